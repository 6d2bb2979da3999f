"""Coordinated checkpoint sets: the parts N ranks wrote at one step, and the commit record written last.

A multi-rank step checkpoints as N ordinary chains, one per rank, under the
kernel id ``<kernel>.r<rank>of<N>``: each rank writes its own *local*
regions (owned planes plus halo/boundary planes) as a full or a delta of its
own chain, in parallel with the others. None of those files is a checkpoint
of the step on its own; the state exists only once rank 0 has written the
*manifest* ``<kernel>-<step:012d>-set<N>.rkset.json`` naming every part with
its content digest and the global planes it owns. The manifest is written
last, with ``Storage.create`` (put-no-replace, atomic, durable), after every
rank reported its part durable: a crash of any rank at any moment leaves
either the previous committed set or the new one, never half a set.

Readers trust nothing they read: the manifest is checked as hostile input
(``rkckpt.setmanifest``: names, data model, bounded parsing), and a part
counts only when its whole chain verifies and its materialised digest is the
one the manifest recorded. A set that fails any check is skipped with a
message naming the part and the reason, and the next older one is used;
nothing here raises for a bad set.

A folder written by a single process (a plain chain of ``<kernel>``) is seen
as a 1-part set, so one restore path serves both, and a state written by N
ranks can be restored on M: ``read_planes`` assembles any global plane range
from only the parts that overlap it, and each part by byte range through
its chain (full and deltas, raw or compressed chunks; ``rkckpt.rangeread``):
the headers and chunk tables, then only the bytes, zstd frames and patch
blocks that hold the planes asked for. ``part_head`` reads a part's metadata
and control chunks the same way, without its regions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .chain import NAME_RE, ChainIndex, Entry, latest_restorable, open_source, verify_chain
from .errors import CheckpointError
from .model import Checkpoint, ChunkType
from .rangeread import ChainReader
from .setmanifest import (
    MAX_MANIFEST_BYTES,
    PART_RE,
    SET_RE,
    SET_SUFFIX,
    CheckpointSet,
    Part,
    SetError,
    check_layout,
    is_part_kernel,
    manifest_bytes,
    manifest_names,
    parse_doc,
    parse_manifest,
    part_kernel_id,
    read_manifest,
    set_name,
)
from .storage.base import Storage, StorageError

log = logging.getLogger("rkckpt.ckptset")

__all__ = [
    "MAX_MANIFEST_BYTES",
    "SET_RE",
    "SET_SUFFIX",
    "CheckpointSet",
    "Part",
    "SetError",
    "SetStatus",
    "check_layout",
    "commit_set",
    "gc_sets",
    "is_part_kernel",
    "latest_set",
    "manifest_bytes",
    "manifest_names",
    "parse_manifest",
    "part_checkpoint",
    "PartHeaders",
    "part_head",
    "part_kernel_id",
    "plain_view",
    "read_planes",
    "read_planes_of",
    "read_replicated",
    "read_replicated_of",
    "read_manifest",
    "scan_sets",
    "set_name",
    "verify_parts",
    "written_part",
]


@dataclass(frozen=True)
class SetStatus:
    """One manifest (or plain chain) as a listing sees it: the set, or why it cannot be restored."""

    name: str
    kernel_id: str
    step: int
    ranks: int
    set: CheckpointSet | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


# ---------------------------------------------------------------- commit
def commit_set(storage: Storage, s: CheckpointSet, *, timeout: float | None = None) -> str:
    """Write the manifest of ``s`` after checking it; return its name.

    Checked first: the layout (``len(parts) == ranks``, planes ``[0, nz)``
    contiguous in rank order) and that every part file exists with the
    recorded digest. Then the manifest is written with ``Storage.create``
    (atomic, durable, never replacing a committed set) and the storage is
    flushed, so when this returns the set exists for every reader. A manifest
    already there for this name with other content (a set of an earlier,
    interrupted run at the same step, whose parts were written over since) is
    replaced atomically, with a warning.

    On two-level storage (``durable``) the manifest must never reach the
    shared store before its parts: this process's uploads of the parts'
    chains are waited for (not newer saves queued behind them), and every
    file of every part's chain must be in the shared store (``SetError``
    naming the first that is not), so the set stays whole when the
    node-local folder is lost. Then the manifest's own upload is waited for.
    ``timeout`` bounds each of those two waits (``StorageError`` past it).
    """
    name = set_name(s.kernel_id, s.step, s.ranks)
    try:
        s = CheckpointSet(s.kernel_id, s.step, s.run_id, s.ranks, s.nz, tuple(s.decomposed), tuple(s.parts), name)
        check = parse_doc(json.loads(s.to_json()), name)
    except ValueError as exc:
        raise SetError(name, f"refusing to commit: {exc}") from None
    index = _index_of(storage, check.parts)
    for p in check.parts:
        e = index.entries.get(p.name)
        if e is None or not e.ok:
            raise SetError(p.name, f"refusing to commit set {name}: part {p.rank} is {'missing' if e is None else e.error}")
        if e.state_digest != p.digest:
            raise SetError(p.name, f"refusing to commit set {name}: part {p.rank} has digest {e.state_digest}, not {p.digest}")
    _check_uploaded(storage, index, check.parts, name, timeout)
    data = s.to_json()
    try:
        storage.create(name, data)
    except StorageError as exc:
        if not storage.exists(name):
            raise
        try:
            same = manifest_bytes(storage, name) == data
        except SetError:
            same = False
        if not same:
            log.warning("replacing the manifest %s of an earlier run (%s)", name, exc.problem)
            storage.save(name, data)
    storage.expedite([name])  # its parts are uploaded: it need not wait behind newer parts' uploads
    storage.wait_uploaded([name], timeout)  # the manifest alone, not the newer parts queued behind it
    if not storage.durable(name):
        raise SetError(name, f"the commit record did not reach the shared store: {storage.upload_failed(name)}")
    return name


def _check_uploaded(storage: Storage, index: ChainIndex, parts: Iterable[Part], name: str, timeout: float | None) -> None:
    """Two-level storage: every file of every part's chain is in the shared store (else ``SetError``)."""
    files = [e.name for p in parts for e in index.chain_of(index.entries[p.name])[0]]
    storage.wait_uploaded(files, timeout)
    for f in files:
        if not storage.durable(f):
            why = storage.upload_failed(f)
            raise SetError(f, f"refusing to commit set {name}: a part is not in the shared store{f': {why}' if why else ' yet'}")


