"""Issue 18, items 1 and 2: no writer replaces a checkpoint, no delta is its own parent,
and retention keeps the chain the running writer restored from and extends.

Real files and storage back ends (a folder, fsspec's ``memory://``, two-level
over both, SeaweedFS S3) and, for retention, real ``rkrun`` processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from chain_helpers import ckpt_name, write_steps
from fixtures_kernel import rkrun_env
from helpers import chain_state
from rkckpt import container, retention
from rkckpt import delta as rkdelta
from rkckpt.chain import SUFFIXES, ChainIndex, SelfParentError, describe, latest_restorable
from rkckpt.delta import STATE_DIGEST_KEY
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import PARENT_DIGEST_KEY, Checkpoint
from rkckpt.storage import ExistsError, FileStorage, FsspecStorage, MemoryStorage, TwoLevelStorage, open_storage

KID = "integ"


def _stores(tmp_path: Path) -> dict[str, object]:
    return {
        "file": FileStorage(tmp_path / "f"),
        "memory": MemoryStorage(),
        "fsspec": FsspecStorage(f"memory://integ-{os.getpid()}-{tmp_path.name}"),
        "twolevel": TwoLevelStorage(FileStorage(tmp_path / "local"), MemoryStorage()),
    }


@pytest.mark.parametrize("kind", ["file", "memory", "fsspec", "twolevel"])
def test_create_never_replaces_a_checkpoint(tmp_path: Path, kind: str) -> None:
    s = _stores(tmp_path)[kind]
    name = ckpt_name(KID, 7, "delta")
    assert s.create(name, b"first") == 5
    with pytest.raises(ExistsError, match="refusing to replace it") as err:
        s.create(name, lambda f: f.write(b"second, longer"))
    assert name in str(err.value)
    s.flush()
    assert s.load(name) == b"first" and s.list().count(name) == 1
    assert s.save("rkckpt-index.json", b"1") and s.save("rkckpt-index.json", b"2") == 1  # notes are still replaced
    if kind == "file":
        assert not [p for p in (tmp_path / "f").iterdir() if p.name.startswith(".rkckpt-tmp-")]
    s.close()


def test_twolevel_create_refuses_a_name_only_the_shared_store_holds(tmp_path: Path) -> None:
    """A run on another node finds the name in the shared store, not in its empty local folder."""
    shared = MemoryStorage()
    name = ckpt_name(KID, 3, "full")
    shared.save(name, b"from node 1")
    s = TwoLevelStorage(FileStorage(tmp_path / "n2"), shared)
    with pytest.raises(ExistsError):
        s.create(name, b"from node 2")
    s.flush()
    s.close()
    assert shared.load(name) == b"from node 1" and not (tmp_path / "n2" / name).exists()


def test_file_create_refuses_a_name_that_appears_while_writing(tmp_path: Path) -> None:
    """The window between the existence check and the rename, forced: the writer callback itself
    puts a file under the name. ``link`` refuses; nothing is replaced, no temporary file is left."""
    s = FileStorage(tmp_path)
    name = ckpt_name(KID, 9, "full")

    def writer(f: object) -> None:
        (tmp_path / name).write_bytes(b"someone else")
        f.write(b"ours")  # type: ignore[attr-defined]

    with pytest.raises(ExistsError):
        s.create(name, writer)
    assert (tmp_path / name).read_bytes() == b"someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rkckpt.lock", name]
    s.close()


def test_create_on_s3_never_replaces(s3_server, tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket()}/integ"
    s3 = open_storage(url, **s3_server.options())
    name = ckpt_name(KID, 5, "full")
    s3.create(name, b"one")
    with pytest.raises(ExistsError):
        s3.create(name, b"two")
    two = TwoLevelStorage(FileStorage(tmp_path / "node"), open_storage(url, **s3_server.options()))
    with pytest.raises(ExistsError):
        two.create(name, b"three")
    two.close()
    assert s3.load(name) == b"one"


def test_manager_refuses_a_delta_on_itself_and_an_existing_name(tmp_path: Path) -> None:
    write_steps(tmp_path, KID, range(1, 4), full_every=8)  # full 1, delta 2, delta 3
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.rk.h5")}
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, keep_chains=9), KID) as m:
        rp = m.latest()
        assert rp is not None and rp.step == 3
        with pytest.raises(SelfParentError, match="parent is never itself"):
            m.final(SnapshotResponse(SnapshotRequest(3, "signal"), chain_state(KID, 3)))
        assert m.stats.failed == 1 and m.stats.last_written_step is None
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=9), KID) as m:  # no restore: a full
        with pytest.raises(ExistsError):
            m.final(SnapshotResponse(SnapshotRequest(1), chain_state(KID, 1)))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.rk.h5")} == before
    assert latest_restorable(FileStorage(tmp_path), KID).step == 3


def _self_parent_delta(step: int) -> bytes:
    """What the old stop path wrote: a delta of a state against that same state."""
    st = chain_state(KID, step)
    d = st.content_digest()
    ck = rkdelta.make_delta(st, st, "block", parent_digest=d, state_digest=d)
    ck = Checkpoint(ck.metadata.with_custom(**{STATE_DIGEST_KEY: d}), ck.chunks)
    return container.encode(ck)


def test_reader_treats_a_self_parent_delta_as_an_orphan_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_steps(tmp_path, KID, range(1, 3), full_every=8)  # full 1, delta 2
    name = ckpt_name(KID, 3, "delta").replace(SUFFIXES["rk.h5"], SUFFIXES["rkcp"])
    (tmp_path / name).write_bytes(_self_parent_delta(3))
    storage = FileStorage(tmp_path)
    index = ChainIndex(storage)
    with caplog.at_level(logging.WARNING, logger="rkckpt.chain"):
        rp = latest_restorable(storage, KID, index=index)
    assert rp is not None and rp.step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "names its own state" in warnings[0], warnings
    assert index.chain_of(index.entries[name])[1].startswith(retention.ORPHANED)
    rows = {r.entry.name: r.status for r in describe(storage)}
    assert rows[name].startswith("orphaned") and "names its own state" in rows[name]


def test_retention_never_deletes_the_writers_chain_or_counts_what_it_passed_over(tmp_path: Path) -> None:
    write_steps(tmp_path, KID, range(1, 7), full_every=2)  # full 1, d 2, d 3 | full 4, d 5, d 6
    storage = FileStorage(tmp_path)
    index = ChainIndex(storage)
    index.refresh()
    full1, full4 = ckpt_name(KID, 1, "full"), ckpt_name(KID, 4, "full")
    chain1 = (full1, ckpt_name(KID, 2, "delta"), ckpt_name(KID, 3, "delta"))
    assert set(retention.plan(index, 1, KID)) == set(chain1)  # the files alone: chain 4 supersedes chain 1
    later = {full4, ckpt_name(KID, 5, "delta"), ckpt_name(KID, 6, "delta")}
    # the writer restored from chain 1 because its own check refused chain 4: chain 1 is the newest kept one
    assert retention.plan(index, 1, KID, writer=retention.WriterView(chain1, frozenset(later))) == []
    # and its chain is never deleted, whatever else supersedes it
    assert retention.plan(index, 1, KID, writer=retention.WriterView(chain1)) == []
    storage.close()


def test_trust_written_skips_the_read_back_and_a_changed_size_is_read_again(tmp_path: Path, caplog) -> None:
    write_steps(tmp_path, KID, range(1, 5), full_every=1)  # full 1, d 2 | full 3, d 4
    storage = FileStorage(tmp_path)
    index = ChainIndex(storage)
    index.refresh()
    full3 = index.entries[ckpt_name(KID, 3, "full")]
    (tmp_path / full3.name).write_bytes((tmp_path / full3.name).read_bytes()[:-3] + b"xyz")  # same size, bad CRC
    retention.trust_written(index, full3.name, full3.size)
    assert ckpt_name(KID, 1, "full") in retention.plan(index, 1, KID)  # trusted: not read back
    retention.trust_written(index, full3.name, full3.size + 1)  # the size differs: read in full, refused
    with caplog.at_level(logging.WARNING, logger="rkckpt.retention"):
        assert retention.plan(index, 1, KID) == []
    assert "not counting" in caplog.text and full3.name in caplog.text
    storage.close()


# ------------------------------------------------------------------ the scenario, with rkrun
WAVESIM = ("wavesim", "--grid", "48", "48", "48", "--checkpoint-every", "2", "--energy-every", "2", "--batch", "1", "--backend", "numpy")


def _rkrun(ck: Path, out: Path, steps: int) -> tuple[int, str]:
    args = [*WAVESIM, "--steps", str(steps), "--checkpoint-dir", str(ck), "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "rkkernel.cli", *args], capture_output=True, text=True, env=rkrun_env(), timeout=120)
    return p.returncode, p.stdout + p.stderr


def _result(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()].tobytes() for k in f}


def _unrestorable_full(ck: Path, step: int, base: Checkpoint) -> str:
    """A full checkpoint at ``step`` with perfect CRCs and digest whose energy series runs backwards:
    rkrun refuses it (RestoreInvalid), ``rkckpt verify`` cannot tell."""
    custom = {k: v for k, v in base.metadata.custom.items() if k not in (PARENT_DIGEST_KEY, STATE_DIGEST_KEY)}
    bad = Checkpoint(dataclasses.replace(base.metadata, current_step=step, custom=custom), list(base.chunks))
    rows = np.array(base.region("rkrun.energy"))
    bad.add_region("rkrun.energy", np.ascontiguousarray(rows[::-1]))
    with CheckpointManager(ck, CheckpointPolicy(full_every=0, keep_chains=99), "wavesim") as m:
        m.final(SnapshotResponse(SnapshotRequest(step), bad))
    return ckpt_name("wavesim", step, "full")


def test_retention_keeps_the_chain_rkrun_restored_from_and_extends(tmp_path: Path) -> None:
    """Issue 18, item 2: two newer fulls pass CRC and digest but rkrun cannot restore them.
    Retention used to count them as the kept chains and delete the chain the run restored from
    and every checkpoint the run wrote; the rerun started from step 0."""
    rc, log = _rkrun(tmp_path / "ref", tmp_path / "ref.h5", 16)
    assert rc == 0, log
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    rc, log = _rkrun(ck, out, 8)  # full 2, deltas 4 6 8
    assert rc == 0, log
    storage = FileStorage(ck)
    restored = latest_restorable(storage, "wavesim")
    storage.close()
    assert restored.step == 8 and len(restored.chain) == 4
    bad = [_unrestorable_full(ck, s, restored.checkpoint) for s in (20, 30)]
    assert {r.entry.name: r.status for r in describe(FileStorage(ck, create=False))}.keys() >= set(bad)
    assert all(r.status == "ok" for r in describe(FileStorage(ck, create=False)))  # CRCs and digests are fine

    rc, log = _rkrun(ck, out, 16)
    assert rc == 0, log
    assert "CHECKPOINTS FAILED" not in log
    assert log.count("steps out of order") == 2, log
    assert "restored from step 8 (chain: " in log, log
    names = {p.name for p in ck.iterdir()}
    written = {ckpt_name("wavesim", s, "delta") for s in (10, 12, 14, 16)}
    assert set(restored.chain) <= names, sorted(names)
    assert written <= names and set(bad) <= names, sorted(names)
    assert _result(out) == _result(tmp_path / "ref.h5")
    rc, log = _rkrun(ck, out, 16)  # the rerun resumes at the end, not at step 0
    assert rc == 0 and "restored from step 16 (chain: " in log, log


def test_a_damaged_file_the_restore_skipped_is_the_only_one_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A truncated newest file is skipped by the restore; when the run reaches that step again its
    new checkpoint takes the name (the damaged file would otherwise block it for good)."""
    write_steps(tmp_path, KID, range(1, 4), full_every=8)  # full 1, delta 2, delta 3
    d3 = tmp_path / ckpt_name(KID, 3, "delta")
    d3.write_bytes(d3.read_bytes()[:500])
    with CheckpointManager(tmp_path, CheckpointPolicy(every_steps=1, keep_chains=9), KID) as m:
        assert m.latest().step == 2
        with caplog.at_level(logging.WARNING, logger="rkckpt.manager"):
            assert m.final(SnapshotResponse(SnapshotRequest(3), chain_state(KID, 3))) == 3
        assert m.stats.failed == 0
    assert "the restore could not use this file; the new checkpoint replaces it" in caplog.text
    rp = latest_restorable(FileStorage(tmp_path), KID)
    assert rp.step == 3 and rp.chain[-1] == d3.name and not rp.skipped


