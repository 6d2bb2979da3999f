"""The RKCKPT stream (the ``.rkcp`` form): one reader over any byte-range source, one streaming writer to any sink.

Entry points:

* ``read_source(source)``: parse a stream from any ``source.Source``
  (sharded or not); returns a ``ParsedFile`` (the checkpoint plus the
  header and chunk headers).
* ``scan(source)``: header, metadata and chunk table without payloads (chain
  listings, region reads over range requests, the HDF5 index).
* ``write_to(f, ckpt, options)``: stream to any binary file object
  (seekable or not). ``encode(ckpt)`` is the in-memory form.

Paths (``.rkcp`` or ``.rk.h5``) are read and written by ``rkckpt.forms``;
``rkckpt.container`` is the public facade over both.

Why streaming: a state of several GiB must not be copied into one ``bytes``
to be written, nor read into one to be parsed. The writer emits chunks one by
one (raw chunks straight from the caller's buffers) and patches the header
with the checksum at the end; the reader reads each chunk into its own
buffer (or straight into its place in a sharded chunk), checks every size
against the bytes left before allocating, and checks the stream CRC before
decoding anything compressed. CRC-32 runs in a helper thread, overlapping
the I/O.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from . import codec, shard
from .codec import WriteOptions
from .crc import crc32, crc32_combine
from .errors import CheckpointError
from .flags import CHUNK_BLOCK_DELTA, CHUNK_PART, CHUNK_ZSTD, COMPRESSION_LZ4, COMPRESSION_NONE, COMPRESSION_ZSTD, HDR_EXTENDED, HDR_SHARD
from .layout import (
    CHUNK_HEADER_SIZE,
    HEADER_SIZE,
    MAX_CHECKPOINT_SIZE,
    SIZE_QUIRK,
    ChunkHeader,
    Header,
    pack_chunk,
    pack_header,
    pack_metadata,
    stream_length,
    unpack_chunk,
    unpack_header,
    unpack_metadata,
)
from .model import Checkpoint, Chunk, ChunkType, Metadata
from .source import Buffer, MemorySource, Source, prefault

__all__ = ["ParsedFile", "Scan", "check", "encode", "read_source", "scan", "write_to"]

_PIECE = 16 << 20  # I/O and CRC granularity: big enough for throughput, small enough to overlap
_EDGE = 2 << 20  # first and last piece of a big read (see ``_cuts``)
#: decoded size a plain (non-sharded) stream may declare in all: its own 1 GiB cap
MAX_DECODED = MAX_CHECKPOINT_SIZE


@dataclass
class ParsedFile:
    """A parsed stream: the checkpoint plus the on-disk details (for inspect)."""

    header: Header
    chunk_headers: list[ChunkHeader]
    checkpoint: Checkpoint


@dataclass
class Scan:
    """What the header, metadata and chunk table of a stream say (no payload read)."""

    header: Header
    metadata: Metadata
    chunk_headers: list[ChunkHeader] = field(default_factory=list)
    length: int = 0


_helpers = threading.local()


def _helper_pool() -> ThreadPoolExecutor:
    """The calling thread's CRC helper: one worker, kept for the thread's lifetime.

    A pool per stream cost ~0.3 ms per checkpoint written or read (a thread
    started and joined each time). Kept per calling thread, streams of one
    thread share a FIFO worker, so each stream's jobs still run in order; when
    the thread ends its locals go, the pool is collected and its worker exits.
    """
    pool = getattr(_helpers, "pool", None)
    if pool is None:
        pool = _helpers.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkckpt-crc")
    return pool


def _forget_helpers() -> None:
    """After a fork the child has none of the parent's worker threads: a fresh pool on first use."""
    global _helpers
    _helpers = threading.local()


os.register_at_fork(after_in_child=_forget_helpers)


class _Crc:
    """Running CRC-32 computed in the calling thread's helper, in submission order."""

    def __init__(self) -> None:
        self.value = 0
        self._pool = _helper_pool()
        self._last: Future[None] | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self._last = self._pool.submit(fn)

    def _do(self, buf: Buffer) -> None:
        self.value = crc32(buf, self.value)

    def prefault(self, view: memoryview) -> None:
        """Fault in a fresh buffer's pages in the helper thread (see ``source.prefault``), in order with the CRCs."""
        if view.nbytes:
            self.submit(lambda: prefault(view))

    def update(self, buf: Buffer) -> None:
        if memoryview(buf).nbytes < (1 << 16) and (self._last is None or self._last.done()):
            self._do(buf)
            return
        self.submit(lambda: self._do(buf))

    def result(self) -> int:
        if self._last is not None:
            self._last.result()
        self.close()
        return self.value

    def close(self) -> None:
        """Wait for this stream's jobs (the worker runs them in order: the last one done means all are)."""
        if self._last is not None:
            futures_wait([self._last])

    def __enter__(self) -> _Crc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ================================================================== reading
