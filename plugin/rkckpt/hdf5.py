"""``.rk.h5``: an RKCKPT stream wrapped in HDF5, with an index for partial reads.

Layout (wrapper version 1):

- ``/rkckpt``: the RKCKPT v1 stream, byte-exact, one contiguous uint8
  dataset, so ``h5py`` or ``h5dump -d /rkckpt -b`` extract a file the
  reference reader parses. This writer puts it last in the file, starting
  on a 4 KiB page, after all the HDF5 structure below.
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
Readers take the stream's bytes from the file at the dataset's offset (one
byte-range source, the same reader as ``.rkcp``), after checking that the
dataset is a plain one stored in this file.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from . import codec, container, h5layout
from .atomic import atomic_open
from .container import HDF5_SIGNATURE, ParsedFile
from .crc import crc32
from .errors import CheckpointError
from .flags import CHUNK_BLOCK_DELTA, CHUNK_PART
from .layout import CHUNK_HEADER_SIZE, HEADER_SIZE, MAX_CHECKPOINT_SIZE, VERSION, unpack_chunk
from .model import Checkpoint, ChunkType, RegionInfo, digest_from_crcs
from .source import FileSource, RangeSource, Source, StorageSource

WRAPPER = "rkckpt.h5"
WRAPPER_VERSION = 1
STREAM = "rkckpt"
INDEX = "index"
REGIONS = "regions"
CHAIN_BASE_KEY = "rkckpt.chain_base"
MAX_REGIONS = 1 << 20
PAGE = 4096
DEFAULT_PROBE_TIMEOUT = 20.0
MAX_STRUCTURE = 64 << 20  # bytes of HDF5 structure copied locally for a storage object's extras
_PIECE = 16 << 20  # bytes per range read when an object is copied locally
MAX_COMPACT_ATTRS = 64  # the wrapper writes 12 root attributes; all stay compact
STREAM_ALIGN_ABOVE = 64 << 10  # objects at least this big (the stream) are page aligned


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
        with FileSource(path) as f:  # a FIFO or device is refused, never waited on
            return f.size >= len(HDF5_SIGNATURE) and bytes(f.read(0, len(HDF5_SIGNATURE))) == HDF5_SIGNATURE
    except CheckpointError:
        return False


# --------------------------------------------------------------------- write


def _stream_dataset(f: Any, length: int) -> Any:
    """``/rkckpt``: contiguous, allocated now, never filled (the stream is written in place)."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no times: equal facts give equal bytes (see _Template)
    space = h5py.h5s.create_simple((length,))
    return h5py.h5d.create(f.id, STREAM.encode(), h5py.h5t.STD_U8LE, space, dcpl=dcpl)


#: stream offset by the shape of the HDF5 structure (see ``write_to``); a wrong entry only costs a rewrite
_OFFSETS: dict[tuple[object, ...], int] = {}


class _Facts:
    """What the HDF5 structure records about a stream; sizes never depend on these values.

    A plain class, not a dataclass: defining one costs about 0.5 ms at
    import, and this module is imported on every cold ``.rk.h5`` load.
    """

    __slots__ = ("chain_base", "created_at", "digest", "parent", "rows", "step")

    def __init__(
        self, rows: list[tuple[int, int, int, int, int, int]], digest: str, parent: str, chain_base: str, step: int, created_at: int
    ) -> None:
        self.rows = rows  # per chunk: id, offset, stored size, uncompressed size, flags, CRC-32
        self.digest, self.parent, self.chain_base = digest, parent, chain_base
        self.step, self.created_at = step, created_at


# Sentinels laid out once per shape of the structure, found in its bytes and patched with each
# checkpoint's values (see _Template): unique 8- and 4-byte integers and 8-character strings.
_S_STEP, _S_CREATED = 0x5E7EC0DE00000001, 0x5E7EC0DE00000002
_S_ROW8 = 0x5E7EC0DE10000000  # + 8 * row + field, for the u8 fields of an /index row
_S_ROW4 = 0xA7B50000  # + 2 * row + field, for the u4 fields
_S_DIGEST, _S_PARENT, _S_BASE = "~DIGEST~", "~PARENT~", "~CHBASE~"
_TEMPLATE_ROWS = 1 << 14


