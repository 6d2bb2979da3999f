"""Checkpoint chains in one folder, and the newest point that can be restored.

A folder holds full checkpoints and deltas named
``<kernel_id>-<step:012d>-<full|delta>.rk.h5`` (or ``.rkcp``; both forms may
be mixed in one folder and one chain). Each delta names its parent
by the content digest of the parent's *materialised* state; each file we
write also records its own materialised digest (``rkckpt.state_digest``), so
the chain structure can be read from headers alone. The JSON index is only a
cache of those headers: when it is missing, damaged or stale it is rebuilt
from the files, which are the truth.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np

from . import codec, delta, forms, safejson, stream
from .delta import STATE_DIGEST_KEY
from .errors import CheckpointError
from .flags import HDR_SHARD
from .model import Checkpoint, Chunk, ChunkType, Metadata
from .source import Source
from .storage.base import Storage, StorageError

log = logging.getLogger("rkckpt.chain")

INDEX_NAME = "rkckpt-index.json"
INDEX_VERSION = 1
#: the file forms a chain may hold, mixed freely in one folder (format name -> suffix of its file names)
SUFFIXES = {name: form.suffix for name, form in forms.FORMS.items()}
DEFAULT_FORMAT = forms.H5.name
_EXTS = "|".join(sorted(re.escape(form.suffix[1:]) for form in forms.FORMS.values()))  # rk\.h5|rkcp
NAME_RE = re.compile(rf"^(?P<kernel_id>.+)-(?P<step>\d{{12}})-(?P<kind>full|delta)\.(?P<ext>{_EXTS})$")
MAX_INDEX_BYTES = 16 << 20


def checkpoint_name(kernel_id: str, step: int, kind: str, fmt: str = DEFAULT_FORMAT) -> str:
    """``<kernel_id>-<step:012d>-<full|delta>.<rk.h5|rkcp>``."""
    if kind not in ("full", "delta"):
        raise ValueError(f"kind must be 'full' or 'delta', not {kind!r}")
    return f"{kernel_id}-{step:012d}-{kind}{forms.by_format(fmt).suffix}"


def newest_named_step(names: Iterable[str]) -> int | None:
    """Highest step among checkpoint file names (by name only: cheap progress checks)."""
    steps = [int(m.group("step")) for m in map(NAME_RE.match, names) if m]
    return max(steps, default=None)


def _local_path(storage: Storage, name: str) -> object | None:
    """The file behind ``name`` when the storage has one (folder, two-level), else None."""
    local_path = getattr(storage, "local_path", None)
    return None if local_path is None else local_path(name)


def open_source(storage: Storage, name: str) -> Source:
    """The RKCKPT stream of checkpoint ``name``: the file itself, or the stream inside a ``.rk.h5``.

    Local files are read from their path; other storage with range requests
    (an ``.rk.h5`` object's HDF5 structure too), never downloaded whole.
    """
    local = _local_path(storage, name)
    if local is None:
        return forms.for_chain_name(name).open_stream(name, storage)
    # the storage's own folder holds no links: refused when opened, not only when it was looked at
    return forms.for_chain_name(name).open_stream(local, None, follow_links=False)


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


class SelfParentError(CheckpointError):
    """A delta whose parent would be itself (or a newer file): it could never be restored."""


def orphan_problem(e: Entry) -> str:
    """Why the delta ``e`` has no parent; a delta naming its own state is called out as such.

    Such a file is what a writer leaves when it writes a step over itself: its
    parent digest is its own state digest, and the file it replaced is gone.
    """
    if e.parent_digest is not None and e.parent_digest == e.state_digest:
        return f"orphaned: {e.name} names its own state {e.parent_digest} as its parent (a checkpoint written over itself)"
    return f"orphaned: parent state {e.parent_digest} of {e.name} is missing or unreadable"


@dataclass
class RestorePoint:
    """A materialised state and the files it was rebuilt from (oldest first)."""

    step: int
    checkpoint: Checkpoint
    chain: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kernel_id: str = ""


_ENTRY_FIELDS = frozenset(f.name for f in fields(Entry))


def _read_entry(storage: Storage, name: str, size: int | None = None) -> Entry:
    m = NAME_RE.match(name)
    assert m is not None
    e = Entry(name, m["kernel_id"], int(m["step"]), m["kind"], -1)
    try:
        e.size = storage.size(name) if size is None else size
        source = open_source(storage, name)
        try:
            scan = stream.scan(source, chunks=False)
        finally:
            source.close()
        meta = scan.metadata
        e.checksum = scan.header.checksum
        check_identity(name, e.kernel_id, e.step, meta)
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


def check_identity(name: str, kernel_id: str, step: int, meta: Metadata) -> None:
    """The kernel id and step in a file's name must be the ones its metadata records.

    Otherwise a file named step 900 that holds step 5 would send every resume
    back to step 5, and a chain could mix two kernels' files.
    """
    if meta.current_step != step:
        raise CheckpointError(name, f"named step {step} but its metadata says step {meta.current_step}")
    if meta.kernel_id != kernel_id:
        raise CheckpointError(name, f"named for kernel {kernel_id!r} but its metadata says kernel {meta.kernel_id!r}")


def load_checkpoint(storage: Storage, name: str) -> Checkpoint:
    """Read and fully verify (checksum, sizes) one checkpoint file or object (.rkcp or .rk.h5)."""
    try:
        source = open_source(storage, name)
        try:
            return stream.read_source(source, allow_shards=forms.for_chain_name(name).shards).checkpoint
        finally:
            source.close()
    except CheckpointError as exc:
        if exc.source == name or isinstance(exc, StorageError):
            raise
        raise CheckpointError(name, exc.problem) from None


def _cached_entry(name: object, v: object) -> Entry | None:
    """An ``Entry`` from the index file, or None when it is malformed or contradicts its file name."""
    m = NAME_RE.match(name) if isinstance(name, str) else None
    if m is None or not isinstance(v, dict) or set(v) - _ENTRY_FIELDS:
        return None
    opt_str = (type(None), str)
    if not (
        v.get("name") == name
        and v.get("kernel_id") == m["kernel_id"]
        and type(v.get("step")) is int
        and v["step"] == int(m["step"])
        and v.get("kind") == m["kind"]
        and type(v.get("size")) is int
        and v["size"] >= 0
        and isinstance(v.get("state_digest"), opt_str)
        and isinstance(v.get("parent_digest"), opt_str)
        and isinstance(v.get("error"), opt_str)
        and (v.get("checksum") is None or type(v.get("checksum")) is int)
        and (v.get("parent_digest") is None) == (m["kind"] == "full")
    ):
        return None
    return Entry(**v)


_encode_fields = json.JSONEncoder(sort_keys=True).encode


def encode_index(entries: dict[str, Entry], lines: dict[tuple[object, ...], str] | None = None) -> bytes:
    """The index document: ``{"entries": {name: fields}, "version": 1}``, one entry per line.

    Every write saves it, so it is cheap: entries are encoded by the C JSON
    encoder (``indent`` selects the pure-Python one, and
    ``dataclasses.asdict`` deep-copies every field: together some 2.5 ms per
    write at 40 entries), and ``lines``, when given, holds each entry's line
    by its field values from the previous save (replaced by this save's), so
    an unchanged entry is not encoded again: about 25 us at 40 entries.
    """
    fresh: dict[tuple[object, ...], str] = {}
    out = []
    for _, e in sorted(entries.items()):
        fields_ = vars(e)
        if len(fields_) != len(_ENTRY_FIELDS):  # an attribute set on the side is not a field: never saved
            fields_ = {f: fields_[f] for f in _ENTRY_FIELDS}
        key = tuple(fields_.values())
        line = lines.get(key) if lines is not None else None
        if line is None:
            line = f"{json.dumps(e.name)}: {_encode_fields(fields_)}"
        fresh[key] = line
        out.append(line)
    if lines is not None:
        lines.clear()
        lines.update(fresh)
    return ('{"entries": {\n' + ",\n".join(out) + f'\n}}, "version": {INDEX_VERSION}}}\n').encode()


class ChainIndex:
    """Cached view of the checkpoint files in one storage location."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.entries: dict[str, Entry] = {}
        self.rebuilt = False
        self.verified: dict[str, int] = {}  # name -> size of full files read back completely (retention)
        self.unverified: set[str] = set()  # entries taken from the index file, not yet read from their files
        self._lines: dict[tuple[object, ...], str] = {}  # each entry's line in the saved index, by its values (encode_index)

    # ------------------------------------------------------------ index file
    def _load_index(self) -> dict[str, Entry]:
        try:
            if not self.storage.exists(INDEX_NAME):
                return {}
            size = self.storage.size(INDEX_NAME)
            if size > MAX_INDEX_BYTES:
                raise ValueError(f"{size} bytes, more than the {MAX_INDEX_BYTES} an index may have")
            doc = safejson.loads(self.storage.load(INDEX_NAME), max_bytes=MAX_INDEX_BYTES)
            if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION or not isinstance(doc.get("entries"), dict):
                raise ValueError("not a version 1 index")
            out = {}
            for n, v in doc["entries"].items():
                e = _cached_entry(n, v)
                if e is not None:  # entries that contradict their own file name are dropped: re-read from the file
                    out[n] = e
            if len(out) != len(doc["entries"]):
                log.info("ignoring %d inconsistent entries of the checkpoint index in %s", len(doc["entries"]) - len(out), self.storage.url)
            return out
        except (StorageError, ValueError) as exc:
            log.info("checkpoint index in %s is damaged (%s); rebuilding it from the files", self.storage.url, exc)
            self.rebuilt = True
            return {}

    def save(self, *, durable: bool = True) -> None:
        """Write the index; ``durable=False``: atomic but not fsynced where the storage can (it is a cache)."""
        save = self.storage.save if durable else getattr(self.storage, "save_cache", self.storage.save)
        save(INDEX_NAME, encode_index(self.entries, self._lines))

    def refresh(self, *, trust_cache: bool = True) -> list[Entry]:
        """Reconcile the cached index with the objects actually present.

        With ``trust_cache=False`` every header is read from the files again
        (what a full listing or gc does, and restore when the cache led it astray).
        """
        if not trust_cache:
            cached: dict[str, Entry] = {}
        elif self.entries:
            cached = self.entries
        else:
            cached = self._load_index()
            self.unverified = set(cached)
        names = [n for n in self.storage.list() if NAME_RE.match(n)]
        out: dict[str, Entry] = {}
        for n in names:
            c = cached.get(n)
            try:
                size = self.storage.size(n)
            except StorageError:
                if not self.storage.exists(n):  # raises when we may not even look
                    continue  # vanished between list and stat
                raise
            if c is not None and c.size == size and c.error is None:
                out[n] = c
            else:
                out[n] = _read_entry(self.storage, n, size)
                self.unverified.discard(n)
        self.entries = out
        self.unverified &= set(out)
        return self.sorted()

    def add(self, entry: Entry) -> None:
        self.entries[entry.name] = entry
        self.unverified.discard(entry.name)

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
                return chain[::-1], orphan_problem(cur)
            chain.append(p)
            cur = p
        chain.reverse()
        for c in chain:
            if not c.ok:
                return chain, f"{c.name}: {c.error}" if c is not e else str(c.error)
        return chain, None


def verify_chain(storage: Storage, chain: list[Entry], cache: dict[str, Checkpoint]) -> Checkpoint:
    """Materialise ``chain`` and check every link and the final state digest."""
    state: Checkpoint | None = None
    digest: str | None = None
    for e in chain:
        ck = cache.get(e.name)
        if ck is None:
            ck = load_checkpoint(storage, e.name)
            cache[e.name] = ck
        check_identity(e.name, e.kernel_id, e.step, ck.metadata)
        if state is None:
            state = ck
            digest = ck.content_digest()
        else:
            state = delta.apply_delta(state, ck, source=e.name, base_digest=digest)
            recorded = ck.metadata.custom.get(STATE_DIGEST_KEY)
            # apply_delta verified a recorded state digest itself
            digest = recorded if recorded is not None else state.content_digest()
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
    result, skipped = _newest_restorable(storage, kernel_id, index, exclude)
    if skipped and index.unverified:
        # the index file is a cache: when it led us past a file, ask the files themselves
        index.refresh(trust_cache=False)
        result, skipped = _newest_restorable(storage, kernel_id, index, exclude)
    if skipped and warn:
        log.warning(
            "skipped %d unrestorable newer checkpoint(s) in %s: %s",
            len(skipped),
            storage.url,
            "; ".join(f"{n} ({why})" for n, why in skipped),
        )
    return result


def _newest_restorable(
    storage: Storage, kernel_id: str | None, index: ChainIndex, exclude: Iterable[str] = ()
) -> tuple[RestorePoint | None, list[tuple[str, str]]]:
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
                state = verify_chain(storage, chain, cache)
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
    return result, skipped


# ---------------------------------------------------------------- listing / gc
@dataclass
class Row:
    entry: Entry
    parent: str | None
    status: str  # "ok" or the problem


def describe(storage: Storage, *, verify: bool = True, kernel_id: str | None = None) -> list[Row]:
    """Every checkpoint with its parent and whether it is restorable.

    With ``verify`` every file is read in full and every chain is applied,
    so a delta whose recorded state digest is not what applying it gives is
    reported, not just one whose bytes are damaged. A materialised state is
    kept only until the last delta that builds on it has been checked.
    """
    index = ChainIndex(storage)
    index.refresh(trust_cache=not verify)  # a full check reads every file anyway: take nothing from the cache
    entries = index.sorted(kernel_id)
    parents = {e.name: index.parent_of(e) for e in entries}
    readers = Counter(p.name for p in parents.values() if p is not None)
    states: dict[str, Checkpoint] = {}
    status: dict[str, str] = {}
    rows = []
    for e in entries:
        parent = parents[e.name]
        if e.ok and verify:
            try:
                _check_state(storage, e, states.get(parent.name) if parent is not None else None, states, readers)
            except (CheckpointError, StorageError) as exc:
                e.error = exc.problem
        if parent is not None:
            readers[parent.name] -= 1
            if not readers[parent.name]:
                states.pop(parent.name, None)
        if not e.ok:
            st = str(e.error)
        elif e.kind == "delta" and parent is None:
            st = orphan_problem(e)
        elif parent is not None and status.get(parent.name) != "ok":
            st = f"parent {parent.name} is broken"
        else:
            st = "ok"
        status[e.name] = st
        rows.append(Row(e, parent.name if parent else None, st))
    return rows


def _check_state(storage: Storage, e: Entry, base: Checkpoint | None, states: dict[str, Checkpoint], readers: Counter[str]) -> None:
    """Read ``e`` in full; materialise it on ``base`` (its parent's state) and check its state digest."""
    ck = load_checkpoint(storage, e.name)
    if e.kind == "full":
        state: Checkpoint | None = ck
        got = ck.content_digest()
        if e.state_digest is not None and got != e.state_digest:
            raise CheckpointError(e.name, f"content digest {got} differs from the recorded state digest {e.state_digest}")
    elif base is not None:
        state = delta.apply_delta(base, ck, source=e.name)  # checks the recorded state digest
    else:
        state = None  # orphaned or after a broken link: reported from the structure
    if state is not None and readers[e.name]:
        states[e.name] = state


# ---------------------------------------------------------------- region reads
def read_region(storage: Storage, name: str, region: str) -> np.ndarray:
    """One named region of a *full* checkpoint, read with range requests only.

    Skips every other chunk's payload, so restoring one field from a large
    object-store checkpoint transfers only that field (for ``.rk.h5``: the
    HDF5 structure, then the region's slice of the stream). The file
    checksum (which covers the whole body) is not verified on this path.
    """
    source = open_source(storage, name)
    try:
        scan = stream.scan(source)
        meta = scan.metadata
        if meta.parent_digest is not None:
            raise CheckpointError(name, "read_region needs a full checkpoint; materialise deltas with latest_restorable")
        if scan.header.flags & HDR_SHARD:  # a region may be split over shards: read them all
            return stream.read_source(source).checkpoint.region(region)
        form = forms.for_chain_name(name)
        if form.read_region is not None:
            local = _local_path(storage, name)
            if local is None:
                return form.read_region(name, region, storage)
            return form.read_region(local, region, None, follow_links=False)
        info = Checkpoint(meta).regions().get(region)
        if info is None:
            raise CheckpointError(name, f"no region named {region!r}")
        for ch in scan.chunk_headers:
            if ch.chunk_type == ChunkType.DEVICE_MEMORY and ch.chunk_id == info.chunk_id:
                payload = source.read(ch.data_offset, ch.compressed_size)
                data = codec.decode_payload(ch.flags, payload, ch.uncompressed_size, name)
                ck = Checkpoint(meta, [Chunk(ch.chunk_type, ch.chunk_id, data, codec.logical_flags(ch.flags))])
                return ck.region(region)
    finally:
        source.close()
    raise CheckpointError(name, f"region {region!r} is declared but its chunk is missing")
