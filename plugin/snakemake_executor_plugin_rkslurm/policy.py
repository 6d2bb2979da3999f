"""What to do with a Slurm job of a checkpointed step: wait, succeed, resubmit or fail.

Pure on purpose: no I/O, no clock, no Slurm calls. The executor gathers one
:class:`JobObservation` per poll (from sacct, squeue or scontrol, whichever
answers) plus what it knows of the checkpoint folder, and feeds it with the
step's :class:`StepHistory` and the user's :class:`PolicySettings` to
:func:`decide`. Keeping the rules here means every Slurm state string and
every preemption mode can be covered by table tests without a cluster, and
the executor stays a thin loop around them.

The stock Slurm executor treats PREEMPTED as "Slurm will take care of it" and
then polls forever under PreemptMode=CANCEL; the rules below never wait on a
state that cannot change by itself without bounding the wait.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

__all__ = [
    "EX_TEMPFAIL",
    "Action",
    "Decision",
    "JobObservation",
    "PolicySettings",
    "SlurmJobState",
    "StepHistory",
    "classify",
    "decide",
    "effective_lead",
    "in_limit_window",
    "parse_exit_code",
    "parse_state",
]

from rkstep.protocol import EX_TEMPFAIL

#: seconds of slack around Slurm's time-limit signal: sbatch(1) says --signal
#: "may be sent up to 60 seconds earlier than specified"
LIMIT_SIGNAL_SLACK = 60


class SlurmJobState(enum.Enum):
    """Every job state Slurm reports (22.05–24.x), plus UNKNOWN for anything else."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    STOPPED = "STOPPED"
    COMPLETING = "COMPLETING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    RESIZING = "RESIZING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    BOOT_FAIL = "BOOT_FAIL"
    PREEMPTED = "PREEMPTED"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEUED = "REQUEUED"
    REQUEUE_FED = "REQUEUE_FED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    REVOKED = "REVOKED"
    UNKNOWN = "UNKNOWN"

    @property
    def is_active(self) -> bool:
        """The job is queued or running; it will change state by itself."""
        return self in _ACTIVE

    @property
    def is_held(self) -> bool:
        """Requeued but held: only an operator's ``scontrol release`` moves it on."""
        return self in _HELD

    @property
    def is_requeueing(self) -> bool:
        """Transient states of a job Slurm is putting back in the queue (same job id)."""
        return self in _REQUEUEING


_ACTIVE = frozenset(
    {
        SlurmJobState.PENDING,
        SlurmJobState.CONFIGURING,
        SlurmJobState.RUNNING,
        SlurmJobState.SUSPENDED,
        SlurmJobState.STOPPED,
        SlurmJobState.COMPLETING,
        SlurmJobState.SIGNALING,
        SlurmJobState.STAGE_OUT,
        SlurmJobState.RESIZING,
        SlurmJobState.REQUEUED,
        SlurmJobState.REQUEUE_FED,
    }
)
_HELD = frozenset({SlurmJobState.REQUEUE_HOLD, SlurmJobState.SPECIAL_EXIT, SlurmJobState.RESV_DEL_HOLD})
_REQUEUEING = frozenset({SlurmJobState.REQUEUED, SlurmJobState.REQUEUE_FED, SlurmJobState.REQUEUE_HOLD})

