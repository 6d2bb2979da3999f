"""The rkslurm executor: stock Slurm submission helpers, our own submitter and status loop.

Why a subclass and not a fork: accounts, partitions, gres, slurm_extra and
log handling stay the stock plugin's. Explicit seams only:

- :mod:`.submitter` builds the stock sbatch command with the stock plugin's
  public helpers and adds ``--signal``, ``--requeue``, the step's tag
  (``--comment rkslurm:<key>``) and ``RKSLURM_CHECKPOINT_DIR``; sbatch is
  retried while slurmctld is unreachable. A resubmission is the same call;
  Snakemake keeps seeing one job per step (the Slurm id of its
  SubmittedJobInfo is swapped in place, no retry attempt).
- before anything in a step's folder is touched, a live Slurm job an earlier
  head process submitted for it (found by its tag) is adopted -- only when it
  is this uid's and carries the same fingerprint (:mod:`.adoption`); a live
  job of other params is cancelled and the step resubmitted. The folder itself
  is :class:`rkstep.StepFolder`'s: a folder with files rkstep did not create is
  refused before submission, and nothing in it is touched.
- ``check_active_jobs`` is query → decide (:class:`.monitor.Monitor`, unit
  tested against a fake Slurm) → act (here): one Slurm query per poll for
  every step. A resubmission (sbatch, retried for up to
  ``--rkslurm-submit-retry-minutes`` while slurmctld is away) runs on a
  worker thread, never inside the status loop, so every other step keeps
  being polled and decided meanwhile; the loop picks up its outcome at the
  next poll.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import snakemake_executor_plugin_slurm as _stock
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface

from rkckpt import logsafe
from rkstep.fingerprint import CHECKPOINT_DIR_PARAM, step_fingerprint
from rkstep.folder import StepFolder, default_checkpoint_dir, step_key
from rkstep.protocol import ENV_CHECKPOINT_DIR, fingerprint_tag, submission_tag

from . import adoption, interruptions, pendingshrink, ranks, slurmquery, submitter
from .monitor import Monitor, Pacer, Plan, SlurmApi, SlurmCli, Step
from .policy import Action, PolicySettings, SlurmJobState, effective_lead


def _runtime_seconds(job: JobExecutorInterface) -> int | None:
    """The job's ``runtime`` resource (minutes, as the stock plugin passes it to ``--time``) in seconds."""
    try:
        value = job.resources.get("runtime")
        return int(float(value) * 60) if value not in (None, "") and float(value) > 0 else None
    except (TypeError, ValueError, AttributeError):
        return None


#: ``scheme://user:secret@host``: the userinfo of a storage URL (until ``logsafe.redact`` masks it itself)
_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")


def redact(text: str) -> str:
    """``text`` as the executor may print or record it: credentials of storage URLs masked."""
    return logsafe.redact(_URL_USERINFO.sub(r"\1***@", text))


