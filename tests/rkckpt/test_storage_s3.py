"""Object storage on a real SeaweedFS S3 server: chains, mixed forms, secrets, two-level flush (the store contract: test_store_conformance)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from ckpt_helpers import stream_span
from fixtures_s3 import start_weed, stop_weed
from helpers import chain_state
from rkckpt.chain import describe, latest_restorable, read_region
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.storage import FileStorage, FsspecStorage, ListingError, StorageError, TwoLevelStorage, open_storage

pytestmark = pytest.mark.s3

KID = "s3k"
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


def state(step: int, n: int = 65536) -> Checkpoint:
    return chain_state(KID, step, big=n, small=1024, small_dtype=np.float64)


def check(ck: Checkpoint, step: int, n: int = 65536) -> None:
    want = state(step, n)
    for r in ("big", "small"):
        np.testing.assert_array_equal(ck.region(r), want.region(r))


def test_manager_chain_on_s3_and_fallback(s3_server):
    url = f"s3://{s3_server.bucket()}/ck"
    with CheckpointManager(open_storage(url, **s3_server.options()), CheckpointPolicy(every_steps=1, full_every=3), KID) as m:
        for step in range(1, 6):
            m.submit(SnapshotResponse(SnapshotRequest(step), state(step)))
        assert m.final(SnapshotResponse(SnapshotRequest(6, "final"), state(6))) == 6
    s = open_storage(url, **s3_server.options())
    rp = latest_restorable(s, KID)
    assert rp.step == 6 and len(rp.chain) >= 2 and rp.chain[0].endswith("-full.rk.h5")
    check(rp.checkpoint, 6)
    # region read through range requests on the object store
    np.testing.assert_array_equal(read_region(s, rp.chain[0], "big"), state(1).region("big"))
    # corrupt the newest object: restore falls back to step 5
    blob = bytearray(s.load(rp.chain[-1]))
    blob[stream_span(bytes(blob))[1] - 5] ^= 0x55
    s.save(rp.chain[-1], bytes(blob))
    rp2 = latest_restorable(s, KID)
    assert rp2.step == 5 and rp2.skipped[0][0] == rp.chain[-1]
    check(rp2.checkpoint, 5)
    status = {r.entry.name: r.status for r in describe(s)}
    assert "checksum" in status[rp.chain[-1]]


def test_mixed_forms_on_s3_with_region_range_reads(s3_server):
    """A chain of .rkcp then .rk.h5 objects restores from S3; a region is read from either form by range requests."""
    url = f"s3://{s3_server.bucket()}/mixed"
    for fmt, steps in (("rkcp", (1, 2)), ("rk.h5", (3, 4))):
        policy = CheckpointPolicy(every_steps=1, full_every=8, checkpoint_format=fmt)
        with CheckpointManager(open_storage(url, **s3_server.options()), policy, KID) as m:
            if steps[0] > 1:
                assert m.latest().step == 2
            for step in steps:
                m.submit(SnapshotResponse(SnapshotRequest(step), state(step)))
    s = open_storage(url, **s3_server.options())
    rp = latest_restorable(s, KID)
    assert rp.step == 4 and [n.rsplit("-", 1)[-1] for n in rp.chain] == ["full.rkcp", "delta.rkcp", "delta.rk.h5", "delta.rk.h5"]
    check(rp.checkpoint, 4)
    assert all(r.status == "ok" for r in describe(s))
    np.testing.assert_array_equal(read_region(s, rp.chain[0], "small"), state(1).region("small"))
    with CheckpointManager(open_storage(url, **s3_server.options()), CheckpointPolicy(every_steps=1, full_every=0), KID) as m:
        m.latest()
        m.submit(SnapshotResponse(SnapshotRequest(5), state(5)))  # a full .rk.h5 object
    name = f"{KID}-000000000005-full.rk.h5"
    s = open_storage(url, **s3_server.options())
    np.testing.assert_array_equal(read_region(s, name, "big"), state(5).region("big"))
    np.testing.assert_array_equal(read_region(s, name, "small"), state(5).region("small"))


def test_secret_never_in_errors_or_logs(s3_server, caplog):
    bucket = s3_server.bucket()
    good = open_storage(f"s3://{bucket}/x", **s3_server.options())
    good.save("obj", b"data")
    wrong_secret = "wrong-" + s3_server.secret[::-1]
    bad = open_storage(f"s3://{bucket}/x", endpoint_url=s3_server.endpoint, key=s3_server.key, secret=wrong_secret)
    messages = []
    with caplog.at_level(logging.DEBUG):
        for op in (lambda: bad.load("obj"), lambda: bad.save("n", b"1"), bad.list, lambda: bad.delete("obj")):
            with pytest.raises(StorageError) as info:
                op()
            messages.append(str(info.value))
        try:  # a failing latest() / manager must not leak it either
            CheckpointManager(bad, CheckpointPolicy(every_steps=1), KID).final(SnapshotResponse(SnapshotRequest(1), state(1, 16)))
        except StorageError as exc:
            messages.append(str(exc))
    assert len(messages) == 5
    for msg in messages:
        assert wrong_secret not in msg and s3_server.secret not in msg, msg
        assert msg.startswith(f"s3://{bucket}/x"), msg
    assert wrong_secret not in caplog.text and s3_server.secret not in caplog.text


def test_two_level_flush_and_restore_on_another_node(s3_server, tmp_path):
    url = f"s3://{s3_server.bucket()}/two"
    shared = open_storage(url, **s3_server.options())
    two = TwoLevelStorage(FileStorage(tmp_path / "node1"), shared)
    with CheckpointManager(two, CheckpointPolicy(every_steps=1), KID) as m:
        for step in (1, 2, 3):
            m.submit(SnapshotResponse(SnapshotRequest(step), state(step)))
        m.flush()
        names = [n for n in two.local.list() if n.endswith(".rk.h5")]
        assert names and all(two.durable(n) for n in names)
        assert two.flushed_bytes > 0
    # a new node: empty local folder, everything comes from the object store
    other = TwoLevelStorage(FileStorage(tmp_path / "node2"), open_storage(url, **s3_server.options()))
    rp = latest_restorable(other, KID)
    assert rp.step == 3
    check(rp.checkpoint, 3)
    other.close()


class GatedS3(FsspecStorage):
    """The real S3 store, but an upload can be held at its start so the test can kill the server then."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.started = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def put_local(self, local, name):
        self.started.set()
        self.gate.wait(60)
        return super().put_local(local, name)


