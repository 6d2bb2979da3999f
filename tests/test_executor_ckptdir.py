"""Slurm output parsing of the rkslurm executor (no cluster needed; the step folder is tests/test_stepfolder.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snakemake_executor_plugin_rkslurm import slurmquery

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


def _shim(tmp_path: Path, name: str, script: str) -> None:
    p = tmp_path / "bin" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(0o755)


def test_query_survives_failing_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in scontrol/sacct (shell scripts on PATH) that fail like a restarting slurmctld / disabled accounting."""
    _shim(tmp_path, "scontrol", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1\n")
    _shim(tmp_path, "sacct", "echo '5|RUNNING|0:0|localhost|scavenger|00:00:03|UNLIMITED'\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    got = slurmquery.query(["5"])
    assert got["5"].state == "RUNNING" and got["5"].source == "sacct"
    _shim(tmp_path, "sacct", "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    with pytest.raises(slurmquery.QueryError, match="Unable to contact"):
        slurmquery.query(["5"])
    _shim(tmp_path, "scontrol", f"cat <<'EOF'\n{SCONTROL}EOF\n")
    got = slurmquery.query(["3", "99"])
    assert set(got) == {"3"}  # accounting disabled: scontrol alone answers, unknown ids are left out


def test_plugin_flags_have_help() -> None:
    out = subprocess.run([sys.executable, "-m", "snakemake", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("max-preemptions", "max-timeouts", "poll-interval", "checkpoint-root", "keep-checkpoints", "signal-lead-time"):
        assert f"--rkslurm-{flag}" in out
    assert "--rkslurm-requeue" in out  # the stock settings, under our prefix


def test_query_asks_scontrol_about_our_ids_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One `scontrol show job -o ID` per id of ours, never the whole cluster; a purged id goes to sacct."""
    asked = tmp_path / "asked"
    _shim(
        tmp_path,
        "scontrol",
        f'echo "$@" >> {asked}\nif [ "$4" = 99 ]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi\n'
        f"cat <<'EOF'\n{SCONTROL}EOF\n",
    )
    _shim(tmp_path, "sacct", f'echo "$@" >> {asked}\necho "99|COMPLETED|0:0|localhost|main|00:00:03|UNLIMITED"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    got = slurmquery.query(["3", "99"])
    assert got["3"].source == "scontrol" and got["99"].source == "sacct" and got["99"].preempted is None
    lines = asked.read_text().splitlines()
    assert lines[:2] == ["show job -o 3", "show job -o 99"]
    assert "-j 99 " in lines[2] + " " and "3" not in lines[2].split("-j ")[1].split()[0]


def test_tagged_jobs_finds_only_the_steps_own_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _shim(
        tmp_path,
        "squeue",
        "printf '5|rule_sim rkslurm:abc|RUNNING\\n6|rule_sim|RUNNING\\n7|rkslurm:abc|PENDING\\n8|rkslurm:abcd|RUNNING\\n'\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert slurmquery.tagged_jobs("rkslurm:abc") == [("5", "RUNNING"), ("7", "PENDING")]
    _shim(tmp_path, "squeue", "echo 'squeue: error: Unable to contact slurm controller' >&2; exit 1\n")
    with pytest.raises(slurmquery.QueryError):  # "cannot ask" must never read as "no job": no duplicate
        slurmquery.tagged_jobs("rkslurm:abc")
