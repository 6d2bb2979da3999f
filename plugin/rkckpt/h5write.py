"""The ``.rk.h5`` writer: the RKCKPT stream written at disk speed inside an HDF5 wrapper.

See ``rkckpt.hdf5`` for the layout. The HDF5 structure is laid out once per
shape (``_Template``) and patched for each checkpoint.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import codec, h5layout, stream
from .atomic import atomic_open
from .crc import crc32
from .errors import CheckpointError
from .h5schema import (
    CHAIN_BASE_KEY,
    INDEX,
    PAGE,
    REGIONS,
    STREAM,
    WRAPPER,
    WRAPPER_VERSION,
    index_dtype,
    regions_dtype,
    scratch_folder,
)
from .layout import VERSION
from .model import Checkpoint, ChunkType, digest_from_crcs

MAX_COMPACT_ATTRS = 64  # the wrapper writes 12 root attributes; all stay compact
STREAM_ALIGN_ABOVE = 64 << 10  # objects at least this big (the stream) are page aligned


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

    with tempfile.TemporaryDirectory(prefix="rkckpt-h5-", dir=scratch_folder()) as folder:
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


class _Plan:
    """One checkpoint's encoded stream and everything its HDF5 structure is built from."""

    def __init__(self, ckpt: Checkpoint, options: codec.WriteOptions, chain_base: str | None) -> None:
        self.ckpt, self.options, self.chain_base = ckpt, options, chain_base
        self.enc = stream.encode_single(ckpt, options)
        self.parent = ckpt.metadata.parent_digest or ""
        names = ckpt.region_names()
        self.regions = sorted(ckpt.regions().values(), key=lambda r: r.name)
        self.offsets = self.enc.chunk_offsets()
        self.row_names = [names.get(p.chunk_id, "") if p.chunk_type == ChunkType.DEVICE_MEMORY else "" for p in self.enc.chunks]

    def base_for(self, digest: str) -> str:
        if self.chain_base is not None:
            return self.chain_base
        return self.ckpt.metadata.custom.get(CHAIN_BASE_KEY, "" if self.parent else digest)

    def facts_for(self, crcs: list[int], digest: str) -> _Facts:
        rows = [
            (p.chunk_id, at, p.encoded.size, p.uncompressed_size, p.encoded.flags, crc)
            for p, at, crc in zip(self.enc.chunks, self.offsets, crcs, strict=True)
        ]
        meta = self.ckpt.metadata
        return _Facts(rows, digest, self.parent, self.base_for(digest), meta.current_step, self.ckpt.created_at)

    def fill(self, h: Any, facts: _Facts) -> None:
        """Write the root attributes, the index and the region table of ``facts`` into the open file ``h``."""
        meta, attrs = self.ckpt.metadata, h.attrs
        attrs["rkckpt.wrapper"] = WRAPPER
        attrs["wrapper_version"] = WRAPPER_VERSION
        attrs["format_version"] = VERSION
        attrs["kernel_id"] = meta.kernel_id
        attrs["kernel_type"] = meta.kernel_type
        attrs["step"] = np.uint64(facts.step)
        attrs["kind"] = "delta" if self.parent else "full"
        attrs["content_digest"] = facts.digest
        attrs["parent_digest"] = facts.parent
        attrs["chain_base"] = facts.chain_base
        attrs["created_at"] = np.uint64(facts.created_at)
        attrs["compat"] = bool(self.options.compat)
        index = np.zeros(len(self.enc.chunks), dtype=index_dtype())
        for i, (p, name, row) in enumerate(zip(self.enc.chunks, self.row_names, facts.rows, strict=True)):
            cid, at, stored, unc, flags, crc = row
            index[i] = (p.chunk_type, cid, name, at, stored, unc, flags, crc)
        h.create_dataset(INDEX, data=index, track_times=False)
        table = np.zeros(len(self.regions), dtype=regions_dtype())
        for i, r in enumerate(self.regions):
            table[i] = (r.name, r.dtype, np.asarray(r.shape, dtype="<i8"), r.chunk_id)
        h.create_dataset(REGIONS, data=table, track_times=False)

    def layout(self, facts: _Facts) -> tuple[int, bytes, bytes]:
        return _layout(self.enc.length, lambda h: self.fill(h, facts))

    def shape(self, first: _Facts) -> tuple[object, ...]:
        """What the layout depends on: every size and string of the structure, none of the numbers, digests or the length."""
        meta, parent, base = self.ckpt.metadata, self.parent, first.chain_base
        return (
            meta.kernel_id,
            meta.kernel_type,
            parent if len(parent) != len(_S_PARENT) else len(parent),
            base if len(base) != len(_S_BASE) else len(base),
            bool(self.options.compat),
            tuple((p.chunk_type, name) for p, name in zip(self.enc.chunks, self.row_names, strict=True)),
            tuple((r.name, r.dtype, tuple(r.shape), r.chunk_id) for r in self.regions),
            self.enc.length >= STREAM_ALIGN_ABOVE,
        )


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
    plan = _Plan(ckpt, options, chain_base)
    placeholder = "0" * 8  # a digest's size: the layout does not change when the real one goes in
    first = plan.facts_for([0] * len(plan.enc.chunks), placeholder)
    shape = plan.shape(first)
    offset, prefix, suffix = _place_stream(f, start, plan, shape, first)
    f.seek(start)
    stream.write_fully(f, prefix)
    f.seek(start + offset + plan.enc.length)
    stream.write_fully(f, suffix)
    end = f.tell()
    if f.seek(0, io.SEEK_END) > end:  # a retried layout left bytes past the end
        f.truncate(end)  # only then: ftruncate costs about 1 ms on ext4 while the stream is being written back
    return end - start


