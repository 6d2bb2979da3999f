"""The status loop's first two stages, free of Snakemake: query, then decide.

:class:`Monitor` asks a :class:`SlurmApi` about the current job of each step
(and nothing else), turns each record plus what the step wrote in its
checkpoint folder (events, stop marker, progress) into a
:class:`~.policy.JobObservation` via :func:`~.policy.classify`, and lets
:func:`~.policy.decide` choose. The executor only acts on the returned
:class:`Plan` list (report, resubmit, cancel), so the glue is unit-tested
against a fake :class:`SlurmApi` without a cluster or a workflow.

At scale (issue 21): one query per poll for every step (the Slurm calls do
not grow with the number of steps), the step folder read only when the
step's job changed state (events from the last offset, ``StepFolder.observe``),
a :class:`Pacer` that polls fast only while a step runs on a preemptible
partition and backs off with jitter while Slurm is busy.
"""

from __future__ import annotations

import inspect
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rkstep.events import Attempt
from rkstep.folder import StepFolder
from rkstep.protocol import EX_TEMPFAIL, StepPaths

from . import slurmquery
from .policy import (
    Action,
    Decision,
    JobObservation,
    PolicySettings,
    SlurmJobState,
    StepHistory,
    classify,
    decide,
    parse_exit_code,
    parse_state,
)
from .ranks import Geometry, expand_hostlist
from .slurmquery import JobRecord

__all__ = ["Monitor", "Pacer", "Plan", "SlurmApi", "SlurmCli", "Step"]


class SlurmApi(Protocol):
    """What the executor asks Slurm. Every call names our jobs (ids or our tag).

    ``query`` may take ``watch`` (ids of multi-node jobs whose failure may be a
    node's, see :func:`.slurmquery.mark_failed_nodes`); one that does not is
    asked without it.
    """

    def query(self, job_ids: Sequence[str]) -> dict[str, JobRecord]: ...

    def tagged_jobs(self, tag: str) -> list[tuple[str, str]]: ...

    def cancel(self, job_id: str) -> None: ...

    def cancel_pending(self, job_id: str) -> bool: ...