# ---------------------------------------------------------------- verification
class _KernelView:
    """``storage`` with only the checkpoint files of some kernels listed (``kernels``, or those ``keep`` accepts).

    A ``ChainIndex`` over it reads the headers of those files alone: a rank
    restoring planes ``[z0, z1)`` touches only the parts that own them, not
    every part's files (on an object store, each header is a request).
    """

    def __init__(self, storage: Storage, kernels: Iterable[str] = (), keep: Callable[[str], bool] | None = None) -> None:
        self._storage = storage
        self._kernels = frozenset(kernels)
        self._keep = keep

    def list(self) -> list[str]:
        out = []
        for n in self._storage.list():
            m = NAME_RE.match(n)
            if m is not None and (m["kernel_id"] in self._kernels or (self._keep is not None and self._keep(m["kernel_id"]))):
                out.append(n)
        return out

    def __getattr__(self, attr: str) -> object:
        return getattr(self._storage, attr)


def plain_view(storage: Storage) -> Storage:
    """``storage`` as plain-chain tools see it: every checkpoint file except the parts of sets.

    ``rkckpt ls/latest/gc`` hand it to the chain functions, so a part chain is
    never listed, restored or collected as if it were a checkpoint on its own.
    """
    return _KernelView(storage, keep=lambda kid: not is_part_kernel(kid))  # type: ignore[return-value]


def _index_of(storage: Storage, parts: Iterable[Part]) -> ChainIndex:
    """A chain index of just the chains of ``parts`` (never saved: it is partial)."""
    return PartHeaders(storage).covering(parts)


