"""Chains are emitted as .rk.h5 by default; .rkcp on request; every reader takes both, mixed."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ckpt_helpers import stream_span
from rkckpt import container
from rkckpt.chain import checkpoint_name, describe, latest_restorable, newest_named_step, read_region
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.retention import gc
from rkckpt.storage import FileStorage

KID = "emit"


def state(step: int) -> Checkpoint:
    c = Checkpoint(Metadata(KID, "test", step, (64, 8, 1)), created_at=step)
    base = np.arange(256 * 1024, dtype=np.float32)
    base[:256] += step  # a small change per step: block deltas
    c.add_region("p", base)
    c.add_region("n", np.full(512, step, dtype=np.int64))
    return c


def write(folder, steps, fmt: str | None = None, **policy) -> None:
    kw = {} if fmt is None else {"checkpoint_format": fmt}
    with CheckpointManager(folder, CheckpointPolicy(every_steps=1, **kw, **policy), KID) as m:
        if steps[0] > 1:
            m.latest()
        for s in steps:
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))


def independent_parse(stream: bytes) -> list[tuple[int, int, int]]:
    """A minimal RKCKPT v1 reader written from RKCKPT-FORMAT.md alone (no rkckpt code)."""
    magic, version, header_size, total, count, compression, checksum, flags, _, _ = struct.unpack_from("<QIIQIIIIQ16s", stream)
    assert magic == 0x524B434B50543031 and version == 1 and header_size in (56, 64)
    assert total in (len(stream), len(stream) - 8)
    assert zlib.crc32(stream[64:]) & 0xFFFFFFFF == checksum
    pos = 64
    (meta_len,) = struct.unpack_from("<I", stream, pos)
    pos += 4 + meta_len
    chunks = []
    for _ in range(count):
        ctype, cflags, usize, csize, cid = struct.unpack_from("<IIQQQ", stream, pos)
        pos += 32 + csize
        assert pos <= len(stream)
        chunks.append((ctype, cid, usize))
    assert pos == len(stream)
    return chunks


def test_default_chain_is_rk_h5_that_h5py_h5dump_and_a_plain_parser_read(tmp_path):
    d = tmp_path / "ck"
    write(d, [1, 2, 3])
    names = sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
    assert [n for n in names if n != "rkckpt-index.json"] == [
        checkpoint_name(KID, 1, "full"),
        checkpoint_name(KID, 2, "delta"),
        checkpoint_name(KID, 3, "delta"),
    ]
    assert all(n.endswith(".rk.h5") for n in names if n.startswith(KID))
    for n in names:
        if not n.endswith(".rk.h5"):
            continue
        with h5py.File(d / n, "r") as f:
            stream = f["rkckpt"][()].tobytes()
            assert f.attrs["kind"] in ("full", "delta")
        assert independent_parse(stream)
        raw = (d / n).read_bytes()
        start, end = stream_span(raw)
        assert raw[start:end] == stream
        if shutil.which("h5dump"):
            out = tmp_path / "dump.rkcp"
            subprocess.run(["h5dump", "-d", "/rkckpt", "-b", "LE", "-o", str(out), str(d / n)], check=True, capture_output=True)
            assert out.read_bytes() == stream
    rp = latest_restorable(FileStorage(d))
    assert rp.step == 3 and rp.chain[-1] == checkpoint_name(KID, 3, "delta")
    assert rp.checkpoint.content_digest() == state(3).content_digest()


def test_rkcp_on_request(tmp_path):
    d = tmp_path / "ck"
    write(d, [1, 2], "rkcp")
    assert sorted(p.name for p in d.glob(f"{KID}-*")) == [checkpoint_name(KID, 1, "full", "rkcp"), checkpoint_name(KID, 2, "delta", "rkcp")]
    with pytest.raises(ValueError, match="checkpoint_format"):
        CheckpointManager(tmp_path / "x", CheckpointPolicy(checkpoint_format="zip"), KID)


def test_mixed_folder_every_reader(tmp_path):
    """A chain started as .rkcp and continued as .rk.h5 (and back) is one chain to every reader."""
    d = tmp_path / "ck"
    write(d, [1, 2, 3], "rkcp", full_every=8)
    write(d, [4, 5], "rk.h5", full_every=8)  # restores from step 3, continues the chain
    write(d, [6], "rkcp", full_every=8)
    files = sorted(p.name for p in d.glob(f"{KID}-*"))
    assert {f.rsplit(".", 1)[-1] for f in files} == {"rkcp", "h5"}
    st = FileStorage(d)
    rp = latest_restorable(st)
    assert rp.step == 6 and len(rp.chain) == 6 and not rp.skipped
    assert rp.chain[0].endswith(".rkcp") and rp.chain[3].endswith(".rk.h5")
    assert rp.checkpoint.content_digest() == state(6).content_digest()
    rows = describe(st)
    assert [r.status for r in rows] == ["ok"] * 6
    assert newest_named_step(files) == 6  # the executor's progress check
    np.testing.assert_array_equal(read_region(st, checkpoint_name(KID, 1, "full", "rkcp"), "p"), state(1).region("p"))
    runner = CliRunner()
    r = runner.invoke(main, ["verify", *[str(d / f) for f in files]])
    assert r.exit_code == 0, r.output
    out = tmp_path / "state.rk.h5"
    r = runner.invoke(main, ["apply", str(d / files[0]), *[str(d / f) for f in files[1:]], "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert container.load(out).content_digest() == state(6).content_digest()
    r = runner.invoke(main, ["latest", str(d), "--json"])
    assert r.exit_code == 0 and '"step": 6' in r.output
    # a second full chain in .rk.h5; gc keeps the newest one and removes the mixed one
    write(d, [7], "rk.h5", full_every=0)
    assert checkpoint_name(KID, 7, "full") in [p.name for p in d.iterdir()]
    doomed = gc(FileStorage(d), keep=1)
    assert sorted(doomed) == files
    assert latest_restorable(FileStorage(d)).step == 7


def test_region_read_from_a_sharded_rkcp(tmp_path, monkeypatch):
    """A region split over shard streams is read whole (the range-read path falls back to the full read)."""
    from rkckpt import codec, shard

    monkeypatch.setattr(shard, "MAX_STREAM", 6 << 20)
    ck = state(1)
    big = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float32)
    ck.add_region("big", big)
    d = tmp_path / "ck"
    d.mkdir()
    name = checkpoint_name(KID, 1, "full", "rkcp")
    container.write(d / name, ck, codec.WriteOptions(compress=False))
    parsed = container.read(d / name)
    assert len(parsed.chunk_headers) > len(parsed.checkpoint.chunks)  # some chunk is split
    np.testing.assert_array_equal(read_region(FileStorage(d), name, "big"), big)
    np.testing.assert_array_equal(read_region(FileStorage(d), name, "p"), ck.region("p"))


def test_rk_h5_writer_recovers_from_a_wrong_cached_offset(tmp_path, monkeypatch):
    """The stream offset is remembered per structure shape; a wrong entry costs a rewrite, never a bad file."""
    from rkckpt import codec, h5write, hdf5

    ck = state(1)
    first = tmp_path / "a.rk.h5"
    container.write(first, ck, codec.WriteOptions())
    assert h5write._OFFSETS  # remembered  # noqa: SLF001
    monkeypatch.setattr(h5write, "_OFFSETS", {k: v + 4096 for k, v in h5write._OFFSETS.items()})  # noqa: SLF001
    second = tmp_path / "b.rk.h5"
    container.write(second, ck, codec.WriteOptions())
    assert second.read_bytes() == first.read_bytes()
    hdf5.check_h5(second)
    assert container.load(second).content_digest() == ck.content_digest()
