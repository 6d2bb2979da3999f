"""Compression extension: frames, shuffle, adaptive raw fallback, bombs."""

from __future__ import annotations

import io as pyio
import struct

import numpy as np
import pytest
import zstandard

from rkckpt import CheckpointError, codec, container
from rkckpt.flags import CHUNK_SHUFFLE, CHUNK_SHUFFLE_ELEM_SHIFT, CHUNK_ZSTD, COMPRESSION_ZSTD, HDR_EXTENDED
from rkckpt.model import Checkpoint, Metadata

SIZE = codec.WriteOptions(adaptive="size")
WAVE = np.sin(np.linspace(0, 200, 3 << 20, dtype=np.float32)).astype(np.float32)
NOISE = np.random.default_rng(0).random(1 << 18).astype(np.float32)


def _ckpt() -> Checkpoint:
    ck = Checkpoint(Metadata("k", "fdtd_3d", 7), created_at=123)
    ck.add_region("wave", WAVE)
    ck.add_region("noise", NOISE)
    return ck


def test_wave_is_compressed_shuffled_in_frames_and_roundtrips(tmp_path):
    opts = codec.WriteOptions(block_size=1 << 20, adaptive="size")
    flags, payload = codec.encode_payload(WAVE.data, 0, opts, elem_size=4)
    assert flags == CHUNK_ZSTD | CHUNK_SHUFFLE | (4 << CHUNK_SHUFFLE_ELEM_SHIFT)
    bs, count = struct.unpack_from("<II", payload)
    assert (bs, count) == (1 << 20, 12)
    assert len(payload) < WAVE.nbytes // 2
    out = codec.decode_payload(flags, memoryview(payload), WAVE.nbytes, "x")
    assert bytes(out) == WAVE.tobytes()


def test_noise_is_stored_raw_and_file_flags():
    ck = _ckpt()
    parsed = container.read(container.encode(ck, SIZE))
    by_size = {h.uncompressed_size: h for h in parsed.chunk_headers}
    assert by_size[NOISE.nbytes].flags == 0 and by_size[NOISE.nbytes].compressed_size == NOISE.nbytes
    assert by_size[WAVE.nbytes].flags & CHUNK_ZSTD
    assert parsed.header.compression == COMPRESSION_ZSTD and parsed.header.flags & HDR_EXTENDED
    assert parsed.checkpoint.content_digest() == ck.content_digest()
    np.testing.assert_array_equal(parsed.checkpoint.region("wave"), WAVE)


def test_compat_writes_raw_and_encode_to_matches_encode(tmp_path):
    ck = _ckpt()
    for opts in (codec.COMPAT, codec.WriteOptions(), SIZE, codec.WriteOptions(shuffle=False, level=3, adaptive="size")):
        blob = container.encode(ck, opts)
        buf = pyio.BytesIO()
        assert container.write(buf, ck, opts) == len(blob)
        assert buf.getvalue() == blob  # deterministic, same bytes both ways
        p = tmp_path / "c.rkcp"
        container.write(p, ck, opts)
        assert p.read_bytes() == blob
        assert container.load(p).content_digest() == ck.content_digest()
    assert container.read(container.encode(ck, codec.COMPAT)).header.compression == 0


def _frame_payload(frames: list[bytes], bs: int, raw: list[bool] | None = None) -> bytes:
    raw = raw or [False] * len(frames)
    entries = [len(f) | (codec.RAW_FRAME if r else 0) for f, r in zip(frames, raw, strict=True)]
    return struct.pack("<II", bs, len(frames)) + struct.pack(f"<{len(frames)}I", *entries) + b"".join(frames)


def test_zstd_bomb_is_rejected_without_allocating():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(512 << 20))  # 512 MiB of zeros, ~16 KiB
    payload = _frame_payload([bomb], 4096)
    with pytest.raises(CheckpointError, match="declares 536870912 bytes"):
        codec.decode_payload(CHUNK_ZSTD, memoryview(payload), 4096, "bomb.rkcp")


def test_frame_without_content_size_or_short_is_rejected():
    nosize = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4096))
    with pytest.raises(CheckpointError, match="declares -1"):
        codec.decode_payload(CHUNK_ZSTD, memoryview(_frame_payload([nosize], 4096)), 4096, "x")
    short = zstandard.ZstdCompressor().compress(bytes(100))
    with pytest.raises(CheckpointError, match="declares 100 bytes"):
        codec.decode_payload(CHUNK_ZSTD, memoryview(_frame_payload([short], 4096)), 4096, "x")
    two = zstandard.ZstdCompressor().compress(bytes(4096))
    with pytest.raises(CheckpointError, match="unused data|corrupt"):
        codec.decode_payload(CHUNK_ZSTD, memoryview(_frame_payload([two + two], 4096)), 4096, "x")


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x00\x10", "shorter than its frame table"),
        (struct.pack("<II", 4096, 5), "5 frames, 1 expected"),
        (struct.pack("<II", 0, 1), "block size 0"),
        (struct.pack("<III", 4096, 1, 10) + b"abc", "add up to 10"),
        (struct.pack("<III", 4096, 1, 3 | codec.RAW_FRAME) + b"abc", "raw frame 0 stores 3"),
        (struct.pack("<III", 4096, 1, 3) + b"abc", "not a zstd frame|declares"),
    ],
)
def test_malformed_frame_tables(payload, match):
    with pytest.raises(CheckpointError, match=match):
        codec.decode_payload(CHUNK_ZSTD, memoryview(payload), 4096, "x")