class PartHeaders:
    """The chain headers of a set's parts, each part's read once for all the reads of one restore.

    A rank restoring on a new layout asks for part 0's control chunks, its
    planes from the parts that own them and whole regions from part 0: each
    call would otherwise list the store and read (or stat) the same part's
    chain headers again. Pass one ``PartHeaders`` to ``part_head``,
    ``read_planes_of`` and ``read_replicated_of``; it grows by the parts asked
    for and is never saved (it is partial).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._kids: set[str] = set()
        self._index: ChainIndex | None = None

    def covering(self, parts: Iterable[Part]) -> ChainIndex:
        """An index holding at least the chains of ``parts``."""
        kids = {m["kernel_id"] for p in parts if (m := NAME_RE.match(p.name))} - self._kids
        if kids or self._index is None:
            index = ChainIndex(_KernelView(self.storage, kids))  # type: ignore[arg-type]
            index.refresh()
            if self._index is None:
                self._index = index
            else:  # the views list disjoint kernels: their entries never collide
                self._index.entries.update(index.entries)
            self._kids |= kids
        return self._index


def _headers(storage: Storage, headers: PartHeaders | None) -> PartHeaders:
    if headers is None:
        return PartHeaders(storage)
    if headers.storage is not storage:
        raise ValueError("these part headers were read from another store")
    return headers


def _part_entry(index: ChainIndex, p: Part) -> Entry:
    e = index.entries.get(p.name)
    if e is None:
        raise SetError(p.name, f"part {p.rank} is missing")
    return e


def _materialise(storage: Storage, index: ChainIndex, p: Part) -> Checkpoint:
    """Part ``p``'s state: its whole chain read, applied and checked against the manifest digest."""
    chain, problem = index.chain_of(_part_entry(index, p))
    if problem is not None:
        raise SetError(p.name, f"part {p.rank} cannot be restored: {problem}")
    try:
        state = verify_chain(storage, chain, {})
    except (CheckpointError, StorageError) as exc:
        raise SetError(p.name, f"part {p.rank} is corrupt: {exc}") from None
    got = state.content_digest()
    if got != p.digest:
        raise SetError(p.name, f"part {p.rank} holds state {got}, the manifest says {p.digest}")
    return state


def _check_regions(s: CheckpointSet, p: Part, state: Checkpoint) -> None:
    """The part's decomposed regions hold the planes the manifest says it owns."""
    try:
        regions = state.regions()
    except CheckpointError as exc:
        raise SetError(p.name, f"part {p.rank}: {exc.problem}") from None
    for r in s.decomposed:
        info = regions.get(r)
        if info is None:
            raise SetError(p.name, f"part {p.rank} has no region {r!r}, which the manifest says is decomposed")
        have = info.shape[0] if info.shape else 0
        if p.offset + (p.z1 - p.z0) > have:
            raise SetError(
                p.name,
                f"part {p.rank}: the manifest puts planes [{p.z0}, {p.z1}) at local plane {p.offset} of {r!r}, "
                f"which has only {have} planes",
            )


def verify_parts(storage: Storage, s: CheckpointSet, ranks: Iterable[int], *, index: ChainIndex | None = None) -> None:
    """Full check (every chain read and applied: checksums, digests, shapes) of the parts written by ``ranks`` only.

    Why a subset: a restore on M ranks spreads the check of an N-part set over
    its ranks (part ``p`` by rank ``p % M``), so no rank reads the whole set and
    each reads about twice its own share; ``SetError`` names the first bad part.
    """
    if index is None:
        index = ChainIndex(storage)
        index.refresh()
    wanted = set(ranks)
    for p in s.parts:
        if p.rank in wanted:
            _check_regions(s, p, _materialise(storage, index, p))


def verify_set(storage: Storage, s: CheckpointSet, *, index: ChainIndex | None = None, full: bool = True) -> None:
    """``SetError`` naming the first part that is missing, broken or not what the manifest says.

    ``full``: every part's chain is read and applied (checksums, digests,
    region shapes); otherwise only the chain structure and recorded digests
    from the headers are checked (cheap, for listings).
    """
    if index is None:
        index = ChainIndex(storage)
        index.refresh()
    if full:
        verify_parts(storage, s, (p.rank for p in s.parts), index=index)
        return
    for p in s.parts:
        e = _part_entry(index, p)
        chain, problem = index.chain_of(e)
        if problem is not None:
            raise SetError(p.name, f"part {p.rank} cannot be restored: {problem}")
        if e.state_digest != p.digest:
            raise SetError(p.name, f"part {p.rank} records state {e.state_digest}, the manifest says {p.digest}")


