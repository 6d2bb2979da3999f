"""Nothing blocks the status loop (issue 21): a resubmission waits for slurmctld on a worker
thread while the executor's real ``check_active_jobs`` keeps polling and deciding every other step.

The executor is built bare (no workflow, no cluster) around the real Monitor and a fake
Slurm query layer; the resubmission's sbatch is a function blocked on an Event, which
forces the window deterministically (no timing luck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from test_executor_monitor import MODES, FakeSlurm, rec

from snakemake_executor_plugin_rkslurm.executor import Executor
from snakemake_executor_plugin_rkslurm.monitor import Monitor, Pacer, Step
from snakemake_executor_plugin_rkslurm.policy import PolicySettings
from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord


def _bare_executor(tmp_path: Path, slurm: FakeSlurm, submit: Any) -> Executor:
    ex = object.__new__(Executor)
    ex.workflow = SimpleNamespace(
        executor_settings=SimpleNamespace(poll_interval=2.0, slow_poll_interval=5.0, keep_checkpoints=True, keep_successful_logs=True)
    )
    ex.status_rate_limiter = contextlib.nullcontext()
    ex.monitor = Monitor(slurm, PolicySettings(), MODES, signal_lead=10)
    ex.slurm = slurm
    ex._steps, ex._steps_lock = {}, threading.Lock()
    ex.pacer = Pacer(fast=2.0, slow=5.0)
    ex._resubmits = {}
    ex._submit_pool = ThreadPoolExecutor(max_workers=2)
    ex.logger = logging.getLogger("rkslurm-test")
    ex._events_path = tmp_path / "events.jsonl"
    ex._submit = submit
    ex.succeeded, ex.failed = [], []
    ex.report_job_success = lambda j: ex.succeeded.append(j.job.jobid)
    ex.report_job_error = lambda j, msg=None, **kw: ex.failed.append((j.job.jobid, msg))
    return ex


def _poll(ex: Executor, jobs: list[SubmittedJobInfo]) -> list[SubmittedJobInfo]:
    async def go() -> list[SubmittedJobInfo]:
        return [j async for j in ex.check_active_jobs(jobs)]

    return asyncio.run(go())


def test_a_resubmission_waiting_for_slurmctld_blocks_no_other_step(tmp_path: Path) -> None:
    slurm = FakeSlurm()
    release, started = threading.Event(), threading.Event()

    def blocked_sbatch(job: Any, step: Step) -> tuple[str, str]:
        started.set()
        assert release.wait(30), "the test never released sbatch"
        return "200", str(tmp_path / "200.log")

    ex = _bare_executor(tmp_path, slurm, blocked_sbatch)
    jobs = []
    for jobid, slurm_id in ((1, "100"), (2, "101")):
        step = Step(rule=f"r{jobid}", checkpoint_dir=None, partition="scavenger")
        step.submitted(slurm_id, None, 0.0)
        ex._steps[jobid] = step
        jobs.append(SubmittedJobInfo(job=SimpleNamespace(jobid=jobid, name=f"r{jobid}"), external_jobid=slurm_id))
    slurm.records["100"] = rec("CANCELLED", preempted=True)  # step 1 was preempted: resubmit
    slurm.records["101"] = rec("RUNNING", job_id="101")
    active = _poll(ex, jobs)
    assert [j.job.jobid for j in active] == [1, 2]
    assert started.wait(10)
    try:
        # sbatch of step 1 is stuck (slurmctld away); step 2 is still polled, and decided
        for _ in range(3):
            active = _poll(ex, active)
        slurm.records["101"] = rec("COMPLETED", job_id="101")
        active = _poll(ex, active)
        assert ex.succeeded == [2] and [j.job.jobid for j in active] == [1]
        assert slurm.asked[1:] == [["101"]] * 4  # step 1 left out while it has no new job id
    finally:
        release.set()
    ex._resubmits[1].result(timeout=10)
    slurm.records["200"] = rec("RUNNING", job_id="200")
    active = _poll(ex, active)  # picks up the new job id
    assert active[0].external_jobid == "200" and ex._steps[1].job_id == "200"
    active = _poll(ex, active)
    assert slurm.asked[-1] == ["200"] and ex.failed == []


def test_a_resubmission_that_fails_fails_only_its_step(tmp_path: Path) -> None:
    slurm = FakeSlurm()

    def refused(job: Any, step: Step) -> tuple[str, str]:
        raise RuntimeError("sbatch could not reach slurmctld for 10.0 min")

    ex = _bare_executor(tmp_path, slurm, refused)
    step = Step(rule="r1", checkpoint_dir=None, partition="scavenger")
    step.submitted("100", None, 0.0)
    ex._steps[1] = step
    slurm.records["100"] = JobRecord(job_id="100", state="CANCELLED", partition="scavenger", preempted=True)
    active = _poll(ex, [SubmittedJobInfo(job=SimpleNamespace(jobid=1, name="r1"), external_jobid="100")])
    ex._resubmits[1].exception(timeout=10)
    assert _poll(ex, active) == []
    assert ex.failed and "resubmission failed" in ex.failed[0][1]