class _Template:
    """The HDF5 structure of one shape of checkpoint with the places of everything that varies.

    Why: laying the structure out through h5py costs 5-30 ms per checkpoint,
    a tenth of a 128 MiB save. The values that vary between checkpoints of
    one kernel (step, time, digests, the /index numbers, the stream length)
    sit in fixed-size fields, so the bytes of one layout, patched, are the
    layout of the next; the superblock and object header checksums
    (lookup3) are recomputed. The first use of a template is checked
    byte for byte against a real layout.
    """

    __slots__ = ("fields", "offset", "prefix", "text_at", "u4_at", "u8_at")  # a plain class: see _Facts

    def __init__(
        self,
        offset: int,
        prefix: bytes,
        fields: h5layout.Fields,
        u8_at: dict[int, int],
        u4_at: dict[int, int],
        text_at: dict[str, list[int]],
    ) -> None:
        self.offset, self.prefix, self.fields = offset, prefix, fields
        self.u8_at, self.u4_at, self.text_at = u8_at, u4_at, text_at  # sentinel -> file offset(s)

    def render(self, facts: _Facts, length: int) -> bytes:
        buf = bytearray(self.prefix)

        def u8(at: int, v: int) -> None:
            buf[at : at + 8] = v.to_bytes(8, "little")

        u8(self.u8_at[_S_STEP], facts.step)
        u8(self.u8_at[_S_CREATED], facts.created_at)
        for i, (cid, off, stored, unc, flags, crc) in enumerate(facts.rows):
            for k, v in enumerate((cid, off, stored, unc)):
                u8(self.u8_at[_S_ROW8 + 8 * i + k], v)
            for k, v in enumerate((flags, crc)):
                at = self.u4_at[_S_ROW4 + 2 * i + k]
                buf[at : at + 4] = v.to_bytes(4, "little")
        for sentinel, value in ((_S_DIGEST, facts.digest), (_S_PARENT, facts.parent), (_S_BASE, facts.chain_base)):
            for at in self.text_at.get(sentinel, ()):
                raw = value.encode()
                if len(raw) != len(sentinel):
                    raise ValueError("a digest of another length")
                buf[at : at + len(raw)] = raw
        for at in self.fields.length_at:
            u8(at, length)
        u8(self.fields.eof_at, self.offset + length)
        for a, b in self.fields.spans:
            buf[b : b + 4] = h5layout.lookup3(buf[a:b]).to_bytes(4, "little")
        return bytes(buf)


def _make_template(length: int, layout: Callable[[_Facts], tuple[int, bytes, bytes]], facts: _Facts) -> _Template | None:
    """Lay the structure out once with sentinels and find them; None when any is not found exactly once."""
    rows = len(facts.rows)
    if rows > _TEMPLATE_ROWS:
        return None
    sentinel = _Facts(
        [
            (_S_ROW8 + 8 * i, _S_ROW8 + 8 * i + 1, _S_ROW8 + 8 * i + 2, _S_ROW8 + 8 * i + 3, _S_ROW4 + 2 * i, _S_ROW4 + 2 * i + 1)
            for i in range(rows)
        ],
        _S_DIGEST if len(facts.digest) == len(_S_DIGEST) else facts.digest,
        _S_PARENT if len(facts.parent) == len(_S_PARENT) else facts.parent,
        _S_BASE if len(facts.chain_base) == len(_S_BASE) else facts.chain_base,
        _S_STEP,
        _S_CREATED,
    )
    offset, prefix, suffix = layout(sentinel)
    if suffix:
        return None  # structure after the stream would move with its length

    def once(pattern: bytes) -> int | None:
        at = prefix.find(pattern)
        return at if at >= 0 and prefix.find(pattern, at + 1) < 0 else None

    u8_at: dict[int, int] = {}
    u4_at: dict[int, int] = {}
    for v in (_S_STEP, _S_CREATED, *(_S_ROW8 + 8 * i + k for i in range(rows) for k in range(4))):
        at = once(v.to_bytes(8, "little"))
        if at is None:
            return None
        u8_at[v] = at
    for v in (_S_ROW4 + 2 * i + k for i in range(rows) for k in range(2)):
        at = once(v.to_bytes(4, "little"))
        if at is None:
            return None
        u4_at[v] = at
    text_at: dict[str, list[int]] = {}
    for text in (sentinel.digest, sentinel.parent, sentinel.chain_base):
        if text in (_S_DIGEST, _S_PARENT, _S_BASE):
            at = once(text.encode())
            if at is None:
                return None
            text_at[text] = [at]
    try:
        fields = h5layout.fields(_PrefixSource(prefix, offset + length))
    except (h5layout.NotFixedLayout, CheckpointError):
        return None
    if any(b + 4 > len(prefix) for _, b in fields.spans) or any(at + 8 > len(prefix) for at in fields.length_at):
        return None
    return _Template(offset, prefix, fields, u8_at, u4_at, text_at)