class _Cursor:
    """Sequential reads of [pos, end) of a source, every length checked first."""

    def __init__(self, source: Source, pos: int, end: int, crc: _Crc | None) -> None:
        self.source, self.pos, self.end, self.crc = source, pos, end, crc
        self.name = source.name

    def left(self) -> int:
        return self.end - self.pos

    def _check(self, n: int, what: str) -> None:
        if n > self.left():
            raise CheckpointError(self.name, f"{what} needs {n} bytes at offset {self.pos}, only {self.left()} present (truncated)")

    def take(self, n: int, what: str) -> memoryview:
        self._check(n, what)
        if not isinstance(self.source, MemorySource) and n > _PIECE:
            out = memoryview(np.empty(n, dtype=np.uint8)).cast("B")
            self.into(out, what)  # piece by piece: the CRC overlaps the reads
            return out
        out = self.source.read(self.pos, n)
        if self.crc is not None:
            for s in range(0, n, _PIECE):
                self.crc.update(out[s : s + _PIECE])
        self.pos += n
        return out

    def into(self, out: memoryview, what: str) -> None:
        """Read into ``out`` piece by piece; the helper thread checksums each piece and faults in the next."""
        n = out.nbytes
        self._check(n, what)
        cuts = _cuts(n)
        if self.crc is not None and len(cuts) > 2:
            self.crc.prefault(out[cuts[1] : cuts[2]])
        for i in range(len(cuts) - 1):
            piece = out[cuts[i] : cuts[i + 1]]
            self.source.read_into(self.pos + cuts[i], piece)
            if self.crc is not None:
                self.crc.update(piece)
                if i + 3 < len(cuts):
                    self.crc.prefault(out[cuts[i + 2] : cuts[i + 3]])
        self.pos += n

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self.pos += n


def _cuts(n: int) -> list[int]:
    """Piece boundaries for reading ``n`` bytes: ``_PIECE``-sized pieces between two ``_EDGE``-sized ones.

    What cannot overlap is kept short: the first piece is read while the
    helper thread is still faulting in the second, and the caller waits for
    the CRC of the last piece.
    """
    if n <= 2 * _EDGE + _PIECE:
        return [*range(0, n, _PIECE), n]
    return [0, *range(_EDGE, n - _EDGE, _PIECE), n - _EDGE, n]


class _Assembly:
    """Chunks split over shard streams, filled in place as their pieces arrive."""

    def __init__(self, source: str, declared: dict[tuple[int, int], int] | None = None) -> None:
        self.source = source
        self.declared = declared or {}
        self.open: dict[tuple[int, int], tuple[np.ndarray, int, int]] = {}  # identity -> (buffer, filled, chunk index)

    def target(self, ctype: int, cid: int, offset: int, total: int, usize: int, chunks: list[Chunk], flags: int) -> memoryview:
        key = (ctype, cid)
        if offset == 0:
            if key in self.open:
                raise CheckpointError(self.source, f"chunk {ctype}/{cid} starts again before it was complete")
            if self.declared.get(key) != total:
                raise CheckpointError(
                    self.source,
                    f"split chunk {ctype}/{cid} claims {total} bytes, its pieces in the file declare {self.declared.get(key, 0)}",
                )
            buf = np.empty(total, dtype=np.uint8)
            chunks.append(Chunk(ctype, cid, memoryview(buf).cast("B"), flags & ~CHUNK_PART))
            self.open[key] = (buf, 0, len(chunks) - 1)
        entry = self.open.get(key)
        if entry is None:
            raise CheckpointError(self.source, f"piece of chunk {ctype}/{cid} at offset {offset} without its start")
        buf, filled, idx = entry
        if offset != filled or buf.size != total or offset + usize > total:
            raise CheckpointError(self.source, f"piece of chunk {ctype}/{cid} at {offset}+{usize} does not continue {filled}/{buf.size}")
        self.open[key] = (buf, filled + usize, idx)
        if filled + usize == total:
            del self.open[key]
        return memoryview(buf[offset : offset + usize]).cast("B")


