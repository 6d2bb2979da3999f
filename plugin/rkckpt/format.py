"""RKCKPT v1 bytes <-> ``Checkpoint`` (see docs/RKCKPT-FORMAT.md).

The reader never trusts a size field before checking it against the bytes
actually present, so a truncated or hostile file fails with a
``CheckpointError`` and never with a huge allocation or a struct error.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import codec
from .errors import CheckpointError
from .flags import CHUNK_PART, COMPRESSION_LZ4, COMPRESSION_NONE, COMPRESSION_ZSTD, HDR_SHARD, KNOWN_HEADER_FLAGS
from .model import Checkpoint, Chunk, ChunkType, Metadata

MAGIC = 0x524B434B50543031
VERSION = 1
HEADER_SIZE = 64
REFERENCE_HEADER_SIZE = 56
MAX_CHECKPOINT_SIZE = 1 << 30
CHUNK_HEADER_SIZE = 32

_HEADER = struct.Struct("<QIIQIIIIQ16s")
_CHUNK = struct.Struct("<IIQQQ")
assert _HEADER.size == HEADER_SIZE and _CHUNK.size == CHUNK_HEADER_SIZE


@dataclass(frozen=True)
class Header:
    version: int
    header_size: int
    total_size: int
    chunk_count: int
    compression: int
    checksum: int
    flags: int
    created_at: int


@dataclass(frozen=True)
class ChunkHeader:
    chunk_type: int
    flags: int
    uncompressed_size: int
    compressed_size: int
    chunk_id: int
    data_offset: int  # offset of the stored payload in the stream


@dataclass
class ParsedFile:
    """A parsed stream: the checkpoint plus the on-disk details (for inspect)."""

    header: Header
    chunk_headers: list[ChunkHeader]
    checkpoint: Checkpoint


class _Reader:
    def __init__(self, buf: memoryview, source: str | None) -> None:
        self.buf = buf
        self.pos = 0
        self.source = source

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.buf.nbytes:
            raise CheckpointError(self.source, f"{what} needs {n} bytes at offset {self.pos}, only {self.buf.nbytes - self.pos} present")

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        n = self.u32(f"{what} length")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(self.source, f"{what} is not valid UTF-8") from None


def _source(source: str | os.PathLike[str] | None) -> str | None:
    return None if source is None else os.fspath(source)


def parse_header(buf: bytes | memoryview, source: str | os.PathLike[str] | None = None, *, max_size: int = MAX_CHECKPOINT_SIZE) -> Header:
    src = _source(source)
    mv = memoryview(buf).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise CheckpointError(src, f"file is {mv.nbytes} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, header_size, total_size, chunk_count, compression, checksum, flags, created_at, _ = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CheckpointError(src, f"not an RKCKPT file (magic 0x{magic:016x})")
    if version == 0 or version > VERSION:
        raise CheckpointError(src, f"unsupported RKCKPT version {version} (this reader knows 1)")
    if header_size not in (REFERENCE_HEADER_SIZE, HEADER_SIZE):
        raise CheckpointError(src, f"header_size {header_size} is neither 56 nor 64")
    if compression not in (COMPRESSION_NONE, COMPRESSION_LZ4, COMPRESSION_ZSTD):
        raise CheckpointError(src, f"unknown compression {compression}")
    if flags & ~KNOWN_HEADER_FLAGS:
        raise CheckpointError(src, f"unknown header flags 0x{flags:x}")
    if total_size > max_size:
        raise CheckpointError(src, f"total_size {total_size} exceeds the limit of {max_size} bytes")
    return Header(version, header_size, total_size, chunk_count, compression, checksum, flags, created_at)


def parse(
    buf: bytes | bytearray | memoryview,
    source: str | os.PathLike[str] | None = None,
    *,
    verify_checksum: bool = True,
    max_size: int = MAX_CHECKPOINT_SIZE,
) -> ParsedFile:
    """Parse one RKCKPT stream held in memory."""
    src = _source(source)
    mv = memoryview(buf).cast("B")
    header = parse_header(mv, src, max_size=max_size)
    if header.flags & HDR_SHARD:
        raise CheckpointError(src, "stream is one shard of a sharded (> 1 GiB) checkpoint; read the whole file with rkckpt.io.load")
    n = mv.nbytes
    if header.total_size not in (n, n - (HEADER_SIZE - REFERENCE_HEADER_SIZE)):
        raise CheckpointError(src, f"total_size field says {header.total_size} bytes but the file has {n} (truncated or padded)")
    if verify_checksum:
        crc = zlib.crc32(mv[HEADER_SIZE:]) & 0xFFFFFFFF
        if crc != header.checksum:
            raise CheckpointError(src, f"checksum mismatch: header says 0x{header.checksum:08x}, data gives 0x{crc:08x}")
    r = _Reader(mv, src)
    r.pos = HEADER_SIZE
    meta_len = r.u32("metadata length")
    r.need(meta_len, "metadata")
    meta_end = r.pos + meta_len
    mr = _Reader(mv[:meta_end], src)
    mr.pos = r.pos
    metadata = _parse_metadata(mr)
    if mr.pos != meta_end:
        raise CheckpointError(src, f"metadata length says {meta_len} bytes but its fields use {mr.pos - r.pos}")
    r.pos = meta_end
    # every chunk needs at least its header: bound the count before looping
    if header.chunk_count > (n - r.pos) // CHUNK_HEADER_SIZE:
        raise CheckpointError(src, f"chunk_count {header.chunk_count} cannot fit in the {n - r.pos} bytes left")
    chunk_headers: list[ChunkHeader] = []
    chunks: list[Chunk] = []
    for i in range(header.chunk_count):
        raw = r.take(CHUNK_HEADER_SIZE, f"chunk {i} header")
        ctype, cflags, usize, csize, cid = _CHUNK.unpack(raw)
        if csize > n - r.pos:
            raise CheckpointError(src, f"chunk {i} declares {csize} data bytes, only {n - r.pos} present (truncated chunk)")
        if usize > max_size:
            raise CheckpointError(src, f"chunk {i} declares uncompressed_size {usize} over the limit")
        if cflags & CHUNK_PART:
            raise CheckpointError(src, f"chunk {i} is a piece of a split chunk (CHUNK_PART) outside a sharded file")
        ch = ChunkHeader(ctype, cflags, usize, csize, cid, r.pos)
        payload = r.take(csize, f"chunk {i} data")
        try:
            data = codec.decode_payload(cflags, payload, usize, src)
        except CheckpointError as exc:
            raise CheckpointError(src, f"chunk {i}: {exc.problem}") from None
        chunk_headers.append(ch)
        chunks.append(Chunk(ctype, cid, data, flags=codec.logical_flags(cflags)))
    if r.pos != n:
        raise CheckpointError(src, f"{n - r.pos} unexpected bytes after the last chunk")
    ckpt = Checkpoint(metadata, chunks, created_at=header.created_at)
    return ParsedFile(header, chunk_headers, ckpt)


def _parse_metadata(r: _Reader) -> Metadata:
    kernel_id = r.string("kernel_id")
    kernel_type = r.string("kernel_type")
    step = r.u64("current_step")
    grid = (r.u32("grid_size"), r.u32("grid_size"), r.u32("grid_size"))
    tile = (r.u32("tile_size"), r.u32("tile_size"), r.u32("tile_size"))
    hlc = (r.u64("hlc"), r.u64("hlc"), r.u64("hlc"))
    count = r.u32("custom_count")
    if count > (r.buf.nbytes - r.pos) // 8:
        raise CheckpointError(r.source, f"custom_count {count} cannot fit in the metadata")
    custom: dict[str, str] = {}
    for _ in range(count):
        k = r.string("custom key")
        custom[k] = r.string(f"custom value of {k!r}")
    return Metadata(kernel_id, kernel_type, step, grid, tile, hlc, custom)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(4, "little") + b


def encode_metadata(m: Metadata) -> bytes:
    parts = [_string(m.kernel_id), _string(m.kernel_type), struct.pack("<Q", m.current_step)]
    parts.append(struct.pack("<3I", *m.grid_size))
    parts.append(struct.pack("<3I", *m.tile_size))
    parts.append(struct.pack("<3Q", *m.hlc))
    parts.append(struct.pack("<I", len(m.custom)))
    for k in sorted(m.custom):
        parts.append(_string(k) + _string(m.custom[k]))
    return b"".join(parts)


def encode(ckpt: Checkpoint, options: codec.WriteOptions = codec.COMPAT, *, header_flags: int = 0) -> bytes:
    """Serialise ``ckpt``; reference quirks (header_size 56, total_size len-8) kept."""
    meta = encode_metadata(ckpt.metadata)
    body: list[bytes | memoryview] = [struct.pack("<I", len(meta)), meta]
    compression = COMPRESSION_NONE
    flags = header_flags
    elems = {} if options.compat else elem_sizes(ckpt)
    for c in ckpt.chunks:
        if c.flags & CHUNK_PART:
            raise CheckpointError(None, "split-chunk pieces (CHUNK_PART) are only written by rkckpt.io for sharded files")
        cflags, payload = codec.encode_payload(c.data, c.flags, options, elem_size=elems.get((c.chunk_type, c.chunk_id)))
        compression, flags = codec.header_bits(cflags, compression, flags)
        pv = memoryview(payload).cast("B")
        body.append(_CHUNK.pack(c.chunk_type, cflags, c.size, pv.nbytes, c.chunk_id))
        body.append(pv)
    if options.compat and (flags or compression):
        raise CheckpointError(None, "compat mode cannot encode extension chunks (block deltas or flags)")
    blob = b"".join(body)
    total = HEADER_SIZE + len(blob)
    checksum = zlib.crc32(blob) & 0xFFFFFFFF
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        REFERENCE_HEADER_SIZE,
        total - (HEADER_SIZE - REFERENCE_HEADER_SIZE),
        len(ckpt.chunks),
        compression,
        checksum,
        flags,
        ckpt.created_at,
        bytes(16),
    )
    return header + blob


def elem_sizes(ckpt: Checkpoint) -> dict[tuple[int, int], int]:
    """Shuffle element size per named region chunk (floats only; 0 = no shuffle)."""
    try:
        regions = ckpt.regions()
    except CheckpointError:
        return {}
    return {(int(ChunkType.DEVICE_MEMORY), info.chunk_id): codec.elem_size_for(info.dtype) for info in regions.values()}


def read(path: str | os.PathLike[str], **kw: object) -> ParsedFile:
    """Read and parse a ``.rkcp`` file."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size > kw.get("max_size", MAX_CHECKPOINT_SIZE) + HEADER_SIZE:  # type: ignore[operator]
                head = f.read(HEADER_SIZE)
                parse_header(head, path, **{k: v for k, v in kw.items() if k == "max_size"})  # type: ignore[arg-type]
                raise CheckpointError(path, f"file is {size} bytes, over the RKCKPT limit")
            data = np.empty(size, dtype=np.uint8)  # one buffer, filled in place: no bytes copies
            view, got = memoryview(data), 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise CheckpointError(path, f"cannot read: {exc.strerror}") from None
    return parse(memoryview(data)[:got], path, **kw)  # type: ignore[arg-type]
