"""Issue 14 on the real local cluster: a user's scancel, hard kills, a dead head
process, sbatch outages -- each failed before the fix (see the test docstrings).

Same setup as test_slurm_executor.py: ``snakemake --executor rkslurm`` on a
one-step workflow whose deterministic step script writes rkstep events. The
step runs on ``main`` (PreemptMode=OFF), so other users' `urgent` jobs on the
shared cluster cannot add preemptions to what a test counts.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_slurm import SlurmWorkflow

pytestmark = pytest.mark.slurm

PART = "main"


def _submitted_ids(out: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", out)


def _squeue_ids() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20).stdout.split())


def _bit_identical(w: SlurmWorkflow) -> None:
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()


def test_user_scancel_fails_the_step_at_once(slurm_workflow: SlurmWorkflow) -> None:
    """Before: CANCELLED (no PreemptTime) counted as a preemption; it took 11 scancels to fail the step."""
    w = slurm_workflow
    w.write(steps=400, delay=0.25, partition=PART)
    p = w.start()
    job = w.wait_running(p, min_steps=3)["job"]
    subprocess.run(["scancel", job], check=True, timeout=20)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "cancelled by scancel, not preempted" in out, out[-5000:]
    assert _submitted_ids(out) == [job], "a cancelled step must not be resubmitted"
    assert out.count("cancelled by scancel, not preempted") >= 1 and "Error in rule sim" in out
    assert len(w.events("start")) == 1
    # the checkpoint is kept for a deliberate rerun
    assert (w.root / ".snakemake/rkslurm/sim/_/rkslurm.progress.json").exists()


def _kill_and_finish(w: SlurmWorkflow, how: str) -> str:
    w.write(steps=40, delay=0.25, partition=PART)
    w.reference(40)
    p = w.start()
    start = w.wait_running(p, min_steps=4)
    if how == "sigkill":
        os.kill(int(start["pid"]), signal.SIGKILL)  # the step runs on this machine (the cluster's one node)
    else:
        subprocess.run(["scancel", "-s", "KILL", f"{start['job']}.0"], check=True, timeout=20)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-5000:]
    _bit_identical(w)
    starts = w.events("start")
    assert len(starts) == 2 and starts[1]["job"] != starts[0]["job"], w.trace()
    killed_at = max(e["step"] for e in w.trace() if e["event"] == "ckpt" and e["job"] == starts[0]["job"])
    assert starts[1]["step"] == killed_at >= 4, "the resubmission restores the killed attempt's newest checkpoint"
    assert "killed by a signal it could not catch after checkpoint progress" in out and "kill 1/3" in out, out[-5000:]
    assert out.count("kill 1/3") == 1 and "kill 2/3" not in out
    # both attempts' Slurm logs are kept after the success (the story of the step)
    for e in starts:
        assert (w.root / f".snakemake/slurm_logs/rule_sim/{e['job']}.log").exists()
    return out


def test_sigkill_of_the_step_restores_automatically(slurm_workflow: SlurmWorkflow) -> None:
    """Before: `kill -9` of the step ended FAILED 1:0 and the executor failed the step."""
    _kill_and_finish(slurm_workflow, "sigkill")


def test_scancel_kill_of_the_job_step_restores_automatically(slurm_workflow: SlurmWorkflow) -> None:
    """Before: `scancel -s KILL <job>.0` (no SIGTERM first) failed the step."""
    _kill_and_finish(slurm_workflow, "scancel-step")


def test_plain_error_exit_is_not_resubmitted(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    w.write(steps=40, delay=0.1, partition=PART, step_args="--fail-at 6")
    rc, out = w.run(timeout=180)
    assert rc != 0
    assert len(set(_submitted_ids(out))) == 1, out[-5000:]
    assert "job failed (FAILED" in out
    assert [e["event"] for e in w.trace()].count("start") == 1


SBATCH_FLAKY = """#!/bin/bash
# fails calls FIRST..LAST (counted in $0.count) the way sbatch does when slurmctld is down
n=$(( $(cat "$0.count" 2>/dev/null || echo 0) + 1 )); echo $n > "$0.count"
if [ $n -ge {first} ] && [ $n -le {last} ]; then
  echo "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)" >&2
  exit 1
