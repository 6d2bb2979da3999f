"""``.rk.h5``: an RKCKPT stream wrapped in HDF5, with an index for partial reads.

Layout (wrapper version 1):

- ``/rkckpt``: the RKCKPT v1 stream, byte-exact, one contiguous uint8
  dataset, so ``h5py`` or ``h5dump -d /rkckpt -b`` extract a file the
  reference reader parses.
- root attributes: ``rkckpt.wrapper`` (= "rkckpt.h5"), ``wrapper_version``,
  ``format_version``, ``kernel_id``, ``kernel_type``, ``step``, ``kind``
  ("full"/"delta"), ``content_digest``, ``parent_digest`` ("" for a full
  checkpoint), ``chain_base`` (digest of the full checkpoint a chain starts
  from; "" when the writer did not know it), ``created_at``.
- ``/index``: one row per chunk (type, id, name, offset of the stored payload
  inside ``/rkckpt``, stored size, uncompressed size, stored flags, CRC-32 of
  the uncompressed data), so one region is read without reading the rest.
- ``/regions``: name, dtype, shape and chunk id of each named region.

The index and attributes are a convenience for readers; the stream stays
the source of truth, and ``check_h5`` verifies that they agree with it.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import select
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import codec, format
from .atomic import atomic_path
from .crc import crc32, crc32_combine
from .errors import CheckpointError
from .flags import CHUNK_BLOCK_DELTA, CHUNK_PART, CHUNK_SHUFFLE, CHUNK_ZSTD, HDR_SHARD
from .model import KEYED_TYPES, Checkpoint, ChunkType, RegionInfo

WRAPPER = "rkckpt.h5"
WRAPPER_VERSION = 1
STREAM = "rkckpt"
INDEX = "index"
REGIONS = "regions"
CHAIN_BASE_KEY = "rkckpt.chain_base"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_REGIONS = 1 << 20

_CHUNK = struct.Struct("<IIQQQ")  # same layouts as format.py
_HEADER = struct.Struct("<QIIQIIIIQ16s")
assert _CHUNK.size == format.CHUNK_HEADER_SIZE and _HEADER.size == format.HEADER_SIZE


def _index_dtype() -> np.dtype:
    import h5py

    return np.dtype(
        [
            ("type", "<u4"),
            ("id", "<u8"),
            ("name", h5py.string_dtype("utf-8")),
            ("offset", "<u8"),
            ("stored_size", "<u8"),
            ("uncompressed_size", "<u8"),
            ("flags", "<u4"),
            ("crc32", "<u4"),
        ]
    )


def _regions_dtype() -> np.dtype:
    import h5py

    return np.dtype(
        [
            ("name", h5py.string_dtype("utf-8")),
            ("dtype", h5py.string_dtype("utf-8")),
            ("shape", h5py.vlen_dtype(np.dtype("<i8"))),
            ("chunk_id", "<u8"),
        ]
    )


@dataclass(frozen=True)
class IndexEntry:
    chunk_type: int
    chunk_id: int
    name: str
    offset: int
    stored_size: int
    uncompressed_size: int
    flags: int
    crc32: int


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


def is_hdf5(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with the HDF5 signature (no user block)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


# --------------------------------------------------------------------- write


@dataclass
class _Planned:
    chunk_type: int
    chunk_id: int
    name: str
    stored_flags: int
    payload: memoryview
    uncompressed_size: int
    data_crc: int
    payload_crc: int


def _plan(ckpt: Checkpoint, options: codec.WriteOptions) -> tuple[bytes, list[_Planned], int, int]:
    """Encode payloads (compressing where the codec says so) and size the stream."""
    names = ckpt.region_names()
    planned: list[_Planned] = []
    compression = format.COMPRESSION_NONE
    hflags = 0
    elems = {} if options.compat else format.elem_sizes(ckpt)  # same choices as format.encode
    for c in ckpt.chunks:
        data = memoryview(c.data).cast("B")
        cflags, payload = codec.encode_payload(data, c.flags, options, elem_size=elems.get((c.chunk_type, c.chunk_id)))
        compression, hflags = codec.header_bits(cflags, compression, hflags)
        pv = memoryview(payload).cast("B")
        data_crc = crc32(data)
        stored_raw = not (cflags & (CHUNK_ZSTD | CHUNK_SHUFFLE)) and pv.nbytes == data.nbytes
        payload_crc = data_crc if stored_raw else crc32(pv)
        name = names.get(c.chunk_id, "") if c.chunk_type == ChunkType.DEVICE_MEMORY else ""
        planned.append(_Planned(c.chunk_type, c.chunk_id, name, cflags, pv, data.nbytes, data_crc, payload_crc))
    if options.compat and (hflags or compression):
        raise CheckpointError(None, "compat mode cannot encode extension chunks (block deltas or flags)")
    meta = format.encode_metadata(ckpt.metadata)
    return meta, planned, compression, hflags


def _content_digest(planned: list[_Planned]) -> str:
    """``Checkpoint.content_digest`` from the per-chunk CRCs (no second pass over the data)."""
    crc = 0
    for p in planned:
        ident = p.chunk_id if p.chunk_type in KEYED_TYPES else 0
        crc = crc32(p.chunk_type.to_bytes(4, "little") + ident.to_bytes(8, "little") + bytes(4), crc)
        crc = crc32_combine(crc, p.data_crc, p.uncompressed_size)
    return f"{crc:08x}"


def _stream_parts(
    meta: bytes, planned: list[_Planned], compression: int, hflags: int, created_at: int
) -> tuple[bytes, list[tuple[int, bytes | memoryview]], int]:
    """Header bytes, (offset, bytes) pieces of the stream, and its total length."""
    pieces: list[tuple[int, bytes | memoryview]] = []
    pos = format.HEADER_SIZE
    head = struct.pack("<I", len(meta)) + meta
    crc = crc32(head)
    pending = bytearray(head)
    pending_at = pos
    pos += len(head)
    for p in planned:
        ch = _CHUNK.pack(p.chunk_type, p.stored_flags, p.uncompressed_size, p.payload.nbytes, p.chunk_id)
        crc = crc32(ch, crc)
        crc = crc32_combine(crc, p.payload_crc, p.payload.nbytes)
        pending += ch
        pos += len(ch)
        if p.payload.nbytes <= 1 << 16:
            pending += p.payload
        else:
            pieces.append((pending_at, bytes(pending)))
            pieces.append((pos, p.payload))
            pending = bytearray()
            pending_at = pos + p.payload.nbytes
        pos += p.payload.nbytes
    if pending:
        pieces.append((pending_at, bytes(pending)))
    total = pos
    quirk_total = total - (format.HEADER_SIZE - format.REFERENCE_HEADER_SIZE)
    header = _HEADER.pack(
        format.MAGIC,
        format.VERSION,
        format.REFERENCE_HEADER_SIZE,
        quirk_total,
        len(planned),
        compression,
        crc,
        hflags,
        created_at,
        bytes(16),
    )
    return header, pieces, total


def write_h5(
    path: str | os.PathLike[str], ckpt: Checkpoint, options: codec.WriteOptions | None = None, *, chain_base: str | None = None
) -> int:
    """Write ``ckpt`` as ``.rk.h5`` atomically; returns the file size.

    Payloads are written straight into slices of a dataset created at its
    final size, so no second full copy of the state is built in memory.
    """
    import h5py

    target = Path(path)
    options = options if options is not None else codec.WriteOptions()
    try:
        meta, planned, compression, hflags = _plan(ckpt, options)
    except CheckpointError as exc:
        raise CheckpointError(target, exc.problem) from None
    header, pieces, total = _stream_parts(meta, planned, compression, hflags, ckpt.created_at)
    if total > format.MAX_CHECKPOINT_SIZE:
        raise CheckpointError(
            target,
            f"encoded stream is {total} bytes, over the {format.MAX_CHECKPOINT_SIZE}-byte RKCKPT limit; save states over 1 GiB as sharded .rkcp",
        )
    digest = _content_digest(planned)
    parent = ckpt.metadata.parent_digest or ""
    base = chain_base if chain_base is not None else ckpt.metadata.custom.get(CHAIN_BASE_KEY, "" if parent else digest)

    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(STREAM, shape=(total,), dtype="u1", fill_time="never")
            ds[0 : len(header)] = np.frombuffer(header, np.uint8)
            for offset, piece in pieces:
                arr = np.frombuffer(piece, np.uint8)
                ds[offset : offset + arr.size] = arr
            attrs = f.attrs
            attrs["rkckpt.wrapper"] = WRAPPER
            attrs["wrapper_version"] = WRAPPER_VERSION
            attrs["format_version"] = format.VERSION
            attrs["kernel_id"] = ckpt.metadata.kernel_id
            attrs["kernel_type"] = ckpt.metadata.kernel_type
            attrs["step"] = np.uint64(ckpt.metadata.current_step)
            attrs["kind"] = "delta" if parent else "full"
            attrs["content_digest"] = digest
            attrs["parent_digest"] = parent
            attrs["chain_base"] = base
            attrs["created_at"] = np.uint64(ckpt.created_at)
            attrs["compat"] = bool(options.compat)
            index = np.zeros(len(planned), dtype=_index_dtype())
            pos = format.HEADER_SIZE + 4 + len(meta)
            for i, p in enumerate(planned):
                pos += format.CHUNK_HEADER_SIZE
                index[i] = (p.chunk_type, p.chunk_id, p.name, pos, p.payload.nbytes, p.uncompressed_size, p.stored_flags, p.data_crc)
                pos += p.payload.nbytes
            f.create_dataset(INDEX, data=index)
            regions = sorted(ckpt.regions().values(), key=lambda r: r.name)
            table = np.zeros(len(regions), dtype=_regions_dtype())
            for i, r in enumerate(regions):
                table[i] = (r.name, r.dtype, np.asarray(r.shape, dtype="<i8"), r.chunk_id)
            f.create_dataset(REGIONS, data=table)
    return target.stat().st_size


# ---------------------------------------------------------------------- read


class _Opened:
    """An open ``.rk.h5`` whose wrapper identity and stream size were checked."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.source = os.fspath(path)
        if not os.path.exists(self.source):
            raise CheckpointError(self.source, "no such file")
        if not is_hdf5(self.source):
            raise CheckpointError(self.source, "not an HDF5 file (no HDF5 signature)")
        try:
            self.file = h5py.File(self.source, "r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.source, f"cannot open as HDF5: {exc}") from None
        try:
            self._check()
        except BaseException:
            self.file.close()
            raise

    def _check(self) -> None:
        import h5py

        f = self.file
        marker = f.attrs.get("rkckpt.wrapper")
        if isinstance(marker, bytes):
            marker = marker.decode("utf-8", "replace")
        ds = f.get(STREAM)
        if marker != WRAPPER or not isinstance(ds, h5py.Dataset):
            raise CheckpointError(self.source, "HDF5 file is not an rkckpt checkpoint (no rkckpt.wrapper attribute or /rkckpt dataset)")
        version = f.attrs.get("wrapper_version")
        if not isinstance(version, (int, np.integer)) or int(version) > WRAPPER_VERSION or int(version) < 1:
            raise CheckpointError(self.source, f"unsupported .rk.h5 wrapper version {version!r}")
        if ds.dtype != np.uint8 or ds.ndim != 1:
            raise CheckpointError(self.source, f"/rkckpt must be a 1-D uint8 dataset, found {ds.dtype} with shape {ds.shape}")
        self.stream = ds
        self.length = int(ds.shape[0])
        self.offset = self._file_offset(ds)
        head = self.read(0, min(self.length, format.HEADER_SIZE))
        self.header = format.parse_header(head, self.source)
        if self.header.flags & HDR_SHARD:
            raise CheckpointError(self.source, "/rkckpt holds a sharded (> 1 GiB) stream, which .rk.h5 files do not support")
        if self.header.total_size not in (self.length, self.length - (format.HEADER_SIZE - format.REFERENCE_HEADER_SIZE)):
            raise CheckpointError(
                self.source, f"/rkckpt dataset holds {self.length} bytes but the RKCKPT header's total_size says {self.header.total_size}"
            )

    def _file_offset(self, ds: object) -> int | None:
        """File offset of a contiguous, unfiltered, allocated /rkckpt (else None).

        Reading those bytes with plain file I/O is what HDF5 would do, minus
        its per-call overhead; anything else goes through h5py.
        """
        import h5py

        try:
            if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or ds.compression is not None:  # type: ignore[attr-defined]
                return None
            offset = ds.id.get_offset()  # type: ignore[attr-defined]
        except (OSError, ValueError, AttributeError):
            return None
        if offset is None or offset + self.length > os.path.getsize(self.source):
            return None
        return int(offset)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Bytes [start, stop) of the stream, reading only that slice."""
        if start < 0 or stop > self.length or start > stop:
            raise CheckpointError(self.source, f"range {start}..{stop} lies outside the {self.length}-byte stream")
        if stop == start:
            return np.empty(0, dtype=np.uint8)
        try:
            if self.offset is not None:
                out = np.empty(stop - start, dtype=np.uint8)
                _pread_into(self.source, self.offset + start, memoryview(out))
            else:
                out = self.stream[start:stop]  # h5py's read_direct with a selection is ~10x slower
        except (OSError, ValueError) as exc:
            raise CheckpointError(self.source, f"cannot read /rkckpt: {exc}") from None
        return out

    def index(self) -> list[IndexEntry]:
        import h5py

        ds = self.file.get(INDEX)
        if not isinstance(ds, h5py.Dataset):
            raise CheckpointError(self.source, "missing /index dataset")
        if ds.ndim != 1 or ds.shape[0] != self.header.chunk_count:  # bounded before reading
            raise CheckpointError(self.source, f"/index has shape {ds.shape}, the stream has {self.header.chunk_count} chunks")
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

    def regions(self) -> dict[str, RegionInfo]:
        import h5py

        ds = self.file.get(REGIONS)
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
            for k, v in self.file.attrs.items()
        }

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_into(path: str, offset: int, out: memoryview, piece: int = 32 << 20) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < out.nbytes:
            n = f.readinto(out[done : min(out.nbytes, done + piece)])
            if not n:
                raise OSError(f"file ends {out.nbytes - done} bytes early")
            done += n


def _text(v: object) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def probe(path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
    """Read the file's HDF5 structure in a forked child before trusting it here.

    The HDF5 C library can crash (SIGSEGV) or hang on a damaged file's
    metadata, which no ``except`` can catch. The CLI probes first, so a
    damaged file ends as a CheckpointError instead of killing the command.
    Bulk data is read with plain file I/O (see ``_Opened.read``), so only
    the structure needs this.
    """
    src = os.fspath(path)
    if not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no cleanup handlers, just the verdict
        code = 0
        try:
            os.close(r)
            faulthandler.disable()  # a crash is the expected, reported outcome: no dump
            # Runtimes loaded into this process (LLVM inside pocl or Intel's
            # OpenCL) install fatal-signal handlers that print, then return;
            # the child must die by the signal so the parent can report it.
            for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
                signal.signal(sig, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            try:
                with _Opened(src) as h:
                    h.attrs()
                    h.index()
                    h.regions()
            except CheckpointError as exc:
                os.write(w, exc.problem.encode("utf-8", "replace")[:4000])
                code = 3
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                os.write(w, f"damaged HDF5 structure: {type(exc).__name__}: {exc}".encode("utf-8", "replace")[:4000])
                code = 3
        finally:
            os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        message = os.read(r, 8192).decode("utf-8", "replace") if ready else None
    finally:
        os.close(r)
    if message is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if message is None:
        raise CheckpointError(src, f"the HDF5 library did not finish reading the file's structure within {timeout:.0f} s")
    if os.WIFSIGNALED(status):
        raise CheckpointError(src, f"damaged HDF5 structure: the HDF5 library crashed reading it (signal {os.WTERMSIG(status)})")
    if os.WEXITSTATUS(status) != 0:
        raise CheckpointError(src, message or "damaged HDF5 structure")


@_guarded
def read_stream(path: str | os.PathLike[str]) -> bytes:
    """The embedded RKCKPT stream, byte-exact (what ``h5dump -b`` extracts)."""
    with _Opened(path) as h:
        return h.read(0, h.length).tobytes()


def _parse_stream(buf: np.ndarray, src: str, checksum: int | None) -> format.ParsedFile:
    if checksum is not None:  # checked here with the fast CRC; format.parse would use zlib's
        got = crc32(memoryview(buf)[format.HEADER_SIZE :])
        if got != checksum:
            raise CheckpointError(src, f"checksum mismatch: header says 0x{checksum:08x}, data gives 0x{got:08x}")
    parsed = format.parse(memoryview(buf), src, verify_checksum=False)
    if any(h.flags & CHUNK_PART for h in parsed.chunk_headers):
        raise CheckpointError(src, "/rkckpt holds pieces of a sharded checkpoint (CHUNK_PART), which .rk.h5 files do not support")
    return parsed


@_guarded
def read_h5(path: str | os.PathLike[str], *, verify_checksum: bool = True) -> format.ParsedFile:
    """Parse the stream embedded in a ``.rk.h5`` file."""
    with _Opened(path) as h:
        buf = h.read(0, h.length)
        checksum = h.header.checksum if verify_checksum else None
    return _parse_stream(buf, os.fspath(path), checksum)


def load_h5(path: str | os.PathLike[str]) -> Checkpoint:
    return read_h5(path).checkpoint


@_guarded
def attributes(path: str | os.PathLike[str]) -> dict[str, object]:
    """Root attributes (kernel id, step, kind, digests) without reading the stream."""
    with _Opened(path) as h:
        return h.attrs()


@_guarded
def read_index(path: str | os.PathLike[str]) -> list[IndexEntry]:
    with _Opened(path) as h:
        return h.index()


def _read_entry(h: _Opened, entry: IndexEntry, what: str) -> bytes | memoryview:
    if entry.flags & CHUNK_PART:
        raise CheckpointError(h.source, f"{what} is a piece of a sharded chunk, which .rk.h5 files do not support")
    if entry.flags & CHUNK_BLOCK_DELTA:
        raise CheckpointError(h.source, f"{what} is stored as a block-delta patch; apply the chain to a full checkpoint first")
    if entry.offset < format.HEADER_SIZE or entry.offset + entry.stored_size > h.length:
        raise CheckpointError(h.source, f"/index entry for {what} points outside the stream")
    # the 32-byte chunk header right before the payload must agree with the index
    raw = h.read(entry.offset - format.CHUNK_HEADER_SIZE, entry.offset + entry.stored_size)
    ctype, cflags, usize, csize, cid = _CHUNK.unpack_from(raw, 0)
    if (ctype, cflags, usize, csize, cid) != (entry.chunk_type, entry.flags, entry.uncompressed_size, entry.stored_size, entry.chunk_id):
        raise CheckpointError(h.source, f"/index entry for {what} disagrees with the chunk header in the stream")
    if usize > format.MAX_CHECKPOINT_SIZE:
        raise CheckpointError(h.source, f"{what} declares uncompressed_size {usize} over the limit")
    try:
        data = codec.decode_payload(cflags, memoryview(raw)[format.CHUNK_HEADER_SIZE :], usize, h.source)
    except CheckpointError as exc:
        raise CheckpointError(h.source, f"{what}: {exc.problem}") from None
    if crc32(data) != entry.crc32:
        raise CheckpointError(h.source, f"{what}: CRC-32 mismatch (data corrupt)")
    return data


@_guarded
def read_region(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """One named region as an array, reading only its slice of the stream."""
    with _Opened(path) as h:
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
        matches = [e for e in h.index() if e.chunk_id == chunk_id and (chunk_type is None or e.chunk_type == chunk_type)]
        if not matches:
            raise CheckpointError(h.source, f"no chunk with id {chunk_id}")
        if len(matches) > 1:
            raise CheckpointError(h.source, f"{len(matches)} chunks have id {chunk_id}; give the chunk type too")
        return _read_entry(h, matches[0], f"chunk {chunk_id}")


def _find(h: _Opened, chunk_type: int, chunk_id: int, what: str) -> IndexEntry:
    for e in h.index():
        if e.chunk_type == chunk_type and e.chunk_id == chunk_id:
            return e
    raise CheckpointError(h.source, f"{what} is declared but has no chunk in /index")


@_guarded
def check_h5(path: str | os.PathLike[str]) -> format.ParsedFile:
    """Full check: the stream parses and the index/attributes agree with it."""
    src = os.fspath(path)
    with _Opened(path) as h:
        buf = h.read(0, h.length)
        entries = h.index()
        attrs = h.attrs()
        regions = h.regions()
        checksum = h.header.checksum
    parsed = _parse_stream(buf, src, checksum)
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
