"""The rkslurm executor: stock Slurm submission, our own status loop.

Why a subclass and not a fork: accounts, partitions, gres, slurm_extra and
log handling stay the stock plugin's (pinned 2.8.0). We only
- add sbatch options per submission (``--signal``, ``--requeue``, excluded
  nodes, ``RKSLURM_CHECKPOINT_DIR`` in the job's environment) through a thin
  wrapper around the stock module's ``get_submit_command``;
- capture resubmissions so Snakemake keeps seeing one job per step (the
  Slurm id of the SubmittedJobInfo is swapped in place, no retry attempt);
- replace ``check_active_jobs`` with a loop that asks :mod:`.slurmquery` and
  lets :func:`.policy.decide` choose wait | succeed | resubmit | fail.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import snakemake_executor_plugin_slurm as _stock
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from . import ckptdir, slurmquery
from .policy import (
    Action,
    JobObservation,
    PolicySettings,
    SlurmJobState,
    StepHistory,
    decide,
    parse_exit_code,
    parse_state,
)

_SUBMIT_CONTEXT = threading.local()
#: seconds of slack around Slurm's time-limit signal: sbatch(1) says --signal
#: "may be sent up to 60 seconds earlier than specified"
_LIMIT_CHECK_SLACK = 60
_original_get_submit_command = _stock.get_submit_command


def _get_submit_command(job, params, settings=None, failed_nodes=None, array_job=False) -> str:
    """Stock command plus what the current thread's rkslurm submission asks for."""
    call = _original_get_submit_command(job, params, settings=settings, failed_nodes=failed_nodes, array_job=array_job)
    ctx = getattr(_SUBMIT_CONTEXT, "value", None)
    if ctx is None:
        return call
    env_prefix, extra = ctx
    if not call.startswith("sbatch "):
        return call
    return f"{env_prefix} sbatch {extra} " + call[len("sbatch ") :]


if getattr(_stock.get_submit_command, "__name__", "") != "_get_submit_command":
    _stock.get_submit_command = _get_submit_command


@dataclass
class Step:
    """What we know about one Snakemake job (a step) across its Slurm jobs."""

    rule: str
    #: local checkpoint folder (None when the rule points at a storage URL we cannot inspect)
    checkpoint_dir: Path | None
    #: what the job gets as RKSLURM_CHECKPOINT_DIR (the folder, or the rule's URL)
    export: str = ""
    history: StepHistory = field(default_factory=StepHistory)
    partition: str | None = None
    submitted_at: float = 0.0