def test_killing_s3_mid_flush_leaves_local_copy_restorable(tmp_path):
    srv = start_weed(tmp_path / "weed")
    try:
        shared = GatedS3(f"s3://{srv.bucket()}/p", **srv.options(), **FAST_FAIL)
        two = TwoLevelStorage(FileStorage(tmp_path / "local"), shared)
        n = 1 << 20
        m = CheckpointManager(two, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=10), KID)
        m.final(SnapshotResponse(SnapshotRequest(1), state(1, n)))
        m.flush()  # step 1 is durable on S3
        shared.gate.clear()
        shared.started.clear()
        for step in (2, 3, 4):
            m.final(SnapshotResponse(SnapshotRequest(step), state(step, n)))
        assert shared.started.wait(30)  # the upload of step 2 is under way
        srv.kill()  # SIGKILL the server mid-flush
        shared.gate.set()
        with pytest.raises(StorageError, match="not durable"):
            m.flush()
        assert two.durable(f"{KID}-000000000001-full.rk.h5")
        for step in (2, 3, 4):
            assert not two.durable(f"{KID}-{step:012d}-full.rk.h5")
        # the shared store cannot be listed: that is an error, not "only what is local"
        shared.list_delay = 0.01
        with pytest.raises(ListingError):
            latest_restorable(two, KID)
        m.close()
        # the node-local folder alone is a complete checkpoint folder
        rp = latest_restorable(FileStorage(tmp_path / "local"), KID)
        assert rp.step == 4
        check(rp.checkpoint, 4, n)
    finally:
        stop_weed(srv.proc)
