"""Elastic restore reads only what a rank now owns: every byte read from a part file is counted.

A set written by N ranks is read back on M (4 -> 2, 2 -> 3) with each rank's
planes plus one halo plane. Each part file's bytes read are split into: the
payload of the chunk being read, the payloads of *other* chunks (must be
none), and the rest (HDF5 structure, stream header, metadata, chunk headers).
Raw and zstd-compressed parts, full parts and delta chains (block patches);
file and memory storage, and the loopback S3 server once. The planes read are
compared with the arrays written, bit for bit.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rkckpt import ckptset, stream
from rkckpt.chain import load_checkpoint, open_source
from rkckpt.flags import CHUNK_BLOCK_DELTA, CHUNK_ZSTD, HDR_SHARD
from rkckpt.manager import SnapshotRequest, SnapshotResponse
from rkckpt.model import Chunk, ChunkType, region_id
from rkckpt.source import FileSource, RangeSource
from rkckpt.storage import FileStorage, MemoryStorage, open_storage
from set_helpers import DECOMPOSED, HALO, KID, SetWriter, local_state, split

NZ = 12
STRUCTURE_ALLOWANCE = 24 << 10  # HDF5 structure reads + stream header, metadata, chunk headers, per file


def state(step: int) -> dict[str, np.ndarray]:
    """Smooth (compressible) fields, 4 KiB and 8 KiB per plane; one row of ``p`` changes per step."""
    z, y, x = np.meshgrid(np.arange(NZ), np.arange(16), np.arange(64), indexing="ij")
    p = np.round(np.sin(0.3 * z + 0.05 * y + 0.02 * x), 3).astype(np.float32)
    q = (z * 1000 + y * 64 + x).astype(np.float64)
    p[step % NZ, step % 16, :] += step
    return {"p": p, "q": q, "t": np.array([step, 2 * step, 3], dtype=np.int64)}


class LoggedMemory(MemoryStorage):
    """Memory storage logging every ranged read as (name, offset, length); ``size`` is not a read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int, int]] = []

    def load(self, name: str) -> bytes:
        data = super().load(name)
        self.reads.append((name, 0, len(data)))
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.reads.append((name, offset, length))
        return self._objects[name][offset : offset + length]

    def size(self, name: str) -> int:
        return len(self._objects[name])


@pytest.fixture
def file_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every ``pread`` of a checkpoint file through ``FileSource``, as (file name, offset, length)."""
    log: list[tuple[str, int, int]] = []
    real = FileSource.read_into

    def logged(self: FileSource, offset: int, out: memoryview) -> None:
        log.append((Path(self.name).name, offset, out.nbytes))
        real(self, offset, out)

    monkeypatch.setattr(FileSource, "read_into", logged)
    return log


def write_sets(storage, n: int, *, compressed: bool, steps: tuple[int, ...]) -> ckptset.CheckpointSet:
    w = SetWriter(storage, n)
    for m in w.managers:  # raw: stored raw on any machine (the default's cost model depends on the core count)
        m.options = dataclasses.replace(m.options, adaptive="size", block_size=4096, compress=compressed)
    s = None
    for step in steps:
        s = w.write(step, g=state(step))
    assert s is not None
    return s


@dataclasses.dataclass
class Stored:
    """Where one chunk's payload lies in its file, and what a reader may need beyond the bytes asked for."""

    start: int
    stop: int
    ident: tuple[int, int]
    slack: int
    stream_at: int  # where the RKCKPT stream starts in the file (after the HDF5 superblock and structure)