#: squeue's compact state codes (``%t``).
_ABBREVIATIONS: dict[str, SlurmJobState] = {
    "PD": SlurmJobState.PENDING,
    "CF": SlurmJobState.CONFIGURING,
    "R": SlurmJobState.RUNNING,
    "S": SlurmJobState.SUSPENDED,
    "ST": SlurmJobState.STOPPED,
    "CG": SlurmJobState.COMPLETING,
    "SI": SlurmJobState.SIGNALING,
    "SO": SlurmJobState.STAGE_OUT,
    "RS": SlurmJobState.RESIZING,
    "CD": SlurmJobState.COMPLETED,
    "CA": SlurmJobState.CANCELLED,
    "F": SlurmJobState.FAILED,
    "TO": SlurmJobState.TIMEOUT,
    "NF": SlurmJobState.NODE_FAIL,
    "BF": SlurmJobState.BOOT_FAIL,
    "PR": SlurmJobState.PREEMPTED,
    "DL": SlurmJobState.DEADLINE,
    "OOM": SlurmJobState.OUT_OF_MEMORY,
    "RQ": SlurmJobState.REQUEUED,
    "RF": SlurmJobState.REQUEUE_FED,
    "RH": SlurmJobState.REQUEUE_HOLD,
    "SE": SlurmJobState.SPECIAL_EXIT,
    "RD": SlurmJobState.RESV_DEL_HOLD,
    "RV": SlurmJobState.REVOKED,
}
_FULL_NAMES: dict[str, SlurmJobState] = {s.value: s for s in SlurmJobState if s is not SlurmJobState.UNKNOWN}
_ALIASES: dict[str, SlurmJobState] = {"OOM": SlurmJobState.OUT_OF_MEMORY, "CANCELED": SlurmJobState.CANCELLED}


def parse_state(raw: str | None) -> SlurmJobState:
    """Normalise a state as sacct, squeue or scontrol print it.

    Accepts ``RUNNING``, ``running``, ``R``, ``CANCELLED by 0``,
    ``CANCELLED+`` and sacct's width-truncated forms (``OUT_OF_ME+``),
    ``JobState=PREEMPTED``, and flag lists (``COMPLETING,REQUEUED``: the first
    one wins). Anything else is UNKNOWN, never an exception: a state string
    from a newer Slurm must not crash the poll loop.
    """
    if raw is None:
        return SlurmJobState.UNKNOWN
    text = raw.strip().upper()
    if text.startswith("JOBSTATE="):
        text = text[len("JOBSTATE=") :]
    text = re.split(r"[\s,]", text, maxsplit=1)[0] if text else ""
    truncated = text.endswith("+")
    text = text.rstrip("+")
    if not text:
        return SlurmJobState.UNKNOWN
    if text in _FULL_NAMES:
        return _FULL_NAMES[text]
    if text in _ALIASES:
        return _ALIASES[text]
    if text in _ABBREVIATIONS and not truncated:
        return _ABBREVIATIONS[text]
    if truncated and len(text) >= 4:
        # sacct cuts columns to their width and marks the cut with "+".
        matches = [state for name, state in _FULL_NAMES.items() if name.startswith(text)]
        if len(matches) == 1:
            return matches[0]
    return SlurmJobState.UNKNOWN


def parse_exit_code(raw: str | int | None) -> tuple[int | None, int | None]:
    """``"143:0"`` → ``(143, 0)``; ``"0:9"`` → ``(0, 9)``; unparsable parts → None."""
    if raw is None:
        return None, None
    if isinstance(raw, int):
        return raw, None
    parts = str(raw).strip().split(":")

    def as_int(text: str) -> int | None:
        text = text.strip()
        return int(text) if text.isdigit() else None

    code = as_int(parts[0]) if parts else None
    sig = as_int(parts[1]) if len(parts) > 1 else None
    return code, sig


class Action(enum.Enum):
    WAIT = "wait"
    SUCCEED = "succeed"
    RESUBMIT = "resubmit"
    FAIL = "fail"


