"""What one rank of a multi-rank step reads and writes of a checkpoint set (``rkckpt.ckptset``).

Why a module of its own: the step loop (``rkkernel.ranks``) decides *when*;
this says *what*: the rank's slab (:class:`Layout`), the identity every part
carries so a set is only restored into the same simulation whatever the rank
count, the part chain's manager (retention off, no shared index writes), and
how a rank's local state is assembled from a set written by any number of
ranks: its planes of the split regions (``read_planes``), the replicated
regions from part 0, and per-rank fields combined by max (:func:`rank_field`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rkckpt.errors import CheckpointError
from rkckpt.manager import CheckpointManager, CheckpointPolicy, RestorePoint

from .runtime import FINGERPRINT_KEY, RestoreMismatch

if TYPE_CHECKING:
    import numpy as np

    from rkckpt.ckptset import CheckpointSet, PartHeaders
    from rkckpt.model import Checkpoint
    from rkckpt.storage import Storage

    from .runner import StepLoop

#: A part's metadata names the whole simulation (kernel type, global grid, global
#: fingerprint), which a slab's own spec does not: a set restores on another rank count.
IDENTITY_KEY = "rkkernel.set_identity"


def unlocked(storage: Storage) -> Storage:
    """``storage`` without the single-writer folder lock, for ranks other than 0.

    The ranks of one step write one folder together (each its own chain);
    rank 0 holds the lock against other jobs, and taking it would also delete
    the temporary files of the other ranks' writes in flight.
    """
    for s in (storage, getattr(storage, "local", None)):
        if s is not None and hasattr(s, "acquire_lock"):
            s.acquire_lock = lambda: None  # type: ignore[method-assign]
    return storage


@dataclasses.dataclass(frozen=True)
class Layout:
    """This rank's slab: owned global planes [z0, z1) held at local index ``lo``; which regions are split."""

    z0: int
    z1: int
    lo: int
    hi: int
    nz: int
    decomposed: tuple[str, ...]

    @property
    def planes(self) -> tuple[int, int]:
        """The global planes this rank holds locally (owned + halo/boundary planes)."""
        return self.z0 - self.lo, self.z1 + self.hi


def layout_of(loop: StepLoop) -> Layout:
    """The slab of this rank from the kernel run (``KernelRun.decomp.slab``; none: the whole grid).

    The split regions are the kernel's ``decomposed`` names when it declares
    them, else every region of 2+ dimensions whose first axis is the local z axis.
    """
    krun = loop.krun
    nz = int(loop.cfg.grid[2])
    decomp = getattr(krun, "decomp", None)  # rkkernel.decomp.SlabRun of a decomposed kernel
    slab = getattr(decomp, "slab", None) or getattr(krun, "slab", None)
    names = getattr(krun, "decomposed", None) or getattr(krun.spec, "decomposed", None)
    if slab is None:
        z0, z1, lo, hi = 0, nz, 0, 0
    else:
        z0, z1, lo, hi = int(slab.z0), int(slab.z1), int(slab.lo), int(slab.hi)
    local = z1 - z0 + lo + hi
    if names is None:  # the regions whose first axis is the (local) z axis
        names = [r.name for r in krun.spec.regions if r.role != "halo" and len(r.shape) >= 2 and int(r.shape[0]) == local]
    return Layout(z0, z1, lo, hi, nz, tuple(names))


def global_identity(loop: StepLoop) -> dict[str, Any]:
    """What makes two runs the same simulation whatever their rank count (a plain run's fingerprint)."""
    krun, spec = loop.krun, loop.krun.spec
    fp = krun.global_fingerprint or spec.fingerprint()
    return {"kernel_type": spec.kernel_type, "grid": [int(g) for g in loop.cfg.grid], "fingerprint": str(fp)}


def identity_of(ckpt: Checkpoint) -> dict[str, Any]:
    """The simulation a part (or a plain single-process checkpoint) belongs to."""
    m = ckpt.metadata
    raw = m.custom.get(IDENTITY_KEY)
    if raw:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    return {"kernel_type": m.kernel_type, "grid": [int(g) for g in m.grid_size], "fingerprint": str(m.custom.get(FINGERPRINT_KEY))}


def retention_off(policy: CheckpointPolicy) -> CheckpointPolicy:
    """``policy`` with the manager's own retention off: a part file may be needed by a committed set (``gc_sets`` decides)."""
    return dataclasses.replace(policy, keep_chains=None)


def names_in_manifests(storage: Storage, kernel_id: str) -> set[str]:
    """Every part file a manifest of ``kernel_id`` names (manifests that do not parse name none)."""
    from rkckpt.ckptset import manifest_names, read_manifest

    out: set[str] = set()
    for m in manifest_names(storage, kernel_id):
        try:
            out.update(p.name for p in read_manifest(storage, m).parts)
        except (CheckpointError, OSError, ValueError):
            continue
    return out


class PartManager(CheckpointManager):
    """The manager of one rank's part chain: it never writes the shared index file.

    N ranks writing ``rkckpt-index.json`` each with its own view would keep
    overwriting each other's entries; readers rebuild what the index lacks
    from the files' headers, and rank 0's ``gc_sets`` saves one from the files.
    """

    def _save_index(self) -> None:
        return None