def chunk_map(storage, name: str) -> list[Stored]:
    """The payload of every chunk of ``name`` in file offsets, with the slack a range read may add."""
    src = open_source(storage, name)
    try:
        base = src.offset if isinstance(src, RangeSource) else 0
        headers = stream.scan(src).chunk_headers
    finally:
        src.close()
    patches = {(c.chunk_type, c.chunk_id): c.data for c in load_checkpoint(storage, name).chunks if c.flags & CHUNK_BLOCK_DELTA}
    out = []
    for h in headers:
        slack = 0
        if h.flags & CHUNK_ZSTD:  # the frame table and at most one partial frame at each end
            slack += 8 + 4 * -(-h.uncompressed_size // 4096) + 2 * 4096
        if h.flags & CHUNK_BLOCK_DELTA:  # the patch header, its run table and a partial block at each end
            patch = patches[(h.chunk_type, h.chunk_id)]
            slack += 32 + 16 * struct.unpack_from("<I", patch, 24)[0] + 2 * struct.unpack_from("<I", patch, 4)[0]
        out.append(Stored(base + h.data_offset, base + h.data_offset + h.compressed_size, (h.chunk_type, h.chunk_id), slack, base))
    return out


def overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def account(reads: list[tuple[str, int, int]], maps: dict[str, list[Stored]], want: tuple[int, int]) -> Iterator[tuple[str, int, int, int]]:
    """Per file: (name, bytes of the wanted chunk's payload, bytes of other chunks' payloads, other bytes).

    A read that starts before the stream is ``h5layout.locate`` reading the
    HDF5 structure in 4 KiB pieces: counted as structure, whatever it overlaps.
    """
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, off, n in reads:
        if name not in maps:
            continue
        acc = per[name]
        inside = 0
        if off < maps[name][0].stream_at:  # the HDF5 structure, read in 4 KiB pieces that may run into the stream
            acc[2] += n
            continue
        for c in maps[name]:
            got = overlap(off, off + n, c.start, c.stop)
            acc[0 if c.ident == want else 1] += got
            inside += got
        acc[2] += n - inside
    for name, (mine, others, rest) in per.items():
        yield name, mine, others, rest


def local_planes(s: ckptset.CheckpointSet, z0: int, z1: int) -> dict[str, int]:
    """Planes each part file must give for global planes [z0, z1)."""
    return {p.name: min(z1, p.z1) - max(z0, p.z0) for p in ckptset.overlapping(s, z0, z1)}


def chain_files(storage, s: ckptset.CheckpointSet) -> dict[str, list[Stored]]:
    index = ckptset._index_of(storage, s.parts)
    out = {}
    for p in s.parts:
        for e in index.chain_of(index.entries[p.name])[0]:
            out[e.name] = chunk_map(storage, e.name)
    return out


def check_rank_reads(storage, log: list[tuple[str, int, int]], s: ckptset.CheckpointSet, m: int, step: int) -> None:
    """Each of ``m`` ranks reads its planes (+ halo) of every split region: bit-identical, and no more bytes than those."""
    g, maps = state(step), chain_files(storage, s)
    sizes = {n: max(c.stop for c in cs) for n, cs in maps.items()}
    by_part = {n: [p.name for p in s.parts if n.split("-")[0] == p.name.split("-")[0]][0] for n in maps}
    for z0, z1 in split(NZ, m):
        a, b = max(0, z0 - HALO), min(NZ, z1 + HALO)
        for region in DECOMPOSED:
            log.clear()
            got = ckptset.read_planes(storage, s, region, a, b)
            assert got.dtype == g[region].dtype and np.array_equal(got, g[region][a:b])
            plane = g[region][0].nbytes
            need = local_planes(s, a, b)
            touched = set()
            for name, mine, others, rest in account(log, maps, (int(ChunkType.DEVICE_MEMORY), region_id(region))):
                touched.add(by_part[name])
                cap = need[by_part[name]] * plane + max(c.slack for c in maps[name])
                assert others == 0, f"{name}: {others} bytes of other chunks' payloads read"
                assert mine <= cap, f"{name}: {mine} bytes of {region!r} read, its {need[by_part[name]]} planes need {cap}"
                assert rest <= STRUCTURE_ALLOWANCE, f"{name}: {rest} bytes outside any payload read"
                assert mine + others + rest < sizes[name] or need[by_part[name]] * plane >= sizes[name] // 2
            assert touched == set(need), "only the parts that own the planes are read"


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize(("n", "m"), [(4, 2), (2, 3)])
@pytest.mark.parametrize("steps", [(10,), (10, 11, 12)], ids=["full", "delta"])
def test_memory_restore_reads_only_the_owned_planes(n: int, m: int, compressed: bool, steps: tuple[int, ...]) -> None:
    storage = LoggedMemory()
    s = write_sets(storage, n, compressed=compressed, steps=steps)
    kinds = {c.ident for cs in chain_files(storage, s).values() for c in cs}
    assert kinds, "parts were written"
    flags = set()
    for name in chain_files(storage, s):
        src = open_source(storage, name)
        flags |= {h.flags for h in stream.scan(src).chunk_headers}
        src.close()
    assert any(f & CHUNK_ZSTD for f in flags) == compressed, f"chunk flags {sorted(flags)}"
    assert any(f & CHUNK_BLOCK_DELTA for f in flags) == (len(steps) > 1)
    check_rank_reads(storage, storage.reads, s, m, steps[-1])


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
def test_file_restore_4_to_2_and_2_to_3_reads_only_the_owned_planes(tmp_path: Path, file_log: list, compressed: bool) -> None:
    for n, m in ((4, 2), (2, 3)):
        storage = FileStorage(tmp_path / f"{n}{m}")
        s = write_sets(storage, n, compressed=compressed, steps=(10, 11, 12))
        check_rank_reads(storage, file_log, s, m, 12)


def write_with_control(storage, n: int, steps: tuple[int, ...]) -> ckptset.CheckpointSet:
    """Like ``SetWriter.write``, each part also holding a control block that changes every step."""
    w = SetWriter(storage, n)
    s = None
    for step in steps:
        g, parts = state(step), []
        for r, mgr in enumerate(w.managers):
            ck, offset = local_state(g, step, r, n)
            ck.chunks.append(Chunk(int(ChunkType.CONTROL_BLOCK), 0, bytes([r, step % 256]) * 64))
            mgr.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
            z0, z1 = split(NZ, n)[r]
            parts.append(ckptset.written_part(storage, KID, r, n, step, z0, z1, offset))
        s = ckptset.CheckpointSet(KID, step, "run-a", n, NZ, DECOMPOSED, tuple(parts))
        s = dataclasses.replace(s, name=ckptset.commit_set(storage, s))
    assert s is not None
    return s


def test_part_head_reads_no_region_payload() -> None:
    """What a rank on a new layout takes from part 0 besides its planes: metadata and control block, no region bytes."""
    storage = LoggedMemory()
    s = write_with_control(storage, 2, (10, 11))
    maps = chain_files(storage, s)
    storage.reads.clear()
    head = ckptset.part_head(storage, s, 0)
    reads = list(storage.reads)
    full = ckptset.part_checkpoint(storage, s, 0)
    assert head.metadata == full.metadata
    assert [(c.chunk_type, bytes(c.data)) for c in head.chunks] == [(int(ChunkType.CONTROL_BLOCK), bytes([0, 11]) * 64)]
    for name, off, n in reads:
        for c in maps.get(name, []):
            if c.ident[0] == int(ChunkType.DEVICE_MEMORY) and off >= c.stream_at:
                assert overlap(off, off + n, c.start, c.stop) == 0, f"{name}: region payload read for the head"
    assert np.array_equal(ckptset.read_replicated(storage, s, "t"), state(11)["t"])


def test_restore_on_s3_reads_only_the_owned_planes(s3_server) -> None:
    url = f"s3://{s3_server.bucket()}/ranges"
    s3 = open_storage(url, **s3_server.options())
    log: list[tuple[str, int, int]] = []
    real = s3.read_range

    def logged(name: str, offset: int, length: int) -> bytes:
        log.append((name, offset, length))
        return real(name, offset, length)

    s3.read_range = logged  # type: ignore[method-assign]
    s = write_sets(s3, 4, compressed=True, steps=(10, 11))
    check_rank_reads(s3, log, s, 2, 11)


# ---------------------------------------------------------------- hostile bytes on the range path
def damaged_read(compressed: bool, region: str, link: int, edit) -> ckptset.SetError:  # noqa: ANN001
    """Write 2-rank sets at 10 and 13, let ``edit(raw, chunk)`` change part 0's file ``link`` (0: the full), read ``region``.

    Step 13 changes a row of ``p`` in part 0's planes: its delta holds a block patch of ``p``.
    """
    storage = LoggedMemory()
    s = write_sets(storage, 2, compressed=compressed, steps=(10, 13))
    maps = chain_files(storage, s)
    name = sorted(n for n in maps if n.startswith(f"{KID}.r0of2-"))[link]
    chunk = next(c for c in maps[name] if c.ident == (int(ChunkType.DEVICE_MEMORY), region_id(region)))
    raw = bytearray(storage._objects[name])
    edit(raw, chunk)
    storage._objects[name] = bytes(raw)
    with pytest.raises(ckptset.SetError) as ei:
        ckptset.read_planes(storage, s, region, 0, NZ)
    assert ei.value.source == s.parts[0].name
    if link == 0:
        assert name in str(ei.value), "the damaged older link is named"
    return ei.value


def _put(raw: bytearray, at: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, raw, at, *values)


def _first_zstd_frame(raw: bytearray, c: Stored, *, clobber: bool) -> None:
    """Clobber the magic of the first compressed frame, or cut it 10 bytes short (the next frame's slot starts earlier)."""
    count = struct.unpack_from("<I", raw, c.start + 4)[0]
    entries = list(struct.unpack_from(f"<{count}I", raw, c.start + 8))
    i = next(k for k, e in enumerate(entries) if not e & (1 << 31) and k + 1 < count)
    at = c.start + 8 + 4 * count + sum(e & 0x7FFFFFFF for e in entries[:i])
    if clobber:
        raw[at : at + 4] = b"\0\0\0\0"
        return
    _put(raw, c.start + 8 + 4 * i, "<I", entries[i] - 10)
    _put(raw, c.start + 8 + 4 * (i + 1), "<I", entries[i + 1] + 10)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda raw, c: _put(raw, c.start, "<I", 0), "frame block size 0 out of range"),
        (lambda raw, c: _put(raw, c.start + 4, "<I", 1 << 30), "frame table has"),
        (lambda raw, c: _put(raw, c.start + 8, "<I", 0x7FFFFFFF), "frame sizes add up"),
        (lambda raw, c: _first_zstd_frame(raw, c, clobber=True), "is not a zstd frame"),
        (lambda raw, c: _first_zstd_frame(raw, c, clobber=False), "zstd frame"),
    ],
    ids=["block-size", "frame-count", "frame-size", "frame-magic", "frame-truncated"],
)
def test_a_lying_frame_table_or_broken_frame_is_a_typed_error_naming_the_file(edit, why: str) -> None:  # noqa: ANN001
    assert why in damaged_read(True, "q", 0, edit).problem


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda raw, c: _put(raw, c.start + 24, "<I", 0xFFFFFFFF), "runs, more than"),
        (lambda raw, c: _put(raw, c.start + 8, "<Q", 12345), "expects a parent chunk of 12345 bytes"),
        (lambda raw, c: _put(raw, c.start + 16, "<Q", 1 << 40), "grows the chunk"),
        (lambda raw, c: _put(raw, c.start + 32, "<Q", 1 << 62), "out of order"),
        (lambda raw, c: raw.__setitem__(slice(c.start, c.start + 4), b"XXXX"), "bad magic"),
    ],
    ids=["runs", "parent-size", "target-size", "run-start", "magic"],
)
def test_a_lying_block_patch_is_a_typed_error(edit, why: str) -> None:  # noqa: ANN001
    assert why in damaged_read(False, "p", 1, edit).problem