@dataclass
class _Out:
    """Where one pass over a file puts what it finds."""

    chunks: list[Chunk] = field(default_factory=list)
    headers: list[ChunkHeader] = field(default_factory=list)
    asm: _Assembly | None = None
    decoded: int = 0  # bytes the plain stream's chunks decode to, in all


def _stream(source: Source, start: int, *, sharded_file: bool | None, payloads: bool, out: _Out) -> tuple[Header, Metadata, int]:
    """Read (``payloads``) or walk the one stream starting at ``start``; returns (header, metadata, length).

    The single walk over a header, its metadata and its chunk table: full
    reads, header-only scans and the shard prescan all come through here.
    """
    src = source.name
    available = source.size - start
    limit = shard.MAX_STREAM if sharded_file is not False else MAX_CHECKPOINT_SIZE
    header = unpack_header(source.read(start, min(HEADER_SIZE, max(0, available))), src, max_size=limit)
    is_shard = bool(header.flags & HDR_SHARD)
    if sharded_file is not None and is_shard != sharded_file:
        if not sharded_file:
            raise CheckpointError(src, "stream is one shard of a sharded (> 1 GiB) checkpoint, which is not allowed here")
        raise CheckpointError(src, f"stream at offset {start} {'is' if is_shard else 'is not'} a shard, unlike the first stream")
    length = stream_length(header, available, src, start)
    if is_shard:
        limit = shard.MAX_STREAM
    with _Crc() as crc:
        cur = _Cursor(source, start + HEADER_SIZE, start + length, crc if payloads else None)
        meta_len = int.from_bytes(cur.take(4, "metadata length"), "little")
        meta = unpack_metadata(cur.take(meta_len, "metadata"), src)
        if header.chunk_count > cur.left() // CHUNK_HEADER_SIZE:
            raise CheckpointError(src, f"chunk_count {header.chunk_count} cannot fit in the {cur.left()} bytes left")
        parts: dict[int, tuple[int, int]] = {}
        if is_shard:
            _, _, parts = shard.parse_shard_key(meta, src, header.chunk_count)
        pending: list[tuple[int, int, memoryview, memoryview]] = []  # (chunk no, flags, payload, destination)
        for i in range(header.chunk_count):
            raw = cur.take(CHUNK_HEADER_SIZE, f"chunk {i} header")
            ch = unpack_chunk(raw, cur.pos)
            _check_chunk(ch, i, cur.left(), limit, src)
            is_part = bool(ch.flags & CHUNK_PART)
            if is_part != (i in parts):
                raise CheckpointError(src, f"chunk {i}: part flag and shard table disagree")
            if not is_part:
                out.decoded += ch.uncompressed_size
                if not is_shard and out.decoded > MAX_DECODED:
                    raise CheckpointError(
                        src, f"chunks declare {out.decoded} bytes in all, over the {MAX_DECODED}-byte limit of an unsharded stream"
                    )
            out.headers.append(ch)
            compressed = bool(ch.flags & CHUNK_ZSTD)
            if not payloads:
                cur.skip(ch.compressed_size, f"chunk {i} data")
                continue
            logical = codec.logical_flags(ch.flags)
            if is_part:
                assert out.asm is not None
                dest = out.asm.target(ch.chunk_type, ch.chunk_id, parts[i][0], parts[i][1], ch.uncompressed_size, out.chunks, logical)
                if compressed:
                    pending.append((i, ch.flags, cur.take(ch.compressed_size, f"chunk {i} data"), dest))
                else:
                    cur.into(dest, f"chunk {i} data")
                continue
            payload = cur.take(ch.compressed_size, f"chunk {i} data")
            if compressed:
                codec.check_frames(payload, ch.uncompressed_size, src)  # validate before allocating
                dest = memoryview(np.empty(ch.uncompressed_size, dtype=np.uint8)).cast("B")
                pending.append((i, ch.flags, payload, dest))
                out.chunks.append(Chunk(ch.chunk_type, ch.chunk_id, dest, logical))
            else:
                out.chunks.append(Chunk(ch.chunk_type, ch.chunk_id, payload, logical))
        if cur.left():
            raise CheckpointError(src, f"{cur.left()} unexpected bytes after the last chunk")
        if payloads:
            got = crc.result()
            if got != header.checksum:
                raise CheckpointError(src, f"checksum mismatch: header says 0x{header.checksum:08x}, data gives 0x{got:08x}")
    for i, cflags, payload, dest in pending:  # only after the CRC proved the bytes intact
        try:
            codec.decode_into(cflags, payload, dest, src)
        except CheckpointError as exc:
            raise CheckpointError(src, f"chunk {i}: {exc.problem}") from None
    return header, meta, length


