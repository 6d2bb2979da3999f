"""Table tests for the pure preemption policy: every Slurm state string, every rule, every cap."""

from __future__ import annotations

import dataclasses

import pytest

from snakemake_executor_plugin_rkslurm.policy import (
    EX_TEMPFAIL,
    Action,
    JobObservation,
    PolicySettings,
    SlurmJobState,
    StepHistory,
    classify,
    decide,
    parse_exit_code,
    parse_state,
)

S = SlurmJobState

# (raw string as some Slurm command prints it, expected state)
STATE_STRINGS: list[tuple[str, SlurmJobState]] = [
    # full names (sacct -X -P, squeue %T, scontrol JobState=)
    ("PENDING", S.PENDING),
    ("RUNNING", S.RUNNING),
    ("SUSPENDED", S.SUSPENDED),
    ("COMPLETING", S.COMPLETING),
    ("COMPLETED", S.COMPLETED),
    ("CANCELLED", S.CANCELLED),
    ("CANCELLED by 0", S.CANCELLED),
    ("CANCELLED by 1000", S.CANCELLED),
    ("CANCELLED+", S.CANCELLED),
    ("FAILED", S.FAILED),
    ("TIMEOUT", S.TIMEOUT),
    ("NODE_FAIL", S.NODE_FAIL),
    ("PREEMPTED", S.PREEMPTED),
    ("BOOT_FAIL", S.BOOT_FAIL),
    ("DEADLINE", S.DEADLINE),
    ("OUT_OF_MEMORY", S.OUT_OF_MEMORY),
    ("REQUEUED", S.REQUEUED),
    ("REQUEUE_FED", S.REQUEUE_FED),
    ("REQUEUE_HOLD", S.REQUEUE_HOLD),
    ("RESIZING", S.RESIZING),
    ("REVOKED", S.REVOKED),
    ("SIGNALING", S.SIGNALING),
    ("SPECIAL_EXIT", S.SPECIAL_EXIT),
    ("STAGE_OUT", S.STAGE_OUT),
    ("STOPPED", S.STOPPED),
    ("CONFIGURING", S.CONFIGURING),
    ("RESV_DEL_HOLD", S.RESV_DEL_HOLD),
    # "+" suffixes and sacct's 10-column truncation
    ("RUNNING+", S.RUNNING),
    ("PREEMPTED+", S.PREEMPTED),
    ("OUT_OF_ME+", S.OUT_OF_MEMORY),
    ("REQUEUE_H+", S.REQUEUE_HOLD),
    ("REQUEUE_F+", S.REQUEUE_FED),
    ("SPECIAL_E+", S.SPECIAL_EXIT),
    ("RESV_DEL_+", S.RESV_DEL_HOLD),
    ("CONFIGURI+", S.CONFIGURING),
    ("REQUEUE+", S.UNKNOWN),  # ambiguous prefix
    # lowercase / mixed case / whitespace / scontrol form / flag lists
    ("running", S.RUNNING),
    ("Preempted", S.PREEMPTED),
    ("  completed \n", S.COMPLETED),
    ("cancelled by 0", S.CANCELLED),
    ("JobState=PREEMPTED", S.PREEMPTED),
    ("COMPLETING,REQUEUED", S.COMPLETING),
    ("CANCELED", S.CANCELLED),
    # squeue %t abbreviations
    ("PD", S.PENDING),
    ("R", S.RUNNING),
    ("S", S.SUSPENDED),
    ("ST", S.STOPPED),
    ("CG", S.COMPLETING),
    ("CD", S.COMPLETED),
    ("CA", S.CANCELLED),
    ("F", S.FAILED),
    ("TO", S.TIMEOUT),
    ("NF", S.NODE_FAIL),
    ("PR", S.PREEMPTED),
    ("BF", S.BOOT_FAIL),
    ("DL", S.DEADLINE),
    ("OOM", S.OUT_OF_MEMORY),
    ("CF", S.CONFIGURING),
    ("SI", S.SIGNALING),
    ("SO", S.STAGE_OUT),
    ("RS", S.RESIZING),
    ("RQ", S.REQUEUED),
    ("RF", S.REQUEUE_FED),
    ("RH", S.REQUEUE_HOLD),
    ("SE", S.SPECIAL_EXIT),
    ("RD", S.RESV_DEL_HOLD),
    ("RV", S.REVOKED),
    ("pd", S.PENDING),
    ("oom", S.OUT_OF_MEMORY),
    # garbage
    ("", S.UNKNOWN),
    ("   ", S.UNKNOWN),
    ("+", S.UNKNOWN),
    ("LAUNCH_FAILED", S.UNKNOWN),
    ("R+", S.UNKNOWN),
    ("X", S.UNKNOWN),
    ("JobState=", S.UNKNOWN),
]


@pytest.mark.parametrize(("raw", "expected"), STATE_STRINGS)
def test_parse_state(raw: str, expected: SlurmJobState) -> None:
    assert parse_state(raw) is expected


def test_parse_state_none_is_unknown() -> None:
    assert parse_state(None) is S.UNKNOWN


