"""Checkpoint chains in one folder, and the newest point that can be restored.

A folder holds full checkpoints and deltas named
``<kernel_id>-<step:012d>-<full|delta>.rkcp``. Each delta names its parent
by the content digest of the parent's *materialised* state; each file we
write also records its own materialised digest (``rkckpt.state_digest``), so
the chain structure can be read from headers alone. The JSON index is only a
cache of those headers: when it is missing, damaged or stale it is rebuilt
from the files, which are the truth.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from . import codec, delta, flags, format

try:
    from . import shard
except ImportError:  # pragma: no cover - older checkout
    shard = None  # type: ignore[assignment]
from .errors import CheckpointError
from .model import Checkpoint, ChunkType, Metadata
from .storage.base import Storage, StorageError
from .storage.memory import MemoryStorage

try:  # the streaming reader (sharded files, no whole-file bytes)
    from .io import load as _io_load
except ImportError:  # pragma: no cover - older checkout
    _io_load = None

log = logging.getLogger("rkckpt.chain")

STATE_DIGEST_KEY = "rkckpt.state_digest"
HDR_SHARD = getattr(flags, "HDR_SHARD", 0)
_MAX_STREAM = getattr(shard, "MAX_STREAM", format.MAX_CHECKPOINT_SIZE) if shard is not None else format.MAX_CHECKPOINT_SIZE
INDEX_NAME = "rkckpt-index.json"
INDEX_VERSION = 1
NAME_RE = re.compile(r"^(?P<kernel_id>.+)-(?P<step>\d{12})-(?P<kind>full|delta)\.rkcp$")


def checkpoint_name(kernel_id: str, step: int, kind: str) -> str:
    if kind not in ("full", "delta"):
        raise ValueError(f"kind must be 'full' or 'delta', not {kind!r}")
    return f"{kernel_id}-{step:012d}-{kind}.rkcp"


def newest_named_step(names: Iterable[str]) -> int | None:
    """Highest step among checkpoint file names (by name only: cheap progress checks)."""
    steps = [int(m.group("step")) for m in map(NAME_RE.match, names) if m]
    return max(steps, default=None)


@dataclass
class Entry:
    """What the header and metadata of one checkpoint file say."""

    name: str
    kernel_id: str
    step: int
    kind: str
    size: int
    state_digest: str | None = None
    parent_digest: str | None = None
    checksum: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RestorePoint:
    """A materialised state and the files it was rebuilt from (oldest first)."""

    step: int
    checkpoint: Checkpoint
    chain: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kernel_id: str = ""


def _read_entry(storage: Storage, name: str, size: int | None = None) -> Entry:
    m = NAME_RE.match(name)
    assert m is not None
    e = Entry(name, m["kernel_id"], int(m["step"]), m["kind"], -1)
    try:
        e.size = storage.size(name) if size is None else size
        head = storage.read_range(name, 0, format.HEADER_SIZE + 4)
        hdr = format.parse_header(head, name, max_size=_MAX_STREAM)
        if hdr.flags & HDR_SHARD:  # the first of several streams: it must fit
            if hdr.total_size > e.size:
                raise CheckpointError(name, f"first shard says {hdr.total_size} bytes but the file has {e.size} (truncated)")
        elif hdr.total_size not in (e.size, e.size - (format.HEADER_SIZE - format.REFERENCE_HEADER_SIZE)):
            raise CheckpointError(name, f"total_size field says {hdr.total_size} bytes but the file has {e.size} (truncated or padded)")
        (meta_len,) = struct.unpack_from("<I", head, format.HEADER_SIZE)
        if meta_len > e.size - format.HEADER_SIZE - 4:
            raise CheckpointError(name, f"metadata length {meta_len} exceeds the file")
        raw = storage.read_range(name, format.HEADER_SIZE + 4, meta_len)
        r = format._Reader(memoryview(raw), name)  # noqa: SLF001 - same package
        meta = format._parse_metadata(r)  # noqa: SLF001
        e.checksum = hdr.checksum
        e.parent_digest = meta.parent_digest
        e.state_digest = meta.custom.get(STATE_DIGEST_KEY)
        if (e.parent_digest is None) != (e.kind == "full"):
            raise CheckpointError(name, f"named {e.kind} but its metadata says {'delta' if e.parent_digest else 'full'}")
        if e.kind == "full" and e.state_digest is None:
            # not written by us: the digest of a full file is its own content digest
            e.state_digest = load_checkpoint(storage, name).content_digest()
    except (CheckpointError, StorageError) as exc:
        e.error = exc.problem
    return e


def load_checkpoint(storage: Storage, name: str) -> Checkpoint:
    """Read and fully verify (checksum, sizes) one checkpoint file.

    Local files are parsed by the streaming reader (``rkckpt.io``, which
    also understands sharded files); remote objects are spooled to a
    temporary file first rather than held in memory as one ``bytes``.
    """
    try:
        local = getattr(storage, "local_path", lambda _n: None)(name)
        if _io_load is None:
            return format.parse(storage.load(name), name).checkpoint
        if local is not None:
            return _io_load(local)
        if isinstance(storage, MemoryStorage):
            return format.parse(storage.load(name), name).checkpoint
        with tempfile.NamedTemporaryFile(prefix="rkckpt-dl-", suffix=".rkcp") as tmp:
            storage.copy_to(name, tmp)  # type: ignore[attr-defined]
            tmp.flush()
            return _io_load(tmp.name)
    except CheckpointError as exc:
        if exc.source == name or isinstance(exc, StorageError):
            raise
        raise CheckpointError(name, exc.problem) from None


class ChainIndex:
    """Cached view of the checkpoint files in one storage location."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.entries: dict[str, Entry] = {}
        self.rebuilt = False

    # ------------------------------------------------------------ index file
    def _load_index(self) -> dict[str, Entry]:
        try:
            if not self.storage.exists(INDEX_NAME):
                return {}
            doc = json.loads(self.storage.load(INDEX_NAME))
            if doc.get("version") != INDEX_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            return {n: Entry(**v) for n, v in doc["entries"].items() if NAME_RE.match(n)}
        except (StorageError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.info("checkpoint index in %s is damaged (%s); rebuilding it from the files", self.storage.url, exc)
            self.rebuilt = True
            return {}

    def save(self) -> None:
        doc = {"version": INDEX_VERSION, "entries": {n: asdict(e) for n, e in sorted(self.entries.items())}}
        self.storage.save(INDEX_NAME, json.dumps(doc, indent=1, sort_keys=True).encode())

    def refresh(self) -> list[Entry]:
        """Reconcile the cached index with the objects actually present."""
        cached = self._load_index() if not self.entries else self.entries
        names = [n for n in self.storage.list() if NAME_RE.match(n)]
        out: dict[str, Entry] = {}
        for n in names:
            c = cached.get(n)
            try:
                size = self.storage.size(n)
            except StorageError:
                continue  # vanished between list and stat
            if c is not None and c.size == size and c.error is None:
                out[n] = c
            else:
                out[n] = _read_entry(self.storage, n, size)
        self.entries = out
        return self.sorted()

    def add(self, entry: Entry) -> None:
        self.entries[entry.name] = entry

    def remove(self, name: str) -> None:
        self.entries.pop(name, None)

    def sorted(self, kernel_id: str | None = None) -> list[Entry]:
        es = [e for e in self.entries.values() if kernel_id is None or e.kernel_id == kernel_id]
        return sorted(es, key=lambda e: (e.step, e.kind == "delta", e.name))

    # ------------------------------------------------------------ structure
    def parent_of(self, e: Entry) -> Entry | None:
        """The newest earlier checkpoint whose state the delta ``e`` was made from."""
        if e.kind == "full" or e.parent_digest is None:
            return None
        best = None
        for c in self.entries.values():
            if c.kernel_id == e.kernel_id and c.step < e.step and c.ok and c.state_digest == e.parent_digest:
                if best is None or c.step > best.step:
                    best = c
        return best

    def chain_of(self, e: Entry) -> tuple[list[Entry], str | None]:
        """(entries oldest first, problem or None) for the chain ending at ``e``."""
        chain = [e]
        cur = e
        while cur.kind == "delta":
            if not cur.ok:
                break
            p = self.parent_of(cur)
            if p is None:
                return chain[::-1], f"orphaned: parent state {cur.parent_digest} of {cur.name} is missing or unreadable"
            chain.append(p)
            cur = p
        chain.reverse()
        for c in chain:
            if not c.ok:
                return chain, f"{c.name}: {c.error}" if c is not e else str(c.error)
        return chain, None


_APPLY_PARAMS = frozenset(inspect.signature(delta.apply_delta).parameters)


def _verify_chain(storage: Storage, chain: list[Entry], cache: dict[str, Checkpoint]) -> Checkpoint:
    """Materialise ``chain`` and check every link and the final state digest."""
    state: Checkpoint | None = None
    digest: str | None = None
    for e in chain:
        ck = cache.get(e.name)
        if ck is None:
            ck = load_checkpoint(storage, e.name)
            cache[e.name] = ck
        if state is None:
            state = ck
            digest = ck.content_digest()
        else:
            kw = {"base_digest": digest} if "base_digest" in _APPLY_PARAMS else {}
            state = delta.apply_delta(state, ck, source=e.name, **kw)  # type: ignore[arg-type]
            recorded = ck.metadata.custom.get(STATE_DIGEST_KEY)
            # apply_delta verifies a recorded state digest itself when it can
            digest = recorded if recorded is not None and "verify" in _APPLY_PARAMS else state.content_digest()
        want = ck.metadata.custom.get(STATE_DIGEST_KEY)
        if want is not None and digest != want:
            raise CheckpointError(e.name, f"restored state digest {digest} differs from the recorded {want}")
    assert state is not None
    return state


def latest_restorable(
    storage: Storage,
    kernel_id: str | None = None,
    *,
    index: ChainIndex | None = None,
    warn: bool = True,
    exclude: Iterable[str] = (),
) -> RestorePoint | None:
    """The newest checkpoint whose whole chain back to a full one is present and valid.

    Newer files that cannot be restored are reported in ``skipped`` and with a
    single warning naming them. ``exclude``: names of checkpoints the caller
    could not use (e.g. their state did not fit the kernel); they are passed
    over as restore points, so the next older one is found.
    """
    index = index or ChainIndex(storage)
    index.refresh()
    skipped: list[tuple[str, str]] = []
    cache: dict[str, Checkpoint] = {}
    result: RestorePoint | None = None
    excluded = frozenset(exclude)
    for e in reversed(index.sorted(kernel_id)):
        if e.name in excluded:
            continue
        chain, problem = index.chain_of(e)
        if problem is None:
            try:
                state = _verify_chain(storage, chain, cache)
            except (CheckpointError, StorageError) as exc:
                if exc.source is not None and exc.source != e.name:
                    problem = f"chain broken at {exc.source}: {exc.problem}"
                else:
                    problem = exc.problem
                bad = index.entries.get(exc.source or "")
                if bad is not None:
                    bad.error = exc.problem
            else:
                result = RestorePoint(e.step, state, [c.name for c in chain], skipped, e.kernel_id)
                break
        skipped.append((e.name, problem))
    if skipped and warn:
        log.warning(
            "skipped %d unrestorable newer checkpoint(s) in %s: %s",
            len(skipped),
            storage.url,
            "; ".join(f"{n} ({why})" for n, why in skipped),
        )
    return result


# ---------------------------------------------------------------- listing / gc
@dataclass
class Row:
    entry: Entry
    parent: str | None
    status: str  # "ok" or the problem


def describe(storage: Storage, *, verify: bool = True, kernel_id: str | None = None) -> list[Row]:
    """Every checkpoint with its parent and whether it is restorable."""
    index = ChainIndex(storage)
    index.refresh()
    status: dict[str, str] = {}
    rows = []
    for e in index.sorted(kernel_id):
        if e.ok and verify:
            try:
                load_checkpoint(storage, e.name)
            except (CheckpointError, StorageError) as exc:
                e.error = exc.problem
        parent = index.parent_of(e)
        if not e.ok:
            st = str(e.error)
        elif e.kind == "delta" and parent is None:
            st = f"orphaned: parent state {e.parent_digest} is missing or unreadable"
        elif parent is not None and status.get(parent.name) != "ok":
            st = f"parent {parent.name} is broken"
        else:
            st = "ok"
        status[e.name] = st
        rows.append(Row(e, parent.name if parent else None, st))
    return rows


def plan_gc(index: ChainIndex, keep: int, kernel_id: str | None = None) -> list[str]:
    """Names that can go while keeping the newest ``keep`` complete chains.

    A chain is a valid full checkpoint and every delta descending from it.
    Nothing newer than the oldest kept full checkpoint is touched, so no kept
    delta can lose an ancestor and no in-progress chain is cut.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    entries = index.sorted(kernel_id)
    by_kernel: dict[str, list[Entry]] = {}
    for e in entries:
        by_kernel.setdefault(e.kernel_id, []).append(e)
    doomed: list[str] = []
    for es in by_kernel.values():
        roots = [e for e in es if e.kind == "full" and e.ok]
        if len(roots) <= keep:
            continue
        kept_roots = sorted(roots, key=lambda e: e.step)[-keep:]
        cutoff = kept_roots[0].step
        kept: set[str] = set()
        for e in es:  # everything that chains back to a kept root
            chain, _ = index.chain_of(e)
            if chain and chain[0] in kept_roots:
                kept.update(c.name for c in chain)
        doomed.extend(e.name for e in es if e.step < cutoff and e.name not in kept)
    return doomed


def gc(storage: Storage, keep: int, kernel_id: str | None = None, *, index: ChainIndex | None = None) -> list[str]:
    index = index or ChainIndex(storage)
    index.refresh()
    doomed = plan_gc(index, keep, kernel_id)
    for n in doomed:
        storage.delete(n)
        index.remove(n)
    if doomed:
        index.save()
    return doomed


# ---------------------------------------------------------------- region reads
def read_region(storage: Storage, name: str, region: str) -> np.ndarray:
    """One named region of a *full* checkpoint, read with range requests only.

    Skips every other chunk's payload, so restoring one field from a large
    object-store checkpoint transfers only that field. The file checksum
    (which covers the whole body) is not verified on this path.
    """
    size = storage.size(name)
    head = storage.read_range(name, 0, format.HEADER_SIZE + 4)
    hdr = format.parse_header(head, name)
    (meta_len,) = struct.unpack_from("<I", head, format.HEADER_SIZE)
    if meta_len > size - format.HEADER_SIZE - 4:
        raise CheckpointError(name, f"metadata length {meta_len} exceeds the file")
    r = format._Reader(memoryview(storage.read_range(name, format.HEADER_SIZE + 4, meta_len)), name)  # noqa: SLF001
    meta: Metadata = format._parse_metadata(r)  # noqa: SLF001
    if meta.parent_digest is not None:
        raise CheckpointError(name, "read_region needs a full checkpoint; materialise deltas with latest_restorable")
    info = Checkpoint(meta).regions().get(region)
    if info is None:
        raise CheckpointError(name, f"no region named {region!r}")
    pos = format.HEADER_SIZE + 4 + meta_len
    for i in range(hdr.chunk_count):
        raw = storage.read_range(name, pos, format.CHUNK_HEADER_SIZE)
        if len(raw) != format.CHUNK_HEADER_SIZE:
            raise CheckpointError(name, f"chunk {i} header truncated at offset {pos}")
        ctype, cflags, usize, csize, cid = format._CHUNK.unpack(raw)  # noqa: SLF001
        pos += format.CHUNK_HEADER_SIZE
        if csize > size - pos:
            raise CheckpointError(name, f"chunk {i} declares {csize} data bytes, only {size - pos} present (truncated chunk)")
        if ctype == ChunkType.DEVICE_MEMORY and cid == info.chunk_id:
            payload = storage.read_range(name, pos, csize)
            data = codec.decode_payload(cflags, memoryview(payload), usize, name)
            ck = Checkpoint(meta)
            ck.chunks.append(format.Chunk(ctype, cid, data, codec.logical_flags(cflags)))
            return ck.region(region)
        pos += csize
    raise CheckpointError(name, f"region {region!r} is declared but its chunk is missing")


def names(entries: Iterable[Entry]) -> list[str]:
    return [e.name for e in entries]