class _PrefixSource:
    """The structure bytes of a layout as a source (the stream's bytes read as zeros)."""

    def __init__(self, prefix: bytes, size: int) -> None:
        self.prefix, self.size, self.name = prefix, size, None

    def read(self, offset: int, n: int) -> memoryview:
        out = bytearray(n)
        part = self.prefix[offset : offset + n]
        out[: len(part)] = part
        return memoryview(bytes(out))


#: templates by the shape of the structure (see ``write_to``)
_TEMPLATES: dict[tuple[object, ...], _Template | None] = {}


def _scratch_folder() -> str | None:
    shm = "/dev/shm"  # tmpfs: the scratch file never reaches a disk
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _layout(length: int, fill: Callable[[Any], None]) -> tuple[int, bytes, bytes]:
    """The HDF5 file around a ``length``-byte ``/rkckpt``: (its offset, the bytes before it, the bytes after it).

    Built in a sparse scratch file: ``fill`` writes the attributes and
    tables first, then ``/rkckpt`` is created last (contiguous, allocated,
    never written), so all HDF5 structure comes before the stream, a reader
    finds it in the first few KiB, and the scratch file costs a few KiB
    whatever ``length``. No object records times, so equal facts give equal
    bytes.
    """
    import h5py

    with tempfile.TemporaryDirectory(prefix="rkckpt-h5-", dir=_scratch_folder()) as folder:
        scratch = os.path.join(folder, "layout.h5")
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_alignment(STREAM_ALIGN_ABOVE, PAGE)  # the stream starts on a page: whole-page writes and reads
        fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
        # root attributes compact (in the root object header, not a fractal heap), so
        # h5layout.locate finds the wrapper marker without libhdf5
        fcpl.set_attr_phase_change(MAX_COMPACT_ATTRS, MAX_COMPACT_ATTRS)
        fcpl.set_obj_track_times(False)
        with h5py.File(h5py.h5f.create(scratch.encode(), h5py.h5f.ACC_TRUNC, fapl=fapl, fcpl=fcpl)) as f:
            fill(f)
            offset = int(_stream_dataset(f, length).get_offset())
        with open(scratch, "rb") as fh:
            prefix = fh.read(offset)
            fh.seek(offset + length)
            suffix = fh.read()
    return offset, prefix, suffix


