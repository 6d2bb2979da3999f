"""The RKCKPT v1 byte layouts, defined once (see docs/RKCKPT-FORMAT.md).

Everything that packs or unpacks a file header, a chunk header or the
metadata block goes through here, including the reference's size quirk:
``ringkernel-core`` writes a 64-byte header but records ``header_size`` 56
and ``total_size`` = file length - 8. Shard streams (``HDR_SHARD``) record
the exact 64 and length so the next stream's offset is known.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .errors import CheckpointError
from .flags import COMPRESSION_LZ4, COMPRESSION_NONE, COMPRESSION_ZSTD, HDR_SHARD, KNOWN_HEADER_FLAGS
from .model import Metadata

MAGIC = 0x524B434B50543031
VERSION = 1
HEADER_SIZE = 64
REFERENCE_HEADER_SIZE = 56
#: what the reference's ``total_size`` lacks: ``HEADER_SIZE - REFERENCE_HEADER_SIZE``
SIZE_QUIRK = HEADER_SIZE - REFERENCE_HEADER_SIZE
MAX_CHECKPOINT_SIZE = 1 << 30
CHUNK_HEADER_SIZE = 32

HEADER = struct.Struct("<QIIQIIIIQ16s")
CHUNK = struct.Struct("<IIQQQ")
U32 = struct.Struct("<I")
assert HEADER.size == HEADER_SIZE and CHUNK.size == CHUNK_HEADER_SIZE


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


def _src(source: str | os.PathLike[str] | None) -> str | None:
    return None if source is None else os.fspath(source)


# ------------------------------------------------------------------ header
def pack_header(length: int, chunk_count: int, compression: int, checksum: int, flags: int, created_at: int) -> bytes:
    """The 64-byte header of a stream of ``length`` bytes (quirk applied unless a shard)."""
    if flags & HDR_SHARD:
        header_size, total = HEADER_SIZE, length
    else:
        header_size, total = REFERENCE_HEADER_SIZE, length - SIZE_QUIRK
    return HEADER.pack(MAGIC, VERSION, header_size, total, chunk_count, compression, checksum, flags, created_at, bytes(16))


def unpack_header(buf: bytes | memoryview, source: str | os.PathLike[str] | None = None, *, max_size: int = MAX_CHECKPOINT_SIZE) -> Header:
    """Parse and sanity-check a header (sizes against the file come later, see ``stream_length``)."""
    src = _src(source)
    mv = memoryview(buf).cast("B")
    if mv.nbytes < HEADER_SIZE:
        raise CheckpointError(src, f"file is {mv.nbytes} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, header_size, total_size, chunk_count, compression, checksum, flags, created_at, _ = HEADER.unpack_from(mv, 0)
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


def stream_length(header: Header, available: int, source: str | None, at: int = 0) -> int:
    """Bytes the stream whose header is ``header`` occupies, given ``available`` bytes from its start.

    A shard states its exact length (later streams may follow); a plain
    stream takes the rest of the file, and its ``total_size`` must say so,
    with or without the reference's 8-byte quirk.
    """
    if header.flags & HDR_SHARD:
        if header.header_size != HEADER_SIZE or not HEADER_SIZE < header.total_size <= available:
            raise CheckpointError(source, f"shard at offset {at} declares {header.total_size} bytes, {available} present")
        return header.total_size
    if header.total_size not in (available, available - SIZE_QUIRK):
        raise CheckpointError(source, f"total_size field says {header.total_size} bytes but the file has {available} (truncated or padded)")
    return available


# ------------------------------------------------------------------ chunks
def pack_chunk(chunk_type: int, flags: int, uncompressed_size: int, stored_size: int, chunk_id: int) -> bytes:
    return CHUNK.pack(chunk_type, flags, uncompressed_size, stored_size, chunk_id)


def unpack_chunk(raw: bytes | memoryview, data_offset: int) -> ChunkHeader:
    ctype, cflags, usize, csize, cid = CHUNK.unpack(raw)
    return ChunkHeader(ctype, cflags, usize, csize, cid, data_offset)


# ------------------------------------------------------------------ metadata
class _Fields:
    """Sequential little-endian fields of a metadata block, each length checked."""

    def __init__(self, buf: memoryview, source: str | None) -> None:
        self.buf, self.pos, self.source = buf, 0, source

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.buf.nbytes:
            raise CheckpointError(self.source, f"{what} needs {n} bytes at offset {self.pos}, only {self.buf.nbytes - self.pos} present")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little")

    def string(self, what: str) -> str:
        raw = self.take(self.u32(f"{what} length"), what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(self.source, f"{what} is not valid UTF-8") from None


def unpack_metadata(buf: bytes | memoryview, source: str | os.PathLike[str] | None = None) -> Metadata:
    """The metadata block (without its u32 length prefix); every byte must be used."""
    r = _Fields(memoryview(buf).cast("B"), _src(source))
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
    if r.pos != r.buf.nbytes:
        raise CheckpointError(r.source, f"metadata length says {r.buf.nbytes} bytes but its fields use {r.pos}")
    return Metadata(kernel_id, kernel_type, step, grid, tile, hlc, custom)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(4, "little") + b


def pack_metadata(m: Metadata) -> bytes:
    """The metadata block with its u32 length prefix (custom keys sorted: deterministic bytes)."""
    parts = [_string(m.kernel_id), _string(m.kernel_type), struct.pack("<Q", m.current_step)]
    parts.append(struct.pack("<3I", *m.grid_size))
    parts.append(struct.pack("<3I", *m.tile_size))
    parts.append(struct.pack("<3Q", *m.hlc))
    parts.append(struct.pack("<I", len(m.custom)))
    for k in sorted(m.custom):
        parts.append(_string(k) + _string(m.custom[k]))
    body = b"".join(parts)
    return U32.pack(len(body)) + body
