"""Per-chunk payload encoding: raw (compat) and the project's extensions.

The container (``container.py``) calls ``encode_chunk`` and ``decode_into``
for every chunk and knows nothing about compression.

A compressed chunk (``CHUNK_ZSTD``) is stored as a *frame table* so that its
sub-blocks are compressed and decompressed in parallel (zstandard releases
the GIL) and so that every size is checked before anything is allocated::

    u32 block_size        uncompressed bytes per sub-block (last one shorter)
    u32 frame_count       == ceil(uncompressed_size / block_size)
    frame_count x u32     stored size of each frame; bit 31 set = stored raw
                          (the block's bytes as they would enter zstd, i.e.
                          after the shuffle when CHUNK_SHUFFLE is set)
    frames...             each an independent zstd frame (content size in its
                          header) or, for raw entries, the block's bytes

With ``CHUNK_SHUFFLE`` each sub-block was byte-shuffled before compression
with the element size in flag bits 8..15 (byte k of every element grouped
together; a tail shorter than one element is kept as is). Why per sub-block:
each frame stays independent, so decoding needs no second pass.

Adaptive: a sample of the chunk is compressed first; when it does not shrink
to ``min_ratio``, or (``adaptive="speed"``) when a cost model says that
compressing would make the write slower than storing raw, the chunk is
stored raw (no flags), so compression never slows a checkpoint down. The
decision depends on sizes and options only, never on timings, so the same
input always gives the same bytes.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from .errors import CheckpointError
from .flags import (
    CHUNK_BLOCK_DELTA,
    CHUNK_SHUFFLE,
    CHUNK_SHUFFLE_ELEM_MASK,
    CHUNK_SHUFFLE_ELEM_SHIFT,
    CHUNK_ZSTD,
    COMPRESSION_ZSTD,
    HDR_BLOCK_DELTA,
    HDR_EXTENDED,
    KNOWN_CHUNK_FLAGS,
    LOGICAL_CHUNK_FLAGS,
)

RAW_FRAME = 1 << 31
MIN_BLOCK = 4096
MAX_BLOCK = 1 << 30
_U32 = struct.Struct("<I")

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class WriteOptions:
    """How to encode a checkpoint. ``compat=True`` writes what the reference reads.

    ``level``: zstd level (1 is the fast one; higher rarely pays off for
    float state). ``shuffle``: byte-shuffle float regions before zstd.
    ``threads``: 0 = one per CPU. ``block_size``: bytes per independent zstd
    frame. ``min_ratio``: compress a chunk only when a sample shrinks to at
    most this fraction; otherwise it is stored raw. ``compress=False`` stores
    every chunk raw but keeps the other extensions (block deltas, shards).
    ``adaptive="speed"`` (default) also requires that compressing is
    predicted not to make the write slower than storing raw: with sample
    ratio r, ``threads * zstd_bps >= disk_bps / (1 - r)`` (compression and
    writing run one after the other per chunk). The throughputs are options,
    not timings, so output stays deterministic; on a 2-core machine with a
    1.5 GB/s disk this stores everything raw. ``adaptive="size"`` compresses
    whenever the ratio is good (use it for slow or remote storage).
    ``early_writeback``: when writing to a real file, ask the kernel to start
    writing each piece to disk right away (posix_fadvise DONTNEED), so disk
    I/O overlaps the copying and the final fsync has little left to do.
    """

    compat: bool = False
    level: int = 1
    shuffle: bool = True
    threads: int = 0
    block_size: int = 4 << 20
    min_ratio: float = 0.5
    sample_size: int = 256 << 10
    compress: bool = True
    adaptive: Literal["speed", "size"] = "speed"
    zstd_bps: float = 0.4e9
    disk_bps: float = 1.5e9
    early_writeback: bool = True

    def __post_init__(self) -> None:
        if not MIN_BLOCK <= self.block_size <= MAX_BLOCK:
            raise ValueError(f"block_size must be within [{MIN_BLOCK}, {MAX_BLOCK}]")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError("min_ratio must be within [0, 1]")
        if self.adaptive not in ("speed", "size"):
            raise ValueError(f"adaptive must be 'speed' or 'size', not {self.adaptive!r}")


COMPAT = WriteOptions(compat=True)


@dataclass
class Encoded:
    """A chunk ready to be written: its stored flags and payload pieces."""

    flags: int
    parts: list[Buffer]
    size: int  # sum of the parts' lengths


# --------------------------------------------------------------- helpers
_tls = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _threads(options_threads: int) -> int:
    return options_threads if options_threads > 0 else max(1, os.cpu_count() or 1)


def decode_threads() -> int:
    """Threads a reader decodes frames with (one per CPU), as a full read does."""
    return _threads(0)


_pools_pid = os.getpid()


def worker_pool(n: int) -> ThreadPoolExecutor:
    """Shared worker pool; rebuilt in a forked child, whose copy has no threads."""
    global _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        pool = _pools.get(n)
        if pool is None:
            pool = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rkckpt-codec")
        return pool


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level: zstd contexts are not thread-safe."""
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def _u8(data: Buffer) -> np.ndarray:
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def shuffle(data: Buffer, elem: int) -> Buffer:
    """Group byte k of every ``elem``-byte element together (tail kept as is)."""
    a = _u8(data)
    n = (a.size // elem) * elem
    if elem <= 1 or n == 0:
        return data
    body = a[:n].reshape(-1, elem).T
    if n == a.size:
        return np.ascontiguousarray(body).data
    out = np.empty(a.size, dtype=np.uint8)
    out[:n].reshape(elem, -1)[:] = body
    out[n:] = a[n:]
    return out.data


def unshuffle_into(src: Buffer, elem: int, out: np.ndarray) -> None:
    """Inverse of ``shuffle``, written into ``out`` (uint8, same length)."""
    a = _u8(src)
    n = (a.size // elem) * elem
    if elem <= 1 or n == 0:
        out[:] = a
        return
    dst = out[:n].reshape(-1, elem)
    planes = a[:n].reshape(elem, -1)
    for k in range(elem):  # one strided column at a time: ~4x faster than a transposed copy
        dst[:, k] = planes[k]
    out[n:] = a[n:]


def elem_size_for(dtype: str | np.dtype) -> int:
    """Shuffle element size for a region dtype: floats (and complex) only."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return dt.itemsize
    if dt.kind == "c":
        return dt.itemsize // 2
    return 0


def _sample(data: np.ndarray, size: int, block: int) -> np.ndarray:
    """A few slices spread over the chunk (aligned to 4 KiB), concatenated."""
    if data.size <= size:
        return data
    pieces = 8
    each = max(MIN_BLOCK, size // pieces)
    starts = np.linspace(0, data.size - each, pieces).astype(np.int64) // MIN_BLOCK * MIN_BLOCK
    return np.concatenate([data[s : s + each] for s in starts])


def _ratio(sample: np.ndarray, elem: int, level: int) -> float:
    buf = shuffle(sample.data, elem) if elem > 1 else sample.data
    return len(_compressor(level).compress(buf)) / max(1, sample.size)


# --------------------------------------------------------------- stages
# A compressed chunk is a small codec pipeline, in the manner of zarr-python's:
# ``Frames`` cuts the chunk into independent sub-blocks (zarr's sharding
# codec, within one chunk) and runs each through its block stages in order
# (``Shuffle`` then ``Zstd``); decoding runs them backwards. The stored chunk
# flags name the pipeline (``pipeline_for``). Block deltas (``delta.BlockDelta``)
# act on a chunk's data before it gets here; sharding (``shard``) splits
# chunks across streams after.
class Shuffle:
    """Byte shuffle: byte k of every ``elem``-byte element grouped together (floats compress better)."""

    def __init__(self, elem: int) -> None:
        self.elem = elem

    def encode(self, block: Buffer) -> Buffer:
        return shuffle(block, self.elem)

    def decode(self, data: Buffer, want: int, i: int, source: str | None, out: np.ndarray | None = None) -> Buffer:
        dst = np.empty(want, dtype=np.uint8) if out is None else out
        unshuffle_into(data, self.elem, dst)
        return dst.data


class Zstd:
    """One zstd frame per block, with its content size; declines (``None``) when that is not smaller."""

    def __init__(self, level: int = 1) -> None:
        self.level = level

    def encode(self, block: Buffer) -> Buffer | None:
        out = _compressor(self.level).compress(block)
        return None if len(out) >= memoryview(block).nbytes else out

    def decode(self, frame: Buffer, want: int, i: int, source: str | None, out: np.ndarray | None = None) -> Buffer:
        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise CheckpointError(source, f"frame {i} is not a zstd frame: {exc}") from None
        if declared != want:  # checked before decompressing: a "zstd bomb" never allocates
            raise CheckpointError(
                source, f"zstd frame {i} declares {declared} bytes, its block has {want} (decompresses beyond uncompressed_size)"
            )
        try:
            block = _decompressor().decompress(frame, max_output_size=want, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CheckpointError(source, f"zstd frame {i} is corrupt: {exc}") from None
        if len(block) != want:
            raise CheckpointError(source, f"zstd frame {i} gave {len(block)} bytes, {want} declared")
        if out is None:
            return block
        out[:] = np.frombuffer(block, dtype=np.uint8)
        return out.data


class Frames:
    """A chunk as independent sub-blocks behind a frame table (layout in the module docstring).

    Each block goes through ``stages`` in order; when the last stage
    declines, the block is stored as it entered that stage (bit 31 of its
    table entry). Blocks are encoded and decoded on the worker pool.
    """

    def __init__(self, block_size: int, stages: tuple[Shuffle | Zstd, ...]) -> None:
        self.block_size, self.stages = block_size, stages

    def encode(self, mv: memoryview, threads: int) -> list[Buffer]:
        bs, n = self.block_size, mv.nbytes
        count = -(-n // bs)

        def one(i: int) -> tuple[int, Buffer]:
            cur: Buffer = mv[i * bs : min(n, (i + 1) * bs)]
            for stage in self.stages:
                out = stage.encode(cur)
                if out is None:  # the last stage declined: stored as it entered it
                    return RAW_FRAME | memoryview(cur).nbytes, cur
                cur = out
            return memoryview(cur).nbytes, cur

        if count > 1 and threads > 1:
            results = list(worker_pool(threads).map(one, range(count)))
        else:
            results = [one(i) for i in range(count)]
        table = bytearray(8 + 4 * count)
        struct.pack_into("<II", table, 0, bs, count)
        np.frombuffer(table, dtype="<u4", offset=8)[:] = [e for e, _ in results]
        return [bytes(table)] + [p for _, p in results]

    def decode_into(self, payload: memoryview, target: np.ndarray, source: str | None, threads: int) -> None:
        usize = target.size
        bs, frames = check_frames(payload, usize, source)

        def one(i: int) -> None:
            off, size, raw = frames[i]
            want = min(usize, (i + 1) * bs) - i * bs
            self.decode_block(payload[off : off + size], i, raw, target[i * bs : i * bs + want], source)

        if len(frames) > 1 and threads > 1:
            for f in [worker_pool(threads).submit(one, i) for i in range(len(frames))]:
                f.result()
        else:
            for i in range(len(frames)):
                one(i)

    def decode_block(self, data: Buffer, i: int, raw: bool, dst: np.ndarray, source: str | None) -> None:
        """Decode frame ``i`` (its stored bytes ``data``) into ``dst``, exactly its block's bytes.

        One frame on its own: the range reader (``rkckpt.rangeread``) decodes
        only the frames that overlap the bytes it needs.
        """
        want = dst.size
        stages = self.stages[:-1] if raw else self.stages
        if raw and memoryview(data).nbytes != want:
            raise CheckpointError(source, f"raw frame {i} stores {memoryview(data).nbytes} bytes, its block has {want}")
        if not stages:
            dst[:] = np.frombuffer(data, dtype=np.uint8)
            return
        for k in range(len(stages) - 1, -1, -1):  # backwards; the first stage writes into place
            data = stages[k].decode(data, want, i, source, dst if k == 0 else None)


def pipeline_for(flags: int, source: str | None) -> Frames | None:
    """The decoding pipeline the stored chunk flags name (``None``: stored raw)."""
    elem = check_flags(flags, source)
    if not flags & CHUNK_ZSTD:
        return None
    return Frames(0, ((Shuffle(elem),) if elem > 1 else ()) + (Zstd(),))


# --------------------------------------------------------------- encode
def encode_chunk(data: Buffer, flags: int, options: WriteOptions, *, elem_size: int | None = None) -> Encoded:
    """Encode one chunk's uncompressed ``data``; raw chunks are never copied.

    ``elem_size`` is the shuffle element size when the caller knows the
    region's dtype (0 = not a float array); ``None`` lets the sample decide
    between no shuffle and 4/8-byte elements.
    """
    mv = memoryview(data).cast("B")
    if flags & ~LOGICAL_CHUNK_FLAGS:
        raise ValueError(f"chunk flags 0x{flags:x} are storage flags; pass only logical ones")
    if options.compat or not options.compress or mv.nbytes < 64 or not _pays_off(0.0, options):
        return Encoded(flags, [mv], mv.nbytes)  # (no sampling when even a perfect ratio would not pay)
    arr = _u8(mv)
    sample = _sample(arr, options.sample_size, options.block_size)
    if elem_size is not None:
        candidates = [elem_size if options.shuffle and elem_size > 1 else 0]
    elif options.shuffle:
        candidates = [0] + [e for e in (4, 8) if mv.nbytes % e == 0]
    else:
        candidates = [0]
    best_elem, best = 0, 2.0
    for e in candidates:
        r = _ratio(sample, e, options.level)
        if r < best:
            best_elem, best = e, r
    if best > options.min_ratio or not _pays_off(best, options):
        return Encoded(flags, [mv], mv.nbytes)
    return _compress_frames(mv, flags, options, best_elem)


def _pays_off(ratio: float, options: WriteOptions) -> bool:
    """Cost model for ``adaptive="speed"``: compress+write(r*n) <= write(n)."""
    if options.adaptive == "size":
        return True
    if ratio >= 1.0:
        return False
    return _threads(options.threads) * options.zstd_bps >= options.disk_bps / (1.0 - ratio)


def _compress_frames(mv: memoryview, flags: int, options: WriteOptions, elem: int) -> Encoded:
    bs = options.block_size
    if elem > 1 and bs % elem:
        bs -= bs % elem
    frames = Frames(bs, ((Shuffle(elem),) if elem > 1 else ()) + (Zstd(options.level),))
    parts = frames.encode(mv, _threads(options.threads))
    out_flags = flags | CHUNK_ZSTD
    if elem > 1:
        out_flags |= CHUNK_SHUFFLE | (elem << CHUNK_SHUFFLE_ELEM_SHIFT)
    return Encoded(out_flags, parts, sum(memoryview(p).nbytes for p in parts))


def encode_payload(data: Buffer, flags: int, options: WriteOptions, *, elem_size: int | None = None) -> tuple[int, Buffer]:
    """Return (stored chunk flags, stored payload) for an uncompressed chunk payload."""
    enc = encode_chunk(data, flags, options, elem_size=elem_size)
    if len(enc.parts) == 1:
        return enc.flags, enc.parts[0]
    return enc.flags, b"".join(enc.parts)


# --------------------------------------------------------------- decode
def check_flags(flags: int, source: str | None) -> int:
    if flags & ~KNOWN_CHUNK_FLAGS:
        raise CheckpointError(source, f"unknown chunk flags 0x{flags:x}")
    elem = (flags & CHUNK_SHUFFLE_ELEM_MASK) >> CHUNK_SHUFFLE_ELEM_SHIFT
    if flags & CHUNK_SHUFFLE:
        if not flags & CHUNK_ZSTD:
            raise CheckpointError(source, "shuffle flag set on a chunk that is not zstd-compressed")
        if elem < 2:
            raise CheckpointError(source, f"shuffle flag with element size {elem}")
    elif elem:
        raise CheckpointError(source, f"shuffle element size {elem} set without the shuffle flag")
    return elem


def check_frames(payload: memoryview, usize: int, source: str | None) -> tuple[int, list[tuple[int, int, bool]]]:
    """Validate the frame table; return block size and (offset, size, raw) per frame."""
    if payload.nbytes < 8:
        raise CheckpointError(source, f"zstd payload of {payload.nbytes} bytes is shorter than its frame table header")
    bs, count = struct.unpack_from("<II", payload, 0)
    if not 1 <= bs <= MAX_BLOCK:
        raise CheckpointError(source, f"frame block size {bs} out of range")
    if count != -(-usize // bs):
        raise CheckpointError(source, f"frame table has {count} frames, {-(-usize // bs)} expected for {usize} bytes in blocks of {bs}")
    if 8 + 4 * count > payload.nbytes:
        raise CheckpointError(source, f"frame table of {count} entries overruns the {payload.nbytes}-byte payload")
    entries = np.frombuffer(payload, dtype="<u4", count=count, offset=8).astype(np.int64)
    raw = (entries & RAW_FRAME) != 0
    sizes = entries & (RAW_FRAME - 1)
    pos = 8 + 4 * count
    if pos + int(sizes.sum()) != payload.nbytes:
        raise CheckpointError(source, f"frame sizes add up to {int(sizes.sum())} bytes, payload holds {payload.nbytes - pos}")
    offsets = pos + np.concatenate(([0], np.cumsum(sizes)[:-1])) if count else np.zeros(0, np.int64)
    return bs, [(int(o), int(s), bool(r)) for o, s, r in zip(offsets, sizes, raw, strict=True)]


def decode_into(flags: int, payload: memoryview, out: memoryview, source: str | None, *, threads: int = 0) -> None:
    """Decode a stored payload into ``out`` (exactly uncompressed_size bytes).

    Every frame must declare its content size and it must equal its block's
    size before anything is decompressed, so a "zstd bomb" is rejected
    without allocating; trailing bytes inside a frame's slot are rejected too.
    """
    payload = memoryview(payload).cast("B")
    target = np.frombuffer(out, dtype=np.uint8)
    frames = pipeline_for(flags, source)
    if frames is None:
        if payload.nbytes != target.size:
            raise CheckpointError(source, f"raw chunk stores {payload.nbytes} bytes but uncompressed_size is {target.size}")
        target[:] = np.frombuffer(payload, dtype=np.uint8)
        return
    frames.decode_into(payload, target, source, _threads(threads))


def decode_payload(flags: int, payload: memoryview, uncompressed_size: int, source: str | None) -> memoryview | bytes:
    """Return the uncompressed bytes of a stored payload, checking its size.

    Raw payloads come back as the same memoryview (no copy); compressed ones
    are decoded into one buffer of exactly ``uncompressed_size`` bytes, which
    is allocated only after the frame table proved consistent.
    """
    check_flags(flags, source)
    payload = memoryview(payload).cast("B")
    if not flags & CHUNK_ZSTD:
        if payload.nbytes != uncompressed_size:
            raise CheckpointError(source, f"raw chunk stores {payload.nbytes} bytes but uncompressed_size is {uncompressed_size}")
        return payload
    check_frames(payload, uncompressed_size, source)  # validate before allocating
    out = memoryview(np.empty(uncompressed_size, dtype=np.uint8)).cast("B")
    decode_into(flags, payload, out, source)
    return out


def logical_flags(stored_flags: int) -> int:
    """Flags that describe the decoded data (storage-only bits dropped)."""
    return stored_flags & LOGICAL_CHUNK_FLAGS


def header_bits(chunk_flags: int, compression: int, header_flags: int) -> tuple[int, int]:
    """Fold one chunk's stored flags into the header's compression and flags."""
    if chunk_flags:
        header_flags |= HDR_EXTENDED
    if chunk_flags & CHUNK_ZSTD:
        compression = COMPRESSION_ZSTD
    if chunk_flags & CHUNK_BLOCK_DELTA:
        header_flags |= HDR_BLOCK_DELTA
    return compression, header_flags
