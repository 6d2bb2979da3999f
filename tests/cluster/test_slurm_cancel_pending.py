"""``slurmquery.cancel_pending`` on the real cluster: a waiting job is cancelled, a running one is never touched.

The executor cancels a waiting multi-rank job to resubmit it in another size; a job that started in the
meantime must keep running (a resubmission beside it would put two jobs on one checkpoint folder).
"""

from __future__ import annotations

import subprocess

import pytest

from fixtures_slurm import wait_until
from snakemake_executor_plugin_rkslurm import slurmquery

pytestmark = pytest.mark.slurm


def _sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-J", "rk-cancel-pending", "-p", "main", "-n", "1", "-o", "/dev/null", *args, "--wrap", "sleep 120"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.strip().split(";")[0]


def _state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20
    ).stdout.strip()


def test_cancel_pending_cancels_a_waiting_job_and_leaves_a_running_one(slurm_env: dict[str, str]) -> None:
    held = _sbatch("--hold")  # waits until released: PENDING for as long as the test needs
    running = _sbatch()
    try:
        wait_until(lambda: _state(running) == "RUNNING", 60, "the second job to start")
        assert _state(held) == "PENDING"
        assert slurmquery.cancel_pending(held) is True
        assert _state(held) in ("CANCELLED", "")
        assert slurmquery.cancel_pending(running) is False
        assert _state(running) == "RUNNING"  # not signalled: --state=PENDING is decided by slurmctld
    finally:
        slurmquery.cancel(held)
        slurmquery.cancel(running)