def test_every_state_has_a_string_in_the_table() -> None:
    covered = {expected for _, expected in STATE_STRINGS}
    assert covered == set(SlurmJobState)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0:0", (0, 0)),
        ("143:0", (143, 0)),
        ("0:9", (0, 9)),
        ("75:0", (75, 0)),
        ("1", (1, None)),
        (75, (75, None)),
        (None, (None, None)),
        ("x:y", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_exit_code(raw: object, expected: tuple[int | None, int | None]) -> None:
    assert parse_exit_code(raw) == expected  # type: ignore[arg-type]


# ---------------------------------------------------------------- decisions per state

HIST = StepHistory().with_submission("100", "/logs/100.log", checkpoint_step=None)


def obs(state: SlurmJobState, **kw: object) -> JobObservation:
    base: dict[str, object] = {"job_id": "100", "state": state, "node": "localhost", "partition": "scavenger", "log_path": "/logs/100.log"}
    base.update(kw)
    return JobObservation(**base)  # type: ignore[arg-type]


# (state, extra observation fields, expected action, expected event)
DECISION_TABLE: list[tuple[SlurmJobState, dict[str, object], Action, str | None]] = [
    (S.PENDING, {}, Action.WAIT, None),
    (S.CONFIGURING, {}, Action.WAIT, None),
    (S.RUNNING, {}, Action.WAIT, None),
    (S.SUSPENDED, {}, Action.WAIT, None),
    (S.STOPPED, {}, Action.WAIT, None),
    (S.COMPLETING, {}, Action.WAIT, None),
    (S.SIGNALING, {}, Action.WAIT, None),
    (S.STAGE_OUT, {}, Action.WAIT, None),
    (S.RESIZING, {}, Action.WAIT, None),
    (S.REQUEUED, {}, Action.WAIT, None),
    (S.REQUEUE_FED, {}, Action.WAIT, None),
    (S.REQUEUE_HOLD, {}, Action.WAIT, None),
    (S.SPECIAL_EXIT, {}, Action.WAIT, None),
    (S.RESV_DEL_HOLD, {}, Action.WAIT, None),
    (S.UNKNOWN, {"raw_state": "WEIRD"}, Action.WAIT, None),
    (S.COMPLETED, {"exit_code": 0}, Action.SUCCEED, None),
    (S.COMPLETED, {}, Action.SUCCEED, None),
    (S.COMPLETED, {"exit_code": 3}, Action.FAIL, None),
    (S.PREEMPTED, {"checkpoint_step": 40}, Action.RESUBMIT, "preemption"),
    (S.PREEMPTED, {}, Action.RESUBMIT, "preemption"),
    (S.PREEMPTED, {"requeue_on_preempt": True}, Action.WAIT, None),
    (S.NODE_FAIL, {}, Action.RESUBMIT, "node_failure"),
    (S.BOOT_FAIL, {}, Action.RESUBMIT, "node_failure"),
    (S.TIMEOUT, {"checkpoint_step": 50}, Action.RESUBMIT, "timeout"),
    (S.TIMEOUT, {}, Action.FAIL, "timeout"),
    (S.CANCELLED, {"exit_code": EX_TEMPFAIL}, Action.RESUBMIT, "interrupted"),
    (S.FAILED, {"exit_code": EX_TEMPFAIL}, Action.RESUBMIT, "interrupted"),
    (S.FAILED, {"exit_code": 1, "stopped_step": 30}, Action.RESUBMIT, "interrupted"),
    (S.CANCELLED, {"exit_code": 0, "signal": 15}, Action.FAIL, None),
    (S.FAILED, {"exit_code": 1}, Action.FAIL, None),
    (S.FAILED, {"exit_code": 143}, Action.FAIL, None),
    # a user's scancel (no PreemptTime) fails even though the step saved a checkpoint and exited 75
    (S.CANCELLED, {"exit_code": EX_TEMPFAIL, "stopped_step": 30, "preempted": False}, Action.FAIL, "cancelled"),
    (S.CANCELLED, {"exit_code": 0, "signal": 9, "preempted": False, "killed": True, "checkpoint_step": 40}, Action.FAIL, "cancelled"),
    # killed by a signal it could not catch (start event, no end): resubmitted only after progress
    (S.FAILED, {"exit_code": 1, "killed": True, "checkpoint_step": 40}, Action.RESUBMIT, "kill"),
    (S.FAILED, {"exit_code": 1, "killed": True}, Action.FAIL, "kill"),
    (S.OUT_OF_MEMORY, {"killed": True, "checkpoint_step": 40}, Action.RESUBMIT, "kill"),
    # a plain error exit (an end event, so not killed) is never resubmitted, checkpoint or not
    (S.FAILED, {"exit_code": 1, "checkpoint_step": 40}, Action.FAIL, None),
    (S.OUT_OF_MEMORY, {}, Action.FAIL, None),
    (S.DEADLINE, {}, Action.FAIL, None),
    (S.REVOKED, {}, Action.FAIL, None),
]


def test_decision_table_covers_every_state() -> None:
    assert {row[0] for row in DECISION_TABLE} == set(SlurmJobState)


@pytest.mark.parametrize(
    ("state", "extra", "action", "event"), DECISION_TABLE, ids=[f"{r[0].value}-{i}" for i, r in enumerate(DECISION_TABLE)]
)
def test_decision_table(state: SlurmJobState, extra: dict[str, object], action: Action, event: str | None) -> None:
    d = decide(obs(state, **extra), HIST, PolicySettings())
    assert d.action is action, d.reason
    assert d.event == event
    assert d.reason  # always a human-readable reason
    if action is Action.FAIL:
        assert "100" in d.reason and "/logs/100.log" in d.reason


@pytest.mark.parametrize(("raw", "expected"), STATE_STRINGS)
def test_every_state_string_gets_a_decision(raw: str, expected: SlurmJobState) -> None:
    """From raw string to decision without raising, whatever Slurm prints."""
    d = decide(obs(parse_state(raw), raw_state=raw, exit_code=0), HIST)
    assert isinstance(d.action, Action)


# ---------------------------------------------------------------- classify: what really ended the job

# (Slurm state, classify keyword arguments, effective state)
CLASSIFY_TABLE: list[tuple[SlurmJobState, dict[str, object], SlurmJobState]] = [
    # a victim exiting within GraceTime: its own exit, but slurmctld set PreemptTime
    (S.FAILED, {"preempted": True, "stopped": True}, S.PREEMPTED),
    (S.CANCELLED, {"preempted": True, "stopped": True}, S.PREEMPTED),
    (S.CANCELLED, {"preempted": True}, S.PREEMPTED),
    # a user's scancel: no PreemptTime, stays CANCELLED whatever the step did
    (S.CANCELLED, {"preempted": False, "stopped": True}, S.CANCELLED),
    (S.CANCELLED, {"preempted": False, "stopped": True, "run_seconds": 59, "time_limit_seconds": 60, "signal_lead": 10}, S.CANCELLED),
    (S.CANCELLED, {"preempted": None}, S.CANCELLED),
    # stopped on our --signal lead shortly before the limit: the timeout it is
    (S.FAILED, {"preempted": False, "stopped": True, "run_seconds": 40, "time_limit_seconds": 60, "signal_lead": 10}, S.TIMEOUT),
    (S.FAILED, {"preempted": None, "stopped": True, "run_seconds": 40, "time_limit_seconds": 60, "signal_lead": 10}, S.TIMEOUT),
    # ... but not long before it, not without a stop, not without a limit
    (S.FAILED, {"preempted": False, "stopped": True, "run_seconds": 100, "time_limit_seconds": 3600, "signal_lead": 60}, S.FAILED),
    (S.FAILED, {"preempted": False, "step_error": True, "run_seconds": 59, "time_limit_seconds": 60, "signal_lead": 10}, S.FAILED),
    (S.FAILED, {"preempted": False, "step_error": True, "run_seconds": 5, "time_limit_seconds": 3600, "signal_lead": 10}, S.FAILED),
    # the time-limit race (issue 21): the step had finished (or left no word) when the signal
    # cancelled its job step; Slurm says FAILED 1:0 inside the window: a timeout to continue
    (S.FAILED, {"preempted": False, "finished": True, "run_seconds": 50, "time_limit_seconds": 60, "signal_lead": 10}, S.TIMEOUT),
    (S.FAILED, {"preempted": False, "run_seconds": 3590, "time_limit_seconds": 3600, "signal_lead": 60}, S.TIMEOUT),
    (S.CANCELLED, {"preempted": False, "finished": True, "run_seconds": 58, "time_limit_seconds": 60, "signal_lead": 10}, S.TIMEOUT),
    # ... but not before the window, and a finished step's plain scancel long before the limit stays CANCELLED
    (S.FAILED, {"preempted": False, "finished": True, "run_seconds": 100, "time_limit_seconds": 3600, "signal_lead": 60}, S.FAILED),
    (S.CANCELLED, {"preempted": False, "finished": True, "run_seconds": 100, "time_limit_seconds": 3600, "signal_lead": 60}, S.CANCELLED),
    (S.FAILED, {"preempted": False, "stopped": True, "run_seconds": 59}, S.FAILED),
    # every other state is what Slurm says, PreemptTime or not
    (S.PREEMPTED, {"preempted": True}, S.PREEMPTED),
    (S.COMPLETED, {"preempted": True}, S.COMPLETED),
    (S.TIMEOUT, {"stopped": True}, S.TIMEOUT),
    (S.OUT_OF_MEMORY, {"preempted": False}, S.OUT_OF_MEMORY),
    (S.RUNNING, {"preempted": True}, S.RUNNING),
    (S.NODE_FAIL, {"stopped": True}, S.NODE_FAIL),
]


@pytest.mark.parametrize(("state", "kw", "expected"), CLASSIFY_TABLE, ids=[f"{r[0].value}-{i}" for i, r in enumerate(CLASSIFY_TABLE)])
def test_classify_table(state: SlurmJobState, kw: dict[str, object], expected: SlurmJobState) -> None:
    assert classify(state, **kw) is expected  # type: ignore[arg-type]


def test_lead_is_capped_at_a_third_of_the_limit() -> None:
    from snakemake_executor_plugin_rkslurm.policy import effective_lead, in_limit_window

    assert effective_lead(60, 60) == 20 and effective_lead(10, 60) == 10 and effective_lead(60, None) == 60
    # 1-minute limit, lead 60 capped to 20: the window opens at 60 - 20 - 60 s slack (at once);
    # 1-hour limit, lead 60: it opens at 3600 - 60 - 60 s
    assert in_limit_window(3479, 3600, 60) is False and in_limit_window(3480, 3600, 60) is True
    assert in_limit_window(0, 60, 60) is True and in_limit_window(None, 60, 60) is False


def test_user_cancel_fails_at_once_whatever_the_preemption_budget() -> None:
    """Regression: a user's scancel was resubmitted max-preemptions + 1 times."""
    d = decide(obs(S.CANCELLED, exit_code=EX_TEMPFAIL, stopped_step=30, checkpoint_step=30, preempted=False), HIST, PolicySettings())
    assert d.action is Action.FAIL
    assert "cancelled by scancel" in d.reason and "step 30" in d.reason
    assert d.history.preemptions == 0


def test_unknown_preemption_keeps_treating_a_stop_as_interrupted() -> None:
    """sacct alone (slurmctld purged the job) cannot tell; a saved stop is then resumed."""
    d = decide(obs(S.CANCELLED, exit_code=EX_TEMPFAIL, preempted=None), HIST)
    assert d.action is Action.RESUBMIT and d.event == "interrupted"


def test_kills_have_their_own_cap_and_need_progress_each_time() -> None:
    settings = PolicySettings(max_kills=2, max_preemptions=0)
    h = StepHistory().with_submission("1", checkpoint_step=None)
    for i, jid in enumerate(("1", "2")):
        d = decide(obs(S.FAILED, job_id=jid, exit_code=1, killed=True, checkpoint_step=10 * (i + 1)), h, settings)
        assert d.action is Action.RESUBMIT, d.reason
        assert d.history.kills == i + 1 and d.history.preemptions == 0
        h = d.history.with_submission(str(int(jid) + 1))
    # no progress since the last attempt started: fail, do not loop
    d = decide(obs(S.FAILED, job_id="3", exit_code=1, killed=True, checkpoint_step=20), h, settings)
    assert d.action is Action.FAIL and "before a newer checkpoint" in d.reason
    # progress, but over the cap
    d = decide(obs(S.FAILED, job_id="3", exit_code=1, killed=True, checkpoint_step=30), h, settings)
    assert d.action is Action.FAIL and "max-kills=2" in d.reason and "1, 2, 3" in d.reason


# ---------------------------------------------------------------- history is immutable and updated


def test_history_is_immutable_and_decisions_return_a_new_one() -> None:
    before = HIST
    d = decide(obs(S.PREEMPTED, checkpoint_step=40), before)
    assert before.preemptions == 0 and before.last_checkpoint_step is None
    assert d.history.preemptions == 1
    assert d.history.last_checkpoint_step == 40
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.history.preemptions = 5  # type: ignore[misc]


def test_with_submission_records_ids_logs_and_baseline() -> None:
    h = StepHistory().with_submission("7", "/l/7.log", checkpoint_step=12)
    h = h.with_submission("8", "/l/8.log")
    assert h.job_ids == ("7", "8")
    assert h.log_paths == ("/l/7.log", "/l/8.log")
    assert h.last_checkpoint_step == 12


def test_observation_of_foreign_job_is_ignored() -> None:
    d = decide(obs(S.FAILED, job_id="999"), HIST)
    assert d.action is Action.WAIT and d.history == HIST


# ---------------------------------------------------------------- CANCEL mode: preemption cap


def run_preemptions(n: int, settings: PolicySettings) -> tuple[StepHistory, list[Action], str]:
    h = StepHistory().with_submission("1")
    actions = []
    reason = ""
    for i in range(n):
        jid = h.job_ids[-1]
        d = decide(obs(S.PREEMPTED, job_id=jid, checkpoint_step=10 * (i + 1)), h, settings)
        actions.append(d.action)
        reason = d.reason
        h = d.history
        if d.action is Action.RESUBMIT:
            h = h.with_submission(str(2 + i))
        else:
            break
    return h, actions, reason


def test_preempted_twice_resubmits_twice_then_succeeds() -> None:
    settings = PolicySettings(max_preemptions=2)
    h, actions, _ = run_preemptions(2, settings)
    assert actions == [Action.RESUBMIT, Action.RESUBMIT]
    assert h.job_ids == ("1", "2", "3") and h.preemptions == 2
    d = decide(obs(S.COMPLETED, job_id="3", exit_code=0), h, settings)
    assert d.action is Action.SUCCEED


def test_preemption_cap_fails_listing_every_job_id() -> None:
    settings = PolicySettings(max_preemptions=2)
    h, actions, reason = run_preemptions(3, settings)
    assert actions == [Action.RESUBMIT, Action.RESUBMIT, Action.FAIL]
    for jid in ("1", "2", "3"):
        assert jid in reason
    assert "preemption cap" in reason and "max-preemptions=2" in reason


def test_zero_preemptions_allowed_fails_on_first() -> None:
    _, actions, _ = run_preemptions(1, PolicySettings(max_preemptions=0))
    assert actions == [Action.FAIL]


def test_exit_75_counts_against_the_preemption_cap() -> None:
    settings = PolicySettings(max_preemptions=1)
    h = StepHistory().with_submission("1")
    d = decide(obs(S.CANCELLED, job_id="1", exit_code=75, raw_state="CANCELLED by 0"), h, settings)
    assert d.action is Action.RESUBMIT and d.history.preemptions == 1
    h = d.history.with_submission("2")
    d = decide(obs(S.PREEMPTED, job_id="2"), h, settings)
    assert d.action is Action.FAIL and "1, 2" in d.reason


# ---------------------------------------------------------------- REQUEUE mode


def test_requeue_via_scontrol_restarts_waits_and_counts_once() -> None:
    """scontrol: COMPLETING Restarts=1 → PENDING → RUNNING → COMPLETED, same job id."""
    h = StepHistory().with_submission("5")
    seq = [
        (S.RUNNING, 0),
        (S.COMPLETING, 1),
        (S.PENDING, 1),
        (S.PENDING, 1),
        (S.RUNNING, 1),
    ]
    for state, restarts in seq:
        d = decide(obs(state, job_id="5", restarts=restarts, requeue_on_preempt=True), h)
        assert d.action is Action.WAIT, (state, d.reason)
        h = d.history
    assert h.preemptions == 1 and h.job_ids == ("5",)
    d = decide(obs(S.COMPLETED, job_id="5", restarts=1, exit_code=0, requeue_on_preempt=True), h)
    assert d.action is Action.SUCCEED and d.history.job_ids == ("5",)


def test_requeue_via_sacct_transient_preempted_counts_once() -> None:
    """sacct -X shows PREEMPTED for several polls while Slurm requeues; restarts unknown."""
    h = StepHistory().with_submission("5")
    seq = [S.RUNNING, S.PREEMPTED, S.PREEMPTED, S.PREEMPTED, S.PENDING, S.RUNNING, S.PREEMPTED, S.RUNNING]
    for state in seq:
        d = decide(obs(state, job_id="5", requeue_on_preempt=True), h)
        assert d.action is Action.WAIT, (state, d.reason)
        h = d.history
    assert h.preemptions == 2
    assert h.job_ids == ("5",)


def test_requeue_mixed_sources_do_not_double_count() -> None:
    h = StepHistory().with_submission("5")
    # scontrol sees the restart first, then sacct still shows the transient PREEMPTED
    for o in [
        obs(S.COMPLETING, job_id="5", restarts=1, requeue_on_preempt=True),
        obs(S.PREEMPTED, job_id="5", requeue_on_preempt=True),
        obs(S.PENDING, job_id="5", restarts=1, requeue_on_preempt=True),
        obs(S.RUNNING, job_id="5", requeue_on_preempt=True),
    ]:
        d = decide(o, h)
        assert d.action is Action.WAIT
        h = d.history
    assert h.preemptions == 1


def test_requeue_state_strings_count_as_requeue() -> None:
    h = StepHistory().with_submission("5")
    for state in (S.RUNNING, S.REQUEUED, S.PENDING, S.RUNNING):
        d = decide(obs(state, job_id="5"), h)
        assert d.action is Action.WAIT
        h = d.history
    assert h.preemptions == 1


def test_requeue_beyond_cap_fails() -> None:
    settings = PolicySettings(max_preemptions=1)
    h = StepHistory().with_submission("5")
    for restarts, expected in [(0, Action.WAIT), (1, Action.WAIT), (1, Action.WAIT), (2, Action.FAIL)]:
        d = decide(obs(S.PENDING, job_id="5", restarts=restarts), h, settings)
        assert d.action is expected, d.reason
        h = d.history
    assert "5" in d.reason and "preemption cap" in d.reason


def test_preempted_on_requeue_partition_that_never_requeues_is_resubmitted_once_counted() -> None:
    settings = PolicySettings(max_preempted_polls=3)
    h = StepHistory().with_submission("5")
    actions = []
    for _ in range(5):
        d = decide(obs(S.PREEMPTED, job_id="5", requeue_on_preempt=True, checkpoint_step=20), h, settings)
        actions.append(d.action)
        h = d.history
        if d.action is not Action.WAIT:
            break
    assert actions == [Action.WAIT, Action.WAIT, Action.WAIT, Action.RESUBMIT]
    assert h.preemptions == 1
    assert h.last_checkpoint_step == 20


# ---------------------------------------------------------------- node failures


def test_node_fail_excludes_node_and_accumulates() -> None:
    settings = PolicySettings(max_node_failures=2)
    h = StepHistory().with_submission("1")
    d = decide(obs(S.NODE_FAIL, job_id="1", node="n1"), h, settings)
    assert d.action is Action.RESUBMIT and d.exclude_node == "n1" and d.excluded_nodes == ("n1",)
    h = d.history.with_submission("2")
    d = decide(obs(S.BOOT_FAIL, job_id="2", node="n2"), h, settings)
    assert d.action is Action.RESUBMIT and d.exclude_node == "n2" and d.excluded_nodes == ("n1", "n2")
    h = d.history.with_submission("3")
    d = decide(obs(S.NODE_FAIL, job_id="3", node="n3"), h, settings)
    assert d.action is Action.FAIL and "1, 2, 3" in d.reason


def test_node_exclusion_can_be_switched_off() -> None:
    d = decide(obs(S.NODE_FAIL, node="n1"), HIST, PolicySettings(exclude_failed_nodes=False))
    assert d.action is Action.RESUBMIT and d.exclude_node is None


def test_node_failures_do_not_use_the_preemption_cap() -> None:
    d = decide(obs(S.NODE_FAIL), HIST, PolicySettings(max_preemptions=0))
    assert d.action is Action.RESUBMIT and d.history.preemptions == 0


# ---------------------------------------------------------------- time limits


@pytest.mark.parametrize(
    ("baseline", "now", "action"),
    [
        (None, None, Action.FAIL),  # never checkpointed
        (None, 10, Action.RESUBMIT),  # first checkpoint in this attempt
        (10, 10, Action.FAIL),  # no progress since the attempt started
        (10, 25, Action.RESUBMIT),
        (10, 5, Action.FAIL),  # went backwards (fell back to an older checkpoint)
    ],
)
def test_timeout_continuation_needs_progress(baseline: int | None, now: int | None, action: Action) -> None:
    h = StepHistory().with_submission("1", checkpoint_step=baseline)
    d = decide(obs(S.TIMEOUT, job_id="1", checkpoint_step=now), h)
    assert d.action is action, d.reason
    if action is Action.FAIL:
        assert "without checkpoint progress" in d.reason


def test_time_limit_continuation_three_times_maxtime() -> None:
    """A step needing 3× MaxTime: two timeouts with progress, then completion."""
    h = StepHistory().with_submission("1")
    for i, jid in enumerate(["1", "2"]):
        d = decide(obs(S.TIMEOUT, job_id=jid, checkpoint_step=100 * (i + 1)), h)
        assert d.action is Action.RESUBMIT
        h = d.history.with_submission(str(int(jid) + 1))
    assert h.timeouts == 2 and h.last_checkpoint_step == 200
    assert decide(obs(S.COMPLETED, job_id="3"), h).action is Action.SUCCEED


def test_timeout_cap_is_separate_from_preemption_cap() -> None:
    settings = PolicySettings(max_preemptions=0, max_timeouts=1)
    h = StepHistory().with_submission("1")
    d = decide(obs(S.TIMEOUT, job_id="1", checkpoint_step=10), h, settings)
    assert d.action is Action.RESUBMIT and d.history.preemptions == 0
    h = d.history.with_submission("2")
    d = decide(obs(S.TIMEOUT, job_id="2", checkpoint_step=20), h, settings)
    assert d.action is Action.FAIL
    assert "max-timeouts=1" in d.reason and "1, 2" in d.reason


# ---------------------------------------------------------------- bounded waits


def test_unknown_state_waits_bounded() -> None:
    settings = PolicySettings(max_unknown_polls=3)
    h = HIST
    actions = []
    for _ in range(4):
        d = decide(obs(S.UNKNOWN, raw_state="???"), h, settings)
        actions.append(d.action)
        h = d.history
    assert actions == [Action.WAIT] * 3 + [Action.FAIL]
    assert "100" in d.reason


def test_unknown_counter_resets_on_a_known_state() -> None:
    settings = PolicySettings(max_unknown_polls=2)
    h = HIST
    for state in (S.UNKNOWN, S.UNKNOWN, S.RUNNING, S.UNKNOWN, S.UNKNOWN):
        d = decide(obs(state), h, settings)
        assert d.action is Action.WAIT
        h = d.history


def test_held_job_waits_bounded() -> None:
    settings = PolicySettings(max_held_polls=2)
    h = HIST
    actions = []
    for _ in range(3):
        d = decide(obs(S.REQUEUE_HOLD), h, settings)
        actions.append(d.action)
        h = d.history
    assert actions == [Action.WAIT, Action.WAIT, Action.FAIL]
    assert "scontrol release 100" in d.reason


def test_plain_failure_message_has_ids_and_logs() -> None:
    h = StepHistory().with_submission("41", "/w/.snakemake/slurm_logs/41.log").with_submission("42", "/w/.snakemake/slurm_logs/42.log")
    d = decide(obs(S.FAILED, job_id="42", exit_code=1, signal=0), h)
    assert d.action is Action.FAIL
    assert "41, 42" in d.reason and "/w/.snakemake/slurm_logs/42.log" in d.reason and "exit code 1:0" in d.reason


def test_negative_settings_rejected() -> None:
    with pytest.raises(ValueError, match="max_preemptions"):
        PolicySettings(max_preemptions=-1)


# ---------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_obs = st.builds(
    JobObservation,
    job_id=st.just("1"),
    state=st.sampled_from(list(SlurmJobState)),
    exit_code=st.one_of(st.none(), st.integers(0, 255)),
    signal=st.one_of(st.none(), st.integers(0, 64)),
    restarts=st.one_of(st.none(), st.integers(0, 5)),
    node=st.one_of(st.none(), st.sampled_from(["n1", "n2"])),
    requeue_on_preempt=st.booleans(),
    checkpoint_step=st.one_of(st.none(), st.integers(0, 1000)),
    stopped_step=st.one_of(st.none(), st.integers(0, 1000)),
)


