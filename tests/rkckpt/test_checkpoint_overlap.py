"""Checkpoints off the critical path: asynchronous device->host copies, one pass of the writer over each byte."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fixtures_kernel import kernel_backend  # noqa: F401 - fixture
from rkckpt import delta
from rkckpt import manager as mgr_mod
from rkckpt.chain import INDEX_NAME, ChainIndex, latest_restorable
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage
from rkkernel.runtime import PersistentKernel
from rkkernel.wavesim import WaveParams, make_spec

P = WaveParams(20, 18, 22)
KID = "ovl"


# ---------------------------------------------------------------- the asynchronous copy
def test_snapshot_is_the_state_of_its_step_while_the_kernel_runs_on(kernel_backend: str) -> None:  # noqa: F811
    """The window: snapshot at step 5, run 7 more steps *before* waiting for the copy; the copy is still step 5's."""
    ref = PersistentKernel(make_spec(P), kernel_backend)
    ref.run(5)
    want = ref.create_checkpoint()
    k = PersistentKernel(make_spec(P), kernel_backend)
    k.run(5)
    old = k.create_checkpoint()
    snap, wait = k.snapshot(reuse=old)  # copies into old's buffers, queued behind step 5
    k.run(7)  # enqueued after the copy: the kernel overwrites both pressure fields
    assert k.step == 12
    wait()
    assert snap.metadata.current_step == 5
    assert snap.content_digest() == want.content_digest()
    for name in ("pressure_a", "pressure_b"):
        assert np.array_equal(snap.region(name), want.region(name))
        assert np.shares_memory(snap.region(name), old.region(name))  # double buffering: no fresh allocation
        assert not np.array_equal(snap.region(name), k.region(name))  # the device did move on


def _state(step: int, frac: float = 0.0, n: int = 1 << 18) -> Checkpoint:
    """A float32 state in which the first ``frac`` of the cells changed since step 0."""
    c = Checkpoint(Metadata(KID, "test", step))
    a = np.zeros(n, np.float32)
    a[: int(n * frac)] = step
    c.add_region("x", a)
    return c


def test_writer_reads_nothing_before_the_copy_is_ready(tmp_path) -> None:
    """The manager's writer waits for ``ready`` before its first byte: a snapshot still being copied is never written half-done."""
    gate = threading.Event()
    truth = _state(3, 0.5)
    c = _state(3, 0.5)
    buf = np.asarray(c.region("x"))
    buf[:] = -1.0  # the copy has not landed yet

    def ready() -> None:
        gate.wait(10)
        buf[:] = truth.region("x")  # the copy lands

    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1), KID) as m:
        m.submit(SnapshotResponse(SnapshotRequest(3), c, ready))
        assert m.stats.completed == 0
        gate.set()
        m.flush()
        assert m.stats.completed == 1
    rp = latest_restorable(FileStorage(tmp_path), KID)
    assert rp is not None and rp.step == 3 and np.array_equal(rp.checkpoint.region("x"), truth.region("x"))


# ---------------------------------------------------------------- the writer's work, once
class CountingStorage(FileStorage):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.reads: list[str] = []

    def load(self, name: str) -> bytes:
        self.reads.append(name)
        return super().load(name)

    def open_read(self, name: str):  # noqa: ANN201
        self.reads.append(name)
        return super().open_read(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.reads.append(name)
        return super().read_range(name, offset, length)

    def local_path(self, name: str):  # noqa: ANN201
        self.reads.append(name)
        return super().local_path(name)


def test_retention_does_not_read_back_what_the_manager_just_wrote(tmp_path) -> None:
    st = CountingStorage(tmp_path / "ck")
    with CheckpointManager(st, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=3), KID) as m:
        for step in range(1, 6):
            m.submit(SnapshotResponse(SnapshotRequest(step), _state(step, 1.0)))
        m.flush()
        assert m.stats.full == 5 and m.stats.deleted == 2  # retention ran and trusted the new roots
    assert not [n for n in st.reads if n.endswith(".rk.h5")], st.reads
    ckpts = sorted(n for n in os.listdir(tmp_path / "ck") if n.endswith(".rk.h5"))
    assert ckpts == [f"{KID}-00000000000{s}-full.rk.h5" for s in (3, 4, 5)]
    # a root written by another process (or an earlier run) is still read back in full before older files go
    st2 = CountingStorage(tmp_path / "ck")
    with CheckpointManager(st2, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=2), KID) as m:
        m.submit(SnapshotResponse(SnapshotRequest(6), _state(6, 1.0)))
        m.flush()
        assert m.stats.deleted == 2
    assert f"{KID}-000000000005-full.rk.h5" in st2.reads and f"{KID}-000000000006-full.rk.h5" not in st2.reads


