"""States over 1 GiB: sharded streams, streaming I/O, bounded peak memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rkckpt import CheckpointError, codec, container, shard
from rkckpt.flags import HDR_SHARD
from rkckpt.model import Checkpoint, Chunk, Metadata


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 8 MiB so the sharded path runs in milliseconds."""
    monkeypatch.setattr(shard, "MAX_STREAM", 8 << 20)


def _state() -> Checkpoint:
    ck = Checkpoint(Metadata("big", "fdtd_3d", 42, custom={"a": "b"}), created_at=5)
    ck.add_region("wave", np.sin(np.linspace(0, 500, 5 << 20, dtype=np.float32)).astype(np.float32))  # 20 MiB, compressible
    ck.add_region("noise", np.random.default_rng(0).random(2 << 20).astype(np.float32))  # 8 MiB, raw
    ck.add_region("empty", np.zeros(0, np.float32))
    return ck


@pytest.mark.parametrize("options", [codec.WriteOptions(adaptive="size"), codec.WriteOptions(compress=False)], ids=["zstd", "raw"])
def test_sharded_roundtrip(tmp_path, small_shards, options):
    ck = _state()
    p = tmp_path / "big.rkcp"
    n = container.write(p, ck, options)
    assert n == p.stat().st_size
    parsed = container.read(p)
    assert parsed.header.flags & HDR_SHARD
    got = parsed.checkpoint
    assert got.metadata == ck.metadata  # shard key removed again
    assert got.content_digest() == ck.content_digest()
    np.testing.assert_array_equal(got.region("wave"), ck.region("wave"))
    # every stream is a valid RKCKPT stream under the (patched) cap
    raw = p.read_bytes()
    pos, count = 0, 0
    while pos < len(raw):
        total = int.from_bytes(raw[pos + 16 : pos + 24], "little")
        assert total <= shard.MAX_STREAM
        pos += total
        count += 1
    assert pos == len(raw) and count >= 3


def test_sharded_truncated_and_corrupt(tmp_path, small_shards):
    p = tmp_path / "big.rkcp"
    container.write(p, _state(), codec.WriteOptions(compress=False))
    raw = p.read_bytes()
    first = int.from_bytes(raw[16:24], "little")
    cases = {
        "cut.rkcp": (raw[:first], "truncated"),
        "cut2.rkcp": (raw[: len(raw) - 10], "declare"),
        "flip.rkcp": (raw[: first + 100_000] + bytes([raw[first + 100_000] ^ 1]) + raw[first + 100_001 :], "checksum"),
        "extra.rkcp": (raw + b"\0" * 80, "not an RKCKPT file|shorter|unexpected"),
    }
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=match) as ei:
            container.load(tmp_path / name)
        assert name in str(ei.value)


def test_forged_split_total_is_not_allocated(tmp_path, small_shards, monkeypatch):
    real = shard.shard_metadata

    def lying(meta, index, count, pieces):
        for p in pieces:
            if p.partial:
                p.total = 1 << 60  # would be an exabyte allocation if trusted
        return real(meta, index, count, pieces)

    monkeypatch.setattr(shard, "shard_metadata", lying)
    p = tmp_path / "forged.rkcp"
    container.write(p, _state(), codec.WriteOptions(compress=False))
    with pytest.raises(CheckpointError, match="claims 1152921504606846976 bytes"):
        container.load(p)


def test_compat_refuses_to_shard(tmp_path, small_shards):
    with pytest.raises(CheckpointError, match="compat mode cannot shard"):
        container.write(tmp_path / "x.rkcp", _state(), codec.COMPAT)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_plan_bounds():
    ck = Checkpoint(Metadata("k", "t", 0))
    ck.chunks = [Chunk(5, i, memoryview(bytearray(1))) for i in range(3)]
    assert not shard.needs_sharding(ck, 100, 4 << 20)
    assert shard.stored_bound(1 << 30, 4 << 20) > 1 << 30


WRITER = """
import json, os, sys, numpy as np
from rkckpt import codec, container
from rkckpt.model import Checkpoint, Chunk, Metadata
n = 3 << 30
ck = Checkpoint(Metadata("big", "fdtd_3d", 1), created_at=1)
a = np.empty(n // 4 * 3 // 4, np.float32)   # 2.25 GiB region: split over shards
step = 1 << 24
for s in range(0, a.size, step):  # filled in slices: no state-sized temporaries
    a[s : s + step] = np.arange(s, min(a.size, s + step), dtype=np.float32) * np.float32(1e-3)
ck.add_region("p", a)
q = np.empty(n // 4 // 4, np.float32)  # 0.75 GiB of noise: stored raw
rng = np.random.default_rng(0)
for s in range(0, q.size, step):
    q[s : s + step] = rng.random(min(step, q.size - s), dtype=np.float32)
ck.add_region("q", q)
digest = ck.content_digest()
size = container.write(sys.argv[1], ck, codec.WriteOptions(adaptive="size"))
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"digest": digest, "size": size, "hwm": hwm, "state": n}))
"""

READER = """
import json, sys
from rkckpt import container
ck = container.load(sys.argv[1])
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"digest": ck.content_digest(), "hwm": hwm, "chunks": len(ck.chunks)}))
"""


@pytest.mark.slow
def test_3gib_state_roundtrips_streaming(tmp_path):
    if shutil.disk_usage(tmp_path).free < 10 << 30:
        pytest.skip("needs 10 GiB free disk")
    path = tmp_path / "huge.rkcp"

    def run(code):
        return json.loads(
            subprocess.run(
                [sys.executable, "-c", textwrap.dedent(code), str(path)], check=True, capture_output=True, text=True, timeout=1200
            ).stdout
        )

    w = run(WRITER)
    assert w["size"] == path.stat().st_size
    r = run(READER)
    assert r["digest"] == w["digest"] and r["chunks"] == 2
    state = w["state"]
    print(f"3 GiB state: file {w['size']} B, writer peak RSS {w['hwm'] / state:.2f}x state, reader peak RSS {r['hwm'] / state:.2f}x state")
    # writer holds the state; reader builds it once: neither may grow to several times it
    assert w["hwm"] < 1.5 * state, w
    assert r["hwm"] < 1.5 * state, r
    os.unlink(path)
