"""Bits this project adds to the RKCKPT v1 header and chunk flags.

The reference writes 0 everywhere, so any non-zero bit marks an extension
that a reference reader would not understand; ``compat`` mode never sets one.
See docs/FORMAT-EXTENSIONS.md for the full description.
"""

from __future__ import annotations

# header.compression values
COMPRESSION_NONE = 0
COMPRESSION_LZ4 = 1
COMPRESSION_ZSTD = 2

# header.flags bits
HDR_EXTENDED = 1 << 0  # file uses chunk-level extensions below
HDR_BLOCK_DELTA = 1 << 1  # at least one chunk is a block-level delta patch
HDR_SHARD = 1 << 2  # one stream of a sharded (> 1 GiB) checkpoint

# chunk.flags bits
CHUNK_ZSTD = 1 << 0  # payload is one or more zstd frames
CHUNK_SHUFFLE = 1 << 1  # bytes were shuffled before compression
CHUNK_BLOCK_DELTA = 1 << 2  # decompressed data is a block patch against the parent chunk
CHUNK_PART = 1 << 3  # one piece of a chunk split across shard streams (HDR_SHARD only)
CHUNK_SHUFFLE_ELEM_SHIFT = 8  # bits 8..15: element size used by the shuffle
CHUNK_SHUFFLE_ELEM_MASK = 0xFF << CHUNK_SHUFFLE_ELEM_SHIFT

KNOWN_HEADER_FLAGS = HDR_EXTENDED | HDR_BLOCK_DELTA | HDR_SHARD
KNOWN_CHUNK_FLAGS = CHUNK_ZSTD | CHUNK_SHUFFLE | CHUNK_BLOCK_DELTA | CHUNK_PART | CHUNK_SHUFFLE_ELEM_MASK
#: bits that describe the decoded data (kept on ``Chunk.flags``); the rest describe storage only
LOGICAL_CHUNK_FLAGS = CHUNK_BLOCK_DELTA | CHUNK_PART