def test_flag_combinations_checked():
    with pytest.raises(CheckpointError, match="shuffle flag set on a chunk that is not zstd"):
        codec.decode_payload(CHUNK_SHUFFLE | (4 << 8), memoryview(b"abcd"), 4, "x")
    with pytest.raises(CheckpointError, match="unknown chunk flags"):
        codec.decode_payload(1 << 20, memoryview(b"abcd"), 4, "x")


def test_raw_frames_inside_table_and_odd_elem_sizes():
    data = np.random.default_rng(1).integers(0, 4, 100_003, dtype=np.uint8)  # compressible, odd length
    for elem in (0, 3, 4, 8, 16):
        opts = codec.WriteOptions(block_size=4096, min_ratio=1.0, adaptive="size")
        flags, payload = codec.encode_payload(data.data, 0, opts, elem_size=elem)
        assert flags & CHUNK_ZSTD
        assert bytes(codec.decode_payload(flags, memoryview(payload), data.size, "x")) == data.tobytes()
    noise = np.concatenate([np.zeros(40_960, np.uint8), np.random.default_rng(2).integers(0, 256, 40_960, dtype=np.uint8)])
    flags, payload = codec.encode_payload(noise.data, 0, codec.WriteOptions(block_size=4096, min_ratio=1.0, adaptive="size"))
    assert flags & CHUNK_ZSTD
    bs, count = struct.unpack_from("<II", payload)
    entries = struct.unpack_from(f"<{count}I", payload, 8)
    assert [bool(e & codec.RAW_FRAME) for e in entries] == [False] * 10 + [True] * 10  # incompressible frames stored raw
    assert bytes(codec.decode_payload(flags, memoryview(payload), noise.size, "x")) == noise.tobytes()


def test_shuffle_inverse():
    a = np.arange(1001, dtype=np.uint8)
    for elem in (2, 3, 4, 7):
        out = np.empty_like(a)
        codec.unshuffle_into(codec.shuffle(a.data, elem), elem, out)
        np.testing.assert_array_equal(out, a)


def test_corrupt_compressed_file_names_file(tmp_path):
    p = tmp_path / "z.rkcp"
    container.write(p, _ckpt(), SIZE)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"z\.rkcp: checksum mismatch"):
        container.load(p)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        container.read(bytes(raw), "z.rkcp")


def test_speed_mode_cost_model():
    slow_cpu = codec.WriteOptions(threads=2, zstd_bps=0.4e9, disk_bps=1.5e9)
    fast_cpu = codec.WriteOptions(threads=16, zstd_bps=0.4e9, disk_bps=1.5e9)
    assert codec.encode_chunk(WAVE.data, 0, slow_cpu, elem_size=4).flags == 0  # compressing would be slower
    assert codec.encode_chunk(WAVE.data, 0, fast_cpu, elem_size=4).flags & CHUNK_ZSTD
    with pytest.raises(ValueError):
        codec.WriteOptions(adaptive="fast")  # type: ignore[arg-type]


def test_shuffled_chunk_with_raw_last_frame():
    """Regression: a short last frame stored raw must still be unshuffled correctly."""
    data = np.sin(np.linspace(0, 40, 2066, dtype=np.float32)).astype(np.float32).view(np.uint8)[:8261].copy()
    flags, payload = codec.encode_payload(data.data, 0, codec.WriteOptions(adaptive="size", block_size=4096, min_ratio=1.0), elem_size=4)
    assert flags & CHUNK_SHUFFLE
    bs, count = struct.unpack_from("<II", payload)
    assert struct.unpack_from(f"<{count}I", payload, 8)[-1] & codec.RAW_FRAME
    assert bytes(codec.decode_payload(flags, memoryview(payload), data.size, "x")) == data.tobytes()


def test_codec_works_in_forked_child():
    """The shared thread pool is rebuilt after fork (a copied pool has no threads)."""
    import os

    opts = codec.WriteOptions(adaptive="size", block_size=1 << 20)
    codec.encode_payload(bytes(4 << 20), 0, opts)  # parent pool exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            f, p = codec.encode_payload(bytes(4 << 20), 0, opts)
            ok = bytes(codec.decode_payload(f, memoryview(p), 4 << 20, "x")) == bytes(4 << 20)
        finally:
            os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