def set_to_doc(s: CheckpointSet | None) -> dict[str, Any] | None:
    return None if s is None else dataclasses.asdict(s)


def set_from_doc(doc: Mapping[str, Any]) -> CheckpointSet:
    from rkckpt.ckptset import CheckpointSet, Part

    parts = tuple(Part(**p) for p in doc["parts"])
    return CheckpointSet(**{**doc, "parts": parts, "decomposed": tuple(doc["decomposed"])})


_PART_RE = re.compile(r"^(?P<kid>.+)-(?P<step>\d{12})-(?:full|delta)\.")


def own_files_after(storage: Storage, kernel_id: str, step: int) -> list[str]:
    """This chain's files at a step after ``step``: written but never committed (a set restores before them)."""
    out = []
    for name in storage.list():
        m = _PART_RE.match(name)
        if m and m["kid"] == kernel_id and int(m["step"]) > step:
            out.append(name)
    return out


def rank_field(storage: Storage, s: CheckpointSet, region: str) -> np.ndarray:
    """A field every rank holds whole but computes on its own slab, as the max over the parts.

    Such a field is a per-rank reduction the kernel combines with a max over
    the ranks (traveltime's ``last_change``, the last step its slab changed,
    see ``decomp.SlabRun.max_int``); every new rank starts from the global max,
    so the combined value is the same on any rank count.
    """
    return rank_fields(storage, s, [region])[region]


def rank_fields(storage: Storage, s: CheckpointSet, regions: list[str], headers: PartHeaders | None = None) -> dict[str, np.ndarray]:
    """``rank_field`` of several regions: each part's chain is opened once for all of them."""
    import numpy as np

    from rkckpt.ckptset import PartHeaders, read_replicated_of

    headers = headers or PartHeaders(storage)
    per_part = [read_replicated_of(storage, s, regions, rank=p.rank, headers=headers) for p in s.parts]
    return {r: np.maximum.reduce([values[r] for values in per_part]) for r in regions}


def read_set_state(loop: StepLoop, s: CheckpointSet, rank: int, size: int, layout: Layout) -> RestorePoint:
    """A rank's local state at the set's step: its planes of the split regions, the rest from a part.

    On the slab it wrote itself (same rank count and planes) a rank restores
    its own part as it is: one read. On another layout it reads, by byte
    range, part 0's metadata and control chunks and only the planes it now
    holds from the parts that own them (``rkckpt.rangeread``).
    """
    from rkckpt.ckptset import STATE_CHUNKS, PartHeaders, part_checkpoint, part_head
    from rkckpt.model import Checkpoint

    p = s.parts[rank] if s.name is not None and s.ranks == size else None
    own = p is not None and (p.z0, p.z1, p.offset) == (layout.z0, layout.z1, layout.lo)
    # on a new layout: part 0's metadata and control chunks by byte range, never its regions
    headers = PartHeaders(loop.mgr.storage)  # each part's chain headers read once for this whole restore
    base = part_checkpoint(loop.mgr.storage, s, rank) if own else part_head(loop.mgr.storage, s, 0, headers=headers)
    mine, theirs = global_identity(loop), identity_of(base)
    if mine != theirs:
        raise RestoreMismatch(s.name, f"the set is of another simulation ({theirs}), this run is {mine}")
    spec = loop.krun.spec
    meta = dataclasses.replace(base.metadata, grid_size=tuple(int(g) for g in spec.grid), kernel_id=loop.mgr.kernel_id)
    meta = meta.with_custom(**{FINGERPRINT_KEY: spec.fingerprint()})
    ckpt = Checkpoint(meta, [])
    for t in STATE_CHUNKS:
        c = base.find(int(t))
        if c is not None:
            ckpt.chunks.append(c)
    names = [r.name for r in spec.regions if r.role != "halo"] + [sr.region for sr in loop.krun.series if sr.region in base.regions()]
    arrays = {n: base.region(n) for n in names} if own else _regions_on_new_layout(loop, s, names, layout, headers)
    for name in names:
        ckpt.add_region(name, arrays[name])
    return RestorePoint(s.step, ckpt, [q.name for q in s.parts], kernel_id=loop.cfg.kernel_id)


def _regions_on_new_layout(
    loop: StepLoop, s: CheckpointSet, names: list[str], layout: Layout, headers: PartHeaders
) -> dict[str, np.ndarray]:
    """Regions ``names`` of this rank's new slab, from the parts of a set written on another layout.

    Split regions: only this rank's planes, from the parts that own them;
    per-rank fields: the max over every part; the rest: whole, from part 0.
    ``headers``: each part's chain headers are read once for all of them.
    """
    from rkckpt.ckptset import read_planes_of, read_replicated_of

    storage = loop.mgr.storage
    roles = {r.name: r.role for r in loop.krun.spec.regions}
    split = [n for n in names if n in layout.decomposed]
    fields = [n for n in names if n not in split and roles.get(n, "series") == "field" and len(s.parts) > 1]
    whole = [n for n in names if n not in split and n not in fields]
    out = read_planes_of(storage, s, split, *layout.planes, headers=headers) if split else {}
    if fields:
        out.update(rank_fields(storage, s, fields, headers))
    if whole:
        out.update(read_replicated_of(storage, s, whole, headers=headers))
    return out