@given(st.text(max_size=40))
def test_parse_state_never_raises(raw: str) -> None:
    assert isinstance(parse_state(raw), SlurmJobState)


@settings(max_examples=300, deadline=None)
@given(st.lists(_obs, min_size=1, max_size=30))
def test_any_sequence_of_polls_is_handled_and_counts_only_grow(seq: list[JobObservation]) -> None:
    limits = PolicySettings(
        max_preemptions=3, max_timeouts=2, max_node_failures=1, max_unknown_polls=4, max_held_polls=4, max_preempted_polls=2
    )
    h = StepHistory().with_submission("1")
    for o in seq:
        d = decide(o, h, limits)
        assert d.reason
        for name in ("preemptions", "timeouts", "node_failures"):
            assert getattr(d.history, name) >= getattr(h, name)
        if d.action is Action.FAIL:
            assert "1" in d.reason
            break
        if d.action is not Action.WAIT:
            # a resubmission or success ends this job; caps are never exceeded while resubmitting
            assert d.history.preemptions <= limits.max_preemptions
            assert d.history.timeouts <= limits.max_timeouts
            assert d.history.node_failures <= limits.max_node_failures
            break
        h = d.history
    # waiting on UNKNOWN or held states alone cannot go on for ever
    assert h.unknown_polls <= limits.max_unknown_polls and h.held_polls <= limits.max_held_polls
    assert h.preempted_polls <= limits.max_preempted_polls and h.preemptions <= limits.max_preemptions


