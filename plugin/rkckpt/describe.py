"""The stable JSON description of one checkpoint file (``rkckpt inspect --json``): ``describe_file``.

A folder's listing (one row per checkpoint, ``rkckpt ls``) is ``chain.describe``.

Scripts rely on these keys; add keys only with care and never rename one.
"""

from __future__ import annotations

import zlib
from typing import Any

from .container import ParsedFile
from .flags import CHUNK_PART
from .model import ChunkType


def describe_file(parsed: ParsedFile, names: dict[int, str] | None = None) -> dict[str, Any]:
    """JSON-ready dict: header, metadata, content digest and one entry per chunk.

    ``names`` maps DeviceMemory chunk ids to region names known from outside
    the stream (e.g. an HDF5 index); names recorded in the metadata win.
    """
    h = parsed.header
    ck = parsed.checkpoint
    m = ck.metadata
    known = dict(names or {})
    try:
        known.update(ck.region_names())
    except Exception:  # a malformed region table must not hide the rest
        pass
    chunks = []
    for c, (flags, stored) in zip(ck.chunks, _stored(parsed), strict=True):
        entry: dict[str, Any] = {
            "type": c.chunk_type,
            "flags": flags,
            "uncompressed_size": c.size,
            "compressed_size": stored,
            "chunk_id": c.chunk_id,
            "crc32": zlib.crc32(c.data) & 0xFFFFFFFF,
        }
        if c.chunk_type == ChunkType.DEVICE_MEMORY and c.chunk_id in known:
            entry["name"] = known[c.chunk_id]
        chunks.append(entry)
    return {
        "header": {
            "version": h.version,
            "header_size": h.header_size,
            "total_size": h.total_size,
            "chunk_count": h.chunk_count,
            "compression": h.compression,
            "checksum": h.checksum,
            "flags": h.flags,
            "created_at": h.created_at,
        },
        "metadata": {
            "kernel_id": m.kernel_id,
            "kernel_type": m.kernel_type,
            "current_step": m.current_step,
            "grid_size": list(m.grid_size),
            "tile_size": list(m.tile_size),
            "hlc": list(m.hlc),
            "custom": dict(sorted(m.custom.items())),
        },
        "content_digest": ck.content_digest(),
        "chunks": chunks,
    }


def _stored(parsed: ParsedFile) -> list[tuple[int, int]]:
    """(stored flags, stored bytes) per chunk of the checkpoint.

    One chunk header per chunk, except in a sharded file, where a chunk
    split over streams has one header per piece (flag ``CHUNK_PART``): its
    pieces are folded into one entry (flags OR-ed without the part bit,
    stored sizes added), so the JSON always lists the checkpoint's chunks.
    """
    headers = parsed.chunk_headers
    if len(headers) == len(parsed.checkpoint.chunks):
        return [(h.flags, h.compressed_size) for h in headers]
    pieces: dict[tuple[int, int], list[int]] = {}
    for h in headers:
        acc = pieces.setdefault((h.chunk_type, h.chunk_id), [0, 0])
        acc[0] |= h.flags & ~CHUNK_PART
        acc[1] += h.compressed_size
    return [tuple(pieces.get((c.chunk_type, c.chunk_id), [0, 0])) for c in parsed.checkpoint.chunks]  # type: ignore[misc]