class SlurmCli:
    """:class:`SlurmApi` on the real command-line tools (squeue, sacct, scancel).

    Per poll: one ``squeue -j`` for all ids, at most one ``sacct``. The
    adoption listing (``squeue --me``) is one call shared by every step that
    asks within ``listing_max_age`` seconds (the whole start-up burst of
    submissions), never one per submission.
    """

    def __init__(self, listing_max_age: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.listing_max_age = listing_max_age
        self.clock = clock
        self._listing: list[slurmquery.QueueRow] | None = None
        self._listing_at = 0.0
        self._by_word: dict[str, list[tuple[str, str]]] = {}
        self._listing_lock = threading.Lock()

    def query(self, job_ids: Sequence[str], watch: Sequence[str] = ()) -> dict[str, JobRecord]:
        return slurmquery.query(job_ids, watch=watch)

    def my_jobs(self) -> list[slurmquery.QueueRow]:
        """This user's live jobs (job id, name, uid, state, comment): cached ``squeue --me``."""
        with self._listing_lock:
            return list(self._refresh_listing())

    def _refresh_listing(self) -> list[slurmquery.QueueRow]:
        if self._listing is None or self.clock() - self._listing_at > self.listing_max_age:
            rows = slurmquery.my_jobs()  # raises: "cannot ask" is never "no job"
            by_word: dict[str, list[tuple[str, str]]] = {}
            for r in rows:
                for word in set((r.comment or "").split()):
                    by_word.setdefault(word, []).append((r.job_id, r.state))
            self._listing, self._by_word, self._listing_at = rows, by_word, self.clock()
        return self._listing

    def tagged_jobs(self, tag: str) -> list[tuple[str, str]]:
        with self._listing_lock:
            self._refresh_listing()
            return list(self._by_word.get(tag, ()))

    def cancel(self, job_id: str) -> None:
        slurmquery.cancel(job_id)

    def cancel_pending(self, job_id: str) -> bool:
        return slurmquery.cancel_pending(job_id)

    def pending_reasons(self, job_ids: Sequence[str]) -> dict[str, str]:
        return slurmquery.pending_reasons(job_ids)

    def idle_cpus(self, partition: str | None) -> dict[str, int]:
        return slurmquery.idle_cpus(partition)


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
    #: the job's time limit in seconds when the rule sets ``runtime`` (else the partition's applies)
    time_limit: int | None = None
    #: what Slurm said about the current job at the last full observation, and that observation
    seen: tuple[Any, ...] | None = field(default=None, repr=False)
    last_observation: JobObservation | None = field(default=None, repr=False)
    last_decision: Decision | None = field(default=None, repr=False)
    decided_from: StepHistory | None = field(default=None, repr=False)
    #: nodes x tasks of the current submission (multi-rank steps: smaller after a node failure allows it)
    geometry: Geometry = field(default_factory=Geometry)
    #: nodes x tasks the rule asks for (default: ``geometry``); every resubmission starts from it, so a shrunk step grows back
    requested: Geometry | None = None
    #: the fewest nodes a multi-rank step may be resubmitted on (None: never fewer than requested)
    min_nodes: int | None = None
    #: CPUs per task of a multi-rank step (``cpus_per_task`` or threads): what a node must have free to take a rank
    cpus_per_task: int = 1
    #: when the current job of a multi-rank step was first seen ended badly (the node-failure wait starts)
    ended_seen: float | None = None

    def __post_init__(self) -> None:
        if self.folder is None and self.checkpoint_dir is not None:
            self.folder = StepFolder(self.checkpoint_dir)
        if self.requested is None:
            self.requested = self.geometry

    @property
    def full_size(self) -> Geometry:
        """The rule's own nodes x tasks (``requested``; the current shape when nobody set it)."""
        return self.requested if self.requested is not None else self.geometry

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
        self.ended_seen = None
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
        node_failure_wait: float = 60.0,
    ) -> None:
        self.slurm = slurm
        self.policy = policy
        self.preempt_modes = dict(preempt_modes)
        self.signal_lead = int(signal_lead)
        self.clock = clock
        #: seconds a multi-rank job that ended badly is held before it counts as a kill or error
        self.node_failure_wait = float(node_failure_wait)

    def preemptible(self, partition: str | None) -> bool:
        return self.preempt_modes.get(partition or "", "OFF") not in ("OFF", "")

    def plan(self, steps: Sequence[tuple[Any, Step]]) -> list[Plan]:
        """One :class:`Plan` per step. Raises :class:`~.slurmquery.QueryError` when Slurm did not answer.

        One Slurm query for all steps. A step whose job looks as it did at the
        last poll keeps that observation: its folder (events, stop marker,
        progress) is read only when its job changed state, so a poll of
        thousands of pending steps reads no files.
        """
        ids = list(dict.fromkeys(s.job_id for _, s in steps if s.job_id))
        multi = [s.job_id for _, s in steps if s.job_id and s.geometry.multi_rank]
        if multi and _takes_watch(self.slurm):
            records = self.slurm.query(ids, watch=multi)  # type: ignore[call-arg]
        else:
            records = self.slurm.query(ids) if ids else {}
        plans = []
        for key, step in steps:
            rec = records.get(step.job_id or "")
            sig = _signature(step, rec)
            last = step.last_decision
            if sig is not None and sig == step.seen and step.last_observation is not None:
                obs = step.last_observation
                # same observation, same history, a job that waits in the queue or runs: decide
                # would say the same WAIT again (it counts nothing for active states)
                same = (
                    last is not None
                    and last.action is Action.WAIT
                    and obs.state.is_active
                    and (step.history is last.history or step.history is step.decided_from)
                )
            else:
                obs = self.observe(step, rec)
                step.seen, step.last_observation = sig, obs
                same = False
            decision = last if same and last is not None else decide(obs, step.history, self.policy)
            decision = self._hold_for_node_failure(step, obs, decision)
            step.last_decision, step.decided_from = decision, step.history
            warnings = self._folder_warning(step, obs)
            plans.append(Plan(key, step, obs, decision, warnings))
        return plans

    def _hold_for_node_failure(self, step: Step, obs: JobObservation, decision: Decision) -> Decision:
        """A multi-rank job that ended FAILED/CANCELLED with no word from the step may have lost a node
        that slurmctld has not marked down yet (MPI gave up first): wait for that, a bounded time."""
        if not step.geometry.multi_rank or decision.action is Action.WAIT or obs.state not in _MAYBE_NODE:
            return decision
        if obs.stopped_on_signal or obs.preempted or (obs.state is SlurmJobState.CANCELLED and obs.preempted is False):
            return decision
        now = self.clock()
        if step.ended_seen is None:
            step.ended_seen = now
        left = self.node_failure_wait - (now - step.ended_seen)
        if left <= 0:
            return decision
        why = (
            f"multi-rank job {obs.job_id} ended {obs.state.value} without a word from the step; waiting up to "
            f"{left:.0f} s more for Slurm to say whether one of its nodes failed"
        )
        return Decision(Action.WAIT, why, step.history, excluded_nodes=step.history.excluded_nodes)

    def fast_poll(self, plans: Sequence[Plan]) -> bool:
        """Poll fast only while some step RUNS on a preemptible partition (pending ones cannot be preempted)."""
        return any(
            p.observation.state is SlurmJobState.RUNNING and self.preemptible(p.observation.partition or p.step.partition) for p in plans
        )

    def attempt(self, step: Step, job_id: str) -> Attempt | None:
        """The newest attempt of ``job_id`` from the step's events (read from the last offset)."""
        if step.folder is None or not job_id:
            return None
        return step.folder.observe(job_id).attempt  # reads only what was appended since the last poll

    def observe(self, step: Step, rec: JobRecord | None) -> JobObservation:
        job_id = step.job_id or ""
        state = parse_state(rec.state) if rec else SlurmJobState.UNKNOWN
        code, sig = parse_exit_code(rec.exit_code if rec else None)
        partition = (rec.partition if rec else None) or step.partition
        requeue_on_preempt = self.preempt_modes.get(partition or "", "") == "REQUEUE" and (
            rec.requeue if rec and rec.requeue is not None else True
        )
        attempt = self.attempt(step, job_id)
        stopped = attempt.stopped_step if attempt is not None and attempt.stopped_step is not None else self._fresh_stop_step(step)
        if rec is not None:
            ended = attempt is not None and attempt.ended
            state = classify(
                state,
                preempted=rec.preempted,
                stopped=stopped is not None or code == EX_TEMPFAIL,
                run_seconds=rec.run_seconds,
                time_limit_seconds=rec.time_limit_seconds,
                signal_lead=self.signal_lead,
                finished=ended and attempt.end_rc == 0,  # type: ignore[union-attr]
                step_error=ended and attempt.end_rc not in (0, EX_TEMPFAIL),  # type: ignore[union-attr]
            )
        if rec is not None and rec.failed_nodes and state in _MAYBE_NODE and not rec.preempted:
            state = SlurmJobState.NODE_FAIL  # its MPI launcher gave up before slurmctld marked the node down
        return JobObservation(
            job_id=job_id,
            state=state,
            exit_code=code,
            signal=sig,
            restarts=rec.restarts if rec else None,
            node=_failed_node(rec),
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
        if obs.state.is_active and obs.state is not SlurmJobState.RUNNING:
            return ()  # a pending job has nothing to lose yet: no stat per pending step per poll
        if step.checkpoint_dir.exists():
            return ()
        step.folder_gone_reported = True
        return (
            f"rkslurm: rule {step.rule}: the checkpoint folder {step.checkpoint_dir} was deleted under job {obs.job_id} "
            f"({obs.state.value.lower()}); its checkpoints are gone and the step cannot write new ones: an interruption now "
            "restarts it from step 0",
        )


def _takes_watch(slurm: object) -> bool:
    """Whether ``slurm.query`` accepts ``watch=`` (older query layers and test fakes do not)."""
    try:
        return "watch" in inspect.signature(slurm.query).parameters  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False


#: how a multi-rank job ends when a node dies before slurmctld notices
_MAYBE_NODE = frozenset({SlurmJobState.FAILED, SlurmJobState.CANCELLED, SlurmJobState.OUT_OF_MEMORY})


def _failed_node(rec: JobRecord | None) -> str | None:
    """The node(s) to blame: those of the job's nodes Slurm reports dead after a node failure
    (comma-joined), None when it has several and none is dead now; else the batch host."""
    if rec is None:
        return None
    if rec.failed_nodes:
        return ",".join(rec.failed_nodes)
    if rec.failed_nodes is not None and len(expand_hostlist(rec.nodes)) > 1:
        return None
    return rec.node


def _signature(step: Step, rec: JobRecord | None) -> tuple[Any, ...] | None:
    """What must stay the same for the last observation of the step to still hold (None: always look)."""
    if rec is None:
        return None
    return (
        step.job_id,
        step.submitted_at,
        rec.state,
        rec.restarts,
        rec.exit_code,
        rec.preempted,
        rec.source,
        rec.partition,
        rec.node,
        rec.requeue,
        rec.failed_nodes,
    )


@dataclass
class Pacer:
    """Seconds until the next poll: fast, slow, or backing off while Slurm is busy.

    A rate-limited, slow or unreachable slurmctld ("Request rate limit
    exceeded", timeouts) doubles the wait up to ``max_backoff`` with full
    jitter (so many heads do not retry in step), is said once per outage
    (and once when it ends), and never fails a step.
    """

    fast: float = 2.0
    slow: float = 5.0
    max_backoff: float = 60.0
    rng: Callable[[], float] = random.random
    failures: int = 0

    def ok(self, fast: bool) -> tuple[float, str | None]:
        """After an answered poll: (interval, message to log once or None)."""
        msg = f"rkslurm: Slurm answers again after {self.failures} failed status queries." if self.failures else None
        self.failures = 0
        return (self.fast if fast else self.slow), msg

    def failed(self, error: Exception) -> tuple[float, str | None]:
        """After a poll Slurm did not answer: (interval, message to log once per outage or None)."""
        self.failures += 1
        cap = min(self.max_backoff, self.fast * 2 ** min(self.failures, 10))
        wait = max(self.fast, cap * (0.5 + 0.5 * self.rng()))
        msg = None
        if self.failures == 1:
            busy = isinstance(error, slurmquery.SlurmBusy)
            msg = (
                f"rkslurm: Slurm {'is busy or rate-limiting' if busy else 'status query failed'} ({error}); "
                f"backing off (up to {self.max_backoff:.0f} s, with jitter) and asking again; no step is failed for this."
            )
        return wait, msg