# ---------------------------------------------------------------- multi-rank steps (issue 23): shape, shrink, failed node


def test_hostlists_expand_as_slurm_prints_them() -> None:
    from snakemake_executor_plugin_rkslurm.ranks import expand_hostlist

    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu[01-03,7],login") == ["gpu01", "gpu02", "gpu03", "gpu7", "login"]
    assert expand_hostlist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    assert expand_hostlist("(null)") == expand_hostlist("None assigned") == expand_hostlist(None) == []
    with pytest.raises(ValueError, match="range"):
        expand_hostlist("n[a-b]")
    with pytest.raises(ValueError, match="implausibly large"):
        expand_hostlist("n[1-999999999]")


def test_geometry_comes_from_the_stock_resources_and_is_checked() -> None:
    from snakemake_executor_plugin_rkslurm.ranks import Geometry, min_nodes, requested

    assert requested({"nodes": 2, "tasks": 4}) == Geometry(2, 4) and Geometry(2, 4).multi_rank
    assert not requested({}).multi_rank and not requested({"tasks": 1}).multi_rank
    assert requested({"tasks": 3}).multi_rank
    for bad in ({"tasks": 0}, {"nodes": "two"}, {"nodes": True}, {"tasks": 2.5}):
        with pytest.raises(ValueError, match="whole number"):
            requested(bad)
    assert min_nodes({}, 0) is None and min_nodes({}, 1) == 1 and min_nodes({"rkslurm_min_nodes": 2}, 1) == 2