# ---------------------------------------------------------------- restore
def scan_sets(
    storage: Storage,
    kernel_id: str | None = None,
    *,
    run_id: str | None = None,
    full: bool = True,
    stop_at_valid: bool = False,
    index: ChainIndex | None = None,
    exclude: Collection[str] = (),
) -> list[SetStatus]:
    """Every manifest of ``kernel_id`` (all: None), newest first, each with the set or why it is not restorable.

    ``exclude``: manifests already found unusable by a caller's own check (passed over silently).
    """
    if index is None:
        index = ChainIndex(storage)
        index.refresh()
    out = []
    for name in manifest_names(storage, kernel_id):
        if name in exclude:
            continue
        m = SET_RE.match(name)
        assert m is not None
        s: CheckpointSet | None = None
        try:
            s = read_manifest(storage, name)
            if run_id is not None and s.run_id != run_id:
                raise SetError(name, f"written by run {s.run_id!r}, not this run {run_id!r}: sets of other runs are not mixed in")
            verify_set(storage, s, index=index, full=full)
            problem = None
        except SetError as exc:
            problem = str(exc) if exc.source != name else exc.problem
        out.append(SetStatus(name, m["kernel_id"], int(m["step"]), int(m["ranks"]), s, problem))
        if problem is None and stop_at_valid:
            break
    return out


def default_decomposed(ck: Checkpoint) -> tuple[str, ...]:
    """Regions of a plain checkpoint taken as split along axis 0: those of 2+ dimensions with the first one's plane count."""
    regions = sorted((n, i) for n, i in ck.regions().items() if len(i.shape) >= 2)
    if not regions:
        return ()
    nz = regions[0][1].shape[0]
    return tuple(n for n, i in regions if i.shape[0] == nz)


def plain_as_set(kernel_id: str, step: int, chain: Sequence[str], ck: Checkpoint, decomposed: Sequence[str] | None) -> CheckpointSet:
    """A plain single-process chain's restore point as a 1-part set (planes ``[0, nz)`` of its own regions)."""
    dec = tuple(decomposed) if decomposed is not None else default_decomposed(ck)
    regions = ck.regions()
    nz = regions[dec[0]].shape[0] if dec and dec[0] in regions and regions[dec[0]].shape else 0
    return CheckpointSet(kernel_id, step, "", 1, nz, dec, (Part(0, chain[-1], ck.content_digest(), 0, nz, 0),), None)


def latest_set(
    storage: Storage,
    kernel_id: str,
    *,
    run_id: str | None = None,
    decomposed: Sequence[str] | None = None,
    full: bool = True,
    exclude: Collection[str] = (),
) -> CheckpointSet | None:
    """The newest restorable state of ``kernel_id``: a committed, verified set or the plain chain, whichever is newer.

    Sets that cannot be used (a part missing or corrupt, a manifest that lies,
    another run's set when ``run_id`` is given, hostile files) are logged with
    the reason and passed over. ``decomposed`` names the split regions of a
    plain chain (default: ``default_decomposed``). ``full=False`` checks parts
    from their headers only (each rank then reads just the planes it needs;
    the ranks check the parts' contents between them: ``verify_parts``).
    ``exclude``: manifests a caller's own check found unusable.
    """
    plain = latest_restorable(storage, kernel_id, warn=False)
    plain_step = -1 if plain is None else plain.step
    found: CheckpointSet | None = None
    for st in scan_sets(storage, kernel_id, run_id=run_id, full=full, stop_at_valid=True, exclude=exclude):
        if st.step <= plain_step:
            break
        if st.ok:
            found = st.set
            break
        log.warning("skipping checkpoint set %s: %s", st.name, st.problem)
    if found is None and plain is not None:
        found = plain_as_set(kernel_id, plain.step, plain.chain, plain.checkpoint, decomposed)
    return found


def part_checkpoint(storage: Storage, s: CheckpointSet, rank: int) -> Checkpoint:
    """The materialised, verified state of part ``rank`` of ``s`` (its whole chain applied)."""
    if not 0 <= rank < len(s.parts):
        raise ValueError(f"set {s.name or s.kernel_id} has no part {rank}")
    p = s.parts[rank]
    return _materialise(storage, _index_of(storage, [p]), p)


