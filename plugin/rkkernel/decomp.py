"""Slabs along z: which global planes each rank owns and which extra planes it holds.

Why slabs along z: every field region of the stencil kernels is (nz, ny, nx)
with z slowest, so a rank's part is one contiguous byte range of each region
(cheap to checkpoint and to read back on another rank count), and a halo is
a few whole planes. The decomposed kernel is the normal kernel on a local
grid of ``lo + owned + hi`` planes: the extra planes are halo planes (copied
from the neighbour) or, at a global edge, nothing (the global boundary plane
is owned by the edge rank and is the local grid's boundary too).

With a halo of ``k`` planes a rank may run ``k`` steps between exchanges
(each step spoils one more plane from the local edge inwards, the owned
planes stay exact): the CPU sweep's fused steps keep their speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .comm import Comm

if TYPE_CHECKING:
    from .runtime import PersistentKernel


@dataclass(frozen=True)
class Slab:
    """One rank's part of the global z axis."""

    rank: int
    ranks: int
    nz: int  # global planes along axis 0 (z) of every field region
    z0: int  # owned global planes [z0, z1)
    z1: int
    lo: int  # local planes held below z0 (halo), 0 at the global bottom
    hi: int  # local planes held above z1 (halo), 0 at the global top

    @property
    def owned(self) -> int:
        return self.z1 - self.z0

    @property
    def local_nz(self) -> int:
        return self.lo + self.owned + self.hi

    @property
    def g0(self) -> int:
        """Global plane of local plane 0."""
        return self.z0 - self.lo

    def local(self, z: int) -> int | None:
        """Local plane of global plane ``z``, or None when this rank does not own it."""
        return z - self.g0 if self.z0 <= z < self.z1 else None

    def owned_slice(self) -> slice:
        """The owned planes as a slice of a local region's axis 0."""
        return slice(self.lo, self.lo + self.owned)

    def take(self, global_array: np.ndarray) -> np.ndarray:
        """This rank's local planes [z0 - lo, z1 + hi) of a global array (z first), contiguous."""
        return np.ascontiguousarray(global_array[self.g0 : self.z1 + self.hi])


def plan(nz: int, ranks: int, halo: int) -> list[Slab]:
    """Split ``nz`` planes over ``ranks``: even, the first ``nz % ranks`` ranks one plane more.

    Each rank must own at least ``max(halo, 2)`` planes: its neighbours' halos
    come from its owned planes only, and a local grid needs an interior.
    Raises ValueError saying how many ranks fit.
    """
    if ranks < 1:
        raise ValueError(f"rank count must be at least 1, got {ranks}")
    if halo < 1:
        raise ValueError(f"halo must be at least 1 plane, got {halo}")
    if nz < 3:
        raise ValueError(f"the grid needs at least 3 planes along z, got {nz}")
    need = max(halo, 2)
    if ranks > 1 and nz // ranks < need:
        fit = max(1, nz // need)
        raise ValueError(
            f"{ranks} ranks do not fit a grid of {nz} planes along z: each rank must own at least {need} planes "
            f"(halo {halo}); use at most {fit} ranks or a larger grid"
        )
    base, extra = divmod(nz, ranks)
    slabs, z = [], 0
    for r in range(ranks):
        n = base + (1 if r < extra else 0)
        lo = halo if r > 0 else 0
        hi = halo if r < ranks - 1 else 0
        slabs.append(Slab(r, ranks, nz, z, z + n, lo, hi))
        z += n
    return slabs


@dataclass
class SlabRun:
    """What a decomposed run needs beyond its local kernel: the comm, the slab, the halo regions."""

    comm: Comm
    slab: Slab
    halo: int  # planes exchanged, and steps run between exchanges
    fields: tuple[str, ...]  # regions whose halo planes are exchanged

    @property
    def root(self) -> bool:
        return self.comm.rank == 0

    def exchange(self, kernel: PersistentKernel) -> None:
        """Fill the halo planes of every field from the neighbours' owned planes (one message each way)."""
        s, b = self.slab, kernel.backend
        low = np.stack([b.read_planes(n, s.lo, s.lo + s.lo) for n in self.fields]) if s.lo else None
        top = s.lo + s.owned
        high = np.stack([b.read_planes(n, top - s.hi, top) for n in self.fields]) if s.hi else None
        got_low, got_high = self.comm.exchange_planes(low, high)
        for i, name in enumerate(self.fields):
            if got_low is not None:
                b.write_planes(name, 0, got_low[i])
            if got_high is not None:
                b.write_planes(name, top, got_high[i])

    def total(self, planes: np.ndarray) -> float:
        """The global Σ of per-plane sums: owned planes gathered on rank 0 in plane order, then broadcast.

        The same additions in the same order as one process's ``combine_planes``.
        """
        from .reduce import combine_planes

        mine = np.ascontiguousarray(np.asarray(planes, dtype=np.float64)[self.slab.owned_slice()])
        parts = self.comm.gather_arrays(mine)
        value = combine_planes(np.concatenate(parts)) if parts is not None else None
        return float(self.comm.bcast_json(value))  # type: ignore[arg-type]

    def gather_field(self, local: np.ndarray) -> np.ndarray | None:
        """The global array from every rank's owned planes, on rank 0 (None elsewhere)."""
        parts = self.comm.gather_arrays(np.ascontiguousarray(local[self.slab.owned_slice()]))
        return None if parts is None else np.concatenate(parts)

    def gather_values(self, cells: Sequence[tuple[int, int, int]], read: Callable[[int, int, int], float]) -> list[float]:
        """Values at global cells (x, y, z), each read by its owner (local z), in order, on every rank."""
        mine = {str(i): read(x, y, lz) for i, (x, y, z) in enumerate(cells) if (lz := self.slab.local(z)) is not None}
        docs = self.comm.gather_json(mine)
        merged: dict[str, float] = {}
        for d in docs or []:
            merged.update(d)  # type: ignore[arg-type]
        values = self.comm.bcast_json([merged[str(i)] for i in range(len(cells))] if docs is not None else None)
        return [float(v) for v in values]  # type: ignore[union-attr]

    def max_int(self, value: int) -> int:
        return self.comm.allreduce_int(int(value), "max")


def slab_run(nz: int, halo: int, fields: tuple[str, ...], comm: Comm | None = None) -> SlabRun | None:
    """The SlabRun of this process when it is one rank of several (None: a single process)."""
    from .comm import world

    c = comm if comm is not None else world()
    if c.size <= 1:
        return None
    return SlabRun(c, plan(nz, c.size, halo)[c.rank], halo, fields)
