"""Checkpoint folders and Slurm output parsing of the rkslurm executor (no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_executor_plugin_rkslurm import ckptdir, slurmquery

# --------------------------------------------------------------- folders


def test_wildcards_key_is_stable_and_safe() -> None:
    assert ckptdir.wildcards_key({}) == "_"
    assert ckptdir.wildcards_key({"b": "2", "a": "x/y"}) == "a=x%2Fy,b=2"
    assert ckptdir.wildcards_key({"a": "x/y", "b": 2}) == ckptdir.wildcards_key({"b": "2", "a": "x/y"})
    assert "/" not in ckptdir.wildcards_key({"a": "../../etc"})


def test_default_dir_and_snakefile_helper_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = ckptdir.default_checkpoint_dir("simulate", {"size": "64"})
    assert d == tmp_path / ".snakemake/rkslurm/simulate/size=64"

    class WC(dict):
        pass

    assert ckptdir.rkslurm_checkpoint_dir("simulate")(WC(size="64")) == str(d)
    assert ckptdir.rkslurm_checkpoint_dir("simulate", root="/x")(WC()) == "/x/simulate/_"


def test_prepare_resumes_same_fingerprint_and_wipes_changed(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    r = ckptdir.prepare(d, "aaa")
    assert r.fresh and r.stale_reason is None
    (d / "state-000000000010-full.rkcp").write_bytes(b"x")
    r = ckptdir.prepare(d, "aaa")
    assert not r.fresh and r.stale_reason is None
    assert (d / "state-000000000010-full.rkcp").exists()
    r = ckptdir.prepare(d, "bbb")
    assert r.fresh and r.stale_reason and "changed" in r.stale_reason
    assert not (d / "state-000000000010-full.rkcp").exists()
    assert json.loads((d / ckptdir.FINGERPRINT_FILE).read_text())["fingerprint"] == "bbb"


def test_prepare_wipes_folder_without_fingerprint(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    (d / "old.rkcp").write_bytes(b"x")
    r = ckptdir.prepare(d, "aaa")
    assert r.stale_reason and "no fingerprint" in r.stale_reason
    assert not (d / "old.rkcp").exists()


def test_prepare_treats_corrupt_fingerprint_as_stale(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir()
    (d / ckptdir.FINGERPRINT_FILE).write_text("{not json")
    (d / "x-000000000001-full.rkcp").write_bytes(b"x")
    r = ckptdir.prepare(d, "aaa")
    assert r.stale_reason is not None
    assert not (d / "x-000000000001-full.rkcp").exists()


def test_fingerprint_tracks_inputs_params_code(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_text("a")
    base = ckptdir.fingerprint([str(f)], {"n": 1}, "cmd", "r")
    assert base == ckptdir.fingerprint([str(f)], {"n": 1, ckptdir.PARAM_NAME: "/elsewhere"}, "cmd", "r")
    assert base != ckptdir.fingerprint([str(f)], {"n": 2}, "cmd", "r")
    assert base != ckptdir.fingerprint([str(f)], {"n": 1}, "cmd2", "r")
    f.write_text("bb")
    assert base != ckptdir.fingerprint([str(f)], {"n": 1}, "cmd", "r")


def test_fingerprint_is_by_content_not_mtime(tmp_path: Path) -> None:
    """A touched or copied input keeps the folder resumable (the local and rkslurm executors agree)."""
    import os

    f = tmp_path / "in.txt"
    f.write_text("same")
    base = ckptdir.fingerprint([str(f)], {"n": 1}, "cmd", "r")
    os.utime(f, (1, 1))
    assert ckptdir.fingerprint([str(f)], {"n": 1}, "cmd", "r") == base
    f.write_text("diff")
    os.utime(f, (1, 1))
    assert ckptdir.fingerprint([str(f)], {"n": 1}, "cmd", "r") != base


def test_read_progress_from_marker_names_and_progress_file(tmp_path: Path) -> None:
    assert ckptdir.read_progress(tmp_path / "missing") is None
    assert ckptdir.read_progress(tmp_path) is None
    (tmp_path / "wave-000000000012-full.rkcp").write_bytes(b"")
    (tmp_path / "wave-000000000020-delta.rkcp").write_bytes(b"")
    assert ckptdir.read_progress(tmp_path) == 20
    (tmp_path / ckptdir.STOP_MARKER).write_text(json.dumps({"step": 23, "signal": "SIGTERM"}))
    assert ckptdir.read_progress(tmp_path) == 23
    (tmp_path / ckptdir.PROGRESS_FILE).write_text(json.dumps({"step": 30}))
    assert ckptdir.read_progress(tmp_path) == 30
    (tmp_path / ckptdir.STOP_MARKER).write_text("garbage")
    assert ckptdir.read_progress(tmp_path) == 30


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    ckptdir.atomic_write_text(tmp_path / "a.json", "1")
    ckptdir.atomic_write_text(tmp_path / "a.json", "2")
    assert (tmp_path / "a.json").read_text() == "2"
    assert os.listdir(tmp_path) == ["a.json"]


# --------------------------------------------------------------- Slurm output

SCONTROL = (
    "JobId=3 JobName=x UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=1 Nice=0 Account=root QOS=normal "
    "JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=1:0 "
    "RunTime=00:00:06 TimeLimit=00:01:00 TimeMin=N/A SubmitTime=2026-11-29T04:09:10 EligibleTime=2026-11-29T04:09:10 "
    "StartTime=2026-11-29T04:09:12 EndTime=2026-11-29T04:09:21 PreemptEligibleTime=2026-11-29T04:09:12 "
    "PreemptTime=2026-11-29T04:09:20 Partition=scavenger NodeList=localhost BatchHost=localhost "
    "WorkDir=/tmp/a dir with spaces StdOut=/tmp/o.log\n"
    "JobId=13 JobName=y JobState=PENDING Reason=BeginTime Requeue=1 Restarts=2 ExitCode=0:0 RunTime=00:00:00 "
    "TimeLimit=UNLIMITED StartTime=2026-11-29T04:11:20 PreemptTime=2026-11-29T04:11:11 Partition=requeue NodeList=(null)\n"
)


def test_parse_scontrol() -> None:
    jobs = slurmquery.parse_scontrol(SCONTROL)
    a, b = jobs["3"], jobs["13"]
    assert (a.state, a.exit_code, a.restarts, a.node, a.partition) == ("FAILED", "1:0", 0, "localhost", "scavenger")
    assert (a.run_seconds, a.time_limit_seconds, a.requeue, a.preempted) == (6, 60, True, True)
    assert (b.state, b.restarts, b.node, b.time_limit_seconds) == ("PENDING", 2, None, None)
    assert b.preempted is False  # preempted in an earlier run, requeued since


def test_parse_sacct_and_durations() -> None:
    jobs = slurmquery.parse_sacct(
        "7|PREEMPTED|0:15|localhost|scavenger|00:00:12|00:30:00\n8|CANCELLED by 0|0:0|None assigned|main|00:00:00|UNLIMITED\n"
    )
    assert jobs["7"].state == "PREEMPTED" and jobs["7"].run_seconds == 12 and jobs["7"].time_limit_seconds == 1800
    assert jobs["8"].node is None and jobs["8"].time_limit_seconds is None
    assert slurmquery.parse_duration("1-02:03:04") == 93784
    assert slurmquery.parse_duration("05:06") == 306
    assert slurmquery.parse_duration("1-02:03") == 93780
    assert slurmquery.parse_duration("INFINITE") is None


def test_plugin_flags_have_help() -> None:
    out = subprocess.run([sys.executable, "-m", "snakemake", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("max-preemptions", "max-timeouts", "poll-interval", "checkpoint-root", "keep-checkpoints", "signal-lead-time"):
        assert f"--rkslurm-{flag}" in out
    assert "--rkslurm-requeue" in out  # the stock settings, under our prefix


def test_declared_fingerprint_matches_the_workflow_preparation_script(tmp_path: Path) -> None:
    """Local executor (prepare_ckpt.py) and rkslurm compute the same value: switching keeps the folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows" / "wavesim" / "scripts"))
    import prepare_ckpt

    model = tmp_path / "velocity.npy"
    model.write_bytes(b"model bytes")
    text = "grid=8 8 8 steps=100"
    d = tmp_path / "ck"
    assert prepare_ckpt.main([str(d), text, str(model)]) == 0
    (d / "x-000000000010-full.rkcp").write_bytes(b"c")
    params = {"fingerprint": text, "steps": 100, ckptdir.PARAM_NAME: str(d)}
    digest = ckptdir.step_fingerprint("simulate", params, "rkrun ...", [str(model)])
    r = ckptdir.prepare(d, digest)
    assert r.stale_reason is None and not r.fresh and (d / "x-000000000010-full.rkcp").exists()
    # another declared text, or other model contents: a different fingerprint
    assert ckptdir.step_fingerprint("simulate", {**params, "fingerprint": "grid=9 9 9"}, "", [str(model)]) != digest
    model.write_bytes(b"other model")
    assert ckptdir.step_fingerprint("simulate", params, "rkrun ...", [str(model)]) != digest
