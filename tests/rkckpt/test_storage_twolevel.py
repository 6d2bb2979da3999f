"""Two-level storage on a real SeaweedFS: node-local folders scoped per location, listings never "empty" by error."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_s3 import free_ports
from helpers import flat_state
from rkckpt.chain import latest_restorable
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.storage import FileStorage, FsspecStorage, ListingError, StorageError, TwoLevelStorage, open_storage

pytestmark = pytest.mark.s3

KID = "two"
FAST_FAIL = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 5}}


def state(step: int) -> Checkpoint:
    return flat_state(KID, step, 1024)


def test_jobs_sharing_a_local_dir_never_see_each_others_files(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("RKCKPT_LOCAL_DIR", str(tmp_path / "node-local"))
    url_a = f"s3://{s3_server.bucket()}/job-a"
    url_b = f"s3://{s3_server.bucket()}/job-b"
    a = open_storage(url_a, **s3_server.options())
    assert isinstance(a, TwoLevelStorage)
    with CheckpointManager(a, CheckpointPolicy(every_steps=1), KID) as m:
        m.final(SnapshotResponse(SnapshotRequest(500), state(500)))
        m.flush()
    b = open_storage(url_b, **s3_server.options())  # empty prefix, same $RKCKPT_LOCAL_DIR, same kernel id
    assert b.local.root != a.local.root and b.local.root.parent == a.local.root.parent
    assert latest_restorable(b, KID) is None
    b.close()
    again = open_storage(url_a, **s3_server.options())  # the same location finds its own local copy
    assert again.local.root == a.local.root and latest_restorable(again, KID).step == 500
    again.close()


class FlakyListing(FsspecStorage):
    """The real store, whose first ``fails`` listings fail the way a cold node's first request can."""

    def __init__(self, *a, fails: int = 1, **kw):
        super().__init__(*a, **kw)
        self.fails = fails
        self.calls = 0

    def _ls(self):
        self.calls += 1
        if self.calls <= self.fails:
            raise StorageError(self.url, "listing failed: ConnectTimeoutError: connect timeout")
        return super()._ls()


def test_transient_listing_error_is_retried_and_restore_finds_the_checkpoint(s3_server, tmp_path):
    url = f"s3://{s3_server.bucket()}/flaky"
    with CheckpointManager(open_storage(url, **s3_server.options()), CheckpointPolicy(every_steps=1, full_every=2), KID) as m:
        for s in (1, 2, 3):
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))
    shared = FlakyListing(url, **s3_server.options(), fails=2)
    shared.list_delay = 0.01
    fresh_node = TwoLevelStorage(FileStorage(tmp_path / "fresh"), shared)
    rp = latest_restorable(fresh_node, KID)
    assert rp is not None and rp.step == 3 and shared.calls == 3
    np.testing.assert_array_equal(rp.checkpoint.region("a"), state(3).region("a"))
    fresh_node.close()


def test_listing_that_keeps_failing_is_an_error_not_an_empty_store(tmp_path):
    (port,) = free_ports(1)  # nothing listens there
    shared = open_storage("s3://nobucket/p", endpoint_url=f"http://127.0.0.1:{port}", key="k" * 8, secret="s" * 16, **FAST_FAIL)
    shared.list_delay = 0.01
    node = TwoLevelStorage(FileStorage(tmp_path / "local"), shared)
    with pytest.raises(ListingError, match=r"listing failed.*gave up after 5 attempts"):
        latest_restorable(node, KID)
    with CheckpointManager(node, CheckpointPolicy(every_steps=1), KID) as m, pytest.raises(StorageError):
        m.latest()  # rkrun exits with this error instead of starting again from step 0
    with pytest.raises(ListingError):
        shared.list()
