"""Commit records on two-level storage reach the shared store only after every part (real loopback S3).

Ranks on one node share the node-local folder, each with its own upload
queue (``TwoLevelStorage`` per process): rank 0 sees rank 1's part locally
long before rank 1's upload has finished. ``ckptset.commit_set`` must not
write the manifest until every part's chain is in the shared store, or a
node lost after the commit would leave a manifest naming parts that never
left it. The windows are forced with a shared-store wrapper that holds or
fails the uploads of chosen names (``set_helpers.HeldStore``), never with sleeps.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from rkckpt import ckptset
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.storage import FileStorage, StorageError, TwoLevelStorage, open_storage
from set_helpers import DECOMPOSED, KID, NZ, HeldStore, SetWriter, assert_reads_back, global_state, local_state, split

pytestmark = pytest.mark.s3


def _s3(s3_server) -> Any:  # noqa: ANN001
    return open_storage(f"s3://{s3_server.bucket()}/ck", local=False, **s3_server.options())


def _rank_managers(stores: list[TwoLevelStorage]) -> list[CheckpointManager]:
    policy = CheckpointPolicy(every_steps=1, keep_chains=None, full_every=8, delta_try_fraction=1.0)
    return [CheckpointManager(st, policy, ckptset.part_kernel_id(KID, r, len(stores))) for r, st in enumerate(stores)]


def _write_parts(stores: list[TwoLevelStorage], mgrs: list[CheckpointManager], step: int) -> ckptset.CheckpointSet:
    """Each rank (its own two-level storage) writes its part of ``step``; the set, not yet committed."""
    g, parts = global_state(step), []
    for r, (st, m) in enumerate(zip(stores, mgrs, strict=True)):
        ck, offset = local_state(g, step, r, len(stores))
        m.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
        z0, z1 = split(NZ, len(stores))[r]
        parts.append(ckptset.written_part(st, KID, r, len(stores), step, z0, z1, offset))
    return ckptset.CheckpointSet(KID, step, "run-a", len(stores), NZ, DECOMPOSED, tuple(parts))


def _latest_shared(shared: Any) -> int | None:
    s = ckptset.latest_set(shared, KID)
    return None if s is None else s.step


def test_a_part_still_uploading_on_another_rank_blocks_the_commit(s3_server, tmp_path: Path) -> None:
    """Two ranks on one node (one local folder, two upload queues): rank 1's upload held -> no commit record."""
    shared = _s3(s3_server)
    held = HeldStore(shared, lambda n: ".r1of2-" in n and "-000000000020-" in n)
    local = FileStorage(tmp_path / "node")
    rank1_local = FileStorage(tmp_path / "node")
    rank1_local.acquire_lock = lambda: None  # rank 0 holds the folder lock (as rkkernel.rankstate.unlocked)
    stores = [TwoLevelStorage(local, shared), TwoLevelStorage(rank1_local, held)]
    mgrs = _rank_managers(stores)
    ckptset.commit_set(stores[0], _write_parts(stores, mgrs, 10))
    assert _latest_shared(shared) == 10
    held.gate.clear()
    s = _write_parts(stores, mgrs, 20)
    assert held.holding.wait(30)
    assert not stores[1].durable(s.parts[1].name) and not stores[0].durable(s.parts[1].name)
    with pytest.raises(ckptset.SetError, match="a part is not in the shared store yet"):
        ckptset.commit_set(stores[0], s)
    assert _latest_shared(shared) == 10  # the shared store holds no record of a set it lacks parts of
    assert ckptset.set_name(KID, 20, 2) not in shared.list()
    held.gate.set()
    stores[1].flush()
    assert stores[0].durable(s.parts[1].name)
    ckptset.commit_set(stores[0], s)
    assert _latest_shared(shared) == 20
    for st in stores:
        st.close()