@dataclass(frozen=True)
class PolicySettings:
    """User limits (the ``--rkslurm-*`` flags). Caps are per step, counted over all its Slurm jobs."""

    max_preemptions: int = 10
    max_timeouts: int = 20
    max_node_failures: int = 3
    #: attempts killed by a signal they could not catch (SIGKILL, OOM killer) after checkpoint progress
    max_kills: int = 3
    #: consecutive polls with an unparsable/unknown state before giving up
    max_unknown_polls: int = 60
    #: consecutive polls with the job held (REQUEUE_HOLD, SPECIAL_EXIT, RESV_DEL_HOLD)
    max_held_polls: int = 720
    #: consecutive polls of PREEMPTED on a REQUEUE partition before assuming
    #: Slurm will not requeue it (sacct shows PREEMPTED for ~10 s while requeueing)
    max_preempted_polls: int = 12
    #: NODE_FAIL/BOOT_FAIL: ask for the failed node to be excluded on resubmission
    exclude_failed_nodes: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_preemptions",
            "max_timeouts",
            "max_node_failures",
            "max_kills",
            "max_unknown_polls",
            "max_held_polls",
            "max_preempted_polls",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"PolicySettings.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class JobObservation:
    """One poll's view of the step's current Slurm job, plus the checkpoint folder."""

    job_id: str
    state: SlurmJobState
    exit_code: int | None = None
    signal: int | None = None
    #: scontrol's Restarts (times Slurm requeued this job id); None when unknown (sacct/squeue)
    restarts: int | None = None
    node: str | None = None
    partition: str | None = None
    #: the partition preempts by REQUEUE and the job is requeueable
    requeue_on_preempt: bool = False
    #: newest restorable checkpoint step in the step's folder now (None: no checkpoint)
    checkpoint_step: int | None = None
    #: step from a fresh ``rkrun.stopped.json`` marker written by this attempt
    stopped_step: int | None = None
    log_path: str | None = None
    raw_state: str | None = None
    #: slurmctld chose this run as a preemption victim (PreemptTime set); None: unknown (sacct, squeue)
    preempted: bool | None = None
    #: the step's events show this attempt started and never ended (killed by a signal it could not catch)
    killed: bool = False

    @property
    def stopped_on_signal(self) -> bool:
        """The step itself says it was interrupted and saved its state (exit 75 or the marker)."""
        return self.exit_code == EX_TEMPFAIL or self.stopped_step is not None


@dataclass(frozen=True)
class StepHistory:
    """Everything the policy remembers about one Snakemake step. Immutable: decisions return a new one."""

    job_ids: tuple[str, ...] = ()
    log_paths: tuple[str, ...] = ()
    preemptions: int = 0
    timeouts: int = 0
    node_failures: int = 0
    kills: int = 0
    #: checkpoint step when the current attempt started (progress baseline)
    last_checkpoint_step: int | None = None
    excluded_nodes: tuple[str, ...] = ()
    #: requeues of the current job id already counted as preemptions
    job_requeues: int = 0
    #: requeue transitions seen for the current job id (sacct/squeue view)
    requeue_transitions: int = 0
    #: highest scontrol Restarts seen for the current job id
    restarts_seen: int = 0
    #: the previous poll saw the current job in a requeue transition
    in_requeue: bool = False
    unknown_polls: int = 0
    held_polls: int = 0
    preempted_polls: int = 0

    def with_submission(self, job_id: str, log_path: str | None = None, checkpoint_step: int | None = None) -> StepHistory:
        """The history after submitting ``job_id`` for this step (first submission or a resubmission)."""
        baseline = checkpoint_step if checkpoint_step is not None else self.last_checkpoint_step
        return replace(
            self,
            job_ids=(*self.job_ids, str(job_id)),
            log_paths=(*self.log_paths, log_path) if log_path else self.log_paths,
            last_checkpoint_step=baseline,
            job_requeues=0,
            requeue_transitions=0,
            restarts_seen=0,
            in_requeue=False,
            unknown_polls=0,
            held_polls=0,
            preempted_polls=0,
        )

    def describe(self) -> str:
        """Slurm ids and logs of every attempt, for failure messages."""
        ids = ", ".join(self.job_ids) if self.job_ids else "(none)"
        text = (
            f"Slurm job ids of this step: {ids}; preemptions={self.preemptions}, timeouts={self.timeouts}, "
            f"node failures={self.node_failures}, kills={self.kills}"
        )
        if self.log_paths:
            text += "; logs: " + ", ".join(self.log_paths)
        return text


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    history: StepHistory
    exclude_node: str | None = None
    #: what was counted by this decision: "preemption", "requeue", "timeout", "node_failure", "interrupted" or None
    event: str | None = None
    excluded_nodes: tuple[str, ...] = field(default=())


def _progress(obs: JobObservation, hist: StepHistory) -> bool:
    if obs.checkpoint_step is None:
        return False
    return hist.last_checkpoint_step is None or obs.checkpoint_step > hist.last_checkpoint_step


