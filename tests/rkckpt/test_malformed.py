"""Every kind of malformed input ends in one CheckpointError naming the file."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import h5py
import numpy as np
import pytest

from ckpt_helpers import fix_checksum, fix_total, parse_path, sample_checkpoint, zstd_supported
from hostile_inputs import frames_payload, rle_frame, zstd_chunk_stream
from rkckpt import CheckpointError, codec, container, hdf5
from rkckpt.flags import CHUNK_PART, CHUNK_SHUFFLE, CHUNK_ZSTD, HDR_SHARD

META_AT = 64  # metadata length field
FIRST_STRING_AT = 68  # kernel_id length


def base_bytes() -> bytes:
    return container.encode(sample_checkpoint(), codec.COMPAT)


def chunk_offsets(buf: bytes) -> list[int]:
    """Offsets of the chunk headers of a valid stream."""
    parsed = container.read(buf)
    return [ch.data_offset - 32 for ch in parsed.chunk_headers]


def meta_end(buf: bytes) -> int:
    return 68 + struct.unpack_from("<I", buf, 64)[0]


def custom_count_at(buf: bytes) -> int:
    pos = 68
    for _ in range(2):  # kernel_id, kernel_type
        pos += 4 + struct.unpack_from("<I", buf, pos)[0]
    return pos + 8 + 12 + 12 + 24


def _set(fmt: str, at: int | Callable[[bytes], int], value: int, *, checksum: bool = True) -> Callable[[bytes], bytes]:
    def mutate(buf: bytes) -> bytes:
        out = bytearray(buf)
        struct.pack_into(fmt, out, at(buf) if callable(at) else at, value)
        return bytes(fix_checksum(out) if checksum else out)

    return mutate


def _truncate_chunk(buf: bytes) -> bytes:
    last = chunk_offsets(buf)[-2]  # cut inside the second-to-last chunk's data
    return bytes(fix_total(buf[: last + 40]))


def _bad_utf8(buf: bytes) -> bytes:
    out = bytearray(buf)
    out[FIRST_STRING_AT + 4] = 0xFF
    return bytes(fix_checksum(out))


CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda b: b"", "shorter than"),
    "short header": (lambda b: b[:40], "shorter than"),
    "ascii magic": (lambda b: b"RKCKPT01" + b[8:], "not an RKCKPT file"),
    "wrong magic": (_set("<Q", 0, 0x1122334455667788), "not an RKCKPT file"),
    "future version": (_set("<I", 8, 2), "version"),
    "version zero": (_set("<I", 8, 0), "version"),
    "header_size": (_set("<I", 12, 60), "header_size"),
    "total_size beyond bytes": (_set("<Q", 16, 10_000_000), "total_size"),
    "total_size over 1 GiB": (_set("<Q", 16, (1 << 30) + 1), "total_size"),
    "total_size 2**64-1": (_set("<Q", 16, 2**64 - 1), "total_size"),
    "unknown compression": (_set("<I", 28, 9), "compression"),
    "unknown header flags": (_set("<I", 36, 1 << 20), "flags"),
    "bad checksum": (_set("<I", 32, 0xDEADBEEF, checksum=False), "checksum"),
    "flipped data byte": (lambda b: b[:-3] + bytes([b[-3] ^ 0x40]) + b[-2:], "checksum"),
    "truncated file": (lambda b: b[: len(b) // 2], "total_size"),
    "truncated chunk": (_truncate_chunk, "chunk"),
    "metadata length beyond file": (_set("<I", META_AT, 1 << 31), "metadata"),
    "metadata length short": (_set("<I", META_AT, 20), "metadata|kernel_type|current_step"),
    "metadata length long": (lambda b: _set("<I", META_AT, struct.unpack_from("<I", b, META_AT)[0] + 32)(b), "metadata"),
    "string past metadata end": (_set("<I", FIRST_STRING_AT, 5000), "kernel_id"),
    "string length 2**32-1": (_set("<I", FIRST_STRING_AT, 2**32 - 1), "kernel_id"),
    "string not utf-8": (_bad_utf8, "UTF-8"),
    "custom_count huge": (_set("<I", custom_count_at, 2**32 - 1), "custom_count"),
    "custom_count off by one": (
        lambda b: _set("<I", custom_count_at(b), struct.unpack_from("<I", b, custom_count_at(b))[0] + 1)(b),
        "custom",
    ),
    "chunk_count huge": (_set("<I", 24, 2**32 - 1), "chunk_count"),
    "chunk_count one more": (lambda b: _set("<I", 24, struct.unpack_from("<I", b, 24)[0] + 1)(b), "chunk"),
    "chunk_count one less": (lambda b: _set("<I", 24, struct.unpack_from("<I", b, 24)[0] - 1)(b), "unexpected bytes"),
    "compressed_size beyond": (lambda b: _set("<Q", chunk_offsets(b)[1] + 16, 1 << 40)(b), "chunk 1"),
    "compressed_size 2**64-1": (lambda b: _set("<Q", chunk_offsets(b)[1] + 16, 2**64 - 1)(b), "chunk 1"),
    "uncompressed_size disagrees": (lambda b: _set("<Q", chunk_offsets(b)[1] + 8, 7)(b), "chunk 1"),
    "uncompressed_size huge": (lambda b: _set("<Q", chunk_offsets(b)[1] + 8, 2**63)(b), "chunk 1"),
    "unknown chunk flags": (lambda b: _set("<I", chunk_offsets(b)[1] + 4, 1 << 30)(b), "chunk flags"),
    "trailing garbage": (lambda b: bytes(fix_total(b + b"\0" * 16)), "unexpected bytes|chunk"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_stream(tmp_path, case):
    mutate, problem = CASES[case]
    path = tmp_path / "bad.rkcp"
    path.write_bytes(mutate(base_bytes()))
    with pytest.raises(CheckpointError, match=problem) as exc:
        parse_path(path)
    assert exc.value.source == str(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("where", ["header", "chunk"])
def test_in_memory_parser_rejects_shard_flags(where):
    """One shard of a sharded file is not a checkpoint on its own."""
    buf = bytearray(base_bytes())
    if where == "header":
        struct.pack_into("<I", buf, 36, HDR_SHARD | 1)
    else:
        struct.pack_into("<I", buf, chunk_offsets(bytes(buf))[1] + 4, CHUNK_PART)
    with pytest.raises(CheckpointError, match="shard|part"):
        container.read(bytes(fix_checksum(buf)), "x.rkcp")


def test_base_bytes_are_valid():
    raw = base_bytes()
    assert container.read(raw).checkpoint.content_digest() == sample_checkpoint().content_digest()


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.rkcp"
    with pytest.raises(CheckpointError) as exc:
        parse_path(path)
    assert exc.value.source == str(path)


# ------------------------------------------------------------------ zstd


needs_zstd = pytest.mark.skipif(not zstd_supported(), reason="codec does not compress yet")
DATA = bytes(range(256)) * 64  # 16 KiB
BS = 4096


def _z(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=True).compress(data)


@needs_zstd
def test_crafted_zstd_chunk_parses(tmp_path):
    """Guards the crafting helpers: a truthful payload in the codec's layout decodes."""
    frames = [_z(DATA[i : i + BS]) for i in range(0, len(DATA), BS)]
    path = tmp_path / "ok.rkcp"
    path.write_bytes(zstd_chunk_stream(frames_payload(frames, block_size=BS), len(DATA)))
    assert bytes(parse_path(path).checkpoint.chunks[-1].data) == DATA
    mixed = [frames[0], DATA[BS : 2 * BS], *frames[2:]]
    path.write_bytes(zstd_chunk_stream(frames_payload(mixed, block_size=BS, raw=(1,)), len(DATA)))
    assert bytes(parse_path(path).checkpoint.chunks[-1].data) == DATA