def _part_chain(index: ChainIndex, p: Part) -> list[str] | None:
    """The files of part ``p``'s chain, oldest first, checked from their headers; None when its digest is not recorded.

    The chain must link (parent digests, no broken or orphaned link) and its
    tip must record the state digest the manifest names: then the state can
    be read by range. A tip that records no digest (not written by rkckpt)
    is materialised instead, which computes it.
    """
    e = _part_entry(index, p)
    chain, problem = index.chain_of(e)
    if problem is not None:
        raise SetError(p.name, f"part {p.rank} cannot be restored: {problem}")
    if e.state_digest is None:
        return None
    if e.state_digest != p.digest:
        raise SetError(p.name, f"part {p.rank} records state {e.state_digest}, the manifest says {p.digest}")
    return [c.name for c in chain]


def _range_error(p: Part, exc: CheckpointError) -> SetError:
    where = "" if exc.source in (None, p.name) else f"{exc.source}: "
    return SetError(p.name, f"part {p.rank}: {where}{exc.problem}")


def _part_regions(
    storage: Storage, index: ChainIndex, p: Part, regions: Sequence[str], planes: tuple[int, int] | None = None
) -> list[np.ndarray]:
    """Regions ``regions`` of part ``p``, or just their local ``planes`` ``[a, b)``, read by byte range.

    Through the part's whole chain (full and deltas, raw or compressed
    chunks): its headers and chunk tables once, then for each region only
    the bytes (the frames, the patch blocks) that hold those planes
    (``rkckpt.rangeread``).
    """
    try:
        names = _part_chain(index, p)
        if names is None:
            state = _materialise(storage, index, p)
            return [_cut(p, r, state.region(r), planes) for r in regions]
        with ChainReader(names, lambda n: open_source(storage, n)) as reader:
            return [reader.region(r, planes) for r in regions]
    except KeyError as exc:
        raise SetError(p.name, f"part {p.rank}: {exc.args[0]}") from None
    except SetError:
        raise
    except CheckpointError as exc:  # StorageError too
        raise _range_error(p, exc) from None


def _cut(p: Part, region: str, arr: np.ndarray, planes: tuple[int, int] | None) -> np.ndarray:
    if planes is None:
        return arr
    a, b = planes
    if arr.ndim == 0 or b > arr.shape[0]:
        raise SetError(p.name, f"part {p.rank}: region {region!r} has {arr.shape[:1]} planes, the manifest needs {b}")
    return arr[a:b]


#: The chunks of a state besides its regions: what a rank restoring on another layout takes from part 0.
STATE_CHUNKS = (ChunkType.CONTROL_BLOCK, ChunkType.H2K_QUEUE, ChunkType.K2H_QUEUE, ChunkType.HLC_STATE, ChunkType.HALO_BUFFERS)


def part_head(
    storage: Storage, s: CheckpointSet, rank: int, chunk_types: Iterable[int] = STATE_CHUNKS, *, headers: PartHeaders | None = None
) -> Checkpoint:
    """Part ``rank``'s metadata and its chunks of ``chunk_types`` (no regions), read by byte range through its chain.

    What a rank restoring on a new layout needs of a part besides the planes
    it owns: the identity and region table (metadata) and the control block
    and queues, never the part's other regions.
    """
    if not 0 <= rank < len(s.parts):
        raise ValueError(f"set {s.name or s.kernel_id} has no part {rank}")
    p = s.parts[rank]
    index = _headers(storage, headers).covering([p])
    try:
        names = _part_chain(index, p)
        if names is None:
            full = _materialise(storage, index, p)
            return Checkpoint(full.metadata, [c for t in chunk_types if (c := full.find(int(t))) is not None])
        with ChainReader(names, lambda n: open_source(storage, n)) as reader:
            chunks = [c for t in chunk_types if (c := reader.chunk_data(int(t))) is not None]
            return Checkpoint(reader.metadata, chunks)
    except SetError:
        raise
    except CheckpointError as exc:
        raise _range_error(p, exc) from None


