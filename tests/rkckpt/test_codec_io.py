"""rkckpt.io: atomic saves, streaming writer, file reader agreeing with format.parse."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rkckpt import CheckpointError, codec, container, stream
from rkckpt.delta import make_delta
from rkckpt.model import Checkpoint, Metadata


def _ck(step: int = 1) -> Checkpoint:
    ck = Checkpoint(Metadata("k", "fdtd_3d", step), created_at=step)
    ck.add_region("p", np.sin(np.linspace(0, 60, 300_000, dtype=np.float32)).astype(np.float32))
    ck.add_region("i", np.arange(1000, dtype=np.int64))
    return ck


class _Pipe:
    """A write-only, non-seekable target (like a socket or an upload stream)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, b) -> int:  # noqa: ANN001
        self.parts.append(bytes(b))
        return len(self.parts[-1])

    def seekable(self) -> bool:
        return False


@pytest.mark.parametrize("opts", [codec.COMPAT, codec.WriteOptions(), codec.WriteOptions(adaptive="size")], ids=["compat", "speed", "size"])
def test_non_seekable_target_gets_same_bytes(opts):
    ck = _ck()
    pipe = _Pipe()
    n = container.write(pipe, ck, opts)
    assert b"".join(pipe.parts) == container.encode(ck, opts) and n == sum(map(len, pipe.parts))


def test_file_reader_agrees_with_in_memory_parser(vectors_dir):
    manifest = json.loads((vectors_dir / "manifest.json").read_text())
    for name in ("full_step1000", "delta_step1010", "delta_step1020"):
        path = vectors_dir / f"{name}.rkcp"
        a, b = container.read(path), container.read(path)
        assert a.header == b.header and a.chunk_headers == b.chunk_headers
        assert a.checkpoint.metadata == b.checkpoint.metadata
        assert a.checkpoint.content_digest() == b.checkpoint.content_digest() == manifest["files"][name]["content_digest"]
    for name in ("corrupt_bitflip", "corrupt_truncated"):
        with pytest.raises(CheckpointError) as ei:
            container.load(vectors_dir / f"{name}.rkcp")
        assert f"{name}.rkcp" in str(ei.value)


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.rkcp"
    container.write(target, _ck(1), codec.COMPAT)
    before = target.read_bytes()
    parent, child = _ck(1), _ck(2)
    child.chunks[0].data = bytes(child.chunks[0].data[:-8]) + b"\1" * 8
    delta = make_delta(parent, child, mode="block")
    with pytest.raises(CheckpointError, match="compat mode"):
        container.write(target, delta, codec.COMPAT)  # fails after the writer started
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.rkcp"]


def test_save_returns_size_and_load_gives_arrays(tmp_path):
    ck = _ck()
    for opts in (codec.COMPAT, codec.WriteOptions(adaptive="size")):
        p = tmp_path / "y.rkcp"
        assert container.write(p, ck, opts) == p.stat().st_size
        got = container.load(p)
        np.testing.assert_array_equal(got.region("p"), ck.region("p"))
        np.testing.assert_array_equal(got.region("i"), np.arange(1000))
        assert got.content_digest() == ck.content_digest()


def test_missing_and_short_files(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        container.load(tmp_path / "missing.rkcp")
    (tmp_path / "short.rkcp").write_bytes(b"\x31\x30")
    with pytest.raises(CheckpointError, match="shorter than the 64-byte header"):
        container.load(tmp_path / "short.rkcp")


def test_h5_paths_dispatch_to_wrapper(tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("rkckpt.hdf5")
    ck = _ck()
    p = tmp_path / "z.rk.h5"
    container.write(p, ck, codec.WriteOptions())
    assert container.read(p).checkpoint.content_digest() == ck.content_digest()
    assert container.load(p).content_digest() == ck.content_digest()


def test_read_pieces_cover_every_byte_once():
    from rkckpt.stream import _EDGE, _PIECE, _cuts

    for n in (0, 1, _EDGE, _PIECE, _PIECE + 1, 2 * _EDGE + _PIECE, 2 * _EDGE + _PIECE + 1, 3 * _PIECE + 12345):
        cuts = _cuts(n)
        assert cuts[0] == 0 and cuts[-1] == n
        sizes = [b - a for a, b in zip(cuts, cuts[1:], strict=False)]
        assert all(0 < s <= _PIECE for s in sizes)


def test_prefault_keeps_what_the_buffer_holds():
    from rkckpt.source import prefault

    buf = np.arange(1 << 20, dtype=np.uint8)
    before = buf.copy()
    prefault(memoryview(buf))  # pages already present and written: nothing changes
    prefault(memoryview(buf)[123:45678])
    fresh = np.empty(3 << 20, dtype=np.uint8)
    prefault(memoryview(fresh)[1:])
    fresh[:] = 7
    assert np.array_equal(buf, before) and (fresh == 7).all()


@pytest.mark.parametrize("suffix", [".rkcp", ".rk.h5"])
def test_big_chunks_read_in_pieces_round_trip_and_corruption_is_caught(tmp_path, monkeypatch, suffix):
    """Chunks over the piece size are read piecewise, the helper thread faulting in pieces ahead."""
    monkeypatch.setattr(stream, "_PIECE", 64 << 10)
    monkeypatch.setattr(stream, "_EDGE", 8 << 10)
    ck = _ck()
    path = tmp_path / f"x{suffix}"
    container.write(path, ck, codec.COMPAT)
    back = container.load(path)
    assert back.content_digest() == ck.content_digest()
    np.testing.assert_array_equal(back.region("p"), ck.region("p"))
    raw = bytearray(path.read_bytes())
    raw[-100_000] ^= 0x40  # inside the big region, read in a middle piece
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        container.load(path)
