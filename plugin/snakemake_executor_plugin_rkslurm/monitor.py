"""The status loop's first two stages, free of Snakemake: query, then decide.

:class:`Monitor` asks a :class:`SlurmApi` about the current job of each step
(and nothing else), turns each record plus what the step wrote in its
checkpoint folder (events, stop marker, progress) into a
:class:`~.policy.JobObservation` via :func:`~.policy.classify`, and lets
:func:`~.policy.decide` choose. The executor only acts on the returned
:class:`Plan` list (report, resubmit, cancel), so the glue is unit-tested
against a fake :class:`SlurmApi` without a cluster or a workflow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rkstep.folder import StepFolder
from rkstep.protocol import EX_TEMPFAIL, StepPaths

from . import slurmquery
from .policy import Decision, JobObservation, PolicySettings, SlurmJobState, StepHistory, classify, decide, parse_exit_code, parse_state
from .slurmquery import JobRecord

__all__ = ["Monitor", "Plan", "SlurmApi", "SlurmCli", "Step"]


class SlurmApi(Protocol):
    """What the executor asks Slurm. Every call names our jobs (ids or our tag)."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobRecord]: ...

    def tagged_jobs(self, tag: str) -> list[tuple[str, str]]: ...

    def cancel(self, job_id: str) -> None: ...


class SlurmCli:
    """:class:`SlurmApi` on the real command-line tools (scontrol, sacct, squeue, scancel)."""

    def query(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        return slurmquery.query(job_ids)

    def tagged_jobs(self, tag: str) -> list[tuple[str, str]]:
        return slurmquery.tagged_jobs(tag)

    def cancel(self, job_id: str) -> None:
        slurmquery.cancel(job_id)


@dataclass
class Step:
    """What we know about one Snakemake job (a step) across its Slurm jobs."""

    rule: str
    #: local checkpoint folder (None when the rule points at a storage URL we cannot inspect)
    checkpoint_dir: Path | None
    #: what the job gets as RKSLURM_CHECKPOINT_DIR (the folder, or the rule's URL)
    export: str = ""
    #: ``sbatch --comment`` word of every submission of this step
    tag: str = ""
    #: ``sbatch --comment`` word with the fingerprint the step was submitted for
    fingerprint_tag: str = ""
    history: StepHistory = field(default_factory=StepHistory)
    partition: str | None = None
    submitted_at: float = 0.0
    #: Slurm log of the current job
    log: str | None = None
    folder_gone_reported: bool = False
    #: the folder's owner (rkstep); made from ``checkpoint_dir`` when not given
    folder: StepFolder | None = None

    def __post_init__(self) -> None:
        if self.folder is None and self.checkpoint_dir is not None:
            self.folder = StepFolder(self.checkpoint_dir)

    @property
    def job_id(self) -> str | None:
        return self.history.job_ids[-1] if self.history.job_ids else None

    @property
    def paths(self) -> StepPaths | None:
        return StepPaths(self.checkpoint_dir) if self.checkpoint_dir is not None else None

    def progress(self) -> int | None:
        return self.folder.progress() if self.folder is not None else None

    def submitted(self, job_id: str, log: str | None, now: float) -> None:
        self.history = self.history.with_submission(str(job_id), log, self.progress())
        self.submitted_at = now
        self.log = log


@dataclass(frozen=True)
class Plan:
    """One step's decision for this poll, with the observation it rests on."""

    key: Any
    step: Step
    observation: JobObservation
    decision: Decision
    #: things the user should hear about even when the step just waits
    warnings: tuple[str, ...] = ()


class Monitor:
    """Query → decide for a set of steps; pure apart from the Slurm calls and reading the step folders."""

    def __init__(
        self,
        slurm: SlurmApi,
        policy: PolicySettings,
        preempt_modes: Mapping[str, str],
        signal_lead: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slurm = slurm
        self.policy = policy
        self.preempt_modes = dict(preempt_modes)
        self.signal_lead = int(signal_lead)
        self.clock = clock

    def preemptible(self, partition: str | None) -> bool:
        return self.preempt_modes.get(partition or "", "OFF") not in ("OFF", "")

    def plan(self, steps: Sequence[tuple[Any, Step]]) -> list[Plan]:
        """One :class:`Plan` per step. Raises :class:`~.slurmquery.QueryError` when Slurm did not answer."""
        ids = [s.job_id for _, s in steps if s.job_id]
        records = self.slurm.query(ids) if ids else {}
        plans = []
        for key, step in steps:
            obs = self.observe(step, records.get(step.job_id or ""))
            warnings = self._folder_warning(step, obs)
            plans.append(Plan(key, step, obs, decide(obs, step.history, self.policy), warnings))
        return plans

    def observe(self, step: Step, rec: JobRecord | None) -> JobObservation:
        job_id = step.job_id or ""
        state = parse_state(rec.state) if rec else SlurmJobState.UNKNOWN
        code, sig = parse_exit_code(rec.exit_code if rec else None)
        partition = (rec.partition if rec else None) or step.partition
        requeue_on_preempt = self.preempt_modes.get(partition or "", "") == "REQUEUE" and (
            rec.requeue if rec and rec.requeue is not None else True
        )
        attempt = None
        if step.folder is not None and job_id:
            attempt = step.folder.observe(job_id).attempt  # reads only what was appended since the last poll
        stopped = attempt.stopped_step if attempt is not None and attempt.stopped_step is not None else self._fresh_stop_step(step)
        if rec is not None:
            state = classify(
                state,
                preempted=rec.preempted,
                stopped=stopped is not None or code == EX_TEMPFAIL,
                run_seconds=rec.run_seconds,
                time_limit_seconds=rec.time_limit_seconds,
                signal_lead=self.signal_lead,
            )
        return JobObservation(
            job_id=job_id,
            state=state,
            exit_code=code,
            signal=sig,
            restarts=rec.restarts if rec else None,
            node=rec.node if rec else None,
            partition=partition,
            requeue_on_preempt=requeue_on_preempt,
            checkpoint_step=step.progress(),
            stopped_step=stopped,
            log_path=step.log,
            raw_state=rec.state if rec else None,
            preempted=rec.preempted if rec else None,
            killed=attempt is not None and attempt.killed,
        )

    def _fresh_stop_step(self, step: Step) -> int | None:
        """The stop marker, when this attempt wrote it (steps that write no events)."""
        if step.folder is None:
            return None
        marker = step.folder.paths.stop_marker
        try:
            if os.lstat(marker).st_mtime + 1 < step.submitted_at:
                return None
        except OSError:
            return None
        return step.folder.marker_step(marker)

    def _folder_warning(self, step: Step, obs: JobObservation) -> tuple[str, ...]:
        """The checkpoint folder vanished under the job: say so here, where the user looks
        (the step's own complaints went to a log inside that folder, or to its job log)."""
        if step.checkpoint_dir is None or step.folder_gone_reported or obs.state is SlurmJobState.COMPLETED:
            return ()
        if step.checkpoint_dir.exists():
            return ()
        step.folder_gone_reported = True
        return (
            f"rkslurm: rule {step.rule}: the checkpoint folder {step.checkpoint_dir} was deleted under job {obs.job_id} "
            f"({obs.state.value.lower()}); its checkpoints are gone and the step cannot write new ones: an interruption now "
            "restarts it from step 0",
        )
