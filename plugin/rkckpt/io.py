"""Checkpoint files: atomic, streaming save and load of ``.rkcp`` / ``.rk.h5``.

Why streaming: a state of several GiB must not be copied into one ``bytes``
to be written, nor read into one to be parsed. The writer emits chunks one by
one (raw chunks straight from the caller's buffers) and patches the header
with the checksum at the end; the reader reads each chunk into its own
buffer (or straight into its place in a sharded chunk), checks every size
against the bytes left before allocating, and checks the stream CRC before
decoding anything compressed. CRC-32 runs in a helper thread, overlapping
the disk I/O (``isal``'s CRC when installed, else ``zlib``'s).
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import codec, format, shard
from .atomic import atomic_open
from .codec import WriteOptions
from .errors import CheckpointError
from .flags import CHUNK_PART, COMPRESSION_NONE, HDR_EXTENDED, HDR_SHARD
from .format import CHUNK_HEADER_SIZE, HEADER_SIZE, MAX_CHECKPOINT_SIZE, ChunkHeader, Header, ParsedFile
from .model import Checkpoint, Chunk, Metadata

try:  # ISA-L's CRC-32 is several times faster than zlib's; same polynomial
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - optional
    from zlib import crc32 as _crc32

__all__ = ["encode_to", "load", "parse_any", "parse_file", "save"]

_PIECE = 16 << 20  # I/O and CRC granularity: big enough for throughput, small enough to overlap
_HEADER = struct.Struct("<QIIQIIIIQ16s")
_CHUNK = struct.Struct("<IIQQQ")
H5_SUFFIX = ".rk.h5"


def crc32(data: codec.Buffer, value: int = 0) -> int:
    return _crc32(data, value) & 0xFFFFFFFF


class _Crc:
    """Running CRC-32 computed in one helper thread, in submission order."""

    def __init__(self) -> None:
        self.value = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkckpt-crc")
        self._last: Future[None] | None = None

    def _do(self, buf: codec.Buffer) -> None:
        self.value = crc32(buf, self.value)

    def update(self, buf: codec.Buffer) -> None:
        if memoryview(buf).nbytes < (1 << 16):
            if self._last is None or self._last.done():
                self._do(buf)
                return
        self._last = self._pool.submit(self._do, buf)

    def result(self) -> int:
        if self._last is not None:
            self._last.result()
        self.close()
        return self.value

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> _Crc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_h5(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(H5_SUFFIX)


def _hdf5():  # noqa: ANN202 - module
    try:
        from . import hdf5
    except ImportError as exc:  # pragma: no cover - depends on the wrapper being installed
        raise CheckpointError(None, f".rk.h5 support is not available: {exc}") from None
    return hdf5


# ------------------------------------------------------------------ writing
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
    except (AttributeError, OSError, ValueError):
        return None


def _write_fully(f: BinaryIO, buf: codec.Buffer) -> None:
    mv = memoryview(buf).cast("B")
    done = 0
    while done < mv.nbytes:  # unbuffered files may write less than asked
        n = f.write(mv[done:])
        done = mv.nbytes if n is None else done + n


def _write_all(f: BinaryIO, buf: codec.Buffer, crc: _Crc, fd: int | None) -> None:
    mv = memoryview(buf).cast("B")
    for s in range(0, mv.nbytes, _PIECE):
        piece = mv[s : s + _PIECE]
        crc.update(piece)
        _write_fully(f, piece)
        if fd is not None and piece.nbytes >= (1 << 20):
            end = f.tell()
            try:  # start writeback now; the final fsync then has little left to do
                os.posix_fadvise(fd, end - piece.nbytes, piece.nbytes, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass


def _encode_stream(
    f: BinaryIO,
    meta: Metadata,
    chunks: list[tuple[int, int, codec.Buffer, int, int | None]],
    created_at: int,
    options: WriteOptions,
    *,
    sharded: bool,
) -> int:
    """Write one RKCKPT stream; chunks are (type, id, data, logical flags, elem size)."""
    with _Crc() as crc:
        return _encode_body(f, meta, chunks, created_at, options, sharded, crc)


def _encode_body(
    f: BinaryIO,
    meta: Metadata,
    chunks: list[tuple[int, int, codec.Buffer, int, int | None]],
    created_at: int,
    options: WriteOptions,
    sharded: bool,
    crc: _Crc,
) -> int:
    meta_b = format.encode_metadata(meta)
    compression, hflags = COMPRESSION_NONE, (HDR_SHARD | HDR_EXTENDED) if sharded else 0
    seekable = _seekable(f)
    start = f.tell() if seekable else 0
    fd = _fileno(f) if seekable and options.early_writeback and hasattr(os, "posix_fadvise") else None
    held: list[codec.Buffer] = []  # non-seekable targets: body kept until the header is known
    total = HEADER_SIZE

    def emit(buf: codec.Buffer) -> None:
        nonlocal total
        total += memoryview(buf).nbytes
        if seekable:
            _write_all(f, buf, crc, fd)
        else:
            crc.update(buf)
            held.append(buf)

    if seekable:
        _write_fully(f, bytes(HEADER_SIZE))  # placeholder, patched below
    emit(struct.pack("<I", len(meta_b)) + meta_b)
    for ctype, cid, data, flags, elem in chunks:
        enc = codec.encode_chunk(data, flags, options, elem_size=elem)
        compression, hflags = codec.header_bits(enc.flags, compression, hflags)
        if options.compat and (hflags or compression):
            raise CheckpointError(None, "compat mode cannot encode extension chunks (block deltas or flags)")
        emit(_CHUNK.pack(ctype, enc.flags, memoryview(data).nbytes, enc.size, cid))
        for part in enc.parts:
            emit(part)
    checksum = crc.result()
    limit = shard.MAX_STREAM if sharded else MAX_CHECKPOINT_SIZE + (HEADER_SIZE - format.REFERENCE_HEADER_SIZE)
    if total > limit:
        raise CheckpointError(None, f"encoded stream is {total} bytes, over the {MAX_CHECKPOINT_SIZE}-byte RKCKPT limit")
    if sharded:  # exact sizes so streams can follow each other
        header = _HEADER.pack(
            format.MAGIC, format.VERSION, HEADER_SIZE, total, len(chunks), compression, checksum, hflags, created_at, bytes(16)
        )
    else:  # the reference's quirks, byte-identical to format.encode
        quirk = total - (HEADER_SIZE - format.REFERENCE_HEADER_SIZE)
        header = _HEADER.pack(
            format.MAGIC,
            format.VERSION,
            format.REFERENCE_HEADER_SIZE,
            quirk,
            len(chunks),
            compression,
            checksum,
            hflags,
            created_at,
            bytes(16),
        )
    if seekable:
        end = f.tell()
        f.seek(start)
        _write_fully(f, header)
        f.seek(end)
    else:
        _write_fully(f, header)
        for buf in held:
            _write_fully(f, buf)
    return total


def encode_to(fileobj: BinaryIO, ckpt: Checkpoint, options: WriteOptions = WriteOptions()) -> int:  # noqa: B008 - frozen
    """Stream ``ckpt`` to ``fileobj``; return the bytes written.

    Seekable targets get a placeholder header patched at the end; others get
    the header first and the body from buffers kept meanwhile (raw chunks are
    referenced, not copied). States over 1 GiB are sharded (not in compat mode).
    """
    if any(c.flags & CHUNK_PART for c in ckpt.chunks):
        raise CheckpointError(None, "chunks flagged CHUNK_PART are written only by the shard writer")
    elems = {} if options.compat else format.elem_sizes(ckpt)
    meta_len = len(format.encode_metadata(ckpt.metadata))
    if not shard.needs_sharding(ckpt, meta_len, options.block_size):
        items = [(c.chunk_type, c.chunk_id, c.data, c.flags, elems.get((c.chunk_type, c.chunk_id))) for c in ckpt.chunks]
        return _encode_stream(fileobj, ckpt.metadata, items, ckpt.created_at, options, sharded=False)
    if options.compat:
        raise CheckpointError(None, f"state of {sum(c.size for c in ckpt.chunks)} bytes is over 1 GiB; compat mode cannot shard it")
    plans = shard.plan(ckpt, meta_len, options.block_size)
    written = 0
    for i, sp in enumerate(plans):
        items = []
        for p in sp.pieces:
            c = ckpt.chunks[p.chunk_index]
            data = memoryview(c.data).cast("B")[p.offset : p.offset + p.length]
            items.append(
                (c.chunk_type, c.chunk_id, data, c.flags | (CHUNK_PART if p.partial else 0), elems.get((c.chunk_type, c.chunk_id)))
            )
        meta = shard.shard_metadata(ckpt.metadata, i, len(plans), sp.pieces)
        written += _encode_stream(fileobj, meta, items, ckpt.created_at, options, sharded=True)
    return written


def save(path: str | os.PathLike[str], ckpt: Checkpoint, options: WriteOptions = WriteOptions()) -> int:  # noqa: B008
    """Write ``ckpt`` atomically (temp file in the same folder, fsync, rename, fsync folder)."""
    target = Path(path)
    if _is_h5(target):
        return int(_hdf5().write_h5(target, ckpt, options))
    with atomic_open(target) as f:
        n = encode_to(f, ckpt, options)
    return n


# ------------------------------------------------------------------ reading
class _File:
    """Sequential reads with every length checked against the bytes present."""

    def __init__(self, f: BinaryIO, size: int, source: str) -> None:
        self.f, self.size, self.source, self.pos = f, size, source, 0

    def left(self) -> int:
        return self.size - self.pos

    def into(self, out: memoryview, what: str, crc: _Crc | None) -> None:
        n = out.nbytes
        if n > self.left():
            raise CheckpointError(self.source, f"{what} needs {n} bytes at offset {self.pos}, only {self.left()} present (truncated)")
        done = 0
        while done < n:
            piece = out[done : min(n, done + _PIECE)]
            got = 0
            while got < piece.nbytes:
                r = self.f.readinto(piece[got:])
                if not r:
                    raise CheckpointError(self.source, f"file shrank while reading {what} at offset {self.pos + done + got}")
                got += r
            if crc is not None:
                crc.update(piece)
            done += piece.nbytes
        self.pos += n

    def take(self, n: int, what: str, crc: _Crc | None) -> memoryview:
        if n > self.left():
            raise CheckpointError(self.source, f"{what} needs {n} bytes at offset {self.pos}, only {self.left()} present (truncated)")
        buf = memoryview(np.empty(n, dtype=np.uint8)).cast("B")
        self.into(buf, what, crc)
        return buf


def _prescan_pieces(fd: int, size: int, src: str) -> dict[tuple[int, int], int]:
    """Sum of the declared sizes of every split chunk's pieces, from headers only.

    A split chunk's buffer is allocated when its first piece is met; its
    ``total`` comes from metadata, so it is trusted only when the pieces that
    are physically in the file add up to it.
    """
    sums: dict[tuple[int, int], int] = {}
    pos = 0
    while pos < size:
        head = os.pread(fd, HEADER_SIZE, pos)
        h = format.parse_header(head, src, max_size=shard.MAX_STREAM)
        if not h.flags & HDR_SHARD or not HEADER_SIZE < h.total_size <= size - pos:
            break  # the sequential reader reports the exact problem
        end = pos + h.total_size
        raw_len = os.pread(fd, 4, pos + HEADER_SIZE)
        meta_len = int.from_bytes(raw_len, "little") if len(raw_len) == 4 else end
        cpos = pos + HEADER_SIZE + 4 + meta_len
        if cpos > end:
            break
        mr = format._Reader(memoryview(os.pread(fd, meta_len, pos + HEADER_SIZE + 4)), src)  # noqa: SLF001
        try:
            _, _, parts = shard.parse_shard_key(format._parse_metadata(mr), src, h.chunk_count)  # noqa: SLF001
        except CheckpointError:
            break
        for i in range(h.chunk_count):
            raw = os.pread(fd, CHUNK_HEADER_SIZE, cpos)
            if len(raw) != CHUNK_HEADER_SIZE or cpos + CHUNK_HEADER_SIZE > end:
                break
            ctype, _, usize, csize, cid = _CHUNK.unpack(raw)
            cpos += CHUNK_HEADER_SIZE + csize
            if cpos > end:
                break
            if i in parts:
                sums[(ctype, cid)] = sums.get((ctype, cid), 0) + usize
        pos = end
    return sums


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


def _read_stream(
    rd: _File, sharded_file: bool, chunks: list[Chunk], chunk_headers: list[ChunkHeader], asm: _Assembly
) -> tuple[Header, Metadata, int]:
    src = rd.source
    start = rd.pos
    head = rd.take(HEADER_SIZE, "header", None)
    limit = shard.MAX_STREAM if sharded_file else MAX_CHECKPOINT_SIZE
    header = format.parse_header(head, src, max_size=limit)
    is_shard = bool(header.flags & HDR_SHARD)
    if is_shard != sharded_file:
        raise CheckpointError(src, f"stream at offset {start} {'is' if is_shard else 'is not'} a shard, unlike the first stream")
    left = rd.size - start
    if is_shard:
        if header.header_size != HEADER_SIZE or not HEADER_SIZE < header.total_size <= left:
            raise CheckpointError(src, f"shard at offset {start} declares {header.total_size} bytes, {left} present")
        length = header.total_size
    else:
        if header.total_size not in (left, left - (HEADER_SIZE - format.REFERENCE_HEADER_SIZE)):
            raise CheckpointError(src, f"total_size field says {header.total_size} bytes but the file has {left} (truncated or padded)")
        length = left
    end = start + length
    with _Crc() as crc:
        return _read_body(rd, header, start, end, limit, is_shard, chunks, chunk_headers, asm, crc)


def _read_body(
    rd: _File,
    header: Header,
    start: int,
    end: int,
    limit: int,
    is_shard: bool,
    chunks: list[Chunk],
    chunk_headers: list[ChunkHeader],
    asm: _Assembly,
    crc: _Crc,
) -> tuple[Header, Metadata, int]:
    src = rd.source
    sub = _File(rd.f, end, src)
    sub.pos = rd.pos
    meta_len = int.from_bytes(sub.take(4, "metadata length", crc), "little")
    meta_raw = sub.take(meta_len, "metadata", crc)
    mr = format._Reader(meta_raw, src)  # noqa: SLF001 - same package
    meta = format._parse_metadata(mr)  # noqa: SLF001
    if mr.pos != meta_len:
        raise CheckpointError(src, f"metadata length says {meta_len} bytes but its fields use {mr.pos}")
    if header.chunk_count > sub.left() // CHUNK_HEADER_SIZE:
        raise CheckpointError(src, f"chunk_count {header.chunk_count} cannot fit in the {sub.left()} bytes left")
    parts: dict[int, tuple[int, int]] = {}
    if is_shard:
        _, _, parts = shard.parse_shard_key(meta, src, header.chunk_count)
    pending: list[tuple[int, int, memoryview, memoryview]] = []  # (chunk no, flags, payload, destination)
    for i in range(header.chunk_count):
        raw = sub.take(CHUNK_HEADER_SIZE, f"chunk {i} header", crc)
        ctype, cflags, usize, csize, cid = _CHUNK.unpack(raw)
        if csize > sub.left():
            raise CheckpointError(src, f"chunk {i} declares {csize} data bytes, only {sub.left()} present (truncated chunk)")
        if usize > limit:
            raise CheckpointError(src, f"chunk {i} declares uncompressed_size {usize} over the limit")
        codec._check_flags(cflags, src)  # noqa: SLF001
        chunk_headers.append(ChunkHeader(ctype, cflags, usize, csize, cid, sub.pos))
        is_part = bool(cflags & CHUNK_PART)
        if is_part != (i in parts):
            raise CheckpointError(src, f"chunk {i}: part flag and shard table disagree")
        compressed = bool(cflags & codec.CHUNK_ZSTD)
        if not compressed and csize != usize:
            raise CheckpointError(src, f"chunk {i}: raw chunk stores {csize} bytes but uncompressed_size is {usize}")
        if is_part:
            offset, total = parts[i]
            dest = asm.target(ctype, cid, offset, total, usize, chunks, codec.logical_flags(cflags))
            if compressed:
                pending.append((i, cflags, sub.take(csize, f"chunk {i} data", crc), dest))
            else:
                sub.into(dest, f"chunk {i} data", crc)
            continue
        payload = sub.take(csize, f"chunk {i} data", crc)
        if compressed:
            codec._frame_table(payload, usize, src)  # noqa: SLF001 - validate before allocating
            dest = memoryview(np.empty(usize, dtype=np.uint8)).cast("B")
            pending.append((i, cflags, payload, dest))
            chunks.append(Chunk(ctype, cid, dest, codec.logical_flags(cflags)))
        else:
            chunks.append(Chunk(ctype, cid, payload, codec.logical_flags(cflags)))
    if sub.pos != end:
        raise CheckpointError(src, f"{end - sub.pos} unexpected bytes after the last chunk")
    got = crc.result()
    if got != header.checksum:
        raise CheckpointError(src, f"checksum mismatch: header says 0x{header.checksum:08x}, data gives 0x{got:08x}")
    for i, cflags, payload, dest in pending:  # only after the CRC proved the bytes intact
        try:
            codec.decode_into(cflags, payload, dest, src)
        except CheckpointError as exc:
            raise CheckpointError(src, f"chunk {i}: {exc.problem}") from None
    rd.pos = end
    return header, meta, end - start


def parse_file(path: str | os.PathLike[str]) -> ParsedFile:
    """Parse a ``.rkcp`` (plain or sharded) or ``.rk.h5`` file."""
    src = os.fspath(path)
    if _is_h5(src):
        return _hdf5().read_h5(src)
    try:
        f = open(src, "rb", buffering=0)  # noqa: SIM115
    except OSError as exc:
        raise CheckpointError(src, f"cannot read: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        rd = _File(f, size, src)  # type: ignore[arg-type]
        if size < HEADER_SIZE:
            raise CheckpointError(src, f"file is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        first = format.parse_header(os.pread(f.fileno(), HEADER_SIZE, 0), src, max_size=shard.MAX_STREAM)
        sharded = bool(first.flags & HDR_SHARD)
        chunks: list[Chunk] = []
        headers: list[ChunkHeader] = []
        asm = _Assembly(src, _prescan_pieces(f.fileno(), size, src) if sharded else None)
        header, meta, _ = _read_stream(rd, sharded, chunks, headers, asm)
        if sharded:
            index, count, _ = shard.parse_shard_key(meta, src, header.chunk_count)
            if index != 0:
                raise CheckpointError(src, f"first shard has index {index}")
            for expect in range(1, count):
                if rd.left() == 0:
                    raise CheckpointError(src, f"file ends after {expect} of {count} shards (truncated)")
                h, m, _ = _read_stream(rd, True, chunks, headers, asm)
                idx, cnt, _ = shard.parse_shard_key(m, src, h.chunk_count)
                if (idx, cnt) != (expect, count):
                    raise CheckpointError(src, f"shard {idx}/{cnt} found where {expect}/{count} was expected")
            if rd.left():
                raise CheckpointError(src, f"{rd.left()} unexpected bytes after the last shard")
            if asm.open:
                raise CheckpointError(src, f"{len(asm.open)} chunk(s) split over shards are incomplete")
            meta = meta.with_custom(**{shard.SHARD_KEY: None})
            header = Header(
                header.version, header.header_size, size, len(chunks), header.compression, header.checksum, header.flags, header.created_at
            )
    return ParsedFile(header, headers, Checkpoint(meta, chunks, created_at=header.created_at))


parse_any = parse_file


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """The checkpoint stored at ``path`` (``.rkcp``, sharded ``.rkcp`` or ``.rk.h5``)."""
    return parse_file(path).checkpoint