fi
exec {real} "$@"
"""


def test_sbatch_outage_during_a_resubmission_is_survived(slurm_workflow: SlurmWorkflow, tmp_path: Path) -> None:
    """Before: one "Unable to contact slurm controller" from sbatch failed the step at once."""
    w = slurm_workflow
    real = shutil.which("sbatch")
    assert real
    bindir = tmp_path / "flakybin"
    bindir.mkdir()
    fake = bindir / "sbatch"
    fake.write_text(SBATCH_FLAKY.format(first=2, last=4, real=real))  # the first resubmission fails 3 times
    fake.chmod(0o755)
    w.write(steps=40, delay=0.25, partition=PART)
    w.reference(40)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    p = w.start("--rkslurm-submit-retry-minutes", "2", env=env)
    os.kill(int(w.wait_running(p, min_steps=4)["pid"]), signal.SIGKILL)  # a resubmission is due
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-5000:]
    _bit_identical(w)
    assert out.count("sbatch cannot reach slurmctld") == 3, out[-5000:]
    assert "sbatch worked again after 3 failed tries" in out
    assert int((bindir / "sbatch.count").read_text()) >= 5


def test_rerun_after_the_head_died_adopts_the_running_job(slurm_workflow: SlurmWorkflow) -> None:
    """Before: `kill -9` of snakemake, `--unlock`, rerun: a second job was submitted, refused, "exit code 1:0"."""
    w = slurm_workflow
    w.write(steps=80, delay=0.25, partition=PART)
    w.reference(80)
    p = w.start()
    job = w.wait_running(p, min_steps=3)["job"]
    p.kill()  # the head dies hard; its Slurm job runs on
    p.communicate(timeout=30)
    assert job in _squeue_ids()
    subprocess.run([sys.executable, "-m", "snakemake", "--unlock"], cwd=w.root, check=True, capture_output=True, timeout=120)
    rc, out = w.run(timeout=300)
    assert rc == 0, out[-5000:]
    assert f"adopting its running Slurm job {job}" in out, out[-5000:]
    assert _submitted_ids(out) == [], "no duplicate job"
    assert {e["job"] for e in w.events("start")} == {job} and len(w.events("start")) == 1
    _bit_identical(w)
    assert out.count("adopting its running Slurm job") == 1


def test_checkpoint_folder_deleted_mid_run_is_said_in_the_executor_log(slurm_workflow: SlurmWorkflow) -> None:
    """Before: the step's complaints went to a log inside the deleted folder; the executor said nothing."""
    w = slurm_workflow
    w.write(steps=400, delay=0.25, partition=PART)
    p = w.start()
    job = w.wait_running(p, min_steps=3)["job"]
    folder = w.root / ".snakemake/rkslurm/sim/_"
    shutil.rmtree(folder)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0  # the test step cannot write its next checkpoint and fails
    assert f"the checkpoint folder {folder} was deleted under job {job}" in out, out[-5000:]
    assert out.count("was deleted under job") == 1  # said once, not at every poll


def test_requeued_rerun_records_its_restart_count(slurm_workflow: SlurmWorkflow) -> None:
    """Before: the rerun Slurm requeued (same job id, Restarts=1) said restart=0."""
    from rkstep import StepPaths, attempts, read_events

    w = slurm_workflow
    w.write(steps=40, delay=0.25, partition="requeue", gate=8)
    w.reference(40)
    p = w.start("--rkslurm-keep-checkpoints")
    job = w.wait_running(p)["job"]
    w.preempt_when_running(p, 1)
    w.open_gate()
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-5000:]
    _bit_identical(w)
    runs = [a for a in attempts(read_events(StepPaths(w.root / ".snakemake/rkslurm/sim/_").events)) if a.job == job]
    assert len(runs) >= 2, runs
    assert [a.restart for a in runs] == list(range(len(runs)))  # 0, 1, ... (more if others' urgent jobs hit it too)
    assert runs[1].start_step == runs[0].stopped_step  # the rerun resumed where the victim stopped