@pytest.mark.parametrize(
    ("nodes", "tasks", "available", "floor", "expected"),
    [
        (2, 4, 2, None, (2, 4)),  # enough nodes: unchanged
        (2, 4, 1, 1, (1, 2)),  # half the nodes, half the ranks
        (4, 8, 3, 1, (3, 6)),
        (2, 3, 1, 1, (1, 1)),  # uneven: rounded down, at least one per node
        (2, None, 1, 1, (1, None)),  # tasks left to Slurm stay so
    ],
)
def test_a_multi_rank_step_shrinks_in_proportion(nodes: int, tasks: int | None, available: int, floor: int | None, expected: tuple) -> None:
    from snakemake_executor_plugin_rkslurm.ranks import Geometry, shrink

    assert shrink(Geometry(nodes, tasks), available, floor) == Geometry(*expected)


def test_a_step_that_may_not_shrink_says_how_to_allow_it() -> None:
    from snakemake_executor_plugin_rkslurm.ranks import Geometry, shrink, usable

    why = shrink(Geometry(2, 4), usable(["n1", "n2"], ["n2"]), None)
    assert isinstance(why, str) and "needs 2 node(s) x 4 task(s)" in why and "--rkslurm-min-nodes" in why
    why = shrink(Geometry(4, 8), usable(["n1", "n2", "n3", "n4"], ["n2,n3", "n4"]), 2)
    assert isinstance(why, str) and "at least 2 node(s)" in why and "only 1 usable" in why


def test_the_sbatch_call_gets_the_smaller_shape_and_the_exec_line_runs_in_the_batch_shell() -> None:
    from snakemake_executor_plugin_rkslurm.ranks import Geometry, apply, batch_exec

    stock = "sbatch --parsable --mem 200 --nodes=2 --ntasks=4 --cpus-per-task=1 -D /w"
    assert apply(stock, Geometry(1, 2)) == "sbatch --parsable --mem 200 --nodes=1 --ntasks=2 --cpus-per-task=1 -D /w"
    assert apply("sbatch --ntasks-per-node=2 -N 2", Geometry(1, None)) == "sbatch --ntasks-per-node=2 --nodes=1"
    line = "python -m snakemake --snakefile S --cores all --executor slurm-jobstep --jobs 1 --mode remote"
    assert batch_exec(line, "--executor slurm-jobstep --jobs 1") == "python -m snakemake --snakefile S --cores all --mode remote"
    with pytest.raises(ValueError, match="in-job executor"):
        batch_exec("python -m snakemake --mode remote", "--executor slurm-jobstep --jobs 1")