def test_held_then_failed_upload_keeps_the_previous_set_and_a_lost_node_restores_whole(s3_server, tmp_path: Path) -> None:
    """One process: the commit waits for its own held upload; a failed upload refuses the commit until a retry
    succeeds; then the node-local folder is lost and a fresh node restores the whole set from the shared store."""
    shared = _s3(s3_server)
    held = HeldStore(shared, lambda n: "-000000000020-" in n or "-000000000030-" in n)
    storage = TwoLevelStorage(FileStorage(tmp_path / "node"), held)
    w = SetWriter(storage, 3)
    w.write(10)
    assert _latest_shared(shared) == 10
    held.gate.clear()
    s = w.write(20, commit=False)
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(ckptset.commit_set(storage, s)))
    t.start()
    assert held.holding.wait(30)
    assert _latest_shared(shared) == 10 and not done  # the commit waits behind the held upload
    held.gate.set()
    t.join(60)
    assert done == [ckptset.set_name(KID, 20, 3)] and _latest_shared(shared) == 20
    held.fail = True
    s = w.write(30, commit=False)
    with pytest.raises(ckptset.SetError, match="a part is not in the shared store: .*upload refused"):
        ckptset.commit_set(storage, s)
    assert _latest_shared(shared) == 20 and ckptset.latest_set(storage, KID).step == 20
    assert storage.upload_failed(s.parts[0].name) == f"{s.parts[0].name}: upload refused (test)"
    held.fail = False
    storage.flush()  # retries the failed uploads
    ckptset.commit_set(storage, s)
    assert _latest_shared(shared) == 30
    storage.close()
    shutil.rmtree(tmp_path / "node")  # the node is gone after the commit
    fresh = TwoLevelStorage(FileStorage(tmp_path / "other-node"), shared)
    got = ckptset.latest_set(fresh, KID)
    assert got is not None and (got.step, got.ranks) == (30, 3)
    assert_reads_back(fresh, got, 30, 2)
    fresh.close()


def test_a_commit_record_whose_upload_hangs_is_an_error_at_the_deadline(tmp_path: Path) -> None:
    """The manifest's own upload held: ``commit_set(timeout=...)`` raises instead of holding the ranks;
    once the upload goes through, the set is whole in the shared store (its parts went first)."""
    shared = FileStorage(tmp_path / "shared")
    held = HeldStore(shared, lambda n: n.endswith(ckptset.SET_SUFFIX))
    storage = TwoLevelStorage(FileStorage(tmp_path / "node"), held)
    s = SetWriter(storage, 2).write(10, commit=False)
    held.gate.clear()
    with pytest.raises(StorageError, match="still uploading"):
        ckptset.commit_set(storage, s, timeout=0.2)
    assert ckptset.latest_set(shared, KID) is None
    held.gate.set()
    storage.flush()
    assert ckptset.latest_set(shared, KID).step == 10
    storage.close()


def test_a_commit_record_goes_before_newer_parts_queued_ahead_of_it(s3_server, tmp_path: Path) -> None:
    """Set 10's record is saved while set 20's part uploads (held) and set 30's waits in the queue:
    it reaches the shared store before set 30's part, not behind it (``Storage.expedite``)."""
    from helpers import wait_until

    shared = _s3(s3_server)
    held = HeldStore(shared, lambda n: "-000000000020-" in n)
    arrived: list[str] = []
    check = held._check

    def recorded(name: str) -> None:
        check(name)
        arrived.append(name)

    held._check = recorded  # type: ignore[method-assign]
    stores = [TwoLevelStorage(FileStorage(tmp_path / "node"), held)]
    mgrs = _rank_managers(stores)
    s10 = _write_parts(stores, mgrs, 10)
    stores[0].flush()
    held.gate.clear()
    _write_parts(stores, mgrs, 20)
    assert held.holding.wait(30)  # the one upload thread is busy with set 20's part
    s30 = _write_parts(stores, mgrs, 30)
    record = ckptset.set_name(KID, 10, 1)
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(ckptset.commit_set(stores[0], s10, timeout=60)))
    t.start()
    wait_until(lambda: record in stores[0]._pending, 30, "the commit record to be queued")
    held.gate.set()
    t.join(60)
    assert done == [record]
    stores[0].flush()
    assert arrived.index(record) < arrived.index(s30.parts[0].name), arrived
    assert _latest_shared(shared) == 10
    stores[0].close()