def _ckpt_text(obs: JobObservation, hist: StepHistory) -> str:
    now = "none" if obs.checkpoint_step is None else f"step {obs.checkpoint_step}"
    before = "none" if hist.last_checkpoint_step is None else f"step {hist.last_checkpoint_step}"
    return f"checkpoint now {now}, at attempt start {before}"


def _where(obs: JobObservation) -> str:
    bits = [f"job {obs.job_id}"]
    if obs.partition:
        bits.append(f"partition {obs.partition}")
    if obs.node:
        bits.append(f"node {obs.node}")
    return ", ".join(bits)


def _exit_text(obs: JobObservation) -> str:
    if obs.exit_code is None and obs.signal is None:
        return "exit code unknown"
    return f"exit code {obs.exit_code if obs.exit_code is not None else '?'}:{obs.signal if obs.signal is not None else 0}"


def _fail(hist: StepHistory, obs: JobObservation, why: str, event: str | None = None) -> Decision:
    return Decision(Action.FAIL, f"{why} ({_where(obs)}). {hist.describe()}", hist, event=event, excluded_nodes=hist.excluded_nodes)


def _resubmit(hist: StepHistory, obs: JobObservation, why: str, event: str, exclude: str | None = None) -> Decision:
    if obs.checkpoint_step is not None:
        hist = replace(hist, last_checkpoint_step=obs.checkpoint_step)
    if exclude and exclude not in hist.excluded_nodes:
        hist = replace(hist, excluded_nodes=(*hist.excluded_nodes, exclude))
    restore = (
        f"restores from checkpoint step {obs.checkpoint_step}"
        if obs.checkpoint_step is not None
        else "starts from step 0 (no checkpoint yet)"
    )
    return Decision(
        Action.RESUBMIT,
        f"{why} ({_where(obs)}); resubmitting, the step {restore}",
        hist,
        exclude_node=exclude,
        event=event,
        excluded_nodes=hist.excluded_nodes,
    )


def _wait(hist: StepHistory, why: str) -> Decision:
    return Decision(Action.WAIT, why, hist, excluded_nodes=hist.excluded_nodes)


def _count_preemption(hist: StepHistory, obs: JobObservation, settings: PolicySettings, what: str, event: str) -> Decision:
    hist = replace(hist, preemptions=hist.preemptions + 1)
    if hist.preemptions > settings.max_preemptions:
        return _fail(
            hist, obs, f"{what}: preemption cap reached ({hist.preemptions} > --rkslurm-max-preemptions={settings.max_preemptions})", event
        )
    return _resubmit(hist, obs, f"{what} (preemption {hist.preemptions}/{settings.max_preemptions})", event)


def _track_requeues(obs: JobObservation, hist: StepHistory) -> tuple[StepHistory, int]:
    """Count Slurm's own requeues of the current job id exactly once each.

    Two sources that may alternate between polls: scontrol's Restarts counter
    (exact) and entering a requeue transition (PREEMPTED on a REQUEUE
    partition, REQUEUED, ...), which is all sacct/squeue show. Each source
    is counted on its own and the larger count wins, so one requeue seen by
    both is counted once.
    """
    requeueing = obs.state.is_requeueing or (obs.state is SlurmJobState.PREEMPTED and obs.requeue_on_preempt)
    transitions = hist.requeue_transitions + (1 if requeueing and not hist.in_requeue else 0)
    restarts = max(hist.restarts_seen, obs.restarts or 0)
    total = max(transitions, restarts)
    new = max(0, total - hist.job_requeues)
    hist = replace(hist, requeue_transitions=transitions, restarts_seen=restarts, job_requeues=total, in_requeue=requeueing)
    if new:
        base = obs.checkpoint_step if obs.checkpoint_step is not None else hist.last_checkpoint_step
        hist = replace(hist, preemptions=hist.preemptions + new, last_checkpoint_step=base)
    return hist, new