@pytest.mark.parametrize("keep", [10, 1])  # 1: every write also deletes the chain before it
def test_index_is_saved_atomically_without_its_own_fsyncs(tmp_path, monkeypatch: pytest.MonkeyPatch, keep: int) -> None:
    st = FileStorage(tmp_path / "ck")
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    with CheckpointManager(st, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=keep), KID) as m:
        m.submit(SnapshotResponse(SnapshotRequest(1), _state(1, 1.0)))
        m.flush()
        calls.clear()
        m.submit(SnapshotResponse(SnapshotRequest(2), _state(2, 1.0)))
        m.wait()
        assert len(calls) == 2  # the checkpoint file and its folder; none for the index
        assert m.stats.deleted == (1 if keep == 1 else 0)
    steps = {1, 2} if keep > 1 else {2}
    idx = ChainIndex(FileStorage(tmp_path / "ck"))
    assert {e.step for e in idx.refresh()} == steps
    assert idx._load_index().keys() == {f"{KID}-00000000000{s}-full.rk.h5" for s in steps}  # the cache is current
    assert not [n for n in os.listdir(tmp_path / "ck") if n.startswith(".") and n != ".rkckpt.lock"]  # no temp files left
    assert (tmp_path / "ck" / INDEX_NAME).is_file()


@pytest.mark.parametrize(("frac", "tried"), [(0.1, True), (0.4, False)])
def test_delta_only_tried_when_the_estimate_says_it_pays(tmp_path, monkeypatch: pytest.MonkeyPatch, frac: float, tried: bool) -> None:
    made: list[int] = []
    real = mgr_mod._make_delta
    monkeypatch.setattr(mgr_mod, "_make_delta", lambda *a, **kw: (made.append(1), real(*a, **kw))[1])
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, keep_chains=10), KID) as m:
        m.submit(SnapshotResponse(SnapshotRequest(1), _state(1, 0.0)))
        m.submit(SnapshotResponse(SnapshotRequest(2), _state(2, frac)))  # 40%: a delta would be kept (< 0.5) but saves little
        m.flush()
        assert (m.stats.deltas, len(made)) == ((1, 1) if tried else (0, 0))
    rp = latest_restorable(FileStorage(tmp_path), KID)
    assert rp is not None and rp.step == 2 and np.array_equal(rp.checkpoint.region("x"), _state(2, frac).region("x"))


def test_change_estimate_is_the_window_by_window_figure() -> None:
    """The one-pass estimate gives the very float the window-by-window loop gave: the full/delta choice is unchanged."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(300_000).astype(np.float32)
    a = np.frombuffer(x.tobytes(), np.uint8)
    for frac in (0.0, 0.002, 0.2, 1.0):
        y = x.copy()
        y[rng.random(x.size) < frac] += 1
        b = np.frombuffer(y.tobytes(), np.uint8)
        n = a.size
        stride = (n - mgr_mod._SAMPLE_BLOCK) // (mgr_mod._SAMPLE_BLOCKS - 1)
        starts = range(0, n - mgr_mod._SAMPLE_BLOCK + 1, stride)
        for block in (64, 32, 4096, 100, 8, 16, 24, 128, 512):  # 8-byte multiples take the word-wise compare
            w = mgr_mod._SAMPLE_BLOCK
            loop = sum(float(delta.changed_blocks(a[i : i + w], b[i : i + w], block).mean()) for i in starts)
            assert mgr_mod._sampled_hits(a, b, starts, block) == loop
