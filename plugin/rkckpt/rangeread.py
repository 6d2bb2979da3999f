"""Byte ranges of the tip state of a chain (a full checkpoint and its deltas), read with range requests only.

Why: a rank that restores a set on another rank count needs a few planes of
each split region from each part it overlaps, and the small replicated chunks
(control block, queues) of one part. Reading whole part files moves every
rank's bytes to every rank; this reads, per link of the part's chain, the
stream header, metadata and chunk table, then only:

* of a raw chunk: the bytes asked for (one range read);
* of a compressed chunk (``CHUNK_ZSTD``: a frame table and independent zstd
  frames, see docs/FORMAT-EXTENSIONS.md): the frame table, then the frames
  that overlap the bytes asked for (one range read), decoded one by one;
* of a block-delta patch (``CHUNK_BLOCK_DELTA``): its header and run table,
  then only the patch blocks that overlap the bytes asked for, laid over the
  same range of the parent (read the same way, down the chain).

The chain is walked from its tip towards its root and stops at the newest
link that stores the chunk whole: links older than that are never opened.

Every size and offset read from a file is checked against the bytes present
(the chunk table by ``stream.scan``, frame tables and patch headers here)
before it is used: a lying table gives a ``CheckpointError`` naming the file.
What this path cannot check is the stream CRC (it covers the whole body):
callers choose the chain from verified headers (``rkckpt.ckptset``), as
``chain.read_region`` does for one region of a full checkpoint.

A sharded stream (a state over 1 GiB) is read whole: its chunks may be split
over shards, so the minimal covering range is the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from . import codec, stream
from .errors import CheckpointError, DeltaMismatchError
from .flags import CHUNK_BLOCK_DELTA, HDR_SHARD
from .layout import CHUNK_HEADER_SIZE, HEADER_SIZE, ChunkHeader
from .model import Checkpoint, Chunk, ChunkType, Metadata, RegionInfo, chunk_identity
from .source import MemorySource, Source

__all__ = ["ChainReader", "StoredChunk", "region_plane_bytes"]

_PATCH = struct.Struct("<4sIQQII")  # the block patch header (``delta.make_patch``)
_PATCH_MAGIC = b"RKBD"
_U32 = np.dtype("<u4")
_U64 = np.dtype("<u8")


class ChunkView(Protocol):
    """Decoded bytes of one chunk of a state, readable by range."""

    size: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.uint8)


class StoredChunk:
    """The decoded bytes of one stored chunk: raw payloads read directly, compressed ones frame by frame."""

    def __init__(self, source: Source, ch: ChunkHeader) -> None:
        self.source, self.ch, self.name = source, ch, source.name
        self.size = ch.uncompressed_size
        self.frames = codec.pipeline_for(ch.flags, self.name)
        self._table: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._decoded: dict[int, np.ndarray] = {}

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.size:
            raise CheckpointError(self.name, f"bytes [{start}, {stop}) lie outside the {self.size}-byte chunk")
        if start == stop:
            return _empty()
        if self.frames is None:
            return np.frombuffer(self.source.read(self.ch.data_offset + start, stop - start), dtype=np.uint8)
        bs = self._frame_table()[0]
        first, last = start // bs, (stop - 1) // bs
        self._decode(first, last)
        blocks = [self._decoded[i] for i in range(first, last + 1)]
        joined = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return joined[start - first * bs : stop - first * bs]

    def _frame_table(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Block size and each frame's payload offset, stored size and raw bit, checked against the stored size."""
        if self._table is not None:
            return self._table
        stored, usize, name = self.ch.compressed_size, self.size, self.name
        if stored < 8:
            raise CheckpointError(name, f"zstd payload of {stored} bytes is shorter than its frame table header")
        bs, count = struct.unpack("<II", self.source.read(self.ch.data_offset, 8))
        if not 1 <= bs <= codec.MAX_BLOCK:
            raise CheckpointError(name, f"frame block size {bs} out of range")
        if count != -(-usize // bs):
            raise CheckpointError(name, f"frame table has {count} frames, {-(-usize // bs)} expected for {usize} bytes in blocks of {bs}")
        if 8 + 4 * count > stored:
            raise CheckpointError(name, f"frame table of {count} entries overruns the {stored}-byte payload")
        entries = np.frombuffer(self.source.read(self.ch.data_offset + 8, 4 * count), dtype=_U32).astype(np.int64)
        raw = (entries & codec.RAW_FRAME) != 0
        sizes = entries & (codec.RAW_FRAME - 1)
        pos = 8 + 4 * count
        if pos + int(sizes.sum()) != stored:
            raise CheckpointError(name, f"frame sizes add up to {int(sizes.sum())} bytes, payload holds {stored - pos}")
        offsets = pos + np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        self._table = (bs, offsets, sizes, raw)
        return self._table

    def _decode(self, first: int, last: int) -> None:
        """Decode frames ``first..last`` not decoded yet, reading their stored bytes with one range read."""
        missing = [i for i in range(first, last + 1) if i not in self._decoded]
        if not missing:
            return
        bs, offsets, sizes, raw = self._frame_table()
        lo, hi = int(offsets[missing[0]]), int(offsets[missing[-1]] + sizes[missing[-1]])
        span = self.source.read(self.ch.data_offset + lo, hi - lo)
        frames = self.frames
        assert frames is not None

        def one(i: int) -> None:
            at = int(offsets[i]) - lo
            dst = np.empty(min(self.size, (i + 1) * bs) - i * bs, dtype=np.uint8)
            frames.decode_block(span[at : at + int(sizes[i])], i, bool(raw[i]), dst, self.name)
            self._decoded[i] = dst

        threads = codec.decode_threads()
        try:
            if len(missing) > 1 and threads > 1:  # zstandard releases the GIL: frames decode in parallel
                for f in [codec.worker_pool(threads).submit(one, i) for i in missing]:
                    f.result()
            else:
                for i in missing:
                    one(i)
        except CheckpointError as exc:
            raise CheckpointError(self.name, exc.problem) from None


class PatchedChunk:
    """A chunk as its parent's bytes with a block-delta patch laid over them, read by range."""

    def __init__(self, parent: ChunkView, patch: StoredChunk) -> None:
        self.parent, self.patch, self.name = parent, patch, patch.name
        if patch.size < _PATCH.size:
            raise CheckpointError(self.name, f"block patch of {patch.size} bytes is shorter than its header")
        magic, block, parent_size, target, nruns, _ = _PATCH.unpack(patch.read(0, _PATCH.size).tobytes())
        if magic != _PATCH_MAGIC or block == 0:
            raise CheckpointError(self.name, "block patch has a bad magic or block size")
        if parent_size != parent.size:
            raise DeltaMismatchError(self.name, f"block patch expects a parent chunk of {parent_size} bytes, base has {parent.size}")
        if nruns > (patch.size - _PATCH.size) // 16:
            raise CheckpointError(self.name, f"block patch declares {nruns} runs, more than its {patch.size} bytes hold")
        self.block, self.size, self.body = int(block), int(target), _PATCH.size + 16 * int(nruns)
        runs = patch.read(_PATCH.size, self.body).view(_U64).reshape(int(nruns), 2)
        self.starts, self.counts = self._check_runs(runs, patch.size - self.body, int(parent_size))
        self.data_at = np.concatenate(([0], np.cumsum(self.counts)[:-1])).astype(np.int64) * self.block

    def _check_runs(self, raw_runs: np.ndarray, data_len: int, parent_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The runs, checked as ``delta.apply_patch`` checks them (order, bounds, data length, coverage)."""
        block, target, name = self.block, self.size, self.name
        if target > parent_size + data_len:
            raise CheckpointError(name, f"block patch grows the chunk to {target} bytes with only {data_len} bytes of data")
        nb = -(-target // block)
        bad = CheckpointError(name, "block patch runs are out of order, overlapping or past the chunk end")
        if (raw_runs > nb).any():  # each field alone first: a sum of two u64 fields may wrap past int64
            raise bad
        runs = raw_runs.astype(np.int64)
        starts, counts = runs[:, 0], runs[:, 1]
        if len(runs) and ((counts <= 0).any() or (starts[1:] < starts[:-1] + counts[:-1]).any() or starts[-1] + counts[-1] > nb):
            raise bad
        total = int(counts.sum())
        has_tail = bool(total and target % block and int(starts[-1] + counts[-1] - 1) == target // block)
        want = (total - has_tail) * block + (target % block if has_tail else 0)
        if want != data_len:
            raise CheckpointError(name, f"block patch holds {data_len} data bytes, its runs need {want}")
        first_new = parent_size // block if parent_size < target else nb  # blocks past the parent must be in the patch
        covered = np.clip(np.minimum(starts + counts, nb) - np.maximum(starts, first_new), 0, None).sum()
        if int(covered) != nb - first_new:
            raise CheckpointError(name, "block patch leaves bytes past the parent's end unwritten")
        return starts, counts

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.size:
            raise CheckpointError(self.name, f"bytes [{start}, {stop}) lie outside the {self.size}-byte chunk")
        out = np.zeros(stop - start, dtype=np.uint8)
        keep = min(stop, self.parent.size)
        if keep > start:
            out[: keep - start] = self.parent.read(start, keep)
        if start == stop:
            return out
        b0, b1 = start // self.block, (stop - 1) // self.block + 1  # blocks [b0, b1) hold the range
        ends = self.starts + self.counts
        hit = np.flatnonzero((self.starts < b1) & (ends > b0))
        if hit.size == 0:
            return out
        first, last = int(hit[0]), int(hit[-1])
        lo_block, hi_block = max(b0, int(self.starts[first])), min(b1, int(ends[last]))
        # the patch data of consecutive runs is contiguous: one read covers every overlapping block
        d0 = self.body + int(self.data_at[first]) + (lo_block - int(self.starts[first])) * self.block
        d1 = min(self.patch.size, self.body + int(self.data_at[last]) + (hi_block - int(self.starts[last])) * self.block)
        data = self.patch.read(d0, d1)
        for j in hit:
            s, e = max(b0, int(self.starts[j])), min(b1, int(ends[j]))
            src = self.body + int(self.data_at[j]) + (s - int(self.starts[j])) * self.block - d0
            t0, t1 = s * self.block, min(e * self.block, self.size)
            a, b = max(t0, start), min(t1, stop)
            out[a - start : b - start] = data[src + a - t0 : src + b - t0]
        return out


class ChainReader:
    """The tip state of one chain, ``names`` oldest first (a full, then deltas), read a chunk range at a time.

    ``open_source`` opens one file's RKCKPT stream (``chain.open_source``).
    Links are opened and scanned lazily, newest first; close the reader
    (or use it as a context manager) to close them.
    """

    def __init__(self, names: Sequence[str], open_source: Callable[[str], Source]) -> None:
        if not names:
            raise ValueError("a chain has at least one file")
        self.names = list(names)
        self._open = open_source
        self._links: dict[int, tuple[Source, list[ChunkHeader]]] = {}
        self._metadata: Metadata | None = None

    def __enter__(self) -> ChainReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for source, _ in self._links.values():
            close = getattr(source, "close", None)
            if close is not None:
                close()
        self._links.clear()

    def _link(self, i: int) -> tuple[Source, list[ChunkHeader]]:
        if i not in self._links:
            source = self._open(self.names[i])
            try:
                sc = stream.scan(_Joined(source))
                headers = sc.chunk_headers
                if sc.header.flags & HDR_SHARD:  # chunks may be split over shards: the file is the covering range
                    source, headers = _whole(source)
            except BaseException:
                getattr(source, "close", lambda: None)()
                raise
            self._links[i] = (source, headers)
            if i == len(self.names) - 1:
                self._metadata = sc.metadata
        return self._links[i]

    @property
    def metadata(self) -> Metadata:
        """The tip's metadata (a delta's metadata is the applied state's, as in the reference)."""
        self._link(len(self.names) - 1)
        assert self._metadata is not None
        return self._metadata

    def chunk(self, chunk_type: int, chunk_id: int = 0) -> ChunkView | None:
        """The tip state's chunk ``(chunk_type, chunk_id)`` as a range-readable view; None when no link has it."""
        ident = chunk_identity(chunk_type, chunk_id)
        patches: list[StoredChunk] = []
        base: ChunkView | None = None
        for i in range(len(self.names) - 1, -1, -1):
            source, headers = self._link(i)
            ch = next((h for h in headers if chunk_identity(h.chunk_type, h.chunk_id) == ident), None)
            if ch is None:
                continue
            stored = StoredChunk(source, ch)
            if not ch.flags & CHUNK_BLOCK_DELTA:
                base = stored
                break
            patches.append(stored)
        if base is None:
            if patches:
                raise CheckpointError(patches[-1].name, f"chunk {ident} is a block patch with no whole chunk before it in the chain")
            return None
        view: ChunkView = base
        for p in reversed(patches):
            view = PatchedChunk(view, p)
        return view

    def chunk_data(self, chunk_type: int, chunk_id: int = 0) -> Chunk | None:
        """The tip state's whole chunk (for the small replicated ones: control block, queues)."""
        view = self.chunk(chunk_type, chunk_id)
        return None if view is None else Chunk(chunk_type, chunk_id, view.read(0, view.size).tobytes())

    def region(self, name: str, planes: tuple[int, int] | None = None) -> np.ndarray:
        """Region ``name`` of the tip state, or only its planes ``[a, b)`` along axis 0."""
        tip = self.names[-1]
        try:
            info = Checkpoint(self.metadata).regions().get(name)
        except CheckpointError as exc:
            raise CheckpointError(tip, exc.problem) from None
        if info is None:
            raise KeyError(f"no region named {name!r}")
        dt, plane, count = region_plane_bytes(info, tip)
        view = self.chunk(int(ChunkType.DEVICE_MEMORY), info.chunk_id)
        if view is None:
            raise CheckpointError(tip, f"region {name!r} is declared but no file of its chain holds its chunk")
        if view.size != plane * count:
            raise CheckpointError(
                tip, f"region {name!r}: {view.size} bytes stored, {plane * count} expected for {info.dtype}{list(info.shape)}"
            )
        if planes is None:
            return np.frombuffer(view.read(0, view.size), dtype=dt).reshape(info.shape)
        a, b = planes
        if not info.shape or not 0 <= a <= b <= count:
            raise CheckpointError(tip, f"region {name!r} has {info.shape[:1]} planes, planes [{a}, {b}) were asked for")
        return np.frombuffer(view.read(a * plane, b * plane), dtype=dt).reshape((b - a, *info.shape[1:]))


def region_plane_bytes(info: RegionInfo, source: str) -> tuple[np.dtype, int, int]:
    """(dtype, bytes per plane along axis 0, plane count) of a region whose table entry is checked as hostile input."""
    try:
        dt = np.dtype(info.dtype)
    except TypeError as exc:
        raise CheckpointError(source, f"region {info.name!r} has dtype {info.dtype!r}: {exc}") from None
    if dt.hasobject or dt.itemsize == 0 or any(s < 0 for s in info.shape):
        raise CheckpointError(source, f"region {info.name!r} is declared as {info.dtype}{list(info.shape)}, which no array can be")
    if not info.shape:
        return dt, dt.itemsize, 1
    plane = dt.itemsize
    for s in info.shape[1:]:
        plane *= s
    return dt, plane, info.shape[0]


class _Joined:
    """``source`` for a scan: the header with the metadata length, and the metadata with chunk 0's header, one read each.

    A scan reads the 64-byte header, the 4-byte metadata length, the
    metadata and then each 32-byte chunk header: over range requests, each
    read is a request. The reads that always follow each other are joined;
    none reaches into a payload (later chunk headers are read on their own).
    """

    def __init__(self, source: Source) -> None:
        self.source, self.name, self.size = source, source.name, source.size
        self._at, self._buf = -1, memoryview(b"")

    def read(self, offset: int, n: int) -> memoryview:
        if self._at <= offset and offset + n <= self._at + self._buf.nbytes:
            return self._buf[offset - self._at : offset - self._at + n]
        extra = 4 if offset == 0 else CHUNK_HEADER_SIZE if offset == HEADER_SIZE + 4 else 0
        extra = max(0, min(extra, self.size - offset - n))
        if not extra:
            return self.source.read(offset, n)
        self._at, self._buf = offset, self.source.read(offset, n + extra)
        return self._buf[:n]

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self.read(offset, out.nbytes)


def _whole(source: Source) -> tuple[Source, list[ChunkHeader]]:
    """A sharded stream read whole (CRC checked), its chunks as raw payloads in memory."""
    parsed = stream.read_source(source)
    close = getattr(source, "close", None)
    if close is not None:
        close()
    datas = [memoryview(c.data).cast("B") for c in parsed.checkpoint.chunks]
    blob = b"".join(bytes(d) for d in datas)
    headers, at = [], 0
    for c, d in zip(parsed.checkpoint.chunks, datas, strict=True):
        headers.append(ChunkHeader(c.chunk_type, c.flags, d.nbytes, d.nbytes, c.chunk_id, at))
        at += d.nbytes
    return MemorySource(blob, source.name), headers