def _check_chunk(ch: ChunkHeader, i: int, left: int, limit: int, src: str) -> None:
    if ch.compressed_size > left:
        raise CheckpointError(src, f"chunk {i} declares {ch.compressed_size} data bytes, only {left} present (truncated chunk)")
    if ch.uncompressed_size > limit:
        raise CheckpointError(src, f"chunk {i} declares uncompressed_size {ch.uncompressed_size} over the limit")
    try:
        codec.check_flags(ch.flags, src)
    except CheckpointError as exc:
        raise CheckpointError(src, f"chunk {i}: {exc.problem}") from None
    if not ch.flags & CHUNK_ZSTD and ch.compressed_size != ch.uncompressed_size:
        raise CheckpointError(
            src, f"chunk {i}: raw chunk stores {ch.compressed_size} bytes but uncompressed_size is {ch.uncompressed_size}"
        )


def _prescan(source: Source) -> dict[tuple[int, int], int]:
    """Sum of the declared sizes of every split chunk's pieces, from headers only.

    A split chunk's buffer is allocated when its first piece is met; its
    ``total`` comes from metadata, so it is trusted only when the pieces that
    are physically in the file add up to it.
    """
    sums: dict[tuple[int, int], int] = {}
    pos = 0
    while pos < source.size:
        out = _Out()
        try:
            _, meta, length = _stream(source, pos, sharded_file=True, payloads=False, out=out)
            _, _, parts = shard.parse_shard_key(meta, source.name, len(out.headers))
        except CheckpointError:
            break  # the full read reports the exact problem
        for i, ch in enumerate(out.headers):
            if i in parts:
                key = (ch.chunk_type, ch.chunk_id)
                sums[key] = sums.get(key, 0) + ch.uncompressed_size
        pos += length
    return sums


def read_source(source: Source, *, allow_shards: bool = True) -> ParsedFile:
    """Parse the checkpoint held by ``source`` (plain stream, or consecutive shard streams)."""
    src = source.name
    if source.size < HEADER_SIZE:
        raise CheckpointError(src, f"file is {source.size} bytes, shorter than the {HEADER_SIZE}-byte header")
    first = unpack_header(source.read(0, HEADER_SIZE), src, max_size=shard.MAX_STREAM)
    sharded = bool(first.flags & HDR_SHARD)
    if sharded and not allow_shards:
        raise CheckpointError(src, "stream is one shard of a sharded (> 1 GiB) checkpoint, which is not allowed here")
    out = _Out(asm=_Assembly(src, _prescan(source)) if sharded else None)
    header, meta, pos = _stream(source, 0, sharded_file=sharded, payloads=True, out=out)
    if sharded:
        index, count, _ = shard.parse_shard_key(meta, src, header.chunk_count)
        if index != 0:
            raise CheckpointError(src, f"first shard has index {index}")
        for expect in range(1, count):
            if pos >= source.size:
                raise CheckpointError(src, f"file ends after {expect} of {count} shards (truncated)")
            before = len(out.headers)
            h, m, length = _stream(source, pos, sharded_file=True, payloads=True, out=out)
            idx, cnt, _ = shard.parse_shard_key(m, src, len(out.headers) - before)
            if (idx, cnt) != (expect, count):
                raise CheckpointError(src, f"shard {idx}/{cnt} found where {expect}/{count} was expected")
            pos += length
        if pos != source.size:
            raise CheckpointError(src, f"{source.size - pos} unexpected bytes after the last shard")
        assert out.asm is not None
        if out.asm.open:
            raise CheckpointError(src, f"{len(out.asm.open)} chunk(s) split over shards are incomplete")
        meta = meta.with_custom(**{shard.SHARD_KEY: None})
        header = Header(
            header.version,
            header.header_size,
            source.size,
            len(out.chunks),
            header.compression,
            header.checksum,
            header.flags,
            header.created_at,
        )
    return ParsedFile(header, out.headers, Checkpoint(meta, out.chunks, created_at=header.created_at))