def overlapping(s: CheckpointSet, z0: int, z1: int) -> list[Part]:
    """The parts that own at least one of the global planes ``[z0, z1)``."""
    return [p for p in s.parts if p.z0 < z1 and p.z1 > z0]


def read_planes(storage: Storage, s: CheckpointSet, region: str, z0: int, z1: int) -> np.ndarray:
    """Global planes ``[z0, z1)`` of the decomposed ``region``, assembled from only the parts that own them."""
    return read_planes_of(storage, s, [region], z0, z1)[region]


def read_planes_of(
    storage: Storage, s: CheckpointSet, regions: Sequence[str], z0: int, z1: int, *, headers: PartHeaders | None = None
) -> dict[str, np.ndarray]:
    """``read_planes`` of several regions: each part's chain headers are read once for all of them."""
    for region in regions:
        if region not in s.decomposed:
            raise ValueError(f"region {region!r} is not decomposed in set {s.name or s.kernel_id} (decomposed: {list(s.decomposed)})")
    if not 0 <= z0 < z1 <= s.nz:
        raise ValueError(f"planes [{z0}, {z1}) are not a non-empty range within [0, {s.nz})")
    parts = overlapping(s, z0, z1)
    index = _headers(storage, headers).covering(parts)
    pieces: dict[str, list[np.ndarray]] = {r: [] for r in regions}
    for p in parts:
        a, b = max(z0, p.z0) - p.z0 + p.offset, min(z1, p.z1) - p.z0 + p.offset
        for region, arr in zip(regions, _part_regions(storage, index, p, regions, (a, b)), strict=True):
            got = pieces[region]
            if got and (arr.dtype != got[0].dtype or arr.shape[1:] != got[0].shape[1:]):
                raise SetError(p.name, f"part {p.rank}: region {region!r} is {arr.dtype}{list(arr.shape)}, unlike part 0's")
            got.append(arr)
    return {r: np.concatenate(got, axis=0) if len(got) > 1 else np.array(got[0]) for r, got in pieces.items()}


def read_replicated(storage: Storage, s: CheckpointSet, region: str) -> np.ndarray:
    """A region every rank holds whole (not decomposed), from part 0."""
    return read_replicated_of(storage, s, [region])[region]


def read_replicated_of(
    storage: Storage, s: CheckpointSet, regions: Sequence[str], rank: int = 0, *, headers: PartHeaders | None = None
) -> dict[str, np.ndarray]:
    """Whole regions (not decomposed) from part ``rank``: its chain headers are read once for all of them."""
    for region in regions:
        if region in s.decomposed:
            raise ValueError(f"region {region!r} is decomposed in set {s.name or s.kernel_id}: use read_planes")
    if not 0 <= rank < len(s.parts):
        raise ValueError(f"set {s.name or s.kernel_id} has no part {rank}")
    p = s.parts[rank]
    arrays = _part_regions(storage, _headers(storage, headers).covering([p]), p, regions)
    return {r: np.array(a) for r, a in zip(regions, arrays, strict=True)}


# ---------------------------------------------------------------- retention
def _chains_needed(index: ChainIndex, names: Iterable[str]) -> set[str]:
    keep: set[str] = set()
    for n in names:
        e = index.entries.get(n)
        if e is not None:
            keep.update(c.name for c in index.chain_of(e)[0])
    return keep


#: (storage url, manifest) -> sizes of every file of the set's part chains when it last read back intact.
#: Files are never replaced (``Storage.create``), so the same names and sizes are the same bytes: a
#: kept set is read in full once, not after every commit.
_VERIFIED: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}


def _chain_files(index: ChainIndex, s: CheckpointSet) -> tuple[tuple[str, int], ...]:
    files = _chains_needed(index, [p.name for p in s.parts])
    return tuple(sorted((n, index.entries[n].size) for n in files))


def _reads_back(storage: Storage, index: ChainIndex, st: SetStatus) -> bool:
    """True when every part of ``st`` reads back in full and matches the manifest (remembered per file sizes)."""
    assert st.set is not None
    key, files = (storage.url, st.name), _chain_files(index, st.set)
    if _VERIFIED.get(key) == files:
        return True
    try:
        verify_set(storage, st.set, index=index, full=True)
    except SetError as exc:
        log.warning("not counting checkpoint set %s as kept: %s", st.name, exc)
        return False
    _VERIFIED[key] = files
    return True