def _place_stream(f: BinaryIO, start: int, plan: _Plan, shape: tuple[object, ...], first: _Facts) -> tuple[int, bytes, bytes]:
    """Write the stream where the structure puts it; return (its offset, the structure before it, after it).

    The offset comes from the shape's template or a remembered layout; if the
    real layout puts the stream elsewhere (not expected: equal sizes give
    equal layouts), the stream is written again there.
    """
    fresh = shape not in _TEMPLATES
    if fresh:
        if len(_TEMPLATES) >= 64:
            _TEMPLATES.clear()
        _TEMPLATES[shape] = _make_template(plan.enc.length, plan.layout, first)
    template = _TEMPLATES[shape]
    offset = template.offset if template is not None else _OFFSETS.get(shape)
    if offset is None:
        offset, _, _ = plan.layout(first)
    for _attempt in range(2):
        f.seek(start + offset)
        facts = _emit(f, plan)
        final, prefix, suffix = _structure(plan, shape, facts, fresh)
        if final == offset:
            if len(_OFFSETS) >= 64:
                _OFFSETS.clear()
            _OFFSETS[shape] = offset  # the next checkpoint of this kind skips the placeholder layout
            return offset, prefix, suffix
        offset = final  # correct either way: write it there
    raise CheckpointError(None, "HDF5 layout of /rkckpt did not settle")


def _emit(f: BinaryIO, plan: _Plan) -> _Facts:
    """Write the stream at ``f``'s position; return the facts its CRCs give (index rows, content digest)."""
    enc = plan.enc
    written = stream.emit(f, enc, plan.options, chunk_crcs=True)
    assert written.payload_crcs is not None
    _start_writeback(f)  # the disk takes the stream while the HDF5 structure is made
    crcs = [
        pc if p.raw else crc32(memoryview(c.data).cast("B"))
        for p, pc, c in zip(enc.chunks, written.payload_crcs, plan.ckpt.chunks, strict=True)
    ]
    digest = digest_from_crcs((p.chunk_type, p.chunk_id, crc, p.uncompressed_size) for p, crc in zip(enc.chunks, crcs, strict=True))
    return plan.facts_for(crcs, digest)


def _structure(plan: _Plan, shape: tuple[object, ...], facts: _Facts, fresh: bool) -> tuple[int, bytes, bytes]:
    """The HDF5 structure for ``facts``: the shape's template patched, or laid out again where there is none.

    A template's first use is checked against a real layout; one that does
    not render or does not match is dropped for this shape.
    """
    template = _TEMPLATES.get(shape)
    if template is not None:
        try:
            rendered = (template.offset, template.render(facts, plan.enc.length), b"")
        except ValueError:
            _TEMPLATES[shape] = None
            return plan.layout(facts)
        if not fresh:
            return rendered
        real = plan.layout(facts)
        if real != rendered:
            _TEMPLATES[shape] = None
        return real
    return plan.layout(facts)


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
    try:
        fd = f.fileno()
        f.flush()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return
    func = _writeback_call()
    if func:
        func(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _writeback_call() -> Any:
    """libc's ``sync_file_range`` through ctypes, looked up once (False where there is none)."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            func = ctypes.CDLL(None, use_errno=True).sync_file_range
            func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            _sync_file_range = func
        except (OSError, AttributeError):
            _sync_file_range = False
    return _sync_file_range


_warm = False


def is_warm() -> bool:
    """True once ``warm_up`` ran (or started) in this process."""
    return _warm


def warm_up() -> None:
    """Pay the writer's one-off costs now: importing h5py, libhdf5's first file, the ``sync_file_range`` lookup.

    Why: the first ``.rk.h5`` write of a process otherwise pays them, some
    40-60 ms of CPU (h5py's import alone is 20-40 ms), on top of the write.
    ``CheckpointManager`` calls this from a background thread when it
    starts, so the first periodic checkpoint of a run does not stall on it.
    What stays is per shape of checkpoint (``_Template``: two layouts). Safe
    to call from any thread and more than once (later calls return at once).
    """
    global _warm
    if _warm:
        return
    _warm = True
    _writeback_call()
    _layout(PAGE, lambda h: None)  # imports h5py; libhdf5 sets up its first file (free lists, property lists)


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