def write_to(f: BinaryIO, ckpt: Checkpoint, options: codec.WriteOptions | None = None, *, chain_base: str | None = None) -> int:
    """Stream ``ckpt`` as ``.rk.h5`` into a seekable binary sink (a new file); return the bytes written.

    At disk speed: the stream is written with plain writes by the same
    writer as ``.rkcp``, at the offset where HDF5 puts a contiguous
    ``/rkckpt`` dataset (allocated early, never filled). Each raw chunk is
    checksummed once; that CRC serves the stream checksum, the index and
    the content digest. The HDF5 structure (attributes, index, region
    table: a few KiB before the stream) is laid out once per shape of
    checkpoint with sentinel values (which fixes the offset), and each
    checkpoint's values are patched into it once the CRCs are known (see
    ``_Template``); where no template can be made, it is laid out again with
    the real values.
    """
    options = options if options is not None else codec.WriteOptions()
    try:
        start = f.tell()
        f.seek(start)
    except (AttributeError, OSError, ValueError) as exc:
        raise CheckpointError(None, f".rk.h5 needs a seekable sink: {exc}") from None
    enc = container.encode_single(ckpt, options)
    parent = ckpt.metadata.parent_digest or ""
    names = ckpt.region_names()
    regions = sorted(ckpt.regions().values(), key=lambda r: r.name)
    offsets = enc.chunk_offsets()
    row_names = [names.get(p.chunk_id, "") if p.chunk_type == ChunkType.DEVICE_MEMORY else "" for p in enc.chunks]

    def base_for(digest: str) -> str:
        return chain_base if chain_base is not None else ckpt.metadata.custom.get(CHAIN_BASE_KEY, "" if parent else digest)

    def fill_with(facts: _Facts) -> Callable[[Any], None]:
        def fill(h: Any) -> None:
            attrs = h.attrs
            attrs["rkckpt.wrapper"] = WRAPPER
            attrs["wrapper_version"] = WRAPPER_VERSION
            attrs["format_version"] = VERSION
            attrs["kernel_id"] = ckpt.metadata.kernel_id
            attrs["kernel_type"] = ckpt.metadata.kernel_type
            attrs["step"] = np.uint64(facts.step)
            attrs["kind"] = "delta" if parent else "full"
            attrs["content_digest"] = facts.digest
            attrs["parent_digest"] = facts.parent
            attrs["chain_base"] = facts.chain_base
            attrs["created_at"] = np.uint64(facts.created_at)
            attrs["compat"] = bool(options.compat)
            index = np.zeros(len(enc.chunks), dtype=_index_dtype())
            for i, (p, name, row) in enumerate(zip(enc.chunks, row_names, facts.rows, strict=True)):
                cid, at, stored, unc, flags, crc = row
                index[i] = (p.chunk_type, cid, name, at, stored, unc, flags, crc)
            h.create_dataset(INDEX, data=index, track_times=False)
            table = np.zeros(len(regions), dtype=_regions_dtype())
            for i, r in enumerate(regions):
                table[i] = (r.name, r.dtype, np.asarray(r.shape, dtype="<i8"), r.chunk_id)
            h.create_dataset(REGIONS, data=table, track_times=False)

        return fill

    def facts_for(crcs: list[int], digest: str) -> _Facts:
        rows = [
            (p.chunk_id, at, p.encoded.size, p.uncompressed_size, p.encoded.flags, crc)
            for p, at, crc in zip(enc.chunks, offsets, crcs, strict=True)
        ]
        return _Facts(rows, digest, parent, base_for(digest), ckpt.metadata.current_step, ckpt.created_at)

    def layout(facts: _Facts) -> tuple[int, bytes, bytes]:
        return _layout(enc.length, fill_with(facts))

    placeholder = "0" * 8  # a digest's size: the layout does not change when the real one goes in
    first = facts_for([0] * len(enc.chunks), placeholder)
    # what the layout depends on: every size and string of the structure, none of the numbers, digests or the length
    shape = (
        ckpt.metadata.kernel_id,
        ckpt.metadata.kernel_type,
        parent if len(parent) != len(_S_PARENT) else len(parent),
        first.chain_base if len(first.chain_base) != len(_S_BASE) else len(first.chain_base),
        bool(options.compat),
        tuple((p.chunk_type, name) for p, name in zip(enc.chunks, row_names, strict=True)),
        tuple((r.name, r.dtype, tuple(r.shape), r.chunk_id) for r in regions),
        enc.length >= STREAM_ALIGN_ABOVE,
    )
    fresh = shape not in _TEMPLATES
    if fresh:
        if len(_TEMPLATES) >= 64:
            _TEMPLATES.clear()
        _TEMPLATES[shape] = _make_template(enc.length, layout, first)
    template = _TEMPLATES[shape]
    offset = template.offset if template is not None else _OFFSETS.get(shape)
    if offset is None:
        offset, _, _ = layout(first)
    for _attempt in range(2):
        f.seek(start + offset)
        written = container.emit(f, enc, options, chunk_crcs=True)
        assert written.payload_crcs is not None
        _start_writeback(f)  # the disk takes the stream while the HDF5 structure is made below
        crcs = [
            pc if p.raw else crc32(memoryview(c.data).cast("B"))
            for p, pc, c in zip(enc.chunks, written.payload_crcs, ckpt.chunks, strict=True)
        ]
        digest = digest_from_crcs((p.chunk_type, p.chunk_id, crc, p.uncompressed_size) for p, crc in zip(enc.chunks, crcs, strict=True))
        facts = facts_for(crcs, digest)
        if template is not None:
            try:
                prefix, suffix, final = template.render(facts, enc.length), b"", template.offset
            except ValueError:
                template = _TEMPLATES[shape] = None
            if template is not None and fresh:  # the first use is checked against a real layout
                real = layout(facts)
                if real != (final, prefix, suffix):
                    template = _TEMPLATES[shape] = None
                    final, prefix, suffix = real
        if template is None:
            final, prefix, suffix = layout(facts)
        if final == offset:
            if len(_OFFSETS) >= 64:
                _OFFSETS.clear()
            _OFFSETS[shape] = offset  # the next checkpoint of this kind skips the placeholder layout
            break
        offset = final  # not expected (equal sizes give equal layouts); correct either way: write it there
    else:
        raise CheckpointError(None, "HDF5 layout of /rkckpt did not settle")
    f.seek(start)
    container.write_fully(f, prefix)
    f.seek(start + offset + enc.length)
    container.write_fully(f, suffix)
    f.truncate()  # a retried layout may have left bytes past the end
    return offset + enc.length + len(suffix)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def _start_writeback(f: BinaryIO) -> None:
    """Start writing ``f``'s dirty pages to the disk without waiting (Linux ``sync_file_range``).

    The final HDF5 layout (``_layout``, some 5-30 ms of h5py work) comes after
    the stream is written; the caller's fsync then waits for the whole
    stream. Starting the writeback first overlaps the two. Nothing is
    promised about durability here (the caller's fsync still decides), so
    any failure is ignored, and sinks without a file descriptor are skipped.
    """
    global _sync_file_range
    try:
        fd = f.fileno()
        f.flush()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return
    if _sync_file_range is None:
        try:
            import ctypes

            func = ctypes.CDLL(None, use_errno=True).sync_file_range
            func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = func
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def write_h5(
    path: str | os.PathLike[str], ckpt: Checkpoint, options: codec.WriteOptions | None = None, *, chain_base: str | None = None
) -> int:
    """Write ``ckpt`` as ``.rk.h5`` atomically (temp file, fsync, rename); returns the file size."""
    target = Path(path)
    try:
        with atomic_open(target) as f:
            return write_to(f, ckpt, options, chain_base=chain_base)
    except CheckpointError as exc:
        if exc.source is None:
            raise CheckpointError(target, exc.problem) from None
        raise