def _kept_sets(storage: Storage, index: ChainIndex, statuses: list[SetStatus], keep: int, verify: bool) -> list[SetStatus]:
    """The newest ``keep`` sets that can be restored (read in full with ``verify``), newest first."""
    kept: list[SetStatus] = []
    for st in statuses:
        if len(kept) == keep:
            break
        if st.ok and st.set is not None and (not verify or _reads_back(storage, index, st)):
            kept.append(st)
    return kept


def plan_gc_sets(storage: Storage, kernel_id: str, keep: int, index: ChainIndex, *, verify: bool = True) -> list[str]:
    """What ``gc_sets`` deletes, in order: manifests first, then part files newest step first (deltas before fulls).

    Nothing goes unless ``keep`` newer sets can be restored: with ``verify``
    their parts are read in full (a part with a flipped bit has perfect
    headers; counting its set as kept would delete the last good one).
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    statuses = scan_sets(storage, kernel_id, full=False, index=index)
    if sum(1 for st in statuses if st.ok) <= keep:
        return []  # nothing could go: skip reading the sets
    kept = _kept_sets(storage, index, statuses, keep, verify)
    if len(kept) < keep:
        return []
    cutoff = kept[-1].step
    kept_parts = [p.name for st in kept for p in st.set.parts]  # type: ignore[union-attr]
    doomed_sets = [st.name for st in statuses if st.step < cutoff]
    mine = [e for e in index.sorted() if e.kernel_id == kernel_id or _part_of(e.kernel_id, kernel_id)]
    needed = _chains_needed(index, kept_parts) | _chains_needed(index, [e.name for e in mine if e.step >= cutoff])
    doomed = [e for e in mine if e.step < cutoff and e.name not in needed]
    doomed.sort(key=lambda e: (e.step, e.kind == "delta", e.name), reverse=True)
    return doomed_sets + [e.name for e in doomed]


def _part_of(part_kernel: str, kernel_id: str) -> bool:
    m = PART_RE.match(part_kernel)
    return m is not None and m["kernel_id"] == kernel_id


def gc_sets(storage: Storage, kernel_id: str, keep: int, *, verify: bool = True) -> list[str]:
    """Delete committed sets of ``kernel_id`` older than the ``keep`` newest restorable ones, and the files only they need.

    Manifests go first (a set stops existing before any of its parts is
    touched), then part files and plain-chain files older than the oldest kept
    set, newest step first so a chain loses its deltas before its root. Never
    deleted: any file a kept set's chains need, and anything at or after the
    oldest kept set's step (a newer part may belong to a set in flight) or
    its chain. The kept sets are read back in full first (once per set:
    ``_VERIFIED``); ``verify=False`` trusts their headers. Returns the deleted names.
    """
    index = ChainIndex(storage)
    index.refresh()  # files are never replaced: a cached header whose file has the same size is that file's
    names = plan_gc_sets(storage, kernel_id, keep, index, verify=verify)
    for n in names:
        storage.delete(n)
        index.remove(n)
        _VERIFIED.pop((storage.url, n), None)
    if names:
        index.save()
    return names


def written_part(storage: Storage, kernel_id: str, rank: int, ranks: int, step: int, z0: int, z1: int, offset: int) -> Part:
    """The ``Part`` for what rank ``rank``'s manager wrote at ``step`` (name and digest from the file's header).

    Rank 0 (or each rank, to report to rank 0) builds the manifest's parts
    with it after the part is durable.
    """
    kid = part_kernel_id(kernel_id, rank, ranks)
    index = ChainIndex(_KernelView(storage, [kid]))  # type: ignore[arg-type]
    index.refresh()
    es = [e for e in index.sorted(kid) if e.step == step and e.ok and e.state_digest is not None]
    if not es:
        raise SetError(kid, f"no readable checkpoint of part {rank} of {ranks} at step {step}")
    e = es[-1]
    return Part(rank, e.name, str(e.state_digest), z0, z1, offset)