def _lying_payloads() -> dict[str, tuple[bytes, int]]:
    import zstandard

    co = zstandard.ZstdCompressor().compressobj()
    streaming = co.compress(DATA) + co.flush()  # no content size in the frame header
    small = 100
    return {
        "content size larger": (frames_payload([_z(DATA)], block_size=1 << 20), small),
        "content size smaller": (frames_payload([_z(DATA[:small])], block_size=1 << 20), len(DATA)),
        "streaming frame larger": (frames_payload([streaming], block_size=1 << 20), small),
        "rle bomb, no content size": (frames_payload([rle_frame(64 << 20)], block_size=1 << 20), small),
        "rle bomb, lying content size": (frames_payload([rle_frame(64 << 20, declared=small)], block_size=1 << 20), small),
        "garbage frame": (frames_payload([b"\x28\xb5\x2f\xfd" + bytes(range(60))], block_size=1 << 20), small),
        "two frames in one slot": (frames_payload([_z(DATA) + _z(DATA)], block_size=1 << 20), len(DATA)),
        "trailing bytes in slot": (frames_payload([_z(DATA) + b"junk"], block_size=1 << 20), len(DATA)),
        "plain frame, no table": (_z(DATA), len(DATA)),
        "frame count too small": (frames_payload([_z(DATA[:BS])], block_size=BS), len(DATA)),
        "frame count huge": (frames_payload([_z(DATA)], block_size=1 << 20, count=2**32 - 1), len(DATA)),
        "block size zero": (frames_payload([_z(DATA)], block_size=0), len(DATA)),
        "frame sizes overrun": (frames_payload([_z(DATA)], block_size=1 << 20)[:-10], len(DATA)),
        "raw frame wrong size": (frames_payload([DATA[:-1]], block_size=1 << 20, raw=(0,)), len(DATA)),
        "table header cut": (b"\x00\x10", len(DATA)),
    }