def test_multi_node_job_blames_the_node_slurm_reports_down_not_its_batch_host(tmp_path) -> None:
    """NODE_FAIL of a 2-node job: the node to exclude is the one that is down (here the second), and a
    job that ended FAILED because MPI gave up first is held until Slurm names the node."""
    from snakemake_executor_plugin_rkslurm.monitor import Monitor, Step
    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    now = [1000.0]

    class Fake:
        def __init__(self) -> None:
            self.rec: JobRecord | None = None
            self.watched: list[list[str]] = []

        def query(self, ids, watch=()):  # noqa: ANN001, ANN201
            self.watched.append(list(watch))
            return {self.rec.job_id: self.rec} if self.rec else {}

    slurm = Fake()
    mon = Monitor(slurm, PolicySettings(), {"main": "OFF"}, clock=lambda: now[0], node_failure_wait=30)  # type: ignore[arg-type]
    step = Step(rule="sim", checkpoint_dir=tmp_path, export=str(tmp_path), partition="main", geometry=Geometry(2, 4), min_nodes=1)
    step.submitted("7", None, 0.0)
    base = {"job_id": "7", "partition": "main", "node": "n1", "nodes": "n[1-2]", "exit_code": "1:0", "preempted": False}
    slurm.rec = JobRecord(state="NODE_FAIL", failed_nodes=("n2",), **base)  # type: ignore[arg-type]
    (plan,) = mon.plan([("k", step)])
    assert slurm.watched == [["7"]]
    assert plan.decision.action is Action.RESUBMIT and plan.decision.exclude_node == "n2", plan.decision.reason
    # the launcher gave up first: FAILED, no node down yet -> held; then Slurm marks n2 down -> node failure
    step.history, step.seen, step.last_observation = StepHistory().with_submission("7"), None, None
    slurm.rec = JobRecord(state="FAILED", failed_nodes=(), **base)  # type: ignore[arg-type]
    (plan,) = mon.plan([("k", step)])
    assert plan.decision.action is Action.WAIT and "whether one of its nodes failed" in plan.decision.reason
    now[0] += 10
    slurm.rec = JobRecord(state="FAILED", failed_nodes=("n2",), **base)  # type: ignore[arg-type]
    (plan,) = mon.plan([("k", step)])
    assert plan.observation.state is S.NODE_FAIL and plan.decision.exclude_node == "n2", plan.decision.reason
    # nobody says a node died: after the wait it is what it looked like (a plain failure here)
    step.history, step.seen, step.last_observation, step.ended_seen = StepHistory().with_submission("7"), None, None, None
    slurm.rec = JobRecord(state="FAILED", failed_nodes=(), **base)  # type: ignore[arg-type]
    assert mon.plan([("k", step)])[0].decision.action is Action.WAIT
    now[0] += 31
    assert mon.plan([("k", step)])[0].decision.action is Action.FAIL


@pytest.mark.parametrize("floor", [None, 1])
def test_node_failure_of_a_two_node_step_on_a_two_node_partition_shrinks_or_fails_saying_why(tmp_path, floor: int | None) -> None:
    """The executor's side: with the failed node excluded only one node is left; --rkslurm-min-nodes 1
    resubmits on 1 x 2, without it the step fails naming the setting (no sbatch at all)."""
    from types import SimpleNamespace

    from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
    from test_executor_monitor import FakeSlurm
    from test_executor_nonblocking import _bare_executor, _poll

    from snakemake_executor_plugin_rkslurm.monitor import Step
    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    submitted: list[Geometry] = []
    ex = _bare_executor(tmp_path, FakeSlurm(), lambda job, step: (submitted.append(step.geometry), ("200", "200.log"))[1])
    ex._partition_nodes = {"main": ["n1", "n2"]}
    step = Step(rule="wave", checkpoint_dir=None, partition="main", geometry=Geometry(2, 4), min_nodes=floor)
    step.submitted("100", None, 0.0)
    ex._steps[1] = step
    ex.slurm.records["100"] = JobRecord(
        job_id="100", state="NODE_FAIL", partition="main", node="n1", nodes="n[1-2]", failed_nodes=("n2",), preempted=False
    )
    active = _poll(ex, [SubmittedJobInfo(job=SimpleNamespace(jobid=1, name="wave"), external_jobid="100")])
    if floor is None:
        assert active == [] and submitted == []
        (msg,) = [m for _, m in ex.failed]
        assert "needs 2 node(s) x 4 task(s)" in msg and "--rkslurm-min-nodes" in msg and "excluded after failures: n2" in msg, msg
    else:
        ex._resubmits[1].result(timeout=10)
        assert submitted == [Geometry(1, 2)] and step.history.excluded_nodes == ("n2",) and ex.failed == []