class Executor(_stock.Executor):
    #: the Slurm query layer (a fake in unit tests)
    slurm: SlurmApi = SlurmCli()

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._default_partition = slurmquery.default_partition()
        self.monitor = Monitor(
            self.slurm,
            PolicySettings(
                max_preemptions=int(s.max_preemptions),
                max_timeouts=int(s.max_timeouts),
                max_node_failures=int(s.max_node_failures),
                max_kills=int(s.max_kills),
            ),
            slurmquery.partition_preempt_modes(),
            signal_lead=int(s.signal_lead_time),
            node_failure_wait=float(getattr(s, "node_failure_wait", 60.0)),
        )
        self.pacer = Pacer(fast=float(s.poll_interval), slow=float(s.slow_poll_interval))
        self.next_seconds_between_status_checks = float(s.poll_interval)
        #: resubmissions in flight, by Snakemake job id: the future of (Slurm job id, log path)
        self._resubmits: dict[int, Future[tuple[str, str]]] = {}
        self._submit_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rkslurm-resubmit")
        self._partition_limits = slurmquery.partition_limits()
        self._partition_nodes = slurmquery.partition_nodes()
        self._lead_warned: set[tuple[str, int]] = set()

    # ------------------------------------------------------------ submission

    def _checkpoint_dir_for(self, job: JobExecutorInterface) -> Path | str:
        """The step's folder; a URL override (``s3://…``) is returned as a string."""
        override = job.resources.get(CHECKPOINT_DIR_PARAM) if hasattr(job, "resources") else None
        params = getattr(job, "params", None)
        if not override and params is not None and hasattr(params, "get"):
            override = params.get(CHECKPOINT_DIR_PARAM)
        if override:
            return str(override) if "://" in str(override) else Path(str(override)).absolute()
        return default_checkpoint_dir(job.name, self._wildcards(job), self.workflow.executor_settings.checkpoint_root)

    @staticmethod
    def _wildcards(job: JobExecutorInterface) -> dict[str, Any]:
        wc = getattr(job, "wildcards", None)
        return dict(wc.items()) if wc is not None and hasattr(wc, "items") else {}

    def _fingerprint(self, job: JobExecutorInterface, folder: StepFolder | None) -> str:
        """Content fingerprint of the step (:func:`rkstep.fingerprint.step_fingerprint`): the rule's declared
        text (param ``rkslurm_fingerprint`` or ``fingerprint``) and inputs, else its code, params and inputs;
        input hashes come from the folder's cache when it has one."""
        rule = getattr(job, "rule", None)
        code = ""
        if rule is not None:
            code = str(getattr(rule, "shellcmd", None) or "")
            run_func = getattr(rule, "run_func", None)
            if not code and run_func is not None:
                c = getattr(run_func, "__code__", None)
                code = c.co_code.hex() if c is not None else getattr(run_func, "__qualname__", "")
        params = {}
        p = getattr(job, "params", None)
        if p is not None and hasattr(p, "items"):
            params = {str(k): v for k, v in p.items()}
        inputs = [str(f) for f in job.input]
        if folder is not None:
            return folder.fingerprint(job.name, params, code, inputs)
        return step_fingerprint(job.name, params, code, inputs)

    def _new_step(self, job: JobExecutorInterface) -> tuple[Step, str]:
        """The step and its fingerprint. Checks the folder (refusing one rkstep does not own) but
        changes nothing in it: the live job is looked for first (:meth:`_prepare` comes after)."""
        partition = job.resources.get("slurm_partition") or self._default_partition
        path = self._checkpoint_dir_for(job)
        if isinstance(path, str):
            self.logger.warning(
                f"rkslurm: rule {job.name} checkpoints to {redact(path)}: passed on as is; without a local folder rkslurm cannot "
                "check its fingerprint or progress (time-limit continuation needs progress), nor remove it after success."
            )
            digest = self._fingerprint(job, None)
            return Step(
                rule=job.name,
                checkpoint_dir=None,
                export=path,
                tag=submission_tag(path),
                fingerprint_tag=fingerprint_tag(digest),
                partition=partition,
            ), digest
        folder = StepFolder(
            path, key=step_key(job.name, self._wildcards(job)), warn=lambda m: self.logger.warning(f"rkslurm: rule {job.name}: {m}")
        )
        folder.check()  # FolderRefused: reported before submission, nothing touched
        digest = self._fingerprint(job, folder)
        step = Step(
            rule=job.name,
            checkpoint_dir=path,
            export=str(path),
            tag=submission_tag(str(path)),
            fingerprint_tag=fingerprint_tag(digest),
            partition=partition,
            folder=folder,
        )
        return step, digest

    def _prepare(self, step: Step, digest: str) -> None:
        """Ready the step's folder for a new job (after no live job could be adopted)."""
        if step.folder is None:
            return
        prep = step.folder.prepare(digest)
        if prep.stale_reason:
            self.logger.warning(
                f"rkslurm: starting rule {step.rule} fresh; old checkpoints in {step.checkpoint_dir} removed: {prep.stale_reason}."
            )
        elif not prep.fresh:
            self.logger.info(
                f"rkslurm: rule {step.rule} will restore from its checkpoint folder {step.checkpoint_dir} (step {step.progress()})."
            )

    def _extras(self, step: Step) -> submitter.SubmitExtras:
        s = self.workflow.executor_settings
        options = []
        lead = self._signal_lead(step)
        if lead > 0:
            options.append(f"--signal=TERM@{lead}")
        elastic = step.geometry.multi_rank and step.min_nodes is not None
        if elastic and not s.requeue:
            # a node failure must come back to us (to shrink the step), not be requeued at full size by Slurm
            options.append("--no-requeue")
        elif not s.requeue and not getattr(s, "no_requeue", False):  # --slurm-no-requeue: stock >= 2.8
            options.append("--requeue")  # let Slurm requeue (same job id) where the partition says REQUEUE
        comment = " ".join(w for w in (step.tag, step.fingerprint_tag) if w)
        return submitter.SubmitExtras(
            env={ENV_CHECKPOINT_DIR: step.export},
            options=options,
            comment=comment or None,
            exclude=step.history.excluded_nodes,
            geometry=step.geometry if step.geometry.multi_rank else None,
            in_batch_shell=step.geometry.multi_rank,
        )

    def _shape(self, job: JobExecutorInterface, step: Step) -> None:
        """A multi-rank step's nodes x tasks (the stock resources) and how small it may get (ValueError: bad resources)."""
        step.geometry = step.requested = ranks.requested(job.resources)
        if step.geometry.multi_rank:
            step.min_nodes = ranks.min_nodes(job.resources, int(getattr(self.workflow.executor_settings, "min_nodes", 0) or 0))
            cpt = job.resources.get("cpus_per_task") or getattr(job, "threads", 1) or 1
            step.cpus_per_task = max(1, int(cpt)) if str(cpt).isdigit() else 1

    def _resize(self, step: Step) -> str | None:
        """Before resubmitting a multi-rank step: the rule's full size again (a step shrunk earlier grows
        back), shrunk when its partition has too few nodes left (``--rkslurm-min-nodes``); the reason it
        cannot run at all, else None. A full size that is free only on paper shrinks again in the queue
        (:mod:`.pendingshrink`)."""
        if not step.geometry.multi_rank:
            return None
        new = pendingshrink.resubmit_shape(
            step.full_size, step.geometry, self._partition_nodes.get(step.partition or ""), step.history.excluded_nodes, step.min_nodes
        )
        if isinstance(new, str):
            excluded = ", ".join(step.history.excluded_nodes) or "none"
            return f"cannot resubmit: it {new} (partition {step.partition}, excluded after failures: {excluded}). {step.history.describe()}"
        if new != step.geometry:
            grows = (new.nodes or 1) > (step.geometry.nodes or 1)
            how = "again, the rule's full size or the most its partition has" if grows else f"(min nodes {step.min_nodes})"
            self.logger.warning(
                f"rkslurm: rule {step.rule}: resubmitting on {new.describe()} instead of {step.geometry.describe()} "
                f"{how}; the step restores its checkpoint on {new.tasks or 1} rank(s)"
            )
            step.geometry = new
        return None

    def _signal_lead(self, step: Step) -> int:
        """``--rkslurm-signal-lead-time``, capped at a third of the step's time limit (warned once per limit)."""
        lead = int(self.workflow.executor_settings.signal_lead_time)
        limit = step.time_limit or self._partition_limits.get(step.partition or "")
        used = effective_lead(lead, limit)
        if used < lead and limit and (step.rule, limit) not in self._lead_warned:
            self._lead_warned.add((step.rule, limit))
            self.logger.warning(
                f"rkslurm: rule {step.rule}: --rkslurm-signal-lead-time {lead} s is not well below its time limit of {limit} s "
                f"(partition {step.partition or 'default'}); using {used} s, a third of the limit, so the job does not spend "
                "most of its time waiting for the signal."
            )
        return used

    def _submit(self, job: JobExecutorInterface, step: Step) -> tuple[str, str]:
        """sbatch the step (blocking, retried while slurmctld is away); returns (job id, log path)."""
        if step.time_limit is None:
            step.time_limit = _runtime_seconds(job)
        call, stdin, pattern = submitter.build_submission(self, job, self._extras(step))
        self.logger.debug(f"rkslurm sbatch call: {redact(call)}")
        out = submitter.sbatch_with_retry(
            call,
            stdin,
            float(self.workflow.executor_settings.submit_retry_minutes) * 60.0,
            warn=lambda m: self.logger.warning(f"rkslurm: rule {step.rule}: {m}"),
        )
        job_id = submitter.parse_job_id(out)
        return job_id, str(pattern).replace("%j", job_id)

    def _live_jobs(self) -> list[adoption.LiveJob]:
        """This uid's live jobs from the shared ``squeue --me`` listing (one call per start-up burst, not per step)."""
        my_jobs = getattr(self.slurm, "my_jobs", None)
        if my_jobs is None:  # a SlurmApi without the shared listing
            return adoption.list_my_jobs()
        return [adoption.LiveJob(r.job_id, r.comment or "", r.user_id, r.state) for r in my_jobs()]

    def _adoptable(self, job: JobExecutorInterface, step: Step) -> tuple[str, str] | None:
        """The live Slurm job an earlier head process submitted for this step, if it may be adopted.

        Only this uid's jobs (``squeue --me``, confirmed by scontrol's UserId) with the step's
        tag are considered; one of another fingerprint is cancelled (its checkpoints would not
        be this step's), another user's is never touched.
        """
        window = float(self.workflow.executor_settings.submit_retry_minutes) * 60.0
        deadline, delay = time.monotonic() + window, 1.0
        while True:
            try:
                rows = self._live_jobs()
                plan = adoption.plan_adoption(rows, step.tag, step.fingerprint_tag, os.getuid(), adoption.job_uid)
                break
            except (slurmquery.QueryError, OSError) as e:
                # "cannot ask" is not "no such job": wait as sbatch would, then submit
                if time.monotonic() >= deadline:
                    self.logger.warning(f"rkslurm: rule {step.rule}: cannot ask squeue for a running job of this step ({e}); submitting")
                    return None
                self.logger.warning(f"rkslurm: rule {step.rule}: cannot ask squeue for a running job of this step ({e}); retrying")
                time.sleep(min(delay, 30.0, max(0.0, deadline - time.monotonic())))
                delay *= 2
        for other, why in plan.ignore:
            self.logger.warning(
                f"rkslurm: rule {step.rule}: not adopting or cancelling Slurm job {other.job_id} with this step's tag: {why}"
            )
        for other, why in plan.cancel:
            self.logger.warning(f"rkslurm: rule {step.rule}: cancelling its live Slurm job {other.job_id}: {why}")
            self.slurm.cancel(other.job_id)
        if plan.cancel and not adoption.wait_gone([j.job_id for j, _ in plan.cancel], max(window, 120.0)):
            # its final checkpoint could land in the folder after we cleared it: never prepare under a live job
            raise RuntimeError(
                f"cancelled Slurm job(s) {', '.join(j.job_id for j, _ in plan.cancel)} did not end; not touching the step's folder"
            )
        if plan.adopt is None:
            return None
        job_id = plan.adopt.job_id
        return job_id, str(submitter.log_pattern(self, job)).replace("%j", job_id)

    def run_jobs(self, jobs: list[JobExecutorInterface]) -> None:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                self._loop = None
        super().run_jobs(jobs)

    def _threadsafe(self, fn: Any, *args: Any, **kw: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: fn(*args, **kw))
        else:
            fn(*args, **kw)

    def run_job(self, job: JobExecutorInterface) -> None:
        """First submission of a step (in the stock submission thread pool): adopt its live job or sbatch."""
        if job.is_group():
            return super().run_job(job)
        try:
            step, digest = self._new_step(job)
            self._shape(job, step)
            adopted = self._adoptable(job, step)  # before anything in the folder is touched
            if adopted is None:
                self._prepare(step, digest)
            if adopted is not None:
                job_id, log = adopted
                self.logger.warning(
                    f"rkslurm: rule {step.rule}: adopting its running Slurm job {job_id} (submitted by an earlier run of the workflow; "
                    f"tag {step.tag}) instead of submitting a duplicate"
                )
            else:
                job_id, log = self._submit(job, step)
                self.logger.info(f"Job {job.jobid} has been submitted with SLURM jobid {job_id} (log: {log}).")
        except Exception as e:  # noqa: BLE001 - report, never crash the submit thread
            self._threadsafe(self.report_job_error, SubmittedJobInfo(job), msg=redact(f"rkslurm: cannot submit rule {job.name}: {e}"))
            return
        step.submitted(job_id, log, time.time())
        with self._steps_lock:
            self._steps[job.jobid] = step
        self._record(step, "adopted" if adopted is not None else "submitted")
        self._threadsafe(self.report_job_submission, SubmittedJobInfo(job, external_jobid=job_id, aux={"slurm_logfile": Path(log)}))

    # ------------------------------------------------------------ status loop

    def _record(self, step: Step, event: str) -> None:
        """Feed the partition's interruption history (M for ``--checkpoint-every auto``) with one step event."""
        interruptions.default_history().observe(step.partition, str(step.export or step.rule), event, time.time())

    def _step_of(self, j: SubmittedJobInfo) -> Step:
        with self._steps_lock:
            step = self._steps.get(j.job.jobid)
            if step is None:  # group jobs etc.: watched, with no checkpoint folder of ours
                step = Step(rule=j.job.name, checkpoint_dir=None)
                step.submitted(str(j.external_jobid), str((j.aux or {}).get("slurm_logfile", "")) or None, time.time())
                self._steps[j.job.jobid] = step
            return step

    async def check_active_jobs(self, active_jobs: list[SubmittedJobInfo]) -> AsyncGenerator[SubmittedJobInfo, None]:
        """One poll: finish resubmissions that completed, one Slurm query for every other step, act.

        Never waits for sbatch: a step whose resubmission is still in flight
        (a worker retries it while slurmctld is away) stays active and is
        left out of the query until the worker is done.
        """
        s = self.workflow.executor_settings
        if not active_jobs:
            self.next_seconds_between_status_checks = float(s.poll_interval)
            return
        to_plan: list[SubmittedJobInfo] = []
        for j in active_jobs:
            fut = self._resubmits.get(j.job.jobid)
            if fut is None:
                to_plan.append(j)
            elif not fut.done():
                yield j  # still submitting: polled again once it has a job id
            elif self._resubmitted(j, self._resubmits.pop(j.job.jobid)):
                yield j
        if not to_plan:
            self.next_seconds_between_status_checks = float(s.poll_interval)
            return
        try:
            async with self.status_rate_limiter:
                plans, broken = await asyncio.to_thread(self._plan_each, [(j, self._step_of(j)) for j in to_plan])
        except (slurmquery.QueryError, OSError) as e:
            wait, msg = self.pacer.failed(e)
            if msg:
                self.logger.warning(msg)
            self.next_seconds_between_status_checks = wait
            for j in to_plan:
                yield j
            return
        for j, step, err in broken:
            await self._fail_unexpected(j, step, "cannot read its state", err)
        shrinking = await asyncio.to_thread(self._shrink_waiting, plans)
        still: list[Plan] = []
        for plan in plans:
            if plan.key.job.jobid in shrinking:
                yield plan.key  # resubmitting smaller: picked up once sbatch answered
                continue
            try:
                active = await self._act(plan)
            except Exception as e:  # noqa: BLE001 - one step's trouble never ends the status loop
                await self._fail_unexpected(plan.key, plan.step, "cannot act on its state", e)
                continue
            if active:
                yield plan.key
                still.append(plan)
        wait, msg = self.pacer.ok(self.monitor.fast_poll(still) or bool(self._resubmits))
        if msg:
            self.logger.info(msg)
        self.next_seconds_between_status_checks = wait

    def _plan_each(self, pairs: list[tuple[SubmittedJobInfo, Step]]) -> tuple[list[Plan], list[tuple[SubmittedJobInfo, Step, Exception]]]:
        """``monitor.plan`` for all steps; when it raises anything but QueryError (a hostile file in one
        folder, a bug), plan each step alone so that only the step that raised is failed."""
        try:
            return self.monitor.plan(pairs), []
        except slurmquery.QueryError:
            raise
        except Exception:  # noqa: BLE001 - narrowed below, step by step
            pass
        plans: list[Plan] = []
        broken: list[tuple[SubmittedJobInfo, Step, Exception]] = []
        for j, step in pairs:
            try:
                plans.extend(self.monitor.plan([(j, step)]))
            except slurmquery.QueryError:
                raise
            except Exception as e:  # noqa: BLE001
                broken.append((j, step, e))
        return plans, broken

    async def _fail_unexpected(self, j: SubmittedJobInfo, step: Step, what: str, e: Exception) -> None:
        """Fail one step on an error nobody planned for (cancelling its job); the others keep running."""
        if step.job_id:
            try:
                await asyncio.to_thread(self.slurm.cancel, step.job_id)
            except Exception:  # noqa: BLE001
                pass
        msg = redact(
            f"rkslurm: rule {step.rule}: {what} ({type(e).__name__}: {e}); failing this step only, Slurm job {step.job_id} cancelled\n"
        )
        self.report_job_error(j, msg=msg)

    def _resubmitted(self, j: SubmittedJobInfo, fut: Future[tuple[str, str]]) -> bool:
        """Take up a finished resubmission; True when the step goes on with its new Slurm job."""
        step = self._step_of(j)
        try:
            job_id, log = fut.result()
        except Exception as e:  # noqa: BLE001 - any failure fails this step only
            self.report_job_error(j, msg=f"rkslurm: rule {step.rule}: resubmission failed: {e}. {step.history.describe()}\n")
            return False
        step.submitted(job_id, log, time.time())
        self._record(step, "submitted")
        self.logger.info(
            f"Job {j.job.jobid} has been submitted with SLURM jobid {job_id} (log: {log}); a resubmission of rule {step.rule}."
        )
        j.external_jobid = job_id
        j.aux = {"slurm_logfile": Path(log)}
        return True

    async def _act(self, plan: Plan) -> bool:
        """Carry out one decision; True while the job stays active."""
        j, step, obs, d = plan.key, plan.step, plan.observation, plan.decision
        for w in plan.warnings:
            self.logger.warning(w)
        prev = step.history
        step.history = d.history
        if d.action is Action.WAIT:
            if d.history.job_requeues > prev.job_requeues:
                step.submitted_at = time.time()  # older stop markers belong to the previous run of this id
                self.logger.warning(f"rkslurm: rule {step.rule}: {d.reason}")
                self._record(step, "requeued")
                await asyncio.to_thread(self._grow_requeued, plan)
            return True
        if d.action is Action.SUCCEED:
            self._record(step, "succeeded")
            self._on_success(step)
            self.report_job_success(j)
            return False
        if d.action is Action.FAIL:
            if obs.state.is_active or obs.state.is_held:
                await asyncio.to_thread(self.slurm.cancel, obs.job_id)
            self._record(step, "failed")
            logs = [p for p in step.history.log_paths if p]
            self.report_job_error(j, msg=f"rkslurm: rule {step.rule}: {d.reason}\n", aux_logs=logs)
            return False
        # RESUBMIT
        self.logger.warning(f"rkslurm: rule {step.rule}: {d.reason}")
        why_not = self._resize(step)
        if why_not is not None:
            self._record(step, "failed")
            self.report_job_error(j, msg=f"rkslurm: rule {step.rule}: {why_not}\n", aux_logs=[p for p in step.history.log_paths if p])
            return False
        self._record(step, d.event or "resubmit")
        # off the status loop: the other steps keep being polled while sbatch waits for slurmctld
        self._resubmits[j.job.jobid] = self._submit_pool.submit(self._submit, j.job, step)
        return True

    def _grow_requeued(self, plan: Plan) -> None:
        """Slurm requeued a shrunk multi-rank step (same job id, same small size): while that job still
        waits, cancel it and resubmit at the rule's full size (:meth:`_resize`). A job already running
        again is left alone: two jobs must never write one checkpoint folder."""
        step, obs = plan.step, plan.observation
        if not step.geometry.multi_rank or step.geometry == step.full_size or obs.state is not SlurmJobState.PENDING:
            return
        shrunk = step.geometry
        new = pendingshrink.resubmit_shape(
            step.full_size, shrunk, self._partition_nodes.get(step.partition or ""), step.history.excluded_nodes, step.min_nodes
        )
        if isinstance(new, str) or (new.nodes or 1) <= (shrunk.nodes or 1):
            return
        self._resize_waiting(
            plan,
            obs.job_id,
            new,
            "regrown",
            f"Slurm requeued job {obs.job_id} on {shrunk.describe()}; cancelled it while it waits "
            f"and resubmitting on {new.describe()} again",
        )

    def _resize_waiting(self, plan: Plan, job_id: str, new: ranks.Geometry, event: str, why: str) -> bool:
        """Cancel the waiting job ``job_id`` and resubmit its step on ``new`` (a shrink or a regrow); False,
        with nothing changed, when the job started first.

        The job may start between the poll that saw it waiting and the cancel: then it keeps running at
        its size (a resubmission beside it would put two jobs on one checkpoint folder)."""
        step = plan.step
        if not self.slurm.cancel_pending(job_id):
            self.logger.warning(f"rkslurm: rule {step.rule}: job {job_id} started before it could be cancelled; it keeps its size")
            return False
        self.logger.warning(f"rkslurm: rule {step.rule}: {why}; the step restores its checkpoint on {new.tasks or 1} rank(s)")
        step.geometry = new
        self._record(step, event)
        self._resubmits[plan.key.job.jobid] = self._submit_pool.submit(self._submit, plan.key.job, step)
        return True

    def _shrink_candidate(self, plan: Plan, now: float) -> pendingshrink.Candidate | None:
        step, obs = plan.step, plan.observation
        if not step.geometry.multi_rank or plan.decision.action is not Action.WAIT or step.job_id is None:
            return None
        h = step.history
        return pendingshrink.Candidate(
            job_id=step.job_id,
            geometry=step.geometry,
            min_nodes=step.min_nodes,
            again=len(h.job_ids) > 1 or h.job_requeues > 0,
            pending=obs.state is SlurmJobState.PENDING,
            waited=now - step.submitted_at,
            partition=obs.partition or step.partition,
            cpus_per_node=pendingshrink.per_node_cpus(step.geometry, step.cpus_per_task),
        )

    def _shrink_waiting(self, plans: list[Plan]) -> set[int]:
        """Multi-rank steps whose resubmission waits for nodes too long: cancel, resubmit smaller
        (:mod:`.pendingshrink`). The Snakemake job ids of the steps now being resubmitted."""
        after = float(getattr(self.workflow.executor_settings, "shrink_after", 60.0))
        now = time.time()
        by_job = {}
        for p in plans:
            c = self._shrink_candidate(p, now)
            if c is not None:
                by_job[c.job_id] = (p, c)
        if not by_job:
            return set()
        try:
            todo = pendingshrink.plan_shrinks(
                [c for _, c in by_job.values()],
                after,
                getattr(self.slurm, "pending_reasons", slurmquery.pending_reasons),
                getattr(self.slurm, "idle_cpus", slurmquery.idle_cpus),
                excluded=lambda c: by_job[c.job_id][0].step.history.excluded_nodes,
            )
        except (slurmquery.QueryError, OSError) as e:
            self.logger.debug(f"rkslurm: cannot ask Slurm whether a waiting multi-rank step may shrink: {e}")
            return set()
        done: set[int] = set()
        for c, new, why in todo:
            plan = by_job[c.job_id][0]
            text = f"{why}; cancelling it and resubmitting on {new.describe()} (min nodes {plan.step.min_nodes})"
            if self._resize_waiting(plan, c.job_id, new, "shrunk", text):
                done.add(plan.key.job.jobid)
        return done

    def _on_success(self, step: Step) -> None:
        s = self.workflow.executor_settings
        if not s.keep_checkpoints and step.folder is not None:
            step.folder.remove()  # the step's files only; the folder too when rkstep made it
        # one clean attempt: its log goes like the stock executor's; a step that was
        # interrupted keeps every attempt's log (the story of what happened to it)
        if not s.keep_successful_logs and len(step.history.job_ids) == 1:
            for p in step.history.log_paths:
                try:
                    Path(p).unlink(missing_ok=True)
                except OSError:
                    pass

    def get_account_arg(self, job: JobExecutorInterface):  # noqa: ANN201 - a generator, as the stock's
        """No ``-A`` when the rule names no account: Slurm then charges the user's default account.

        The stock plugin instead guesses one with a shell pipeline that it runs
        without a shell (``sacct ... | tail -1``), which prints "sacct: invalid
        option -- '1'" and "Unable to guess SLURM account" on every first
        submission. A cluster that requires an explicit account still says so,
        in sbatch's own words, at the first submission.
        """
        if job.resources.get("slurm_account"):
            yield from super().get_account_arg(job)
        else:
            yield ""

    def cancel_jobs(self, active_jobs: list[SubmittedJobInfo]) -> None:
        # a resubmission still in flight would leave a job behind: wait for it, then cancel what it made
        for j in active_jobs:
            fut = self._resubmits.pop(j.job.jobid, None)
            if fut is not None and not fut.cancel():
                try:
                    j.external_jobid = fut.result()[0]
                except Exception:  # noqa: BLE001 - nothing was submitted
                    pass
        super().cancel_jobs(active_jobs)

    def shutdown(self) -> None:
        super().shutdown()
        self._submit_pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["Executor", "Step"]