class Executor(_stock.Executor):
    def __post_init__(self, test_mode: bool = False) -> None:
        super().__post_init__(test_mode=test_mode)
        s = self.workflow.executor_settings
        if self.array_jobs:
            self.logger.warning(
                "rkslurm: array jobs are not supported (each step must be resubmittable on its own); submitting one job per step."
            )
            self.array_jobs = set()
        self._steps: dict[int, Step] = {}
        self._steps_lock = threading.Lock()
        self._policy = PolicySettings(
            max_preemptions=int(s.max_preemptions),
            max_timeouts=int(s.max_timeouts),
            max_node_failures=int(s.max_node_failures),
        )
        self._preempt_modes = slurmquery.partition_preempt_modes()
        self._default_partition = slurmquery.default_partition()
        self._query_failures = 0
        self._last_query_warning = 0.0
        self.next_seconds_between_status_checks = float(s.poll_interval)
        self._events_path = Path(s.checkpoint_root).absolute() / "events.jsonl"

    # ------------------------------------------------------------ submission

    def _checkpoint_dir_for(self, job: JobExecutorInterface) -> Path | str:
        """The step's folder; a URL override (``s3://…``) is returned as a string."""
        override = job.resources.get(ckptdir.PARAM_NAME) if hasattr(job, "resources") else None
        params = getattr(job, "params", None)
        if not override and params is not None and hasattr(params, "get"):
            override = params.get(ckptdir.PARAM_NAME)
        if override:
            return str(override) if "://" in str(override) else Path(str(override)).absolute()
        wc = getattr(job, "wildcards", None)
        wildcards = dict(wc.items()) if wc is not None and hasattr(wc, "items") else {}
        return ckptdir.default_checkpoint_dir(job.name, wildcards, self.workflow.executor_settings.checkpoint_root)

    def _fingerprint(self, job: JobExecutorInterface) -> str:
        rule = getattr(job, "rule", None)
        code = ""
        if rule is not None:
            code = str(getattr(rule, "shellcmd", None) or "")
            run_func = getattr(rule, "run_func", None)
            if not code and run_func is not None:
                c = getattr(run_func, "__code__", None)
                code = repr(c.co_code) if c is not None else repr(run_func)
        params = {}
        p = getattr(job, "params", None)
        if p is not None and hasattr(p, "items"):
            params = {str(k): v for k, v in p.items()}
        return ckptdir.fingerprint([str(f) for f in job.input], params, code, job.name)

    def _partition_of(self, job: JobExecutorInterface) -> str | None:
        return job.resources.get("slurm_partition") or self._default_partition

    def _preemptible(self, partition: str | None) -> bool:
        return self._preempt_modes.get(partition or "", "OFF") not in ("OFF", "")

    def _submit_context(self, step: Step) -> tuple[str, str]:
        s = self.workflow.executor_settings
        env = f"{ckptdir.ENV_VAR}={shlex.quote(step.export)}"
        extra = []
        lead = int(s.signal_lead_time)
        if lead > 0:
            extra.append(f"--signal=TERM@{lead}")
        if not s.requeue and not s.no_requeue:
            # let Slurm requeue (same job id) where the partition says REQUEUE
            extra.append("--requeue")
        return env, " ".join(extra)

    def run_job(self, job: JobExecutorInterface) -> None:
        """First submission of a step: prepare its checkpoint folder, then sbatch."""
        if job.is_group():
            return super().run_job(job)
        try:
            path = self._checkpoint_dir_for(job)
            if isinstance(path, str):
                self.logger.warning(
                    f"rkslurm: rule {job.name} checkpoints to {path}: passed on as is; without a local folder rkslurm cannot "
                    "check its fingerprint or progress (time-limit continuation needs progress), nor remove it after success."
                )
                step = Step(rule=job.name, checkpoint_dir=None, export=path, partition=self._partition_of(job))
            else:
                prep = ckptdir.prepare(path, self._fingerprint(job))
                if prep.stale_reason:
                    self.logger.warning(f"rkslurm: starting rule {job.name} fresh; old checkpoints in {path} removed: {prep.stale_reason}.")
                elif not prep.fresh:
                    self.logger.info(
                        f"rkslurm: rule {job.name} will restore from its checkpoint folder {path} (step {ckptdir.read_progress(path)})."
                    )
                step = Step(rule=job.name, checkpoint_dir=path, export=str(path), partition=self._partition_of(job))
        except Exception as e:  # noqa: BLE001 - report, never crash the submit thread
            self._report_job_error_threadsafe(SubmittedJobInfo(job), f"rkslurm: cannot prepare the checkpoint folder: {e}")
            return
        with self._steps_lock:
            self._steps[job.jobid] = step
        _SUBMIT_CONTEXT.value = self._submit_context(step)
        try:
            super().run_job(job)
        finally:
            _SUBMIT_CONTEXT.value = None

    def _report_job_submission_threadsafe(self, job_info: SubmittedJobInfo) -> None:
        capture = getattr(_SUBMIT_CONTEXT, "capture", None)
        if capture is not None:
            capture["info"] = job_info
            return
        self._record_submission(job_info)
        super()._report_job_submission_threadsafe(job_info)

    def _report_job_error_threadsafe(self, job_info: SubmittedJobInfo, msg: str) -> None:
        capture = getattr(_SUBMIT_CONTEXT, "capture", None)
        if capture is not None:
            capture["error"] = msg
            return
        super()._report_job_error_threadsafe(job_info, msg)

    def _record_submission(self, job_info: SubmittedJobInfo) -> None:
        with self._steps_lock:
            step = self._steps.get(job_info.job.jobid)
        if step is None:
            return
        log = str((job_info.aux or {}).get("slurm_logfile", "")) or None
        step.history = step.history.with_submission(str(job_info.external_jobid), log, self._progress(step))
        step.submitted_at = time.time()
        self._event(step, "submitted", job_id=str(job_info.external_jobid), log=log)

    def _resubmit_blocking(self, job: JobExecutorInterface, step: Step) -> tuple[SubmittedJobInfo | None, str | None]:
        """sbatch the step again in this thread, without telling Snakemake."""
        capture: dict[str, Any] = {}
        _SUBMIT_CONTEXT.capture = capture
        _SUBMIT_CONTEXT.value = self._submit_context(step)
        try:
            _stock.Executor.run_job(self, job)
        finally:
            _SUBMIT_CONTEXT.capture = None
            _SUBMIT_CONTEXT.value = None
        return capture.get("info"), capture.get("error")

    # ------------------------------------------------------------ status loop

    def _event(self, step: Step, event: str, **kw: Any) -> None:
        """Append one line to <checkpoint-root>/events.jsonl (the run's timeline)."""
        rec = {"t": round(time.time(), 3), "rule": step.rule, "checkpoint_dir": step.export, "event": event, **kw}
        try:
            self._events_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._events_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:
            pass

    def _observe(self, job_info: SubmittedJobInfo, step: Step, rec: slurmquery.JobRecord | None) -> JobObservation:
        job_id = str(job_info.external_jobid)
        raw = rec.state if rec else None
        state = parse_state(raw) if rec else SlurmJobState.UNKNOWN
        code, sig = parse_exit_code(rec.exit_code if rec else None)
        partition = (rec.partition if rec else None) or step.partition
        requeue_on_preempt = self._preempt_modes.get(partition or "", "") == "REQUEUE" and (
            rec.requeue if rec and rec.requeue is not None else True
        )
        stopped = self._fresh_stop_step(step)
        # A victim that exits within its GraceTime ends FAILED (its own exit
        # code), not PREEMPTED; slurmctld's PreemptTime tells the truth.
        if rec is not None and rec.preempted and state in (SlurmJobState.FAILED, SlurmJobState.CANCELLED):
            state = SlurmJobState.PREEMPTED
        # A step that stopped on our --signal lead before its time limit ends
        # FAILED, not TIMEOUT: present it to the policy as the timeout it is.
        # Slurm may send the signal up to 60 s earlier than the lead asks for.
        lead = int(self.workflow.executor_settings.signal_lead_time)
        if (
            rec is not None
            and not rec.preempted
            and state in (SlurmJobState.FAILED, SlurmJobState.CANCELLED)
            and stopped is not None
            and rec.time_limit_seconds
            and rec.run_seconds is not None
            and rec.run_seconds >= rec.time_limit_seconds - lead - _LIMIT_CHECK_SLACK
        ):
            state = SlurmJobState.TIMEOUT
        log = str((job_info.aux or {}).get("slurm_logfile", "")) or None
        return JobObservation(
            job_id=job_id,
            state=state,
            exit_code=code,
            signal=sig,
            restarts=rec.restarts if rec else None,
            node=rec.node if rec else None,
            partition=partition,
            requeue_on_preempt=requeue_on_preempt,
            checkpoint_step=self._progress(step),
            stopped_step=stopped,
            log_path=log,
            raw_state=raw,
        )

    @staticmethod
    def _progress(step: Step) -> int | None:
        return ckptdir.read_progress(step.checkpoint_dir) if step.checkpoint_dir is not None else None

    def _fresh_stop_step(self, step: Step) -> int | None:
        if step.checkpoint_dir is None:
            return None
        marker = step.checkpoint_dir / ckptdir.STOP_MARKER
        try:
            if marker.stat().st_mtime + 1 < step.submitted_at:
                return None
            value = (ckptdir.read_marker(marker) or {}).get("step")
            return value if isinstance(value, int) else None
        except OSError:
            return None

    async def check_active_jobs(self, active_jobs: list[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        s = self.workflow.executor_settings
        if not active_jobs:
            self.next_seconds_between_status_checks = float(s.poll_interval)
            return
        ids = [str(j.external_jobid) for j in active_jobs]
        try:
            async with self.status_rate_limiter:
                records = await asyncio.to_thread(slurmquery.query, ids)
        except slurmquery.QueryError as e:
            self._query_failures += 1
            backoff = min(float(s.poll_interval) * 2 ** min(self._query_failures, 6), 60.0)
            now = time.time()
            if now - self._last_query_warning > 30:
                self._last_query_warning = now
                self.logger.warning(
                    f"rkslurm: Slurm status query failed ({self._query_failures}x, retrying in {backoff:.0f} s; jobs are not failed for this): {e}"
                )
            self.next_seconds_between_status_checks = backoff
            for j in active_jobs:
                yield j
            return
        if self._query_failures:
            self.logger.info(f"rkslurm: Slurm status queries work again after {self._query_failures} failures.")
        self._query_failures = 0

        any_preemptible = False
        for j in active_jobs:
            with self._steps_lock:
                step = self._steps.get(j.job.jobid)
            if step is None:  # group jobs etc.: not ours to manage
                step = Step(rule=j.job.name, checkpoint_dir=None)
                step.history = StepHistory().with_submission(str(j.external_jobid))
                with self._steps_lock:
                    self._steps[j.job.jobid] = step
            obs = self._observe(j, step, records.get(str(j.external_jobid)))
            d = decide(obs, step.history, self._policy)
            prev = step.history
            step.history = d.history
            if d.action is Action.WAIT:
                if self._preemptible(obs.partition):
                    any_preemptible = True
                if d.history.job_requeues > prev.job_requeues:
                    step.submitted_at = time.time()  # older stop markers belong to the previous run of this id
                    self.logger.warning(f"rkslurm: rule {step.rule}: {d.reason}")
                    self._event(step, "requeued", job_id=obs.job_id, checkpoint_step=obs.checkpoint_step, reason=d.reason)
                yield j
            elif d.action is Action.SUCCEED:
                self._event(step, "succeeded", job_id=obs.job_id)
                self._on_success(j, step)
                self.report_job_success(j)
            elif d.action is Action.FAIL:
                if obs.state.is_active or obs.state.is_held:
                    await asyncio.to_thread(slurmquery.cancel, obs.job_id)
                self._event(step, "failed", job_id=obs.job_id, reason=d.reason)
                logs = [p for p in step.history.log_paths if p]
                self.report_job_error(j, msg=f"rkslurm: rule {step.rule}: {d.reason}\n", aux_logs=logs)
            else:  # RESUBMIT
                self.logger.warning(f"rkslurm: rule {step.rule}: {d.reason}")
                self._event(
                    step,
                    d.event or "resubmit",
                    job_id=obs.job_id,
                    state=obs.state.value,
                    checkpoint_step=obs.checkpoint_step,
                    reason=d.reason,
                )
                if d.exclude_node:
                    self._failed_nodes.add(d.exclude_node)
                info, err = await asyncio.to_thread(self._resubmit_blocking, j.job, step)
                if info is None or info.external_jobid is None:
                    self.report_job_error(j, msg=f"rkslurm: rule {step.rule}: resubmission failed: {err}. {step.history.describe()}\n")
                    continue
                j.external_jobid = info.external_jobid
                j.aux = info.aux
                self._record_submission(j)
                any_preemptible = any_preemptible or self._preemptible(step.partition)
                yield j
        self.next_seconds_between_status_checks = float(s.poll_interval if any_preemptible else s.slow_poll_interval)

    def _on_success(self, job_info: SubmittedJobInfo, step: Step) -> None:
        s = self.workflow.executor_settings
        if not s.keep_checkpoints and step.checkpoint_dir is not None and step.checkpoint_dir.is_dir():
            ckptdir.remove(step.checkpoint_dir)
        if not s.keep_successful_logs:
            for p in step.history.log_paths:
                try:
                    Path(p).unlink(missing_ok=True)
                except OSError:
                    pass

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        super().cancel_jobs(active_jobs)


__all__ = ["Executor", "Step"]
