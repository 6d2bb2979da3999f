"""A real full file system (a 2 MiB tmpfs): clear error, earlier checkpoints intact."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import tmpfs
from rkckpt.chain import latest_restorable
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage, StorageError


def state(step: int, n: int) -> Checkpoint:
    c = Checkpoint(Metadata("full", "test", step))
    c.add_region("x", np.random.default_rng(step).random(n, dtype=np.float32))
    return c


@pytest.fixture
def tiny_fs(tmp_path):
    with tmpfs(tmp_path / "tiny", "2m") as mnt:
        yield mnt


def test_full_disk_gives_clear_error_and_keeps_earlier_checkpoints(tiny_fs):
    d = tiny_fs / "ck"
    n = 150_000  # 600 KB per checkpoint: the third one cannot fit
    pol = CheckpointPolicy(every_steps=1, full_every=0, keep_chains=10)  # fulls only, no retention
    m = CheckpointManager(d, pol, "full")
    m.final(SnapshotResponse(SnapshotRequest(1), state(1, n)))
    m.final(SnapshotResponse(SnapshotRequest(2), state(2, n)))
    with pytest.raises(StorageError) as info:
        for step in range(3, 10):
            m.final(SnapshotResponse(SnapshotRequest(step), state(step, n)))
    msg = str(info.value)
    assert "no space left on device" in msg and str(d) in msg
    assert "Traceback" not in msg
    assert m.stats.failed == 1
    failed_step = m.stats.completed + 1
    m.close()
    leftovers = [p for p in os.listdir(d) if p.startswith(".rkckpt-tmp-")]
    assert leftovers == [], "partial temp file left on the full disk"
    assert not (d / f"full-{failed_step:012d}-full.rk.h5").exists()
    rp = latest_restorable(FileStorage(d), "full")
    assert rp is not None and rp.step == failed_step - 1 and not rp.skipped
    np.testing.assert_array_equal(rp.checkpoint.region("x"), state(rp.step, n).region("x"))
    # every earlier checkpoint is intact
    for step in range(1, failed_step):
        ck = FileStorage(d).load(f"full-{step:012d}-full.rk.h5")
        assert len(ck) > n * 4