def scan(source: Source, *, chunks: bool = True) -> Scan:
    """Header and metadata (and, with ``chunks``, the chunk table) of the first stream of ``source``.

    Reads only headers: cheap over range requests. The checksum is not
    verified (it covers the payloads); the full ``read`` does that.
    """
    src = source.name
    if source.size < HEADER_SIZE:
        raise CheckpointError(src, f"file is {source.size} bytes, shorter than the {HEADER_SIZE}-byte header")
    if not chunks:
        header = unpack_header(source.read(0, HEADER_SIZE), src, max_size=shard.MAX_STREAM)
        length = stream_length(header, source.size, src)
        cur = _Cursor(source, HEADER_SIZE, length, None)
        meta_len = int.from_bytes(cur.take(4, "metadata length"), "little")
        return Scan(header, unpack_metadata(cur.take(meta_len, "metadata"), src), [], length)
    out = _Out()
    header, meta, length = _stream(source, 0, sharded_file=None, payloads=False, out=out)
    return Scan(header, meta, out.headers, length)


def check(parsed: ParsedFile, source: str | os.PathLike[str] | None = None) -> None:
    """Consistency a reader can live without but a valid file has (``rkckpt verify``).

    No two chunks with one identity (which would one restore take?); no
    block-delta patch in a full checkpoint (there is no parent to patch);
    the header's compression field agrees with the chunks (LZ4, which no
    chunk uses, or zstd on a file with no zstd chunk, is a lie).
    """
    src = None if source is None else os.fspath(source)
    ck, header = parsed.checkpoint, parsed.header
    seen: set[tuple[int, int | None]] = set()
    for i, c in enumerate(ck.chunks):
        if c.identity in seen:
            raise CheckpointError(src, f"chunk {i} repeats the identity {c.chunk_type}/{c.chunk_id} of an earlier chunk")
        seen.add(c.identity)
        if c.flags & CHUNK_BLOCK_DELTA and not ck.is_delta:
            raise CheckpointError(src, f"chunk {i} is a block-delta patch in a full checkpoint (no parent to apply it to)")
    zstd = any(h.flags & CHUNK_ZSTD for h in parsed.chunk_headers)
    if header.compression == COMPRESSION_LZ4:
        raise CheckpointError(src, "header declares LZ4 compression (1), but no chunk is LZ4-compressed: the data is raw")
    if not header.flags & HDR_SHARD and (header.compression == COMPRESSION_ZSTD) != zstd:
        raise CheckpointError(
            src, f"header compression {header.compression} disagrees with the chunks ({'some' if zstd else 'no'} zstd chunks)"
        )


# ================================================================== writing
@dataclass
class _Planned:
    """One chunk ready to be written."""

    chunk_type: int
    chunk_id: int
    uncompressed_size: int
    encoded: codec.Encoded

    @property
    def raw(self) -> bool:
        return not self.encoded.flags & CHUNK_ZSTD


@dataclass
class Encoding:
    """One stream, encoded (compressed where it pays) but not written yet."""

    prefix: bytes  # metadata length + metadata
    chunks: list[_Planned]
    compression: int
    flags: int
    created_at: int
    length: int  # whole stream, header included

    def chunk_offsets(self) -> list[int]:
        """Offset of each chunk's payload in the stream."""
        out, pos = [], HEADER_SIZE + len(self.prefix)
        for p in self.chunks:
            pos += CHUNK_HEADER_SIZE
            out.append(pos)
            pos += p.encoded.size
        return out


@dataclass
class Written:
    length: int
    checksum: int
    payload_crcs: list[int] | None  # per chunk, when asked for


def encode_stream(
    meta: Metadata, chunks: list[tuple[int, int, Buffer, int, int | None]], created_at: int, options: WriteOptions, *, sharded: bool
) -> Encoding:
    """Encode one stream's chunks, given as (type, id, data, logical flags, shuffle element size)."""
    prefix = pack_metadata(meta)
    compression, hflags = COMPRESSION_NONE, (HDR_SHARD | HDR_EXTENDED) if sharded else 0
    planned = []
    length = HEADER_SIZE + len(prefix)
    for ctype, cid, data, flags, elem in chunks:
        enc = codec.encode_chunk(data, flags, options, elem_size=elem)
        compression, hflags = codec.header_bits(enc.flags, compression, hflags)
        if options.compat and (hflags or compression):
            raise CheckpointError(None, "compat mode cannot encode extension chunks (block deltas or flags)")
        planned.append(_Planned(ctype, cid, memoryview(data).nbytes, enc))
        length += CHUNK_HEADER_SIZE + enc.size
    limit = shard.MAX_STREAM if sharded else MAX_CHECKPOINT_SIZE + SIZE_QUIRK
    if length > limit:
        raise CheckpointError(None, f"encoded stream is {length} bytes, over the {MAX_CHECKPOINT_SIZE}-byte RKCKPT limit")
    return Encoding(prefix, planned, compression, hflags, created_at, length)


