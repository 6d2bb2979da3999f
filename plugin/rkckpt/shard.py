"""Sharding: checkpoints over 1 GiB as several RKCKPT streams in one file.

RKCKPT v1 caps a stream at 1 GiB (``MAX_CHECKPOINT_SIZE``). A larger state is
written as consecutive streams in one file, each a complete v1 stream of at
most 1 GiB with header flag ``HDR_SHARD``, ``header_size`` 64 and the *exact*
``total_size`` (so the next stream's offset is known without the reference's
off-by-8 quirk). Every stream repeats the checkpoint's metadata plus the
custom key ``rkckpt.shard``::

    {"count": N, "index": i, "parts": [[k, offset, total], ...]}

where each entry says that chunk ``k`` of this stream (flagged
``CHUNK_PART``) holds bytes ``offset..`` of a chunk of ``total`` bytes that
continues in the next stream(s). Chunks that fit are stored whole. The plan
depends only on uncompressed sizes, so it is deterministic and every stream
stays under the cap even if nothing compresses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import CheckpointError
from .model import Checkpoint, Metadata

SHARD_KEY = "rkckpt.shard"
MAX_STREAM = 1 << 30
_STREAM_OVERHEAD = 64 + 4
_ALIGN = 1 << 20


@dataclass
class Piece:
    chunk_index: int  # in the checkpoint
    offset: int
    length: int
    total: int

    @property
    def partial(self) -> bool:
        return self.length != self.total


@dataclass
class StreamPlan:
    pieces: list[Piece] = field(default_factory=list)


def stored_bound(size: int, block_size: int) -> int:
    """Most bytes a chunk of ``size`` can take stored (raw frames + frame table)."""
    return size + 8 + 4 * (size // max(1, block_size // 2) + 1)


def shard_metadata(meta: Metadata, index: int, count: int, pieces: list[Piece]) -> Metadata:
    parts = [[k, p.offset, p.total] for k, p in enumerate(pieces) if p.partial]
    value = json.dumps({"count": count, "index": index, "parts": parts}, sort_keys=True, separators=(",", ":"))
    return meta.with_custom(**{SHARD_KEY: value})


def needs_sharding(ckpt: Checkpoint, meta_len: int, block_size: int, limit: int | None = None) -> bool:
    limit = MAX_STREAM if limit is None else limit
    bound = _STREAM_OVERHEAD + meta_len + sum(32 + stored_bound(c.size, block_size) for c in ckpt.chunks)
    return bound > limit


def plan_streams(ckpt: Checkpoint, meta_len: int, block_size: int, limit: int | None = None) -> list[StreamPlan]:
    """Split chunks into streams of at most ``limit`` bytes each (worst case)."""
    limit = MAX_STREAM if limit is None else limit
    margin = 64 * 1024 + meta_len  # metadata plus the shard key's JSON
    budget = limit - _STREAM_OVERHEAD - margin
    if budget < 4 * _ALIGN:
        raise CheckpointError(None, f"metadata of {meta_len} bytes leaves no room for data in a shard")
    streams = [StreamPlan()]
    room = budget
    for i, c in enumerate(ckpt.chunks):
        size, off = c.size, 0
        while True:
            cap = room - 44 - 4 * (room // max(1, block_size // 2) + 1)  # payload that surely fits in ``room``
            remaining = size - off
            take = min(remaining, max(0, cap))
            if take < remaining:
                take -= take % _ALIGN
            if cap < 0 or (take <= 0 and remaining > 0):
                streams.append(StreamPlan())
                room = budget
                continue
            streams[-1].pieces.append(Piece(i, off, take, size))
            room -= 32 + stored_bound(take, block_size)
            off += take
            if off >= size:
                break
        if len(streams) > 100_000:
            raise CheckpointError(None, "state needs more than 100000 shards")
    return [s for s in streams if s.pieces]


def parse_shard_key(meta: Metadata, source: str | None, chunk_count: int) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """(index, count, {chunk index in stream: (offset, total)}) from a stream's metadata."""
    raw = meta.custom.get(SHARD_KEY)
    if raw is None:
        raise CheckpointError(source, f"shard stream lacks the {SHARD_KEY!r} metadata key")
    try:
        obj = json.loads(raw)
        index, count = int(obj["index"]), int(obj["count"])
        parts = {int(k): (int(o), int(t)) for k, o, t in obj["parts"]}
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(source, f"metadata key {SHARD_KEY!r} is malformed: {exc}") from None
    if not 0 <= index < count or any(not 0 <= k < chunk_count or o < 0 or t < 0 for k, (o, t) in parts.items()):
        raise CheckpointError(source, f"metadata key {SHARD_KEY!r} is out of range")
    return index, count, parts
