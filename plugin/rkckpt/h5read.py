"""The ``.rk.h5`` reader: the embedded stream, the attributes, /index and /regions, region and chunk reads, ``check_h5``.

See ``rkckpt.hdf5`` for the layout. The stream is parsed and checked by
``rkckpt.stream`` (once); the HDF5 extras are read through libhdf5 only
after ``h5probe`` has read them in a forked child.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from . import codec, h5layout, h5probe, stream
from .crc import crc32
from .errors import CheckpointError
from .flags import CHUNK_BLOCK_DELTA, CHUNK_PART
from .h5schema import (
    INDEX,
    MAX_REGIONS,
    REGIONS,
    STREAM,
    WRAPPER,
    WRAPPER_VERSION,
    IndexEntry,
    scratch_folder,
)
from .layout import CHUNK_HEADER_SIZE, HEADER_SIZE, MAX_CHECKPOINT_SIZE, unpack_chunk
from .model import ChunkType, RegionInfo
from .source import FileSource, RangeSource, Source, StorageSource

MAX_STRUCTURE = 64 << 20  # bytes of HDF5 structure copied locally for a storage object's extras
_PIECE = 16 << 20  # bytes per range read when an object is copied locally


_H5_FAILURES = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError)
F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Errors h5py raises on a damaged file become a CheckpointError naming it."""

    @functools.wraps(fn)
    def wrapper(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(path, *args, **kwargs)
        except CheckpointError:
            raise
        except _H5_FAILURES as exc:
            raise CheckpointError(path, f"damaged HDF5 structure: {type(exc).__name__}: {exc}") from None

    return wrapper  # type: ignore[return-value]


class _Opened:
    """An open ``.rk.h5`` whose wrapper identity, stream dataset and stream size were checked.

    ``stream`` is a byte-range source over the embedded RKCKPT stream: the
    dataset's bytes in the file (or storage object), read with plain reads.

    Files laid out as this module writes them are located by
    ``h5layout.locate`` (pure Python, bounded, no libhdf5, no h5py import):
    the hot path of restore, ``ls``, ``latest`` and ``gc``. Any other layout,
    and the HDF5 extras (attributes, ``/index``, ``/regions``), go through
    libhdf5, but only after ``probe`` has read the same structure in a forked
    child with a timeout: libhdf5 can spin forever or crash on damaged
    metadata. The dataset must be a plain contiguous one stored in this file
    and inside it: external storage, external or soft links, virtual, chunked
    and compressed datasets are refused without reading them, since following
    them would read whatever other file they name or allocate whatever size
    they declare.
    """

    def __init__(self, path: str | os.PathLike[str], storage: Any = None, *, libhdf5: bool = False, follow_links: bool = True) -> None:
        self.source = os.fspath(path)
        self.storage = storage
        self.raw: Source
        self.file: Any = None  # h5py.File, opened only when the extras are needed
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.located: h5layout.Located | None = None
        if storage is None:
            self.raw = FileSource(self.source, follow_links=follow_links)  # refuses FIFOs and devices without blocking
        else:
            self.raw = StorageSource(storage, self.source)
        try:
            if not h5layout.has_signature(self.raw):
                raise CheckpointError(self.source, "not an HDF5 file (no HDF5 signature)")
            why = "libhdf5 asked for"
            if not libhdf5:
                try:
                    self.located = h5layout.locate(self.raw)
                except h5layout.NotFixedLayout as exc:
                    why = str(exc)
                except CheckpointError as exc:
                    raise CheckpointError(self.source, exc.problem) from None
            if self.located is not None:
                self._check_located(self.located)
            elif storage is not None:  # another layout (an older writer's, another tool's): libhdf5 on a local copy
                local = self._download(why)
                self.raw.close()  # type: ignore[attr-defined]
                self.raw = FileSource(local)  # stays readable after the copy's folder is removed (open descriptor)
                self._open_h5(local, probed=False)
                self._check()
            else:
                self._open_h5(self.source, probed=libhdf5)
                self._check()
        except BaseException:
            self.close()
            raise
        self.stream.name = self.source

    def _check_located(self, loc: h5layout.Located) -> None:
        if loc.wrapper != WRAPPER:
            raise CheckpointError(self.source, "HDF5 file is not an rkckpt checkpoint (no rkckpt.wrapper attribute or /rkckpt dataset)")
        if not 1 <= loc.wrapper_version <= WRAPPER_VERSION:
            raise CheckpointError(self.source, f"unsupported .rk.h5 wrapper version {loc.wrapper_version!r}")
        self.length = loc.length
        if self.length > MAX_CHECKPOINT_SIZE + HEADER_SIZE:
            raise CheckpointError(self.source, f"/rkckpt holds {self.length} bytes, over the RKCKPT limit")
        self.stream: Source = RangeSource(self.raw, loc.offset, loc.length)

    def _open_h5(self, local: str, *, probed: bool) -> None:
        """Open ``local`` with h5py, after a probe in a child unless this process is that child."""
        if not probed:
            try:
                probe(local)
            except CheckpointError as exc:
                raise CheckpointError(self.source, exc.problem) from None
        import h5py

        try:
            self.file = h5py.File(local, "r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.source, f"cannot open as HDF5: {exc}") from None
        self._check_same_file()

    def _check_same_file(self) -> None:
        """libhdf5 opened the path again: it must be the file already open here (never a link swapped in since)."""
        fd = getattr(self.raw, "fd", None)
        if fd is None:
            return
        try:
            a, b = os.fstat(fd), os.fstat(self.file.id.get_vfd_handle())
        except (OSError, ValueError, TypeError):  # a driver without a file descriptor: nothing to compare
            return
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise CheckpointError(self.source, "the file changed while it was being opened (replaced, or a link swapped in)")

    def _structure(self) -> Any:
        """The h5py file for the extras, probed first (a storage object: its structure copied locally)."""
        if self.file is None:
            if self.storage is None:
                self._open_h5(self.source, probed=False)
            else:
                self._open_h5(self._local_structure(), probed=False)
        return self.file

    def _local_structure(self) -> str:
        """A sparse local file with the object's HDF5 structure (all but the stream's bytes).

        The writer puts every HDF5 structure before or after ``/rkckpt``, so
        this is a few KiB whatever the stream's size; libhdf5 reads it (after
        the probe) while the stream itself stays a range-read source.
        """
        loc = self.located
        assert loc is not None
        tail = self.raw.size - loc.offset - loc.length
        if loc.offset > MAX_STRUCTURE or tail > MAX_STRUCTURE:
            raise CheckpointError(self.source, f"HDF5 structure outside /rkckpt is over {MAX_STRUCTURE} bytes: not read")
        self._scratch = tempfile.TemporaryDirectory(prefix="rkckpt-h5s-", dir=scratch_folder())
        local = os.path.join(self._scratch.name, "structure.h5")
        with open(local, "wb") as fh:
            fh.write(self.raw.read(0, loc.offset))
            fh.seek(loc.offset + loc.length)
            fh.write(self.raw.read(loc.offset + loc.length, tail))
            fh.truncate(self.raw.size)
        return local

    def _download(self, why: str) -> str:
        """The whole object copied to a local scratch file, in bounded pieces (a layout only libhdf5 reads)."""
        size = self.raw.size
        if size > MAX_CHECKPOINT_SIZE + (64 << 20):
            raise CheckpointError(self.source, f"not laid out as rkckpt writes .rk.h5 files ({why}) and too large to copy locally")
        self._scratch = tempfile.TemporaryDirectory(prefix="rkckpt-h5o-")
        local = os.path.join(self._scratch.name, "object.h5")
        with open(local, "wb") as fh:
            for at in range(0, size, _PIECE):
                fh.write(self.raw.read(at, min(_PIECE, size - at)))
        return local

    def _check(self) -> None:
        """Wrapper identity, then the stream dataset's link, type, shape and storage (through libhdf5).

        With h5py's low-level calls: the same checks as the high-level API,
        at a fifth of its cost.
        """
        import h5py

        fid = self.file.id
        marker = _scalar_attr(fid, b"rkckpt.wrapper")
        if isinstance(marker, bytes):
            marker = marker.decode("utf-8", "replace")
        name = STREAM.encode()
        if fid.links.exists(name):
            kind = fid.links.get_info(name).type
            if kind != h5py.h5l.TYPE_HARD:
                what = _LINK_KINDS.get(kind, f"link of type {kind}")
                raise CheckpointError(self.source, f"/rkckpt is a {what}, not a dataset stored in this file: refused")
            ds = h5py.h5o.open(fid, name)
        else:
            ds = None
        if not isinstance(marker, str) or marker != WRAPPER or not isinstance(ds, h5py.h5d.DatasetID):
            raise CheckpointError(self.source, "HDF5 file is not an rkckpt checkpoint (no rkckpt.wrapper attribute or /rkckpt dataset)")
        version = _scalar_attr(fid, b"wrapper_version")
        if not isinstance(version, (int, np.integer)) or int(version) > WRAPPER_VERSION or int(version) < 1:
            raise CheckpointError(self.source, f"unsupported .rk.h5 wrapper version {version!r}")
        if ds.dtype != np.uint8 or ds.rank != 1:
            raise CheckpointError(self.source, f"/rkckpt must be a 1-D uint8 dataset, found {ds.dtype} with shape {ds.shape}")
        dcpl = ds.get_create_plist()
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise CheckpointError(self.source, "/rkckpt is a virtual dataset (it maps other files): refused")
        if dcpl.get_external_count():
            raise CheckpointError(self.source, "/rkckpt uses HDF5 external storage (its bytes live in other files): refused")
        self.length = int(ds.shape[0])
        if self.length > MAX_CHECKPOINT_SIZE + HEADER_SIZE:
            raise CheckpointError(self.source, f"/rkckpt holds {self.length} bytes, over the RKCKPT limit")
        if layout != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters():
            what = {h5py.h5d.CHUNKED: "chunked", h5py.h5d.COMPACT: "compact"}.get(layout, f"layout {layout}")
            filters = " and filtered" if dcpl.get_nfilters() else ""
            raise CheckpointError(
                self.source, f"/rkckpt is stored {what}{filters}, not contiguous: refused without reading it (rkckpt writes it contiguous)"
            )
        offset = ds.get_offset()
        if offset is None or int(offset) + self.length > self.raw.size:
            where = "unallocated" if offset is None else f"at offset {offset}"
            raise CheckpointError(
                self.source, f"/rkckpt claims {self.length} bytes {where}, but the file holds {self.raw.size} bytes: refused"
            )
        self.stream = RangeSource(self.raw, int(offset), self.length)

    def read(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop) of the stream, reading only that slice."""
        if start < 0 or stop > self.length or start > stop:
            raise CheckpointError(self.source, f"range {start}..{stop} lies outside the {self.length}-byte stream")
        return self.stream.read(start, stop - start)

    def index(self, chunk_count: int | None) -> list[IndexEntry]:
        """The /index rows; ``chunk_count`` None (the probe, which does not read the stream): at most MAX_REGIONS rows."""
        import h5py

        ds = self._structure().get(INDEX)
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(self.source, "missing /index dataset")
        if chunk_count is None and ds.ndim == 1 and ds.shape[0] > MAX_REGIONS:
            raise CheckpointError(self.source, f"/index has shape {ds.shape}, over {MAX_REGIONS} rows")
        if ds.ndim != 1 or (chunk_count is not None and ds.shape[0] != chunk_count):  # bounded before reading
            raise CheckpointError(self.source, f"/index has shape {ds.shape}, the stream has {chunk_count} chunks")
        try:
            rows = ds[()]
            return [
                IndexEntry(
                    int(r["type"]),
                    int(r["id"]),
                    _text(r["name"]),
                    int(r["offset"]),
                    int(r["stored_size"]),
                    int(r["uncompressed_size"]),
                    int(r["flags"]),
                    int(r["crc32"]),
                )
                for r in np.atleast_1d(rows)
            ]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(self.source, f"/index is malformed: {exc}") from None

    def chunk_count(self) -> int:
        return stream.scan(self.stream, chunks=False).header.chunk_count

    def regions(self) -> dict[str, RegionInfo]:
        import h5py

        ds = self._structure().get(REGIONS)
        if not isinstance(ds, h5py.Dataset):
            return {}
        if ds.ndim != 1 or ds.shape[0] > MAX_REGIONS:  # bounded before reading
            raise CheckpointError(self.source, f"/regions has shape {ds.shape}, over {MAX_REGIONS} rows")
        try:
            out = {}
            for r in np.atleast_1d(ds[()]):
                info = RegionInfo(_text(r["name"]), _text(r["dtype"]), tuple(int(s) for s in r["shape"]), int(r["chunk_id"]))
                np.dtype(info.dtype)
                out[info.name] = info
            return out
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CheckpointError(self.source, f"/regions is malformed: {exc}") from None

    def attrs(self) -> dict[str, object]:
        return {
            k: (_text(v) if isinstance(v, (bytes, str)) else v.item() if isinstance(v, np.generic) else v)
            for k, v in self._structure().attrs.items()
        }

    def close_structure(self) -> None:
        """Close HDF5 (and its local copy of a storage object's structure); the stream source stays open."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def close(self) -> None:
        self.close_structure()
        self.raw.close()  # type: ignore[attr-defined]

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LINK_KINDS = {1: "SoftLink", 64: "ExternalLink"}  # h5py.h5l.TYPE_SOFT, TYPE_EXTERNAL (h5py's class names)


def _scalar_attr(oid: Any, name: bytes) -> object:
    """A scalar attribute of ``oid`` (None when absent or not a scalar): bytes, a NumPy scalar, ..."""
    import h5py

    if not h5py.h5a.exists(oid, name):
        return None
    attr = h5py.h5a.open(oid, name)
    if attr.get_space().get_simple_extent_type() != h5py.h5s.SCALAR or attr.dtype.itemsize > 4096:
        return None  # ours are scalars of a few bytes; an array or a huge fixed-size type is not read
    out = np.empty((), dtype=attr.dtype)
    attr.read(out)
    return out[()]


def _text(v: object) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _read_structure(src: str) -> None:
    """What a probe's child reads with libhdf5: the structure only (the stream is read with plain reads, and checked there)."""
    with _Opened(src, libhdf5=True) as h:
        h.attrs()
        h.index(None)
        h.regions()


def probe(path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
    """Read the file's HDF5 structure with libhdf5 in a forked child before trusting it here (``h5probe.probe``)."""
    h5probe.probe(path, _read_structure, timeout=timeout)


@_guarded
def read_stream(path: str | os.PathLike[str]) -> bytes:
    """The embedded RKCKPT stream, byte-exact (what ``h5dump -b`` extracts)."""
    with _Opened(path) as h:
        return bytes(h.read(0, h.length))


@_guarded
def open_stream(path: str | os.PathLike[str], storage: Any = None, *, follow_links: bool = True) -> Source:
    """A byte-range source over the stream inside a ``.rk.h5`` (HDF5 structure checked first).

    The HDF5 file is closed again; the caller closes the returned source.
    ``follow_links=False``: a symbolic link under ``path`` is refused when it is opened.
    """
    h = _Opened(path, storage, follow_links=follow_links)
    h.close_structure()
    return h.stream


@_guarded
def read(path: str | os.PathLike[str], storage: Any = None) -> stream.ParsedFile:
    """Parse the stream embedded in a ``.rk.h5`` file (or, with ``storage``, object)."""
    with _Opened(path, storage) as h:
        return stream.read_source(h.stream, allow_shards=False)


@_guarded
def attributes(path: str | os.PathLike[str]) -> dict[str, object]:
    """Root attributes (kernel id, step, kind, digests) without reading the stream."""
    with _Opened(path) as h:
        return h.attrs()


@_guarded
def read_index(path: str | os.PathLike[str]) -> list[IndexEntry]:
    with _Opened(path) as h:
        return h.index(h.chunk_count())


def _read_entry(h: _Opened, entry: IndexEntry, what: str) -> bytes | memoryview:
    if entry.flags & CHUNK_PART:
        raise CheckpointError(h.source, f"{what} is a piece of a sharded chunk, which .rk.h5 files do not support")
    if entry.flags & CHUNK_BLOCK_DELTA:
        raise CheckpointError(h.source, f"{what} is stored as a block-delta patch; apply the chain to a full checkpoint first")
    if entry.offset < HEADER_SIZE + CHUNK_HEADER_SIZE or entry.offset + entry.stored_size > h.length:
        raise CheckpointError(h.source, f"/index entry for {what} points outside the stream")
    # the 32-byte chunk header right before the payload must agree with the index
    raw = h.read(entry.offset - CHUNK_HEADER_SIZE, entry.offset + entry.stored_size)
    ch = unpack_chunk(raw[:CHUNK_HEADER_SIZE], entry.offset)
    if (ch.chunk_type, ch.flags, ch.uncompressed_size, ch.compressed_size, ch.chunk_id) != (
        entry.chunk_type,
        entry.flags,
        entry.uncompressed_size,
        entry.stored_size,
        entry.chunk_id,
    ):
        raise CheckpointError(h.source, f"/index entry for {what} disagrees with the chunk header in the stream")
    if ch.uncompressed_size > MAX_CHECKPOINT_SIZE:
        raise CheckpointError(h.source, f"{what} declares uncompressed_size {ch.uncompressed_size} over the limit")
    try:
        data = codec.decode_payload(ch.flags, raw[CHUNK_HEADER_SIZE:], ch.uncompressed_size, h.source)
    except CheckpointError as exc:
        raise CheckpointError(h.source, f"{what}: {exc.problem}") from None
    if crc32(data) != entry.crc32:
        raise CheckpointError(h.source, f"{what}: CRC-32 mismatch (data corrupt)")
    return data


@_guarded
def read_region(path: str | os.PathLike[str], name: str, storage: Any = None, *, follow_links: bool = True) -> np.ndarray:
    """One named region as an array, reading only its slice of the stream (also from a storage object)."""
    with _Opened(path, storage, follow_links=follow_links) as h:
        info = h.regions().get(name)
        if info is None:
            raise CheckpointError(h.source, f"no region named {name!r}")
        entry = _find(h, int(ChunkType.DEVICE_MEMORY), info.chunk_id, f"region {name!r}")
        data = _read_entry(h, entry, f"region {name!r}")
    dt = np.dtype(info.dtype)
    expected = int(np.prod(info.shape, dtype=np.int64)) * dt.itemsize
    if len(memoryview(data).cast("B")) != expected:
        raise CheckpointError(
            os.fspath(path),
            f"region {name!r}: {entry.uncompressed_size} bytes stored, {expected} expected for {info.dtype}{list(info.shape)}",
        )
    return np.frombuffer(data, dtype=dt).reshape(info.shape)


@_guarded
def read_chunk(path: str | os.PathLike[str], chunk_id: int, chunk_type: int | None = None) -> bytes | memoryview:
    """Uncompressed data of one chunk picked by id (and type when ids repeat)."""
    with _Opened(path) as h:
        rows = h.index(h.chunk_count())
        matches = [e for e in rows if e.chunk_id == chunk_id and (chunk_type is None or e.chunk_type == chunk_type)]
        if not matches:
            raise CheckpointError(h.source, f"no chunk with id {chunk_id}")
        if len(matches) > 1:
            raise CheckpointError(h.source, f"{len(matches)} chunks have id {chunk_id}; give the chunk type too")
        return _read_entry(h, matches[0], f"chunk {chunk_id}")


def _find(h: _Opened, chunk_type: int, chunk_id: int, what: str) -> IndexEntry:
    for e in h.index(h.chunk_count()):
        if e.chunk_type == chunk_type and e.chunk_id == chunk_id:
            return e
    raise CheckpointError(h.source, f"{what} is declared but has no chunk in /index")


@_guarded
def check_h5(path: str | os.PathLike[str]) -> stream.ParsedFile:
    """Full check: the stream parses and the index/attributes agree with it."""
    src = os.fspath(path)
    with _Opened(path) as h:
        parsed = stream.read_source(h.stream, allow_shards=False)
        entries = h.index(parsed.header.chunk_count)
        attrs = h.attrs()
        regions = h.regions()
    ck = parsed.checkpoint
    if len(entries) != len(parsed.chunk_headers):
        raise CheckpointError(src, f"/index has {len(entries)} rows, the stream {len(parsed.chunk_headers)} chunks")
    for i, (e, ch, c) in enumerate(zip(entries, parsed.chunk_headers, ck.chunks, strict=True)):
        if (e.chunk_type, e.chunk_id, e.offset, e.stored_size, e.uncompressed_size, e.flags) != (
            ch.chunk_type,
            ch.chunk_id,
            ch.data_offset,
            ch.compressed_size,
            ch.uncompressed_size,
            ch.flags,
        ):
            raise CheckpointError(src, f"/index row {i} disagrees with chunk {i} of the stream")
        if e.crc32 != crc32(c.data):
            raise CheckpointError(src, f"/index row {i}: CRC-32 disagrees with the chunk data")
    expected = {
        "kernel_id": ck.metadata.kernel_id,
        "kernel_type": ck.metadata.kernel_type,
        "step": ck.metadata.current_step,
        "kind": "delta" if ck.is_delta else "full",
        "content_digest": ck.content_digest(),
        "parent_digest": ck.metadata.parent_digest or "",
    }
    for k, v in expected.items():
        if attrs.get(k) != v:
            raise CheckpointError(src, f"attribute {k}={attrs.get(k)!r} disagrees with the stream ({v!r})")
    try:
        declared = ck.regions()
    except CheckpointError as exc:
        raise CheckpointError(src, exc.problem) from None
    if regions != declared:
        raise CheckpointError(src, "/regions disagrees with the region table in the stream's metadata")
    return parsed