# ---------------------------------------------------------------------- read


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

    def __init__(self, path: str | os.PathLike[str], storage: Any = None, *, libhdf5: bool = False) -> None:
        self.source = os.fspath(path)
        self.storage = storage
        self.raw: Source
        self.file: Any = None  # h5py.File, opened only when the extras are needed
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.located: h5layout.Located | None = None
        if storage is None:
            self.raw = FileSource(self.source)  # refuses FIFOs and devices without blocking
        else:
            self.raw = StorageSource(storage, self.source)
        try:
            if self.raw.size < len(HDF5_SIGNATURE) or bytes(self.raw.read(0, len(HDF5_SIGNATURE))) != HDF5_SIGNATURE:
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
        self._scratch = tempfile.TemporaryDirectory(prefix="rkckpt-h5s-", dir=_scratch_folder())
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
        return container.scan(self.stream, chunks=False).header.chunk_count

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


class ProbeAbandoned(CheckpointError):
    """A probe given up because the process was asked to stop: no verdict on the file."""


_POLL = 0.05  # seconds between checks of the abandon hook while a probe runs
_abandon: Callable[[], bool] | None = None


def abandon_probes_when(check: Callable[[], bool] | None) -> None:
    """Give up a running probe as soon as ``check()`` is true (rkrun: a stop signal came in).

    A probe waits up to ``probe_timeout()`` for libhdf5; a process told to
    stop (SIGTERM under Slurm) must not sit that out. The signal handler only
    records the signal, so the wait polls ``check`` every 50 ms; an
    abandoned probe raises ``ProbeAbandoned`` (a CheckpointError: the file
    is skipped) and leaves no verdict behind.
    """
    global _abandon
    _abandon = check