def test_failed_nodes_are_asked_once_for_all_node_failed_jobs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One squeue (their node lists) and one sinfo (the dead nodes) for every job that ended on a
    node failure or is watched, never a call per job; nothing at all when no job needs it."""
    import os

    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord, mark_failed_nodes

    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, out in (("squeue", "7|n[1-2]\n8|n[3-4]\n"), ("sinfo", "n2\nn9\n")):
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nprintf "{out}"\n')
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    found = {
        "7": JobRecord(job_id="7", state="NODE_FAIL", node="n1"),
        "8": JobRecord(job_id="8", state="FAILED", node="n3"),  # watched: MPI gave up, no node down
        "9": JobRecord(job_id="9", state="FAILED", node="n5"),  # not multi-node: not asked about
        "6": JobRecord(job_id="6", state="RUNNING", node="n6"),
    }
    assert mark_failed_nodes({"6": found["6"]}) == {"6": found["6"]} and not calls.exists()
    out = mark_failed_nodes(found, watch=["8"])
    assert out["7"].failed_nodes == ("n2",) and out["7"].nodes == "n[1-2]"
    assert out["8"].failed_nodes == () and out["9"].failed_nodes is None and out["6"] == found["6"]
    lines = calls.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["squeue", "sinfo"] and "-j 7,8" in lines[0], lines


# ---------------------------------------------------------------- multi-rank steps: shrink a resubmission that cannot start


def test_pending_reasons_and_free_nodes_are_read_from_squeue_and_sinfo() -> None:
    from snakemake_executor_plugin_rkslurm.pendingshrink import free_nodes, parse_free, parse_reasons, per_node_cpus, waits_for_nodes
    from snakemake_executor_plugin_rkslurm.ranks import Geometry

    assert parse_reasons("101|Resources\n102|ReqNodeNotAvail, UnavailableNodes:n2\n\nbad\n") == {
        "101": "Resources",
        "102": "ReqNodeNotAvail, UnavailableNodes:n2",
    }
    for reason in ("Resources", "Priority", "ReqNodeNotAvail, UnavailableNodes:n1", "Nodes_required_for_job_are_DOWN,_DRAINED"):
        assert waits_for_nodes(reason), reason
    for reason in ("BeginTime", "JobHeldUser", "Dependency", "None", "", None):
        assert not waits_for_nodes(reason), reason
    # duplicate rows (one per partition), allocated/down/not-responding nodes do not count
    text = "n1|mix|1/1/0/2\nn1|mix|1/1/0/2\nn2|idle|0/2/0/2\nn3|alloc|2/0/0/2\nn4|idle*|0/2/0/2\nn5|down|0/0/2/2\nodd row\n"
    idle = parse_free(text)
    assert idle == {"n1": 1, "n2": 2}
    assert free_nodes(idle, 2, ()) == 1 and free_nodes(idle, 1, ()) == 2 and free_nodes(idle, 1, ["n1,n9"]) == 1
    assert per_node_cpus(Geometry(2, 4), 1) == 2 and per_node_cpus(Geometry(2, 3), 2) == 4 and per_node_cpus(Geometry(2, None), 1) == 1


@pytest.mark.parametrize(
    ("again", "pending", "waited", "floor", "reason", "free", "expected"),
    [
        (True, True, 61, 1, "Resources", 1, (1, 2)),  # the shrink
        (True, True, 61, 1, "Priority", 1, (1, 2)),
        (False, True, 61, 1, "Resources", 1, None),  # a first submission waits as long as it takes
        (True, False, 61, 1, "Resources", 1, None),  # running
        (True, True, 59, 1, "Resources", 1, None),  # not long enough
        (True, True, 61, None, "Resources", 1, None),  # the user allows no fewer nodes
        (True, True, 61, 2, "Resources", 1, None),
        (True, True, 61, 1, "BeginTime", 1, None),  # waits for a time, not for nodes
        (True, True, 61, 1, "Resources", 2, None),  # the full size fits: Slurm starts it
        (True, True, 61, 1, "Resources", 0, None),  # nothing free at all: keep waiting
    ],
)
def test_a_resubmission_waiting_for_nodes_shrinks_only_when_allowed_and_useful(
    again: bool, pending: bool, waited: float, floor: int | None, reason: str, free: int, expected: tuple | None
) -> None:
    from snakemake_executor_plugin_rkslurm.pendingshrink import Candidate, plan_shrinks
    from snakemake_executor_plugin_rkslurm.ranks import Geometry

    asked: list[object] = []
    c = Candidate("101", Geometry(2, 4), floor, again, pending, waited, "main", cpus_per_node=2)
    idle = {f"n{i}": 2 for i in range(1, free + 1)} | {"n9": 1}  # n9: too few CPUs free for two ranks

    def reasons(ids: list[str]) -> dict[str, str]:
        asked.append(("squeue", ids))
        return {"101": reason}

    def free_cpus(partition: str | None) -> dict[str, int]:
        asked.append(("sinfo", partition))
        return idle

    out = plan_shrinks([c], 60, reasons, free_cpus)
    if expected is None:
        assert out == []
    else:
        ((cand, new, why),) = out
        assert cand is c and new == Geometry(*expected) and f"reason {reason}" in why, why
    # Slurm is asked only about an eligible step: once for its reason, once for its partition's nodes
    assert asked == ([] if not c.eligible(60) else [("squeue", ["101"]), ("sinfo", "main")])


def test_executor_cancels_a_waiting_resubmission_and_resubmits_it_smaller(tmp_path) -> None:
    """The executor's side: a preempted 2 x 4 step whose resubmission waits (Resources) past
    --rkslurm-shrink-after while one node is busy is cancelled and resubmitted on 1 x 2."""
    import time
    from types import SimpleNamespace

    from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
    from test_executor_monitor import FakeSlurm
    from test_executor_nonblocking import _bare_executor, _poll

    from snakemake_executor_plugin_rkslurm.monitor import Step
    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    class Fake(FakeSlurm):
        def __init__(self) -> None:
            super().__init__()
            self.reasons_asked: list[list[str]] = []

        def pending_reasons(self, ids: list[str]) -> dict[str, str]:
            self.reasons_asked.append(list(ids))
            return {"101": "Resources"}

        def idle_cpus(self, partition: str | None) -> dict[str, int]:
            return {"n1": 0, "n2": 2}

    submitted: list[Geometry] = []
    slurm = Fake()
    ex = _bare_executor(tmp_path, slurm, lambda job, step: (submitted.append(step.geometry), ("102", "102.log"))[1])
    step = Step(rule="wave", checkpoint_dir=None, partition="main", geometry=Geometry(2, 4), min_nodes=1)
    step.submitted("100", None, 0.0)
    step.submitted("101", None, time.time())  # the resubmission after a preemption
    ex._steps[1] = step
    slurm.records["101"] = JobRecord(job_id="101", state="PENDING", partition="main", preempted=False)
    job = SubmittedJobInfo(job=SimpleNamespace(jobid=1, name="wave"), external_jobid="101")
    assert _poll(ex, [job]) == [job] and slurm.cancelled == [] and slurm.reasons_asked == []  # too early: nothing asked
    step.submitted_at -= 61
    assert _poll(ex, [job]) == [job]
    ex._resubmits[1].result(timeout=10)
    assert slurm.cancelled == ["101"] and submitted == [Geometry(1, 2)] and step.geometry == Geometry(1, 2) and ex.failed == []
    assert _poll(ex, [job]) == [job] and step.job_id == "102" and job.external_jobid == "102"


# ---------------------------------------------------------------- multi-rank steps: a shrunk step grows back


@pytest.mark.parametrize(
    ("partition", "excluded", "floor", "expected"),
    [
        (["n1", "n2"], (), 1, (2, 4)),  # the busy node is free again: the rule's full size, not the shrunk one
        (["n1", "n2"], ("n2",), 1, (1, 2)),  # a node failed earlier: it stays excluded
        (["n1", "n2", "n3"], ("n2",), 1, (2, 4)),  # ... but another node takes its place
        (None, (), 1, (2, 4)),  # no node list: full size, and the queue shrinks it again if need be
        (None, ("n2",), 1, (1, 2)),  # no node list after a failure: the full size might not fit at all
        (["n1", "n2"], ("n1", "n2"), 1, "needs at least 1 node(s)"),
    ],
)
def test_every_resubmission_of_a_shrunk_step_starts_from_the_rules_full_size(
    partition: list[str] | None, excluded: tuple[str, ...], floor: int, expected: tuple | str
) -> None:
    from snakemake_executor_plugin_rkslurm.pendingshrink import resubmit_shape
    from snakemake_executor_plugin_rkslurm.ranks import Geometry

    new = resubmit_shape(Geometry(2, 4), Geometry(1, 2), partition, excluded, floor)
    if isinstance(expected, str):
        assert isinstance(new, str) and expected in new, new
    else:
        assert new == Geometry(*expected)
    # a step never shrunk gets its full size as before
    assert resubmit_shape(Geometry(2, 4), Geometry(2, 4), ["n1", "n2"], (), 1) == Geometry(2, 4)


def _shrunk_step_executor(tmp_path, reason: str, idle: dict[str, int]):  # noqa: ANN202
    """An executor with one 2 x 4 step (min nodes 1) that runs shrunk to 1 x 2 as Slurm job 101."""
    from types import SimpleNamespace

    from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
    from test_executor_monitor import FakeSlurm
    from test_executor_nonblocking import _bare_executor

    from snakemake_executor_plugin_rkslurm.monitor import Step
    from snakemake_executor_plugin_rkslurm.ranks import Geometry

    class Fake(FakeSlurm):
        def pending_reasons(self, ids: list[str]) -> dict[str, str]:
            return dict.fromkeys(ids, reason)

        def idle_cpus(self, partition: str | None) -> dict[str, int]:
            return idle

    slurm, submitted = Fake(), []
    ids = iter(range(102, 110))

    def sbatch(job, step):  # noqa: ANN001, ANN202
        submitted.append(step.geometry)
        n = str(next(ids))
        return n, f"{n}.log"

    ex = _bare_executor(tmp_path, slurm, sbatch)
    ex._partition_nodes = {"main": ["n1", "n2"]}
    ex.workflow.executor_settings.shrink_after = 60.0
    step = Step(rule="wave", checkpoint_dir=None, partition="main", geometry=Geometry(2, 4), min_nodes=1)
    step.submitted("100", None, 0.0)
    step.geometry = Geometry(1, 2)  # shrunk by the queue rule (or a node failure) ...
    step.submitted("101", None, 0.0)  # ... and running on 1 node
    ex._steps[1] = step
    return ex, slurm, step, submitted, SubmittedJobInfo(job=SimpleNamespace(jobid=1, name="wave"), external_jobid="101")


def test_a_shrunk_step_preempted_asks_for_its_full_size_again_and_shrinks_again_if_it_cannot_start(tmp_path) -> None:
    """The shrunk 1 x 2 job is preempted: the resubmission asks for 2 x 4 (the rule's size). That job waits
    (Resources) past --rkslurm-shrink-after with one node busy: cancelled, resubmitted on 1 x 2 again."""
    from test_executor_nonblocking import _poll

    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    ex, slurm, step, submitted, job = _shrunk_step_executor(tmp_path, "Resources", {"n1": 0, "n2": 2})
    assert step.full_size == Geometry(2, 4) and step.geometry == Geometry(1, 2)
    slurm.records["101"] = JobRecord(job_id="101", state="CANCELLED", partition="main", exit_code="0:15", preempted=True)
    assert _poll(ex, [job]) == [job]
    ex._resubmits[1].result(timeout=10)
    assert submitted == [Geometry(2, 4)] and step.geometry == Geometry(2, 4) and ex.failed == []
    assert _poll(ex, [job]) == [job] and step.job_id == "102"
    slurm.records["102"] = JobRecord(job_id="102", state="PENDING", partition="main", preempted=False)
    step.submitted_at -= 61
    assert _poll(ex, [job]) == [job]
    ex._resubmits[1].result(timeout=10)
    assert slurm.cancelled == ["102"] and submitted == [Geometry(2, 4), Geometry(1, 2)] and step.geometry == Geometry(1, 2)
    assert step.full_size == Geometry(2, 4) and ex.failed == []


def test_a_shrunk_step_after_a_node_failure_keeps_the_failed_node_excluded(tmp_path) -> None:
    """NODE_FAIL of the shrunk job's node n1, with n2 excluded earlier: no node is left (the failure
    is reported, naming both); with n2 excluded and a plain preemption, it stays on 1 x 2."""
    from test_executor_nonblocking import _poll

    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    ex, slurm, step, submitted, job = _shrunk_step_executor(tmp_path, "Resources", {"n1": 2, "n2": 2})
    step.history = dataclasses.replace(step.history, excluded_nodes=("n2",))
    slurm.records["101"] = JobRecord(job_id="101", state="CANCELLED", partition="main", exit_code="0:15", preempted=True)
    assert _poll(ex, [job]) == [job]
    ex._resubmits[1].result(timeout=10)
    assert submitted == [Geometry(1, 2)] and step.history.excluded_nodes == ("n2",) and ex.failed == []
    assert _poll(ex, [job]) == [job] and step.job_id == "102"
    slurm.records["102"] = JobRecord(
        job_id="102", state="NODE_FAIL", partition="main", node="n1", nodes="n1", failed_nodes=("n1",), preempted=False
    )
    assert _poll(ex, [job]) == [] and submitted == [Geometry(1, 2)]
    (msg,) = [m for _, m in ex.failed]
    assert "excluded after failures: n2, n1" in msg, msg


def test_a_shrunk_step_requeued_by_slurm_is_resubmitted_at_full_size_while_it_waits(tmp_path) -> None:
    """Slurm requeues the shrunk job (same id, same 1 x 2): while it is pending it is cancelled and
    resubmitted on 2 x 4; a requeued job already running again is left alone."""
    from test_executor_nonblocking import _poll

    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    for state, grows in (("RUNNING", False), ("PENDING", True)):
        ex, slurm, step, submitted, job = _shrunk_step_executor(tmp_path / state, "BeginTime", {"n1": 2, "n2": 2})
        slurm.records["101"] = JobRecord(job_id="101", state=state, partition="main", restarts=1, preempted=False)
        assert _poll(ex, [job]) == [job] and step.history.job_requeues == 1
        if grows:
            ex._resubmits[1].result(timeout=10)
            assert slurm.cancelled == ["101"] and submitted == [Geometry(2, 4)] and step.geometry == Geometry(2, 4)
            assert _poll(ex, [job]) == [job] and step.job_id == "102" and job.external_jobid == "102"
        else:
            assert slurm.cancelled == [] and submitted == [] and step.geometry == Geometry(1, 2) and not ex._resubmits
        assert ex.failed == []


def test_a_waiting_job_that_starts_before_the_cancel_keeps_its_size_and_is_not_resubmitted(tmp_path) -> None:
    """The window between the poll that saw the job PENDING and the cancel: the job starts in it. The
    pending-only cancel leaves it running, and neither the shrink nor the regrow resubmits beside it
    (two jobs would write one checkpoint folder)."""
    from test_executor_nonblocking import _poll

    from snakemake_executor_plugin_rkslurm.ranks import Geometry
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    # the regrow of a requeued shrunk job
    ex, slurm, step, submitted, job = _shrunk_step_executor(tmp_path / "regrow", "BeginTime", {"n1": 2, "n2": 2})
    slurm.records["101"] = JobRecord(job_id="101", state="PENDING", partition="main", restarts=1, preempted=False)
    slurm.started.add("101")  # starts between the poll and the cancel
    assert _poll(ex, [job]) == [job]
    assert slurm.cancelled == [] and submitted == [] and step.geometry == Geometry(1, 2) and not ex._resubmits
    # the shrink of a full-size job waiting too long
    ex, slurm, step, submitted, job = _shrunk_step_executor(tmp_path / "shrink", "Resources", {"n1": 0, "n2": 2})
    step.geometry = Geometry(2, 4)
    slurm.records["101"] = JobRecord(job_id="101", state="PENDING", partition="main", preempted=False)
    step.submitted_at -= 61
    slurm.started.add("101")
    assert _poll(ex, [job]) == [job]
    assert slurm.cancelled == [] and submitted == [] and step.geometry == Geometry(2, 4) and not ex._resubmits
    assert ex.failed == []
    # the same job, still waiting at the next poll and not started: shrunk as before
    slurm.started.clear()
    assert _poll(ex, [job]) == [job]
    ex._resubmits[1].result(timeout=10)
    assert slurm.cancelled == ["101"] and submitted == [Geometry(1, 2)]