def _seekable(f: BinaryIO) -> bool:
    try:
        if not f.seekable():
            return False
        f.tell()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _fileno(f: BinaryIO) -> int | None:
    try:
        return f.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def write_fully(f: BinaryIO, buf: Buffer) -> None:
    mv = memoryview(buf).cast("B")
    done = 0
    while done < mv.nbytes:  # unbuffered files may write less than asked
        n = f.write(mv[done:])
        done = mv.nbytes if n is None else done + n


_known = threading.local()


@contextmanager
def known_crcs(crcs: Mapping[tuple[int, int], int]) -> Iterator[None]:
    """CRC-32s the caller computed already, keyed by ``buffer_key``: ``emit`` folds them in, not reading those bytes again.

    The checkpoint manager checksums each chunk of a state once for its content
    digest; a full checkpoint then writes those very buffers raw, and the stream
    CRC (and the ``.rk.h5`` index's per-chunk CRCs) are the same figures. Only
    this thread's writes inside the ``with`` see them; the buffers must stay alive
    and unchanged until it ends (keys are addresses).
    """
    prev = getattr(_known, "crcs", None)
    _known.crcs = crcs
    try:
        yield
    finally:
        _known.crcs = prev


def buffer_key(buf: Buffer) -> tuple[int, int] | None:
    """(address, length) of a contiguous buffer, or None."""
    try:
        mv = memoryview(buf)
        if not mv.c_contiguous or mv.nbytes == 0:
            return None
        return (np.frombuffer(mv.cast("B"), np.uint8).ctypes.data, mv.nbytes)
    except (TypeError, ValueError):
        return None


def _known_crc(parts: list[Buffer]) -> int | None:
    crcs = getattr(_known, "crcs", None)
    if not crcs or len(parts) != 1:
        return None
    key = buffer_key(parts[0])
    return None if key is None else crcs.get(key)


def emit(f: BinaryIO, enc: Encoding, options: WriteOptions, *, chunk_crcs: bool = False) -> Written:
    """Write an encoded stream to ``f`` (at its current position); return checksum and CRCs.

    Seekable sinks get a placeholder header patched at the end; others get
    the header first, after one CRC pass over the (referenced, not copied)
    buffers. ``chunk_crcs`` also returns each payload's own CRC-32 (the HDF5
    index needs them), folded into the stream CRC with ``crc32_combine`` so
    every byte is checksummed once.
    """
    seekable = _seekable(f)
    fd = _fileno(f) if seekable and options.early_writeback and hasattr(os, "posix_fadvise") else None
    crcs: list[int] = []
    with _Crc() as crc:

        def chunk_crc(parts: list[Buffer], known: int | None) -> None:
            def job() -> None:
                value = 0
                if known is not None:
                    value = known
                else:
                    for p in parts:
                        value = crc32(p, value)
                if chunk_crcs:
                    crcs.append(value)
                crc.value = crc32_combine(crc.value, value, sum(memoryview(p).nbytes for p in parts))

            crc.submit(job)

        start = f.tell() if seekable else 0

        def out(buf: Buffer, *, checksum: bool = True) -> None:
            mv = memoryview(buf).cast("B")
            for s in range(0, mv.nbytes, _PIECE):
                piece = mv[s : s + _PIECE]
                if checksum:
                    crc.update(piece)
                if seekable:
                    write_fully(f, piece)
                    if fd is not None and piece.nbytes >= (1 << 20):
                        end = f.tell()
                        try:  # start writeback now; the final fsync then has little left to do
                            os.posix_fadvise(fd, end - piece.nbytes, piece.nbytes, os.POSIX_FADV_DONTNEED)
                        except OSError:
                            pass

        if seekable:
            write_fully(f, bytes(HEADER_SIZE))  # placeholder, patched below
        out(enc.prefix)
        for p in enc.chunks:
            out(pack_chunk(p.chunk_type, p.encoded.flags, p.uncompressed_size, p.encoded.size, p.chunk_id))
            known = _known_crc(p.encoded.parts)
            if chunk_crcs or known is not None:
                chunk_crc(p.encoded.parts, known)
            for part in p.encoded.parts:
                out(part, checksum=not chunk_crcs and known is None)
        checksum = crc.result()
    header = pack_header(enc.length, len(enc.chunks), enc.compression, checksum, enc.flags, enc.created_at)
    if seekable:
        end = f.tell()
        f.seek(start)
        write_fully(f, header)
        f.seek(end)
    else:
        write_fully(f, header)
        write_fully(f, enc.prefix)
        for p in enc.chunks:
            write_fully(f, pack_chunk(p.chunk_type, p.encoded.flags, p.uncompressed_size, p.encoded.size, p.chunk_id))
            for part in p.encoded.parts:
                write_fully(f, part)
    return Written(enc.length, checksum, crcs if chunk_crcs else None)


