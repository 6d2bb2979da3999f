"""Chains on disk: index rebuild, corruption fallback, orphans, retention, region reads."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from ckpt_helpers import stream_span
from helpers import chain_state
from rkckpt.chain import INDEX_NAME, ChainIndex, checkpoint_name, describe, latest_restorable, read_region
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.retention import gc
from rkckpt.retention import plan as plan_gc
from rkckpt.storage import FileStorage

KID = "wave"


def state(step: int) -> Checkpoint:
    """Deterministic state: a big field that changes every 4th step, a small one every step."""
    return chain_state(KID, step, big=16384, small=512, small_dtype=np.float64, big_every=4)


def write_steps(path, steps, **policy) -> None:
    pol = CheckpointPolicy(every_steps=1, **({"full_every": 3, "keep_chains": 10} | policy))
    with CheckpointManager(path, pol, KID) as m:
        for s in steps:
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))
        m.flush()


def assert_state(ck: Checkpoint, step: int) -> None:
    want = state(step)
    for name in ("big", "small"):
        np.testing.assert_array_equal(ck.region(name), want.region(name))
    assert ck.metadata.current_step == step


def name(step, kind):
    return checkpoint_name(KID, step, kind)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, [1, 2, 3, 5, 6, 7, 9])  # full at 1 and 5 (every 3 deltas) and 9? see test
    return d


def test_chain_layout_and_latest(folder):
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rk.h5"))
    kinds = {int(f.split("-")[1]): f.split("-")[2].split(".")[0] for f in files}
    assert kinds[1] == "full"
    assert "delta" in kinds.values()
    rp = latest_restorable(FileStorage(folder))
    assert rp is not None and rp.step == 9 and not rp.skipped
    assert_state(rp.checkpoint, 9)
    assert rp.chain[0].endswith("-full.rk.h5") and rp.chain[-1] == name(9, kinds[9])
    # every element of the chain is an earlier step
    steps = [int(n.split("-")[1]) for n in rp.chain]
    assert steps == sorted(steps)


def _newest_delta_chain(folder):
    rp = latest_restorable(FileStorage(folder))
    return rp.chain


def test_flipped_byte_in_newest_falls_back_with_one_warning(folder, caplog):
    chain = _newest_delta_chain(folder)
    p = folder / chain[-1]
    b = bytearray(p.read_bytes())
    b[stream_span(bytes(b))[1] - 10] ^= 0xFF  # inside the stream (the last chunk's data)
    p.write_bytes(bytes(b))
    with caplog.at_level(logging.WARNING):
        rp = latest_restorable(FileStorage(folder))
    assert rp.step == 7
    assert_state(rp.checkpoint, 7)
    assert [n for n, _ in rp.skipped] == [chain[-1]]
    assert "checksum" in rp.skipped[0][1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and chain[-1] in warnings[0].getMessage()
    rows = {r.entry.name: r for r in describe(FileStorage(folder))}
    assert "checksum" in rows[chain[-1]].status
    assert rows[name(7, rows[next(n for n in rows if "-000000000007-" in n)].entry.kind)].status == "ok"


def test_truncated_newest_falls_back(folder):
    chain = _newest_delta_chain(folder)
    p = folder / chain[-1]
    p.write_bytes(p.read_bytes()[:-3])
    rp = latest_restorable(FileStorage(folder))
    assert rp.step == 7 and "truncated" in rp.skipped[0][1]
    assert_state(rp.checkpoint, 7)


def test_deleted_middle_delta_orphans_descendants(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, [4, 5, 6, 7], full_every=8)
    (d / name(5, "delta")).unlink()
    rp = latest_restorable(FileStorage(d))
    assert rp.step == 4 and rp.chain == [name(4, "full")]
    assert_state(rp.checkpoint, 4)
    skipped = dict(rp.skipped)
    assert set(skipped) == {name(6, "delta"), name(7, "delta")}
    assert "orphaned" in skipped[name(6, "delta")]
    rows = {r.entry.name: r.status for r in describe(FileStorage(d))}
    assert rows[name(4, "full")] == "ok"
    assert rows[name(6, "delta")].startswith("orphaned")
    assert rows[name(7, "delta")] != "ok"


def test_corrupt_middle_delta_breaks_chain_not_earlier_state(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, [1, 2, 3], full_every=8)
    p = d / name(2, "delta")
    b = bytearray(p.read_bytes())
    b[stream_span(bytes(b))[0] + 80] ^= 1  # in the stream
    p.write_bytes(bytes(b))
    rp = latest_restorable(FileStorage(d))
    assert rp.step == 1
    reasons = dict(rp.skipped)
    assert name(2, "delta") in reasons and name(3, "delta") in reasons
    assert name(2, "delta") in reasons[name(3, "delta")] or "orphaned" in reasons[name(3, "delta")]


def test_nothing_restorable(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, [1])
    (d / name(1, "full")).write_bytes(b"garbage")
    assert latest_restorable(FileStorage(d)) is None
    assert latest_restorable(FileStorage(tmp_path / "empty")) is None


def test_index_rebuilt_when_damaged_or_missing(folder):
    s = FileStorage(folder)
    doc = json.loads((folder / INDEX_NAME).read_text())
    assert len(doc["entries"]) == 7
    (folder / INDEX_NAME).write_text("{not json")
    idx = ChainIndex(s)
    assert len(idx.refresh()) == 7 and idx.rebuilt
    (folder / INDEX_NAME).unlink()
    assert latest_restorable(s).step == 9
    # a stale index (lies about a file) is corrected by the files
    doc["entries"][name(9, "delta") if (folder / name(9, "delta")).exists() else name(9, "full")]["size"] = 1
    (folder / INDEX_NAME).write_text(json.dumps(doc))
    assert latest_restorable(s).step == 9


def test_retention_keeps_newest_complete_chains(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, range(1, 14), full_every=2, keep_chains=2)
    files = sorted(p.name for p in d.iterdir() if p.name.endswith(".rk.h5"))
    fulls = [f for f in files if f.endswith("-full.rk.h5")]
    assert len(fulls) == 2
    oldest_kept = min(int(f.split("-")[1]) for f in fulls)
    assert all(int(f.split("-")[1]) >= oldest_kept for f in files)
    s = FileStorage(d)
    rp = latest_restorable(s)
    assert rp.step == 13 and not rp.skipped
    assert_state(rp.checkpoint, 13)
    # every surviving delta still restores (no kept delta lost its parent)
    idx = ChainIndex(s)
    for e in idx.refresh():
        _, problem = idx.chain_of(e)
        assert problem is None, (e.name, problem)


def test_gc_never_deletes_parent_of_kept_delta(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, [1, 2, 3, 4, 5, 6, 7], full_every=2)  # fulls at 1, 4, 7
    s = FileStorage(d)
    idx = ChainIndex(s)
    idx.refresh()
    # newest first: a chain loses its deltas before its root
    assert plan_gc(idx, 1) == [name(6, "delta"), name(5, "delta"), name(4, "full"), name(3, "delta"), name(2, "delta"), name(1, "full")]
    assert plan_gc(idx, 2) == [name(3, "delta"), name(2, "delta"), name(1, "full")]
    assert plan_gc(idx, 3) == []
    # a corrupt newest full does not count as a complete chain
    p = d / name(7, "full")
    p.write_bytes(p.read_bytes()[:100])
    idx = ChainIndex(s)
    idx.refresh()
    assert plan_gc(idx, 2) == []
    deleted = gc(s, 1)
    assert deleted == [name(3, "delta"), name(2, "delta"), name(1, "full")]
    assert latest_restorable(s).step == 6


def test_read_region_uses_ranges_only(folder):
    s = FileStorage(folder)
    arr = read_region(s, name(1, "full"), "big")
    np.testing.assert_array_equal(arr, state(1).region("big"))
    with pytest.raises(Exception, match="no region"):
        read_region(s, name(1, "full"), "nope")
