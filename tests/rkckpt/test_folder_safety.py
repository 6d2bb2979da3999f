"""A checkpoint writer never follows a planted lock link and refuses folders others can write.

Real symlinks and hard links, and real folders owned by another user, with
the writer running as uid 65534 (no capabilities, so no root overrides).
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from asuser import enterable_tmp, run_as_nobody
from helpers import flat_state
from hostile_inputs import VICTIM, give_to_nobody, symlink_out
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.storage import FileStorage, StorageError, UnsafeFolderError

KID = "safe"


def state(step: int) -> Checkpoint:
    return flat_state(KID, step, 256)


@pytest.fixture
def shared_tmp():
    with enterable_tmp() as d:
        yield d


def test_symlinked_lock_is_refused_and_target_untouched(tmp_path):
    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=10), KID) as m:
        for s in (1, 2, 3):  # three chains: gc --keep 1 has work to do
            m.final(SnapshotResponse(SnapshotRequest(s), state(s)))
    (d / ".rkckpt.lock").unlink()
    victim = symlink_out(d / ".rkckpt.lock")
    with pytest.raises(UnsafeFolderError, match="symbolic link"):
        CheckpointManager(d, CheckpointPolicy(every_steps=1), KID)
    r = CliRunner().invoke(main, ["gc", str(d), "--keep", "1"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit | None), r.output
    assert "symbolic link" in r.output
    assert victim.read_bytes() == VICTIM
    assert len(list(d.glob("*.rk.h5"))) == 3


def test_hard_linked_lock_is_refused(tmp_path):
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    os.link(victim, d / ".rkckpt.lock")
    with pytest.raises(UnsafeFolderError, match="hard links"):
        FileStorage(d).save("x", b"1")
    assert victim.read_bytes() == VICTIM


def test_group_writable_folder_is_refused_with_the_fix(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    os.chmod(d, 0o770)
    with pytest.raises(UnsafeFolderError, match=r"writable by group or others \(mode 0770\).*chmod go-w"):
        CheckpointManager(d, CheckpointPolicy(every_steps=1), KID)
    assert not (d / ".rkckpt.lock").exists()


def _write_one(path: str) -> str:
    try:
        with CheckpointManager(path, CheckpointPolicy(every_steps=1), KID) as m:
            m.final(SnapshotResponse(SnapshotRequest(1), state(1)))
    except StorageError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_foreign_and_world_writable_folders_refused_for_a_normal_user(shared_tmp):
    theirs = os.path.join(shared_tmp, "theirs")  # prepared by another user (root here), open to all
    os.mkdir(theirs)
    os.chmod(theirs, 0o777)
    victim = symlink_out(os.path.join(theirs, ".rkckpt.lock"))
    give_to_nobody(victim)
    open_dir = os.path.join(shared_tmp, "mine-open")
    os.mkdir(open_dir)
    give_to_nobody(open_dir, 0o777)
    mine = os.path.join(shared_tmp, "mine")
    os.mkdir(mine)
    give_to_nobody(mine, 0o700)

    out = run_as_nobody(lambda: [_write_one(p) for p in (theirs, open_dir, mine)])
    assert out[0].startswith("UnsafeFolderError") and "owned by uid 0, not by you (uid 65534)" in out[0], out[0]
    assert out[1].startswith("UnsafeFolderError") and "writable by group or others (mode 0777)" in out[1], out[1]
    assert out[2] == "ok"
    assert os.path.exists(os.path.join(mine, f"{KID}-000000000001-full.rk.h5"))
    with open(victim, "rb") as f:
        assert f.read() == VICTIM
