"""Retention and ``rkckpt gc`` only delete what a verified, newer restorable chain supersedes."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from chain_helpers import ckpt_name, write_steps
from helpers import chain_state
from hostile_inputs import flip_byte
from rkckpt.chain import latest_restorable
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.storage import FileStorage

KID = "ret"


def state(step: int):
    return chain_state(KID, step)


def name(step: int, kind: str) -> str:
    return ckpt_name(KID, step, kind)


def two_chains(d):
    """full 1, delta 2, delta 3 | full 4, delta 5."""
    write_steps(d, KID, range(1, 6))
    assert sorted(p.name for p in d.glob("*.rk.h5")) == [
        name(1, "full"),
        name(2, "delta"),
        name(3, "delta"),
        name(4, "full"),
        name(5, "delta"),
    ]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_gc_never_deletes_the_only_restorable_chain(tmp_path):
    d = tmp_path / "ck"
    two_chains(d)
    flip_byte(d / name(4, "full"))
    r = run("gc", d, "--keep", 1)
    assert r.exit_code == 0 and r.exception is None, r.output
    assert "0 file(s) deleted" in r.output
    for s, k in ((1, "full"), (2, "delta"), (3, "delta")):
        assert (d / name(s, k)).exists()
    doc = json.loads(run("latest", d, "--json").output)
    assert doc["step"] == 3
    # a dry run plans from the same verified view
    assert "0 file(s) to delete" in run("gc", d, "--keep", 1, "--dry-run").output


def test_manager_retention_keeps_older_chain_when_newest_full_is_corrupt(tmp_path):
    d = tmp_path / "ck"
    two_chains(d)
    flip_byte(d / name(4, "full"))
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=8, keep_chains=1), KID) as m:
        rp = m.latest()
        assert rp.step == 3
        m.final(SnapshotResponse(SnapshotRequest(6), state(6)))  # continues the older chain; retention runs
        assert m.stats.deleted == 0
    rp = latest_restorable(FileStorage(d), KID, warn=False)
    assert rp.step == 6 and rp.chain[0] == name(1, "full")
    np.testing.assert_array_equal(rp.checkpoint.region("small"), state(6).region("small"))


def test_manager_retention_counts_only_verified_chains(tmp_path):
    d = tmp_path / "ck"
    two_chains(d)
    flip_byte(d / name(4, "full"))
    # a writer that does not restore first (the header of full 4 looks fine)
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, keep_chains=2), KID) as m:
        m.final(SnapshotResponse(SnapshotRequest(6), state(6)))
    # two restorable chains are kept, as asked: 6 and the older 1-2-3 (full 4 does not count)
    for s, k in ((1, "full"), (2, "delta"), (3, "delta"), (6, "full")):
        assert (d / name(s, k)).exists(), name(s, k)
    (d / name(6, "full")).unlink()
    assert latest_restorable(FileStorage(d), KID, warn=False).step == 3


def test_gc_removes_orphans_a_verified_chain_supersedes(tmp_path):
    d = tmp_path / "ck"
    two_chains(d)
    (d / name(1, "full")).unlink()  # what an older gc killed after deleting the root left behind
    r = run("gc", d, "--keep", 2)
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in d.glob("*.rk.h5"))
    assert left == [name(4, "full"), name(5, "delta")]
    assert json.loads(run("latest", d, "--json").output)["step"] == 5


def test_gc_deletes_deltas_before_their_root(tmp_path):
    d = tmp_path / "ck"
    two_chains(d)
    r = run("gc", d, "--keep", 1)
    deleted = [line.split()[-1].rsplit("/", 1)[-1] for line in r.output.splitlines() if line.startswith("deleted ")]
    assert deleted == [name(3, "delta"), name(2, "delta"), name(1, "full")]


def _write(d, step: int, *, restore: bool) -> None:
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=8, keep_chains=1000), KID) as m:
        if restore:
            m.latest()
        m.final(SnapshotResponse(SnapshotRequest(step), state(step)))


def test_gc_leaves_no_orphan_beside_a_kept_root_of_the_same_step(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, KID, [1, 2, 3])  # full 1, delta 2, delta 3
    _write(d, 3, restore=False)  # a full at step 3 too (a rerun after a fallback)
    r = run("gc", d, "--keep", 1)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in d.glob("*.rk.h5")) == [name(3, "full")]


def test_gc_keeps_the_chain_of_anything_newer_than_the_kept_root(tmp_path):
    d = tmp_path / "ck"
    _write(d, 1, restore=False)  # full 1
    _write(d, 2, restore=False)  # full 2
    (d / name(2, "full")).rename(tmp_path / "aside")
    _write(d, 3, restore=True)  # delta 3 on top of full 1
    (tmp_path / "aside").rename(d / name(2, "full"))
    assert (d / name(3, "delta")).exists()
    r = run("gc", d, "--keep", 1)
    assert r.exit_code == 0 and "0 file(s) deleted" in r.output, r.output
    assert json.loads(run("latest", d, "--json").output)["step"] == 3
