"""The chain tools on hostile folders: clear one-line errors, names checked against metadata, safe printing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from asuser import cli_as_nobody, enterable_tmp
from helpers import flat_state
from hostile_inputs import KINDS, VICTIM, flip_byte, give_to_nobody, plant
from rkckpt import container
from rkckpt.chain import checkpoint_name, describe, latest_restorable
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.storage import FileStorage, open_storage

KID = "hx"


def state(step: int, kid: str = KID) -> Checkpoint:
    return flat_state(kid, step, 512)


def name(step: int, kind: str, kid: str = KID) -> str:
    return checkpoint_name(kid, step, kind)


def write(d, steps, kid: str = KID, full_every: int = 2):
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=full_every, keep_chains=10), kid) as m:
        for s in steps:
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s, kid)))


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def test_folder_without_search_permission_is_a_clear_error():
    with enterable_tmp() as base:
        d = os.path.join(base, "ck")
        write(d, [1, 2, 3])
        give_to_nobody(d, 0o600)  # the owner may read the names but not search the folder
        for args in (["ls", d], ["latest", d], ["gc", d, "--keep", "1"]):
            out = cli_as_nobody(args)
            assert out["exception"] is None, out
            assert out["exit_code"] == 1 and "permission denied" in out["output"] and d in out["output"], out
            assert "Traceback" not in out["output"]


def test_missing_folder_is_an_error_for_ls_and_gc(tmp_path):
    for args in (["ls", tmp_path / "nope"], ["ls", tmp_path / "nope", "--json"], ["gc", tmp_path / "nope", "--keep", 1]):
        r = run(*args)
        assert r.exit_code == 1 and "no such checkpoint folder" in r.output
    (tmp_path / "file").write_text("x")
    assert "not a folder" in run("ls", tmp_path / "file").output
    assert not (tmp_path / "nope").exists()


def test_every_command_fails_in_one_style(tmp_path):
    """Folder commands and file commands end the same way: one ``rkckpt: error: FILE: problem`` line, status 1."""
    missing = tmp_path / "nope"
    for args in (
        ["ls", missing],
        ["gc", missing, "--keep", 1],
        ["inspect", missing],
        ["convert", missing, tmp_path / "o.rkcp"],
    ):
        r = run(*args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, (args, r.output)
        assert lines[0].startswith(f"rkckpt: error: {missing}: "), (args, r.output)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_hostile_kind_under_a_checkpoint_name_is_passed_over(tmp_path, kind):
    """A FIFO, symlink, huge sparse file, folder, damaged or foreign file named as the newest checkpoint:
    restore and every folder command pass it over (never block, follow or allocate), and verify names it."""
    d = tmp_path / "ck"
    write(d, [1, 2, 3])
    planted = plant(kind, d / name(4, "full"), donor=d / name(1, "full"))
    assert latest_restorable(FileStorage(d, create=False), KID, warn=False).step == 3
    for args in (["ls", d, "--json"], ["gc", d, "--keep", 1, "--dry-run"], ["latest", d, "--json"]):
        r = run(*args)
        assert r.exit_code == 0 and "Traceback" not in r.output, (args, r.output)
    assert json.loads(r.output)["step"] == 3
    if kind in ("fifo", "symlink", "sparse", "truncated", "bit-flipped"):
        r = run("verify", planted)
        assert r.exit_code == 1 and f"BAD {planted}: " in r.output, r.output
    if kind == "symlink":
        assert (tmp_path / f"victim-of-{planted.name}").read_bytes() == VICTIM


def test_step_in_the_name_must_match_the_metadata(tmp_path, caplog):
    d = tmp_path / "ck"
    write(d, [1, 2, 3, 4, 5])
    shutil.copy(d / name(1, "full"), d / name(900, "full"))  # holds step 1
    rp = latest_restorable(FileStorage(d), KID)
    assert rp.step == 5
    assert rp.skipped == [(name(900, "full"), "named step 900 but its metadata says step 1")]
    assert "named step 900" in caplog.text
    rows = {r.entry.name: r.status for r in describe(FileStorage(d))}
    assert rows[name(900, "full")] == "named step 900 but its metadata says step 1"
    with CheckpointManager(d, CheckpointPolicy(every_steps=1), KID) as m:
        assert m.latest().step == 5


def test_kernel_id_inside_chain_files_is_checked(tmp_path):
    d = tmp_path / "ck"
    write(d, [1, 2, 3])
    other = tmp_path / "other"
    write(other, [4, 5], kid="zz")
    shutil.copy(other / name(4, "full", "zz"), d / name(4, "full"))  # a full of kernel zz under our name
    rp = latest_restorable(FileStorage(d), KID, warn=False)
    assert rp.step == 3
    assert rp.skipped == [(name(4, "full"), "named for kernel 'hx' but its metadata says kernel 'zz'")]


def test_inspect_and_ls_escape_control_characters(tmp_path):
    evil = "k\x1b]0;owned\x07\x1b[2J\u202e"
    ck = state(1, evil)
    ck.metadata.custom["note"] = "\x1b[31mred"
    p = tmp_path / "evil.rkcp"
    container.write(p, ck)
    r = run("inspect", p)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\u202e" not in r.output
    assert "\\x1b]0;owned\\x07" in r.output and "\\x1b[31mred" in r.output
    assert json.loads(run("inspect", p, "--json").output)["metadata"]["kernel_id"] == evil  # JSON escapes by itself
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(p, d / name(1, "full", "k\x1b[2J"))
    for args in (("ls", d), ("latest", d), ("gc", d, "--keep", 1, "--dry-run")):
        r = run(*args)
        assert "\x1b" not in r.output, args


@pytest.mark.s3
def test_errors_name_the_object_not_a_spool_file(s3_server):
    url = f"s3://{s3_server.bucket()}/names"
    s = open_storage(url, **s3_server.options())
    with CheckpointManager(s, CheckpointPolicy(every_steps=1, full_every=0, keep_chains=10), KID) as m:
        for step in (1, 2):
            m.final(SnapshotResponse(SnapshotRequest(step), state(step)))
    blob = bytearray(s.load(name(2, "full")))
    flip_byte(blob, -7, 0x40)
    s.save(name(2, "full"), bytes(blob))
    rp = latest_restorable(s, KID, warn=False)
    assert rp.step == 1 and rp.skipped[0][0] == name(2, "full")
    for text in (rp.skipped[0][1], *(r.status for r in describe(s))):
        assert "rkckpt-dl-" not in text and "/tmp" not in text and "<checkpoint>" not in text, text


def test_write_errors_name_the_checkpoint_being_written(tmp_path):
    from rkckpt.errors import CheckpointError
    from rkckpt.flags import CHUNK_PART
    from rkckpt.model import Chunk, ChunkType

    bad = state(7)
    bad.chunks.append(Chunk(int(ChunkType.CUSTOM), 9, b"piece", CHUNK_PART))  # the encoder refuses this
    with CheckpointManager(tmp_path / "ck", CheckpointPolicy(every_steps=1), KID) as m, pytest.raises(CheckpointError) as info:
        m.final(SnapshotResponse(SnapshotRequest(7), bad))
    assert info.value.source == str(tmp_path / "ck" / name(7, "full"))
    assert "<checkpoint>" not in str(info.value) and ".rkckpt-tmp-" not in str(info.value)


def test_a_link_to_a_valid_checkpoint_of_another_run_is_never_restored(tmp_path, caplog):
    """A symlink under a checkpoint's name is refused even when it points at a *valid* checkpoint with the same
    kernel and a newer step (another run's folder): restore and ``ls`` pass it over, the real chain stays newest."""
    d, other = tmp_path / "ck", tmp_path / "other-run"
    write(d, [1, 2, 3])
    write(other, [1, 2, 3, 4], full_every=1)
    planted = d / name(4, "full")
    planted.symlink_to(other / name(4, "full"))
    rp = latest_restorable(FileStorage(d, create=False), KID)
    assert rp.step == 3
    assert [n for n, _ in rp.skipped] == [name(4, "full")]
    assert "symbolic link" in dict(rp.skipped)[name(4, "full")]
    rows = {r.entry.name: r.status for r in describe(FileStorage(d, create=False))}
    assert "symbolic link" in rows[name(4, "full")]
    r = run("latest", d, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["step"] == 3, r.output
    assert os.path.islink(planted) and (other / name(4, "full")).is_file()  # neither the link nor its target is touched


@pytest.mark.parametrize("fmt", ["rk.h5", "rkcp"])
def test_a_link_swapped_in_after_the_folder_was_looked_at_is_refused_when_opened(tmp_path, monkeypatch, fmt):
    """The window between ``local_path``'s ``lstat`` and the open: the name is a regular file when looked at,
    a link to another run's valid checkpoint when opened. The open itself refuses it (``O_NOFOLLOW``)."""
    from rkckpt.chain import open_source, read_region
    from rkckpt.errors import CheckpointError

    d, other = tmp_path / "ck", tmp_path / "other-run"
    for folder, steps in ((d, [4]), (other, [4])):
        with CheckpointManager(folder, CheckpointPolicy(every_steps=1, full_every=1, checkpoint_format=fmt), KID) as m:
            for s in steps:
                m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))
    n = checkpoint_name(KID, 4, "full", fmt)
    storage = FileStorage(d, create=False)
    assert storage.local_path(n) is not None  # looked at: a regular file
    looked = storage.local_path
    monkeypatch.setattr(storage, "local_path", lambda name: looked(name) or storage.path(name))  # the lstat answer, kept
    (d / n).unlink()
    (d / n).symlink_to(other / n)  # swapped in after the look
    with pytest.raises(CheckpointError, match="symbolic link"):
        open_source(storage, n).close()
    with pytest.raises(CheckpointError, match="symbolic link"):
        read_region(storage, n, state(4).regions().popitem()[0])
    assert (other / n).is_file() and os.path.islink(d / n)