def elem_sizes(ckpt: Checkpoint) -> dict[tuple[int, int], int]:
    """Shuffle element size per named region chunk (floats only; 0 = no shuffle)."""
    try:
        regions = ckpt.regions()
    except CheckpointError:
        return {}
    return {(int(ChunkType.DEVICE_MEMORY), info.chunk_id): codec.elem_size_for(info.dtype) for info in regions.values()}


def streams(ckpt: Checkpoint, options: WriteOptions) -> Iterator[Encoding]:
    """The stream(s) ``ckpt`` is written as: one, or shards when over 1 GiB, each encoded when reached.

    Lazily, so only one shard's compressed bytes are in memory at a time.
    """
    if any(c.flags & CHUNK_PART for c in ckpt.chunks):
        raise CheckpointError(None, "chunks flagged CHUNK_PART are written only by the shard writer")
    elems = {} if options.compat else elem_sizes(ckpt)
    meta_len = len(pack_metadata(ckpt.metadata)) - 4
    if not shard.needs_sharding(ckpt, meta_len, options.block_size):
        items = [(c.chunk_type, c.chunk_id, c.data, c.flags, elems.get((c.chunk_type, c.chunk_id))) for c in ckpt.chunks]
        yield encode_stream(ckpt.metadata, items, ckpt.created_at, options, sharded=False)
        return
    if options.compat:
        raise CheckpointError(None, f"state of {sum(c.size for c in ckpt.chunks)} bytes is over 1 GiB; compat mode cannot shard it")
    plans = shard.plan_streams(ckpt, meta_len, options.block_size)
    for i, sp in enumerate(plans):
        items = []
        for p in sp.pieces:
            c = ckpt.chunks[p.chunk_index]
            data = memoryview(c.data).cast("B")[p.offset : p.offset + p.length]
            items.append(
                (c.chunk_type, c.chunk_id, data, c.flags | (CHUNK_PART if p.partial else 0), elems.get((c.chunk_type, c.chunk_id)))
            )
        meta = shard.shard_metadata(ckpt.metadata, i, len(plans), sp.pieces)
        yield encode_stream(meta, items, ckpt.created_at, options, sharded=True)


def encode_single(ckpt: Checkpoint, options: WriteOptions) -> Encoding:
    """``ckpt`` as one unsharded stream (formats that hold one stream, like ``.rk.h5``)."""
    meta_len = len(pack_metadata(ckpt.metadata)) - 4
    if shard.needs_sharding(ckpt, meta_len, options.block_size):
        raise CheckpointError(None, "state is over the 1 GiB RKCKPT limit; save states over 1 GiB as sharded .rkcp")
    return next(streams(ckpt, options))


def write_to(f: BinaryIO, ckpt: Checkpoint, options: WriteOptions = WriteOptions()) -> int:  # noqa: B008 - frozen
    """Stream ``ckpt`` to the binary file object ``f``; return the bytes written."""
    return sum(emit(f, enc, options).length for enc in streams(ckpt, options))


def encode(ckpt: Checkpoint, options: WriteOptions = codec.COMPAT) -> bytes:
    """``ckpt`` as bytes in memory (default: what the reference writes)."""
    buf = io.BytesIO()
    write_to(buf, ckpt, options)
    return buf.getvalue()