@needs_zstd
@pytest.mark.parametrize("label", sorted(_lying_payloads() if zstd_supported() else []))
def test_zstd_payloads_that_lie(tmp_path, label):
    payload, usize = _lying_payloads()[label]
    path = tmp_path / "bomb.rkcp"
    path.write_bytes(zstd_chunk_stream(payload, usize))
    with pytest.raises(CheckpointError, match="frame|zstd|payload") as exc:
        parse_path(path)
    assert exc.value.source == str(path)


@needs_zstd
@pytest.mark.parametrize("flags", [CHUNK_ZSTD | CHUNK_SHUFFLE, CHUNK_SHUFFLE | (4 << 8), CHUNK_ZSTD | (4 << 8)])
def test_inconsistent_shuffle_flags(tmp_path, flags):
    path = tmp_path / "shuffle.rkcp"
    path.write_bytes(zstd_chunk_stream(frames_payload([_z(DATA)], block_size=1 << 20), len(DATA), flags=flags))
    with pytest.raises(CheckpointError, match="shuffle") as exc:
        parse_path(path)
    assert exc.value.source == str(path)


# ------------------------------------------------------------------ HDF5


def _h5_not_ours(path):
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)


def _h5_wrong_dtype(path):
    with h5py.File(path, "w") as f:
        f.attrs["rkckpt.wrapper"] = hdf5.WRAPPER
        f.attrs["wrapper_version"] = 1
        f["rkckpt"] = np.arange(100, dtype=np.int32)


def _h5_no_marker(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        del f.attrs["rkckpt.wrapper"]


def _h5_future_wrapper(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        f.attrs["wrapper_version"] = 99


def _h5_resized(delta: int):
    def make(path):
        raw = container.encode(sample_checkpoint(), codec.COMPAT)
        hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
        body = raw[: len(raw) + delta] if delta < 0 else raw + bytes(delta)
        with h5py.File(path, "a") as f:
            del f["rkckpt"]
            f["rkckpt"] = np.frombuffer(body, np.uint8)

    return make


def _h5_stream_not_rkckpt(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        f["rkckpt"][0:8] = np.frombuffer(b"NOTRKCKP", np.uint8)


def _h5_shard_stream(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        raw = bytearray(f["rkckpt"][()].tobytes())
        struct.pack_into("<I", raw, 36, HDR_SHARD | 1)
        f["rkckpt"][...] = np.frombuffer(bytes(fix_checksum(raw)), np.uint8)


def _h5_part_chunk(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        raw = bytearray(f["rkckpt"][()].tobytes())
        struct.pack_into("<I", raw, chunk_offsets(bytes(raw))[1] + 4, CHUNK_PART)
        f["rkckpt"][...] = np.frombuffer(bytes(fix_checksum(raw)), np.uint8)


def _h5_corrupt_stream(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    with h5py.File(path, "a") as f:
        f["rkckpt"][500] ^= 0xFF


def _not_hdf5(path):
    path.write_text("just some text, not HDF5\n")


def _truncated_hdf5(path):
    hdf5.write_h5(path, sample_checkpoint(), codec.COMPAT)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _empty(path):
    path.write_bytes(b"")


H5_CASES: dict[str, tuple[Callable, str]] = {
    "hdf5 not ours": (_h5_not_ours, "not an rkckpt checkpoint"),
    "no wrapper marker": (_h5_no_marker, "not an rkckpt checkpoint"),
    "future wrapper version": (_h5_future_wrapper, "wrapper version"),
    "wrong dtype": (_h5_wrong_dtype, "uint8"),
    "dataset shorter than header says": (_h5_resized(-100), "total_size"),
    "dataset longer than header says": (_h5_resized(100), "total_size"),
    "stream not rkckpt": (_h5_stream_not_rkckpt, "not an RKCKPT"),
    "corrupt stream": (_h5_corrupt_stream, "checksum"),
    "sharded stream": (_h5_shard_stream, "shard"),
    "shard piece chunk": (_h5_part_chunk, "shard|part|PART"),
    "not hdf5 at all": (_not_hdf5, "not an HDF5 file"),
    "truncated hdf5": (_truncated_hdf5, "HDF5"),
    "empty": (_empty, "not an HDF5 file"),
}


@pytest.mark.parametrize("case", sorted(H5_CASES))
def test_malformed_hdf5(tmp_path, case):
    make, problem = H5_CASES[case]
    path = tmp_path / "bad.rk.h5"
    make(path)
    with pytest.raises(CheckpointError, match=problem) as exc:
        container.read(path)
    assert exc.value.source == str(path)
    with pytest.raises(CheckpointError) as exc:  # same through the project's loader
        parse_path(path)
    assert exc.value.source == str(path)
    assert str(path) in str(exc.value)


def test_hdf5_region_read_rejects_bad_wrapper(tmp_path):
    path = tmp_path / "x.rk.h5"
    _h5_not_ours(path)
    with pytest.raises(CheckpointError, match="not an rkckpt checkpoint"):
        hdf5.read_region(path, "pressure")


def test_crc_of_sample_is_stable():
    # guards the helpers above: the sample must stay deterministic
    assert zlib.crc32(base_bytes()) == zlib.crc32(base_bytes())
