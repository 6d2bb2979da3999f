"""Slurm output parsing of the rkslurm executor (no cluster needed; the step folder is tests/rkstep/test_stepfolder.py)."""

from __future__ import annotations

import subprocess
import sys

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


def test_plugin_flags_have_help() -> None:
    out = subprocess.run([sys.executable, "-m", "snakemake", "--help"], capture_output=True, text=True, timeout=120).stdout
    for flag in ("max-preemptions", "max-timeouts", "poll-interval", "checkpoint-root", "keep-checkpoints", "signal-lead-time"):
        assert f"--rkslurm-{flag}" in out
    assert "--rkslurm-requeue" in out  # the stock settings, under our prefix
