"""Writing checkpoint sets the way ranks do, for the ckptset tests (not a fixture module).

Each part is written by an ordinary ``CheckpointManager`` (retention off)
under the part kernel id; the global arrays are split along axis 0 by hand,
each part holding its owned planes plus one halo plane on each inner side.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rkckpt import ckptset
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import Storage, StorageError

KID = "wave"
NZ = 12
DECOMPOSED = ("p", "q")
HALO = 1


def global_state(step: int, nz: int = NZ) -> dict[str, np.ndarray]:
    """Two decomposed fields and one replicated region; one row of ``p`` changes per step (each part's delta is small)."""
    rng = np.random.default_rng(7)
    p = rng.standard_normal((nz, 6, 5)).astype(np.float32)
    q = np.arange(nz * 6 * 5, dtype=np.float64).reshape(nz, 6, 5)
    p[step % nz, step % 6, :] += step
    return {"p": p, "q": q, "t": np.array([step, 2 * step, 3], dtype=np.int64)}


def split(nz: int, ranks: int) -> list[tuple[int, int]]:
    """Even split of ``nz`` planes, the first ``nz % ranks`` ranks one plane more (as ``rkkernel.decomp.plan``)."""
    base, extra = divmod(nz, ranks)
    out, at = [], 0
    for r in range(ranks):
        n = base + (r < extra)
        out.append((at, at + n))
        at += n
    return out


def local_state(g: dict[str, np.ndarray], step: int, rank: int, ranks: int, kernel_id: str = KID) -> tuple[Checkpoint, int]:
    """Rank ``rank``'s part (owned planes plus halos) as a checkpoint, and the local index of its first owned plane."""
    z0, z1 = split(len(g["p"]), ranks)[rank]
    lo, hi = max(0, z0 - HALO), min(len(g["p"]), z1 + HALO)
    ck = Checkpoint(Metadata(ckptset.part_kernel_id(kernel_id, rank, ranks), "test", step))
    for name in DECOMPOSED:
        ck.add_region(name, g[name][lo:hi].copy())
    ck.add_region("t", g["t"].copy())
    return ck, z0 - lo


def write_plain(storage: Storage, steps: list[int], kernel_id: str = KID) -> None:
    """A single-process run's plain chain of ``kernel_id`` (the whole global state per checkpoint)."""
    mgr = CheckpointManager(storage, CheckpointPolicy(every_steps=1, delta_try_fraction=1.0), kernel_id)
    for step in steps:
        g = global_state(step)
        ck = Checkpoint(Metadata(kernel_id, "test", step))
        for name in sorted(g):
            ck.add_region(name, g[name])
        mgr.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))


def assert_reads_back(storage, s: ckptset.CheckpointSet, step: int, m: int) -> None:
    """On ``m`` ranks, every rank's planes (and the replicated region) equal the global state of ``step``."""
    g = global_state(step)
    for z0, z1 in split(NZ, m):
        for r in DECOMPOSED:
            got = ckptset.read_planes(storage, s, r, z0, z1)
            assert got.dtype == g[r].dtype
            assert np.array_equal(got, g[r][z0:z1])
    assert np.array_equal(ckptset.read_replicated(storage, s, "t"), g["t"])


@dataclass
class SetWriter:
    """``ranks`` managers on one storage writing a set per ``write`` call, committed unless told not to."""

    storage: Storage
    ranks: int
    kernel_id: str = KID
    run_id: str = "run-a"
    full_every: int = 8

    def __post_init__(self) -> None:
        policy = CheckpointPolicy(every_steps=1, keep_chains=None, full_every=self.full_every, delta_try_fraction=1.0)
        self.managers = [
            CheckpointManager(self.storage, policy, ckptset.part_kernel_id(self.kernel_id, r, self.ranks)) for r in range(self.ranks)
        ]

    def write(self, step: int, *, commit: bool = True, g: dict[str, np.ndarray] | None = None) -> ckptset.CheckpointSet:
        g = global_state(step) if g is None else g
        parts = []
        for r, m in enumerate(self.managers):
            ck, offset = local_state(g, step, r, self.ranks, self.kernel_id)
            m.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
            z0, z1 = split(len(g["p"]), self.ranks)[r]
            parts.append(ckptset.written_part(self.storage, self.kernel_id, r, self.ranks, step, z0, z1, offset))
        s = ckptset.CheckpointSet(self.kernel_id, step, self.run_id, self.ranks, len(g["p"]), DECOMPOSED, tuple(parts))
        if commit:
            name = ckptset.commit_set(self.storage, s)
            s = ckptset.CheckpointSet(**{**s.__dict__, "name": name})
        return s


class HeldStore:
    """A shared store for forced windows: uploads of names ``match`` accepts are held (``gate`` clear) or fail (``fail``)."""

    def __init__(self, inner: Any, match: Callable[[str], bool]) -> None:
        self.inner, self.match = inner, match
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.holding = threading.Event()  # set once an upload waits at the gate

    def _check(self, name: str) -> None:
        if self.match(name):
            if not self.gate.is_set():
                self.holding.set()
            if not self.gate.wait(60):
                raise StorageError(name, "the test never released the gate")
            if self.fail:
                raise StorageError(name, "upload refused (test)")

    def save(self, name: str, data: Any) -> int:
        self._check(name)
        return self.inner.save(name, data)

    def put_local(self, path: Any, name: str) -> int:
        self._check(name)
        put = getattr(self.inner, "put_local", None)
        return put(path, name) if put is not None else self.inner.save(name, Path(path).read_bytes())

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)
