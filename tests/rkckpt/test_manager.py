"""CheckpointManager: scheduling, full/delta choice, restore continuation, counters."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rkckpt import container, hdf5
from rkckpt.chain import latest_restorable
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage, LockedError, MemoryStorage, StorageError

KID = "mgr"


def state(step: int, *, big_changes: bool = False) -> Checkpoint:
    c = Checkpoint(Metadata(KID, "test", step))
    c.add_region("big", np.arange(32768, dtype=np.float32) + (step if big_changes else 0))
    c.add_region("small", np.full(256, step, dtype=np.int64))
    return c


def resp(step: int, reason: str = "periodic", **kw) -> SnapshotResponse:
    return SnapshotResponse(SnapshotRequest(step, reason), state(step, **kw))


def kinds(storage) -> dict[int, str]:
    out = {}
    for n in storage.list():
        if n.endswith(".rk.h5"):
            _, step, kind = n[: -len(".rk.h5")].rsplit("-", 2)
            out[int(step)] = kind
    return out


def test_due_by_steps_and_seconds():
    m = CheckpointManager(MemoryStorage(), CheckpointPolicy(every_steps=10), KID)
    assert [s for s in range(1, 35) if m.due(s)] == [10, 20, 30]
    m2 = CheckpointManager(MemoryStorage(), CheckpointPolicy(every_seconds=5.0), KID)
    t0 = m2._last_time
    assert not m2.due(3, now=t0 + 1)
    assert m2.due(3, now=t0 + 5.5)
    m2.submit(resp(3))
    m2.flush()
    assert not m2.due(3, now=t0 + 100)  # just written
    assert not m2.due(4, now=m2._last_time + 1)
    assert CheckpointManager(MemoryStorage(), CheckpointPolicy(), KID).due(100) is False


def test_full_every_k_deltas():
    s = MemoryStorage()
    with CheckpointManager(s, CheckpointPolicy(every_steps=1, full_every=2, keep_chains=10), KID) as m:
        for step in range(1, 8):
            m.submit(resp(step))
        m.flush()
        assert m.stats.completed == 7 and m.stats.full == 3 and m.stats.deltas == 4 and m.stats.failed == 0
        assert m.stats.bytes_written == sum(len(s.load(n)) for n in s.list() if n.endswith(".rk.h5"))
        assert m.stats.seconds > 0
    assert kinds(s) == {1: "full", 2: "delta", 3: "delta", 4: "full", 5: "delta", 6: "delta", 7: "full"}


def test_full_when_delta_too_large():
    s = MemoryStorage()
    with CheckpointManager(s, CheckpointPolicy(every_steps=1, full_every=100, max_delta_fraction=0.5, keep_chains=10), KID) as m:
        m.submit(resp(1))
        m.submit(resp(2))  # only 'small' changed: delta
        m.submit(resp(3, big_changes=True))  # 'big' changed: delta would be ~100%
        m.flush()
    assert kinds(s) == {1: "full", 2: "delta", 3: "full"}
    full = len(s.load(f"{KID}-000000000001-full.rk.h5"))
    assert len(s.load(f"{KID}-000000000002-delta.rk.h5")) < full * 0.5


def test_final_is_synchronous_and_restores_exactly(tmp_path):
    with CheckpointManager(tmp_path / "ck", CheckpointPolicy(every_steps=5), KID) as m:
        m.submit(resp(5))
        assert m.final(resp(7, "signal")) == 7
        assert (tmp_path / "ck" / f"{KID}-000000000007-delta.rk.h5").exists()  # written before final returned
    rp = latest_restorable(FileStorage(tmp_path / "ck"))
    assert rp.step == 7 and len(rp.chain) == 2
    np.testing.assert_array_equal(rp.checkpoint.region("small"), state(7).region("small"))
    np.testing.assert_array_equal(rp.checkpoint.region("big"), state(7).region("big"))


def test_restart_continues_chain(tmp_path):
    pol = CheckpointPolicy(every_steps=1, full_every=4)
    with CheckpointManager(tmp_path, pol, KID) as m:
        for step in (1, 2):
            m.submit(resp(step))
    with CheckpointManager(tmp_path, pol, KID) as m:
        rp = m.latest()
        assert rp.step == 2 and len(rp.chain) == 2
        m.submit(resp(3))
        m.flush()
    rp = CheckpointManager(tmp_path, pol, KID).latest()
    assert rp.step == 3 and [n.split("-")[1] for n in rp.chain] == ["000000000001", "000000000002", "000000000003"]


def test_second_manager_on_folder_is_refused(tmp_path):
    m = CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1), KID)
    with pytest.raises(LockedError, match="locked by another writer"):
        CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1), KID)
    m.close()
    CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1), KID).close()


def test_compat_policy_writes_reference_files(tmp_path):
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, compat=True), KID) as m:
        m.submit(resp(1))
        m.submit(resp(2))
    for p in tmp_path.glob("*.rk.h5"):
        parsed = container.read(p)
        assert parsed.header.compression == 0 and parsed.header.flags == 0
        assert all(ch.flags == 0 for ch in parsed.chunk_headers)


class FlakyStorage(MemoryStorage):
    def __init__(self):
        super().__init__()
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def save(self, name, data):
        self.gate.wait(10)
        if self.fail and name.endswith(".rk.h5"):
            raise StorageError(name, "injected write failure")
        return super().save(name, data)


def test_failed_background_write_is_counted_and_chain_stays_valid():
    s = FlakyStorage()
    m = CheckpointManager(s, CheckpointPolicy(every_steps=1), KID)
    m.submit(resp(1))
    m.flush()
    s.fail = True
    m.submit(resp(2))
    m.flush()
    s.fail = False
    assert m.stats.failed == 1 and "injected" in m.stats.last_error
    m.submit(resp(3))  # delta against step 1, the last state actually written
    m.flush()
    rp = latest_restorable(s)
    assert rp.step == 3 and len(rp.chain) == 2
    np.testing.assert_array_equal(rp.checkpoint.region("small"), state(3).region("small"))
    m.close()


@pytest.mark.parametrize("max_pending", [1, 2])
def test_submit_waits_only_when_max_pending_writes_are_queued(max_pending: int) -> None:
    s = FlakyStorage()
    m = CheckpointManager(s, CheckpointPolicy(every_steps=1), KID, max_pending=max_pending)
    s.gate.clear()
    for step in range(1, max_pending + 1):
        m.submit(resp(step))  # returns at once: the first write is blocked in storage, the next one queued
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.submit(resp(max_pending + 1)), done.set()))
    t.start()
    assert not done.wait(0.3)  # back-pressure: the queue is full, this submit waits
    s.gate.set()
    t.join(10)
    assert done.is_set()
    m.close()
    assert m.stats.completed == max_pending + 1 and m.stats.wait_seconds > 0
    assert kinds(s) == {1: "full", **{k: "delta" for k in range(2, max_pending + 2)}}  # written in order, a chain


def test_bad_arguments():
    with pytest.raises(ValueError):
        CheckpointManager(MemoryStorage(), CheckpointPolicy(keep_chains=0), KID)
    with pytest.raises(ValueError):
        CheckpointManager(MemoryStorage(), CheckpointPolicy(), "a/b")


def test_default_writes_extended_block_deltas(tmp_path):
    from rkckpt import flags

    def sparse(step: int) -> Checkpoint:
        c = Checkpoint(Metadata(KID, "test", step))
        a = np.zeros(262144, np.float32)
        a[:1000] = step  # 4 KB of 1 MiB changes
        c.add_region("a", a)
        return c

    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1), KID) as m:
        for step in (1, 2, 3):
            m.submit(SnapshotResponse(SnapshotRequest(step), sparse(step)))
    full = container.read(tmp_path / f"{KID}-000000000001-full.rk.h5")
    delta = container.read(tmp_path / f"{KID}-000000000003-delta.rk.h5")
    assert full.header.compression in (0, 2)  # the codec compresses only when it pays off
    assert delta.header.flags & flags.HDR_BLOCK_DELTA and delta.header.flags & flags.HDR_EXTENDED
    assert len(hdf5.read_stream(tmp_path / f"{KID}-000000000003-delta.rk.h5")) < 8192  # the RKCKPT stream inside
    assert (tmp_path / f"{KID}-000000000003-delta.rk.h5").stat().st_size < 8192 + 16384  # plus the HDF5 structure
    rp = latest_restorable(FileStorage(tmp_path))
    assert rp.step == 3 and len(rp.chain) == 3
    np.testing.assert_array_equal(rp.checkpoint.region("a"), sparse(3).region("a"))


def test_thin_front_through_every_4k_block_is_a_small_delta(tmp_path):
    """A change that touches every 4 KiB block but few cells of each (a front crossing every row of a grid)
    is written as a delta of ``delta_block``-byte blocks, not a full: the change estimate samples at that
    granularity too. The chain restores exactly."""

    def front(step: int) -> Checkpoint:
        c = Checkpoint(Metadata(KID, "test", step))
        a = np.full((512, 128), np.inf, np.float32)  # 256 KiB of 128-float rows ...
        a[:, : 4 * step] = step  # ... every row gains 4 cells a step
        c.add_region("t", np.tile(a, (4, 1)))  # 1 MiB: more than the sampled windows
        return c

    pol = CheckpointPolicy(every_steps=1, keep_chains=10)
    with CheckpointManager(tmp_path, pol, KID) as m:
        for step in (1, 2, 3, 4):
            m.submit(SnapshotResponse(SnapshotRequest(step), front(step)))
        m.flush()
        assert m.stats.full == 1 and m.stats.deltas == 3
        full = m.stats.full_bytes
        avg_delta = (m.stats.bytes_written - full) / m.stats.deltas
    # 4 KiB blocks would store every block (100%); 64-byte blocks store 1 or 2 of each row's 8
    assert avg_delta < 0.3 * full
    with pytest.raises(ValueError):
        CheckpointManager(MemoryStorage(), CheckpointPolicy(delta_block=0), KID)
    rp = latest_restorable(FileStorage(tmp_path))
    assert rp.step == 4 and len(rp.chain) == 4
    np.testing.assert_array_equal(rp.checkpoint.region("t"), front(4).region("t"))


def test_reusable_buffers_never_corrupt_the_chain(tmp_path):
    """Snapshots copied into buffers handed back by reusable() still give exact restores."""
    st = FileStorage(tmp_path / "ck")
    mgr = CheckpointManager(st, CheckpointPolicy(every_steps=1, keep_chains=3, full_every=3), KID)
    truth = np.zeros(1 << 18, np.float32)
    reused = 0
    try:
        for step in range(1, 29):
            truth[(step * 7919) % truth.size] += step
            c = Checkpoint(Metadata(KID, "test", step))
            old = mgr.reusable()
            if old is not None:
                reused += 1
                buf = old.region("x").copy() if not old.region("x").flags.writeable else old.region("x")
                np.copyto(buf, truth)
                c.add_region("x", buf)
            else:
                c.add_region("x", truth.copy())
            mgr.submit(SnapshotResponse(SnapshotRequest(step), c))
            if step % 5 == 0:
                mgr.flush()
                rp = latest_restorable(st, KID)
                assert rp.step == step and np.array_equal(rp.checkpoint.region("x"), truth)
        mgr.flush()
        assert reused > 0 and mgr.stats.deltas > 0
        rp = latest_restorable(st, KID)
        assert rp.step == 28 and np.array_equal(rp.checkpoint.region("x"), truth)
    finally:
        mgr.close()
