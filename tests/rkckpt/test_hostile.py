"""Hostile containers are refused with a CheckpointError naming the file: never followed, never a hang.

Each case was found by trying it against an earlier reader (see issue 11).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from ckpt_helpers import sample_checkpoint, small_options, zstd_supported
from hostile_inputs import frames_payload, h5_external_link, h5_external_storage, h5_virtual, plant, raw_stream, rle_frame, wrapping_patch
from rkckpt import CheckpointError, codec, container, hdf5
from rkckpt.chain import latest_restorable
from rkckpt.delta import STATE_DIGEST_KEY
from rkckpt.flags import CHUNK_BLOCK_DELTA, CHUNK_ZSTD, COMPRESSION_LZ4, COMPRESSION_ZSTD
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import PARENT_DIGEST_KEY, Checkpoint, Chunk, ChunkType, Metadata
from rkckpt.storage import FileStorage

RKCKPT = shutil.which("rkckpt")
SECRET = b"TOP-SECRET-" * 8


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    assert RKCKPT is not None
    return subprocess.run([RKCKPT, *map(str, args)], capture_output=True, text=True, timeout=60)


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in proc.stderr, proc.stderr


# ------------------------------------------------------------------ .rk.h5 pointing elsewhere
@pytest.fixture
def other(tmp_path):
    """A file outside the checkpoint holding a perfectly valid stream (and a secret)."""
    stream = container.encode(sample_checkpoint(), codec.COMPAT)
    p = tmp_path / "elsewhere" / "secret.bin"
    p.parent.mkdir()
    p.write_bytes(stream + SECRET)
    h5 = tmp_path / "elsewhere" / "valid.rk.h5"
    container.write(h5, sample_checkpoint(), codec.COMPAT)
    return p, len(stream), h5


def _external_storage(path, other) -> None:
    h5_external_storage(path, other[0], other[1])


def _external_link(path, other) -> None:
    h5_external_link(path, other[2])


def _virtual(path, other) -> None:
    h5_virtual(path, other[2], other[1])


@pytest.mark.parametrize(
    "make,word",
    [(_external_storage, "external storage"), (_external_link, "ExternalLink"), (_virtual, "virtual dataset")],
    ids=["external-storage", "external-link", "virtual"],
)
def test_rk_h5_stream_stored_elsewhere_is_refused(tmp_path, other, make, word):
    path = tmp_path / "evil.rk.h5"
    make(path, other)
    for read in (container.read, hdf5.check_h5, hdf5.read_index, lambda p: hdf5.read_region(p, "pressure")):
        with pytest.raises(CheckpointError, match=word) as exc:
            read(path)
        assert exc.value.source == str(path)
        assert "SECRET" not in str(exc.value)
    if RKCKPT is not None:
        for args in (("verify", path), ("inspect", "--json", path), ("export", path, "--region", "pressure", "-o", tmp_path / "x.npy")):
            proc = cli(*args)
            assert_refused(proc, str(path), word)
            assert "SECRET" not in proc.stderr + proc.stdout


# ------------------------------------------------------------------ block-delta run wrapping past int64
def test_block_delta_run_wrapping_past_int64_is_refused(tmp_path):
    d = tmp_path / "ck"
    base = sample_checkpoint(step=1)
    with CheckpointManager(d, CheckpointPolicy(every_steps=1), "sample-0") as m:
        m.submit(SnapshotResponse(SnapshotRequest(1), base))
    st = FileStorage(d)
    full_digest = base.content_digest()
    vel = base.find(ChunkType.DEVICE_MEMORY, base.regions()["velocity"].chunk_id)
    meta = base.metadata.with_custom(**{PARENT_DIGEST_KEY: full_digest, STATE_DIGEST_KEY: "00000000"})
    meta = Metadata(meta.kernel_id, meta.kernel_type, 2, meta.grid_size, meta.tile_size, meta.hlc, meta.custom)
    evil = Checkpoint(meta, [Chunk(vel.chunk_type, vel.chunk_id, wrapping_patch(vel.size), CHUNK_BLOCK_DELTA)])
    name = "sample-0-000000000002-delta.rk.h5"
    container.write(d / name, evil, codec.WriteOptions())
    rp = latest_restorable(st)  # falls back to step 1, naming the bad delta
    assert rp.step == 1 and rp.skipped[0][0] == name and "block patch" in rp.skipped[0][1]
    if RKCKPT is not None:
        proc = cli("latest", d, "--json")
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert json.loads(proc.stdout)["step"] == 1
        proc = cli("apply", d / "sample-0-000000000001-full.rk.h5", d / name, "-o", tmp_path / "out.rkcp")
        assert_refused(proc, "block patch")


# ------------------------------------------------------------------ declared sizes over 1 GiB
@pytest.mark.skipif(not zstd_supported(), reason="needs the zstd extension")
def test_unsharded_stream_declaring_over_1_gib_is_refused(tmp_path):
    each = 800_000_000  # four chunks of tiny RLE frames: 3.2 GB declared in about 100 KB
    frame = rle_frame(each, declared=each)
    payload = frames_payload([frame], block_size=1 << 30)
    buf = raw_stream([(int(ChunkType.CUSTOM), i, CHUNK_ZSTD, each, payload) for i in range(4)], compression=COMPRESSION_ZSTD)
    assert len(buf) < 200_000
    path = tmp_path / "bomb.rkcp"
    path.write_bytes(buf)
    for read in (lambda: container.read(path), lambda: container.read(buf, "mem")):
        with pytest.raises(CheckpointError, match="over the 1073741824-byte limit"):
            read()
    if RKCKPT is not None:
        assert_refused(cli("verify", path), str(path), "limit")


# ------------------------------------------------------------------ not a regular file
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = plant("fifo", tmp_path / "ckpt.rkcp")
    h5fifo = plant("fifo", tmp_path / "ckpt.rk.h5")
    for p in (fifo, h5fifo):
        with pytest.raises(CheckpointError, match="not a regular file"):
            container.read(p)
    if RKCKPT is not None:  # each would block for ever on open() without a writer
        for args in (("verify", fifo), ("inspect", fifo), ("convert", fifo, tmp_path / "o.rk.h5"), ("verify", h5fifo), ("inspect", h5fifo)):
            assert_refused(cli(*args), "not a regular file")


# ------------------------------------------------------------------ verify: valid-looking but inconsistent
def _verify_refuses(tmp_path, buf: bytes, word: str) -> None:
    path = tmp_path / "odd.rkcp"
    path.write_bytes(buf)
    container.read(path)  # readable: the data is all there
    with pytest.raises(CheckpointError, match=word):
        container.check(container.read(path), path)
    if RKCKPT is not None:
        assert_refused(cli("verify", path), str(path), word)


def test_verify_refuses_duplicate_chunk_identities(tmp_path):
    ck = sample_checkpoint()
    ck.chunks.append(Chunk(int(ChunkType.CUSTOM), 42, b"another payload"))  # id 42 again
    _verify_refuses(tmp_path, container.encode(ck, codec.COMPAT), "repeats the identity")


def test_verify_refuses_block_delta_chunk_in_full_checkpoint(tmp_path):
    ck = sample_checkpoint()
    ck.chunks.append(Chunk(int(ChunkType.CUSTOM), 7, wrapping_patch(16), CHUNK_BLOCK_DELTA))
    assert not ck.is_delta
    _verify_refuses(tmp_path, container.encode(ck, small_options()), "block-delta patch in a full checkpoint")


def test_verify_refuses_lz4_declared_on_raw_data(tmp_path):
    buf = bytearray(container.encode(sample_checkpoint(), codec.COMPAT))
    struct.pack_into("<I", buf, 28, COMPRESSION_LZ4)  # the header is outside the checksum
    _verify_refuses(tmp_path, bytes(buf), "LZ4")


def test_valid_files_still_verify(tmp_path):
    for name, opts in (("a.rkcp", codec.COMPAT), ("b.rkcp", small_options()), ("c.rk.h5", codec.WriteOptions())):
        container.write(tmp_path / name, sample_checkpoint(), opts)
        container.check(container.read(tmp_path / name), name)


# ------------------------------------------------------------------ ls: a delta with a wrong state digest
def test_ls_reports_a_delta_with_a_wrong_state_digest(tmp_path):
    d = tmp_path / "ck"
    states = [sample_checkpoint(step=s) for s in (1, 2, 3)]
    for s, ck in zip((2, 3), states[1:], strict=True):
        ck.add_region("pressure", np.full((256, 16), s, np.float32))
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=8, delta_try_fraction=1.0), "sample-0") as m:
        for s, ck in zip((1, 2, 3), states, strict=True):
            m.submit(SnapshotResponse(SnapshotRequest(s), ck))
    name = "sample-0-000000000002-delta.rk.h5"
    bad = container.load(d / name)
    lie = "0badd16e" if bad.metadata.custom[STATE_DIGEST_KEY] != "0badd16e" else "0badd16f"
    bad.metadata = bad.metadata.with_custom(**{STATE_DIGEST_KEY: lie})
    container.write(d / name, bad, codec.WriteOptions())
    container.read(d / name)  # the file itself is intact
    if RKCKPT is None:
        pytest.skip("rkckpt is not installed")
    proc = cli("ls", d, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["sample-0-000000000001-full.rk.h5"]["valid"]
    assert not rows[name]["valid"] and "state digest" in rows[name]["problem"]
    assert not rows["sample-0-000000000003-delta.rk.h5"]["valid"]