def probe_timeout() -> float:
    """Seconds a probe waits for libhdf5 (``$RKCKPT_H5_PROBE_TIMEOUT``, default 20)."""
    try:
        value = float(os.environ.get("RKCKPT_H5_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT))
    except ValueError:
        return DEFAULT_PROBE_TIMEOUT
    return value if 0 < value < 1e6 else DEFAULT_PROBE_TIMEOUT


#: verdicts of earlier probes, by file identity (see ``_identity``) -> None (fine) or the problem
_PROBED: dict[tuple[object, ...], str | None] = {}
_EDGE = 64 << 10  # bytes at each end of the file that enter its identity


def _identity(path: str) -> tuple[object, ...] | None:
    """(path, device, inode, size, mtime, ctime, CRC-32 of the first and last 64 KiB).

    The CRCs: a file rewritten in place within one timestamp tick, at the
    same size, must not inherit the verdict of the bytes it replaced. The
    HDF5 structure this writer emits lies in those ranges.
    """
    try:
        with FileSource(path) as fs:
            st = os.fstat(fs.fd)
            head = crc32(fs.read(0, min(_EDGE, fs.size)))
            tail = crc32(fs.read(max(0, fs.size - _EDGE), min(_EDGE, fs.size)))
    except CheckpointError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, head, tail)


def probe(path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
    """Read the file's HDF5 structure with libhdf5 in a forked child before trusting it here.

    The HDF5 C library can crash (SIGSEGV) or spin forever on a damaged
    file's metadata, which no ``except`` can catch. A damaged file ends as
    a CheckpointError naming it after at most ``timeout`` seconds (default
    ``probe_timeout()``); the wait is a ``select``, so this process's signal
    handlers keep running. A verdict is remembered for the same file
    (device, inode, size, mtime), so the CLI's probe-then-read pays once.
    Bulk data is read with plain file I/O (see ``_Opened.read``), so only
    the structure needs this.
    """
    src = os.fspath(path)
    if not hasattr(os, "fork"):
        return
    key = _identity(src)
    if key is not None and key in _PROBED:
        problem = _PROBED[key]
        if problem is not None:
            raise CheckpointError(src, problem)
        return
    wait = probe_timeout() if timeout is None else timeout
    problem = _probe_child(src, wait)
    if key is not None:
        if len(_PROBED) >= 256:
            _PROBED.clear()
        _PROBED[key] = problem
    if problem is not None:
        raise CheckpointError(src, problem)


def _probe_child(src: str, timeout: float) -> str | None:
    """Run libhdf5 over ``src`` in a child; the problem found, or None."""
    import faulthandler  # the probe's modules load with the first probe, not on the hot path
    import select
    import signal

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
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)  # the parent's stop handlers are not this child's
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            try:
                with _Opened(src, libhdf5=True) as h:
                    h.attrs()
                    h.index(None)  # the structure only: the stream is read with plain reads, and checked there
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
        deadline = time.monotonic() + timeout
        message = None
        abandoned = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([r], [], [], min(left, _POLL))
            if ready:
                message = os.read(r, 8192).decode("utf-8", "replace")
                break
            if _abandon is not None and _abandon():
                abandoned = True
                break
    except BaseException:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.close(r)
    if message is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if abandoned:
        raise ProbeAbandoned(src, "reading its HDF5 structure was abandoned: a stop was requested")
    if message is None:
        return f"the HDF5 library did not finish reading the file's structure within {timeout:g} s (damaged HDF5 structure)"
    if os.WIFSIGNALED(status):
        return f"damaged HDF5 structure: the HDF5 library crashed reading it (signal {os.WTERMSIG(status)})"
    if os.WEXITSTATUS(status) != 0:
        return message or "damaged HDF5 structure"
    return None


@_guarded
def read_stream(path: str | os.PathLike[str]) -> bytes:
    """The embedded RKCKPT stream, byte-exact (what ``h5dump -b`` extracts)."""
    with _Opened(path) as h:
        return bytes(h.read(0, h.length))


@_guarded
def open_stream(path: str | os.PathLike[str], storage: Any = None) -> Source:
    """A byte-range source over the stream inside a ``.rk.h5`` (HDF5 structure checked first).

    The HDF5 file is closed again; the caller closes the returned source.
    """
    h = _Opened(path, storage)
    h.close_structure()
    return h.stream


@_guarded
def read(path: str | os.PathLike[str], storage: Any = None) -> ParsedFile:
    """Parse the stream embedded in a ``.rk.h5`` file (or, with ``storage``, object)."""
    with _Opened(path, storage) as h:
        return container.read_source(h.stream, allow_shards=False)


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
def read_region(path: str | os.PathLike[str], name: str, storage: Any = None) -> np.ndarray:
    """One named region as an array, reading only its slice of the stream (also from a storage object)."""
    with _Opened(path, storage) as h:
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
def check_h5(path: str | os.PathLike[str]) -> ParsedFile:
    """Full check: the stream parses and the index/attributes agree with it."""
    src = os.fspath(path)
    with _Opened(path) as h:
        parsed = container.read_source(h.stream, allow_shards=False)
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