def effective_lead(lead: int, time_limit_seconds: int | None) -> int:
    """The ``--signal`` lead actually used: at most a third of the time limit.

    A lead as long as the limit (the default 60 s on a 1-minute partition)
    would make every job spend most of its time waiting to be told to stop.
    """
    lead = max(0, int(lead))
    if time_limit_seconds and time_limit_seconds > 0:
        return min(lead, time_limit_seconds // 3)
    return lead


def in_limit_window(run_seconds: int | None, time_limit_seconds: int | None, signal_lead: int) -> bool:
    """The job ran into the window where the time-limit signal may land (lead plus Slurm's slack)."""
    if not time_limit_seconds or run_seconds is None:
        return False
    lead = effective_lead(signal_lead, time_limit_seconds)
    return run_seconds >= time_limit_seconds - lead - LIMIT_SIGNAL_SLACK


def classify(
    state: SlurmJobState,
    *,
    preempted: bool | None = None,
    stopped: bool = False,
    run_seconds: int | None = None,
    time_limit_seconds: int | None = None,
    signal_lead: int = 0,
    finished: bool = False,
    step_error: bool = False,
) -> SlurmJobState:
    """What really ended the job, from what Slurm reports plus what the step said.

    - A preemption victim that exits within its GraceTime ends FAILED or
      CANCELLED with its own exit code; slurmctld's PreemptTime (``preempted``)
      says it was a preemption: PREEMPTED.
    - The time-limit race: a job that ends FAILED or CANCELLED after it ran
      into the window of our ``--signal=TERM@lead`` (lead plus Slurm's 60 s
      slack) is the TIMEOUT it is -- whether the step stopped on the signal
      (``stopped``), had already finished its work when the signal cancelled
      the job step (``finished``: its attempt ended rc 0, yet Slurm says
      FAILED 1:0 and the inner Snakemake removed the outputs), or left no word.
      Only a step that itself reported an error (``step_error``: it ended
      with another code) stays FAILED. A CANCELLED job is continued only when
      the step had finished: a step that stopped on SIGTERM and ended
      CANCELLED without a PreemptTime was stopped by somebody's ``scancel``,
      near the limit or not.
      :func:`decide` still continues a TIMEOUT only after checkpoint progress.
    - Everything else is what Slurm says. In particular CANCELLED without a
      PreemptTime stays CANCELLED: somebody ran ``scancel``.
    """
    if state not in (SlurmJobState.FAILED, SlurmJobState.CANCELLED):
        return state
    if preempted:
        return SlurmJobState.PREEMPTED
    if in_limit_window(run_seconds, time_limit_seconds, signal_lead):
        if state is SlurmJobState.FAILED and (stopped or finished or not step_error):
            return SlurmJobState.TIMEOUT
        if state is SlurmJobState.CANCELLED and finished and not stopped:
            return SlurmJobState.TIMEOUT
    return state


def _capped(hist: StepHistory, obs: JobObservation, count: int, cap: int, what: str, flag: str, event: str | None) -> Decision | None:
    """The failure once ``count`` passed ``cap`` (``--rkslurm-<flag>``); None while under it."""
    if count > cap:
        return _fail(hist, obs, f"{what}: cap reached ({count} > --rkslurm-{flag}={cap})", event)
    return None


def _on_unknown(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    hist = replace(hist, unknown_polls=hist.unknown_polls + 1)
    if hist.unknown_polls > settings.max_unknown_polls:
        return _fail(hist, obs, f"Slurm state {obs.raw_state!r} stayed unknown for {hist.unknown_polls} polls")
    return _wait(
        hist,
        f"unknown Slurm state {obs.raw_state!r} for job {obs.job_id} (poll {hist.unknown_polls}/{settings.max_unknown_polls}); waiting",
    )


def _on_held(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    state = obs.state
    hist = replace(hist, held_polls=hist.held_polls + 1)
    if hist.held_polls > settings.max_held_polls:
        return _fail(
            hist, obs, f"job held by Slurm ({state.value}) for {hist.held_polls} polls; release it with `scontrol release {obs.job_id}`"
        )
    return _wait(
        hist,
        f"job {obs.job_id} is held by Slurm ({state.value}); waiting for `scontrol release` ({hist.held_polls}/{settings.max_held_polls})",
    )


def _on_active(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    why = f"job {obs.job_id} {obs.state.value.lower()}"
    if requeued or (hist.job_requeues and obs.state is SlurmJobState.PENDING):
        why += f" after Slurm requeued it ({hist.job_requeues}x, same job id; no duplicate submitted)"
    return _wait(hist, why)


def _on_completed(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    if obs.exit_code not in (None, 0):
        return _fail(hist, obs, f"Slurm says COMPLETED but {_exit_text(obs)}")
    return Decision(Action.SUCCEED, f"job {obs.job_id} completed", hist, excluded_nodes=hist.excluded_nodes)


def _on_preempted(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    if not obs.requeue_on_preempt:
        return _count_preemption(hist, obs, settings, "job preempted (PreemptMode=CANCEL)", "preemption")
    hist = replace(hist, preempted_polls=hist.preempted_polls + 1)
    if hist.preempted_polls <= settings.max_preempted_polls:
        return _wait(hist, f"job {obs.job_id} preempted on a REQUEUE partition; waiting for Slurm to requeue the same job id")
    # Slurm did not requeue it after all (e.g. --no-requeue): carry on as CANCEL,
    # without counting the preemption a second time.
    if hist.preemptions > settings.max_preemptions:
        return _fail(hist, obs, f"preemption cap reached ({hist.preemptions} > {settings.max_preemptions})", "preemption")
    return _resubmit(hist, obs, f"preempted and not requeued by Slurm within {settings.max_preempted_polls} polls", "preemption")


def _on_node_failure(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    hist = replace(hist, node_failures=hist.node_failures + 1)
    what = "node failure" if obs.state is SlurmJobState.NODE_FAIL else "node boot failure"
    capped = _capped(hist, obs, hist.node_failures, settings.max_node_failures, what, "max-node-failures", "node_failure")
    if capped:
        return capped
    exclude = obs.node if settings.exclude_failed_nodes and obs.node else None
    why = f"{what} ({hist.node_failures}/{settings.max_node_failures})"
    if exclude:
        why += f", excluding node {exclude}"
    elif settings.exclude_failed_nodes:
        why += ", excluding no node (none of the job's nodes is down now)"
    return _resubmit(hist, obs, why, "node_failure", exclude=exclude)


def _on_timeout(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    if not _progress(obs, hist):
        return _fail(
            hist,
            obs,
            f"time limit reached without checkpoint progress ({_ckpt_text(obs, hist)}); raise the time limit or checkpoint more often",
            "timeout",
        )
    hist = replace(hist, timeouts=hist.timeouts + 1)
    capped = _capped(hist, obs, hist.timeouts, settings.max_timeouts, "time limit", "max-timeouts", "timeout")
    if capped:
        return capped
    return _resubmit(
        hist,
        obs,
        f"time limit reached after progress ({_ckpt_text(obs, hist)}); continuing ({hist.timeouts}/{settings.max_timeouts})",
        "timeout",
    )


def _on_kill(obs: JobObservation, hist: StepHistory, settings: PolicySettings, what: str) -> Decision:
    if not _progress(obs, hist):
        return _fail(
            hist, obs, f"step {what} ({obs.state.value}, {_exit_text(obs)}) before a newer checkpoint ({_ckpt_text(obs, hist)})", "kill"
        )
    hist = replace(hist, kills=hist.kills + 1)
    capped = _capped(hist, obs, hist.kills, settings.max_kills, f"step {what}", "max-kills", "kill")
    if capped:
        return capped
    return _resubmit(
        hist, obs, f"step {what} after checkpoint progress ({_ckpt_text(obs, hist)}; kill {hist.kills}/{settings.max_kills})", "kill"
    )


def _on_ended_badly(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    """CANCELLED, FAILED, OUT_OF_MEMORY: scancel, a stop on our signal, a kill, or a plain failure."""
    state = obs.state
    if state is SlurmJobState.CANCELLED and obs.preempted is False:
        # PreemptTime unset: a person (or a script) ran scancel. They want the step to end.
        saved = f"; its checkpoint (step {obs.checkpoint_step}) is kept for a rerun" if obs.checkpoint_step is not None else ""
        return _fail(hist, obs, f"job cancelled by scancel, not preempted ({_exit_text(obs)}){saved}", "cancelled")
    if state in (SlurmJobState.CANCELLED, SlurmJobState.FAILED) and obs.stopped_on_signal:
        stopped = f" at step {obs.stopped_step}" if obs.stopped_step is not None else ""
        return _count_preemption(
            hist,
            obs,
            settings,
            f"step stopped on a signal{stopped} and saved its checkpoint ({state.value}, {_exit_text(obs)}); treating as interrupted",
            "interrupted",
        )
    if obs.killed:
        return _on_kill(
            obs,
            hist,
            settings,
            "killed by the OOM killer" if state is SlurmJobState.OUT_OF_MEMORY else "killed by a signal it could not catch",
        )
    if state is SlurmJobState.CANCELLED:
        return _fail(hist, obs, f"job cancelled ({obs.raw_state or state.value}, {_exit_text(obs)})")
    if state is SlurmJobState.OUT_OF_MEMORY:
        return _fail(hist, obs, "job ran out of memory; raise mem_mb")
    return _on_other(obs, hist, settings, requeued)


def _on_other(obs: JobObservation, hist: StepHistory, settings: PolicySettings, requeued: int) -> Decision:
    why = _FINAL_WORDS.get(obs.state)
    return _fail(hist, obs, why or f"job failed ({obs.state.value}, {_exit_text(obs)})")


_FINAL_WORDS = {
    SlurmJobState.DEADLINE: "job missed its --deadline",
    SlurmJobState.REVOKED: "job revoked (federation: a sibling cluster runs it)",
}

_Handler = Callable[[JobObservation, StepHistory, PolicySettings, int], Decision]

#: one handler per Slurm state that ends (or holds) a job; active states share ``_on_active``
_HANDLERS: dict[SlurmJobState, _Handler] = {
    SlurmJobState.UNKNOWN: _on_unknown,
    SlurmJobState.COMPLETED: _on_completed,
    SlurmJobState.PREEMPTED: _on_preempted,
    SlurmJobState.NODE_FAIL: _on_node_failure,
    SlurmJobState.BOOT_FAIL: _on_node_failure,
    SlurmJobState.TIMEOUT: _on_timeout,
    SlurmJobState.CANCELLED: _on_ended_badly,
    SlurmJobState.FAILED: _on_ended_badly,
    SlurmJobState.OUT_OF_MEMORY: _on_ended_badly,
}


def _handler(state: SlurmJobState) -> _Handler:
    if state in _HANDLERS:
        return _HANDLERS[state]
    if state.is_held:
        return _on_held
    if state.is_active:
        return _on_active
    return _on_other


def decide(obs: JobObservation, history: StepHistory, settings: PolicySettings | None = None) -> Decision:
    """Map one observation of the step's current Slurm job to the next action (one handler per state)."""
    settings = settings or PolicySettings()
    state = obs.state
    hist = history
    if hist.job_ids and obs.job_id not in hist.job_ids:
        # Defensive: an observation of a job we never submitted for this step.
        return _wait(hist, f"ignoring observation of job {obs.job_id}: not one of this step's jobs {hist.job_ids}")

    if state is not SlurmJobState.UNKNOWN:
        hist = replace(hist, unknown_polls=0)
    if not state.is_held:
        hist = replace(hist, held_polls=0)
    if state is not SlurmJobState.PREEMPTED:
        hist = replace(hist, preempted_polls=0)

    # REQUEUE mode: Slurm reruns the same job id. Count it, never resubmit.
    hist, requeued = _track_requeues(obs, hist)
    if requeued and hist.preemptions > settings.max_preemptions:
        return _fail(
            hist,
            obs,
            f"job requeued by Slurm: preemption cap reached ({hist.preemptions} > --rkslurm-max-preemptions={settings.max_preemptions}); cancel it",
            "requeue",
        )
    return _handler(state)(obs, hist, settings, requeued)