def test_repeated_preemption_right_after_restore_costs_no_checkpoint(tmp_path: Path) -> None:
    """Issue 18, item 1, as filed: a delta chain, SIGKILL, then SIGTERM during each restore.
    Every stop used to write ``<kernel>-S-delta`` over the chain's own tail (its parent itself),
    losing one checkpoint per repeat (70 -> 68 -> 66). Now the stop writes nothing, the files stay
    byte for byte, and the marker names the durable step."""
    ck = tmp_path / "ck"
    args = ["traveltime", "--grid", "48", "48", "48", "--steps", "400", "--checkpoint-every", "2", "--batch", "1", "--backend", "numpy"]
    args += ["--checkpoint-dir", str(ck), "--out", str(tmp_path / "r.h5")]

    def run(schedule: str) -> subprocess.CompletedProcess[str]:
        env = {**rkrun_env(), "RKSLURM_TEST_SIGNAL": schedule}
        return subprocess.run([sys.executable, "-m", "rkkernel.cli", *args], capture_output=True, text=True, env=env, timeout=120)

    assert run("write:KILL:6").returncode == -9  # full 2, deltas 4..10; killed writing step 12
    files = {p.name: p.read_bytes() for p in ck.glob("*.rk.h5")}
    assert max(files) == ckpt_name("traveltime", 10, "delta")
    for _ in range(3):
        p = run("restore:TERM:1")
        assert p.returncode == 75, p.stderr
        assert "restored from step 10 (chain: " in p.stderr and "step 10 is already checkpointed; the stop writes nothing new" in p.stderr
        assert json.loads((ck / "rkrun.stopped.json").read_text())["step"] == 10
        assert {q.name: q.read_bytes() for q in ck.glob("*.rk.h5")} == files
        assert latest_restorable(FileStorage(ck, create=False), "traveltime").step == 10
