"""``rkckpt-index.json`` is a cache: a damaged or lying index never hides or invents a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from chain_helpers import ckpt_name, write_steps
from helpers import chain_state
from rkckpt.chain import INDEX_NAME, latest_restorable
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy
from rkckpt.storage import FileStorage
from rkstep.events import EventWriter
from rkstep.folder import StepFolder
from rkstep.protocol import STOP_MARKER, StepPaths

KID = "idx"


def state(step: int):
    return chain_state(KID, step)


def name(step: int, kind: str) -> str:
    return ckpt_name(KID, step, kind)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ck"
    write_steps(d, KID, range(1, 6))  # full 1, delta 2 3, full 4, delta 5
    assert (d / INDEX_NAME).exists()
    return d


def edit_index(d, fn):
    doc = json.loads((d / INDEX_NAME).read_text())
    fn(doc["entries"])
    (d / INDEX_NAME).write_text(json.dumps(doc))


def restored_step(d) -> int | None:
    with CheckpointManager(d, CheckpointPolicy(every_steps=1), KID) as m:  # what rkrun does first
        rp = m.latest()
        return None if rp is None else rp.step


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def test_deeply_nested_index_is_ignored_by_every_tool(folder):
    (folder / INDEX_NAME).write_text("[" * 100000)
    assert restored_step(folder) == 5
    assert cli("ls", folder, "--json").exit_code == 0
    assert json.loads(cli("latest", folder, "--json").output)["step"] == 5
    (folder / INDEX_NAME).write_text("[" * 100000)
    assert cli("gc", folder, "--keep", 1).exit_code == 0
    (folder / INDEX_NAME).write_text("{" * 100000)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run(
        [sys.executable, "-c", "from rkckpt.cli import main; main()", "latest", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr and "step 5" in p.stdout, p.stderr


def test_wrong_types_in_index_entries(folder):
    edit_index(folder, lambda es: es[name(5, "delta")].update(step="five"))
    assert restored_step(folder) == 5
    edit_index(folder, lambda es: es[name(4, "full")].update(size=[1], state_digest=7))
    assert latest_restorable(FileStorage(folder), KID).step == 5
    edit_index(folder, lambda es: es.update({name(3, "delta"): "not an entry", "x": 5}))
    assert json.loads(cli("latest", folder, "--json").output)["step"] == 5


def test_index_lying_about_kind_does_not_hide_a_checkpoint(folder):
    # the newest chain's full is said to be a delta with an unknown parent
    edit_index(folder, lambda es: es[name(4, "full")].update(kind="delta", parent_digest="deadbeef"))
    assert restored_step(folder) == 5


def test_index_lying_about_digest_is_checked_against_the_files(folder):
    edit_index(folder, lambda es: es[name(4, "full")].update(state_digest="deadbeef"))
    rp = latest_restorable(FileStorage(folder), KID, warn=False)
    assert rp.step == 5 and rp.skipped == [] and rp.chain == [name(4, "full"), name(5, "delta")]
    np.testing.assert_array_equal(rp.checkpoint.region("small"), state(5).region("small"))


def test_index_claiming_a_file_is_broken_is_rechecked(folder):
    edit_index(folder, lambda es: es[name(5, "delta")].update(error="checksum mismatch (made up)"))
    assert restored_step(folder) == 5


def test_oversized_index_is_not_read(folder):
    with open(folder / INDEX_NAME, "wb") as f:
        f.truncate(17 << 20)  # sparse: bigger than any index we write
    assert restored_step(folder) == 5


def read_progress(d):
    return StepFolder(d).progress()


def test_executor_ignores_damaged_stop_marker(tmp_path):
    d = tmp_path / "step"
    d.mkdir()
    EventWriter(StepPaths(d).events, job="1").checkpoint(40)  # progress comes from the step's events, not file names
    for junk in ("[" * 100000, '{"step": "five"}', '{"step": 10' + " " * (1 << 20) + "}", "\xff\xfe"):
        (d / STOP_MARKER).write_text(junk, errors="surrogateescape")
        assert read_progress(d) == 40
    (d / STOP_MARKER).write_text('{"step": 50}')
    assert read_progress(d) == 50


def test_ls_shows_the_files_structure_not_the_index(folder):
    edit_index(folder, lambda es: es[name(4, "full")].update(state_digest="deadbeef"))
    rows = {x["name"]: x for x in json.loads(cli("ls", folder, "--json").output)}
    assert rows[name(5, "delta")]["parent"] == name(4, "full") and all(x["valid"] for x in rows.values())


def test_executor_fresh_stop_step_survives_a_damaged_marker(tmp_path):

    from snakemake_executor_plugin_rkslurm.monitor import Monitor, Step

    step = Step(rule="r", checkpoint_dir=tmp_path)
    for junk in ("[" * 100000, '{"step": "five"}', "[1, 2]", "\x00\x01"):
        (tmp_path / STOP_MARKER).write_text(junk)
        assert Monitor._fresh_stop_step(None, step) is None  # type: ignore[arg-type]
    (tmp_path / STOP_MARKER).write_text('{"step": 120, "signal": "SIGUSR1"}')
    assert Monitor._fresh_stop_step(None, step) == 120  # type: ignore[arg-type]