def test_a_chunk_table_or_region_table_that_lies_is_a_typed_error() -> None:
    def longer_chunk(raw: bytearray, c: Stored) -> None:
        _put(raw, c.start - 16, "<Q", 1 << 29)  # compressed_size of the chunk header before the payload

    assert "present" in damaged_read(False, "q", 0, longer_chunk).problem

    def more_planes(raw: bytearray, c: Stored) -> None:
        old = b'"name":"p","shape":[7,16,64]'
        at = raw.index(old, c.stream_at)
        raw[at : at + len(old)] = old.replace(b"[7,", b"[9,")

    assert "bytes stored" in damaged_read(False, "p", 1, more_planes).problem


def test_a_truncated_part_is_a_typed_error() -> None:
    def cut(raw: bytearray, c: Stored) -> None:
        del raw[c.start + 100 :]

    err = damaged_read(False, "p", 1, cut)
    assert "truncated" in err.problem or "ended" in err.problem or "outside" in err.problem, err.problem


def test_a_sharded_stream_is_read_whole_and_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state over the stream cap (here 8 MiB) may split a chunk over shards: the covering range is the file."""
    from rkckpt import codec, container, shard
    from rkckpt.model import Checkpoint, Metadata
    from rkckpt.rangeread import ChainReader

    monkeypatch.setattr(shard, "MAX_STREAM", 8 << 20)
    wave = np.sin(np.linspace(0, 50, 48 * 256 * 256, dtype=np.float32)).reshape(48, 256, 256)  # 12 MiB
    ck = Checkpoint(Metadata("big", "fdtd_3d", 7))
    ck.add_region("wave", wave)
    path = tmp_path / "big-000000000007-full.rkcp"
    container.write(path, ck, codec.WriteOptions(compress=False))
    with FileSource(path) as src:
        assert stream.scan(src, chunks=False).header.flags & HDR_SHARD, "the state was written as shards"
    with ChainReader([path.name], lambda n: FileSource(tmp_path / n)) as reader:
        assert np.array_equal(reader.region("wave", (5, 9)), wave[5:9])
        assert np.array_equal(reader.region("wave"), wave)


def test_one_restore_reads_each_part_chain_headers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Part 0's control chunks, the planes of parts 0-1 and part 0's whole regions: with one ``PartHeaders``
    the store is listed once per new part and no chain header is read twice; without it, again per call."""
    import rkckpt.chain as chain_mod

    storage = LoggedMemory()
    s = write_sets(storage, 4, compressed=True, steps=(1, 2, 3))
    if storage.exists(chain_mod.INDEX_NAME):
        storage.delete(chain_mod.INDEX_NAME)  # every header from its file
    entries: list[str] = []
    lists = [0]
    real_entry, real_list = chain_mod._read_entry, storage.list

    def counted_entry(st, name, size=None):  # noqa: ANN001, ANN202
        entries.append(name)
        return real_entry(st, name, size)

    def counted_list() -> list[str]:
        lists[0] += 1
        return real_list()

    monkeypatch.setattr(chain_mod, "_read_entry", counted_entry)
    monkeypatch.setattr(storage, "list", counted_list)

    def restore(headers: ckptset.PartHeaders | None) -> tuple[object, ...]:
        entries.clear()
        lists[0] = 0
        head = ckptset.part_head(storage, s, 0, headers=headers)
        planes = ckptset.read_planes_of(storage, s, ["p", "q"], 0, NZ // 2, headers=headers)
        whole = ckptset.read_replicated_of(storage, s, ["t"], headers=headers)
        control = tuple(bytes(c.data) for c in head.chunks)
        return control, planes["p"].tobytes(), planes["q"].tobytes(), whole["t"].tobytes()

    alone = restore(None)
    alone_entries, alone_lists = sorted(entries), lists[0]
    shared = restore(ckptset.PartHeaders(storage))
    assert shared == alone  # the same state either way
    assert len(entries) == len(set(entries)), f"a chain header read twice: {sorted(entries)}"
    assert lists[0] == 2  # part 0, then part 1 (the other owner of planes [0, NZ/2))
    assert alone_lists == 3 and len(alone_entries) > len(entries), (alone_lists, alone_entries, sorted(entries))
    with pytest.raises(ValueError, match="another store"):
        ckptset.part_head(MemoryStorage(), s, 0, headers=ckptset.PartHeaders(storage))
