"""Per-chunk payload encoding: raw (compat) and the project's extensions.

``format`` calls ``encode_payload``/``decode_payload`` for every chunk and
knows nothing about compression itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError
from .flags import (
    CHUNK_BLOCK_DELTA,
        COMPRESSION_ZSTD,
    CHUNK_ZSTD,
    HDR_BLOCK_DELTA,
    HDR_EXTENDED,
    KNOWN_CHUNK_FLAGS,
)


@dataclass(frozen=True)
class WriteOptions:
    """How to encode a checkpoint. ``compat=True`` writes what the reference reads."""

    compat: bool = False
    level: int = 3


COMPAT = WriteOptions(compat=True)


def encode_payload(data: bytes | memoryview, flags: int, options: WriteOptions) -> tuple[int, bytes | memoryview]:
    """Return (chunk flags, stored payload) for an uncompressed chunk payload."""
    return flags, data


def decode_payload(flags: int, payload: memoryview, uncompressed_size: int, source: str | None) -> memoryview | bytes:
    """Return the uncompressed bytes of a stored payload, checking its size."""
    if flags & ~KNOWN_CHUNK_FLAGS:
        raise CheckpointError(source, f"unknown chunk flags 0x{flags:x}")
    if payload.nbytes != uncompressed_size:
        raise CheckpointError(source, f"raw chunk stores {payload.nbytes} bytes but uncompressed_size is {uncompressed_size}")
    return payload


def logical_flags(stored_flags: int) -> int:
    """Flags that describe the decoded data (storage-only bits dropped)."""
    return stored_flags & CHUNK_BLOCK_DELTA


def header_bits(chunk_flags: int, compression: int, header_flags: int) -> tuple[int, int]:
    """Fold one chunk's stored flags into the header's compression and flags."""
    if chunk_flags:
        header_flags |= HDR_EXTENDED
    if chunk_flags & CHUNK_ZSTD:
        compression = COMPRESSION_ZSTD
    if chunk_flags & CHUNK_BLOCK_DELTA:
        header_flags |= HDR_BLOCK_DELTA
    return compression, header_flags
