"""The executor's query → decide glue (monitor.Monitor) against a fake Slurm query layer.

No cluster, no workflow: the fake answers what scontrol/sacct would, the step
folder is a real tmp folder with the events a real step writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from rkstep.events import EventWriter
from rkstep.protocol import STOP_MARKER
from snakemake_executor_plugin_rkslurm.monitor import Monitor, Step
from snakemake_executor_plugin_rkslurm.policy import Action, PolicySettings, SlurmJobState
from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord, QueryError


class FakeSlurm:
    """Answers only for the ids it is asked about; records every question."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.asked: list[list[str]] = []
        self.down = False
        self.cancelled: list[str] = []
        self.started: set[str] = set()

    def query(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        self.asked.append(list(job_ids))
        if self.down:
            raise QueryError("scontrol: Unable to contact slurm controller")
        return {i: self.records[i] for i in job_ids if i in self.records}

    def tagged_jobs(self, tag: str) -> list[tuple[str, str]]:
        return []

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def cancel_pending(self, job_id: str) -> bool:
        """As ``scancel --state=PENDING``: a job listed in ``started`` began running first and is not cancelled."""
        if job_id in self.started:
            return False
        self.cancelled.append(job_id)
        return True


MODES = {"scavenger": "CANCEL", "requeue": "REQUEUE", "normal": "OFF"}


def make(tmp_path: Path, **policy: int) -> tuple[FakeSlurm, Monitor, Step]:
    slurm = FakeSlurm()
    mon = Monitor(slurm, PolicySettings(**policy), MODES, signal_lead=10, clock=lambda: 1000.0)
    folder = tmp_path / "ck"
    folder.mkdir()
    step = Step(rule="sim", checkpoint_dir=folder, export=str(folder), partition="scavenger")
    step.submitted("100", "/logs/100.log", 0.0)
    return slurm, mon, step


def writer(step: Step, job: str = "100", restart: int = 0) -> EventWriter:
    assert step.paths is not None
    return EventWriter(step.paths.events, job=job, restart=restart)


def progress(step: Step, n: int) -> None:
    assert step.checkpoint_dir is not None
    (step.checkpoint_dir / "rkslurm.progress.json").write_text(json.dumps({"step": n}))


def rec(state: str, **kw: object) -> JobRecord:
    base: dict[str, object] = {"job_id": "100", "state": state, "partition": "scavenger", "exit_code": "0:0", "preempted": False}
    base.update(kw)
    return JobRecord(**base)  # type: ignore[arg-type]


def one(mon: Monitor, step: Step):
    (plan,) = mon.plan([("key", step)])
    return plan


def test_asks_only_for_the_current_jobs_of_its_steps(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    other = Step(rule="b", checkpoint_dir=None)
    other.submitted("7", None, 0.0)
    other.submitted("8", None, 0.0)  # resubmitted: 7 is history
    slurm.records = {"100": rec("RUNNING"), "8": rec("RUNNING", job_id="8")}
    plans = mon.plan([("a", step), ("b", other)])
    assert slurm.asked == [["100", "8"]]
    assert [p.decision.action for p in plans] == [Action.WAIT, Action.WAIT]


def test_user_scancel_fails_even_after_a_clean_stop(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.checkpoint(5)
    w.stop(5, "SIGTERM")
    w.end(75, 5)
    progress(step, 5)
    slurm.records["100"] = rec("CANCELLED", exit_code="0:15", preempted=False)
    p = one(mon, step)
    assert p.decision.action is Action.FAIL and p.decision.event == "cancelled"
    assert "cancelled by scancel" in p.decision.reason


def test_preemption_victim_ending_cancelled_is_a_preemption(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.stop(5, "SIGTERM")
    w.end(75, 5)
    progress(step, 5)
    slurm.records["100"] = rec("CANCELLED", preempted=True)
    p = one(mon, step)
    assert p.observation.state is SlurmJobState.PREEMPTED
    assert p.decision.action is Action.RESUBMIT and p.decision.event == "preemption"


def test_start_without_end_is_a_kill_and_is_resubmitted_after_progress(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.checkpoint(4)
    progress(step, 4)
    slurm.records["100"] = rec("FAILED", exit_code="1:0")
    p = one(mon, step)
    assert p.observation.killed
    assert p.decision.action is Action.RESUBMIT and p.decision.event == "kill"


def test_plain_error_exit_is_not_resubmitted(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.checkpoint(4)
    w.end(1, 4)
    progress(step, 4)
    slurm.records["100"] = rec("FAILED", exit_code="1:0")
    p = one(mon, step)
    assert not p.observation.killed
    assert p.decision.action is Action.FAIL


def test_events_of_an_earlier_job_do_not_count_for_the_current_one(tmp_path: Path) -> None:
    """Job 99 was killed; job 100 (the current one) exited with an error: not a kill."""
    slurm, mon, step = make(tmp_path)
    writer(step, job="99").start(0)
    w = writer(step)
    w.start(0)
    w.end(1, 0)
    progress(step, 3)
    slurm.records["100"] = rec("FAILED", exit_code="1:0")
    assert one(mon, step).decision.action is Action.FAIL


def test_requeued_attempt_is_read_by_its_restart_count(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w0 = writer(step, restart=0)
    w0.start(0)
    w0.end(0, 9)  # an old, clean attempt
    writer(step, restart=1).start(9)  # the requeued run never ended
    progress(step, 12)
    slurm.records["100"] = rec("FAILED", exit_code="1:0", restarts=1)
    assert one(mon, step).observation.killed


def test_stop_on_the_time_limit_signal_is_a_timeout(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.stop(8, "SIGTERM")
    w.end(75, 8)
    progress(step, 8)
    slurm.records["100"] = rec("FAILED", exit_code="75:0", run_seconds=45, time_limit_seconds=60)
    p = one(mon, step)
    assert p.observation.state is SlurmJobState.TIMEOUT
    assert p.decision.action is Action.RESUBMIT and p.decision.event == "timeout"


def test_stale_stop_marker_of_an_earlier_attempt_is_ignored(tmp_path: Path) -> None:
    """A step without events: only a marker written after this submission counts."""
    slurm, mon, step = make(tmp_path)
    assert step.checkpoint_dir is not None
    (step.checkpoint_dir / STOP_MARKER).write_text(json.dumps({"step": 3}))
    step.submitted_at = 10**10  # submitted long after the marker was written
    slurm.records["100"] = rec("FAILED", exit_code="1:0")
    assert one(mon, step).observation.stopped_step is None


def test_deleted_folder_under_a_running_job_is_reported_once(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    assert step.checkpoint_dir is not None
    slurm.records["100"] = rec("RUNNING")
    assert one(mon, step).warnings == ()
    step.checkpoint_dir.rmdir()
    p = one(mon, step)
    assert len(p.warnings) == 1 and "was deleted" in p.warnings[0] and str(step.checkpoint_dir) in p.warnings[0]
    assert one(mon, step).warnings == ()


def test_deleted_folder_is_reported_when_the_job_already_failed(tmp_path: Path) -> None:
    """The step may die of it before any poll sees it running: the failure still says why."""
    slurm, mon, step = make(tmp_path)
    assert step.checkpoint_dir is not None
    step.checkpoint_dir.rmdir()
    slurm.records["100"] = rec("FAILED", exit_code="1:0")
    p = one(mon, step)
    assert p.decision.action is Action.FAIL and len(p.warnings) == 1 and "(failed)" in p.warnings[0]


def test_query_failure_propagates_so_no_job_is_judged(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    slurm.down = True
    with pytest.raises(QueryError):
        mon.plan([("k", step)])


def test_job_unknown_to_every_tool_waits(tmp_path: Path) -> None:
    _, mon, step = make(tmp_path)
    p = one(mon, step)
    assert p.observation.state is SlurmJobState.UNKNOWN and p.decision.action is Action.WAIT


def test_preemptible_partitions(tmp_path: Path) -> None:
    _, mon, _ = make(tmp_path)
    assert mon.preemptible("scavenger") and mon.preemptible("requeue")
    assert not mon.preemptible("normal") and not mon.preemptible(None)


# ---------------------------------------------------------------- issue 21: at cluster scale


def test_finished_step_failed_by_the_limit_signal_is_continued(tmp_path: Path) -> None:
    """The time-limit race: the step ended rc 0, then the signal cancelled its job step (FAILED 1:0)."""
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.checkpoint(8)
    w.end(0, 10)
    progress(step, 8)
    slurm.records["100"] = rec("FAILED", exit_code="1:0", run_seconds=52, time_limit_seconds=60)
    p = one(mon, step)
    assert p.observation.state is SlurmJobState.TIMEOUT
    assert p.decision.action is Action.RESUBMIT and p.decision.event == "timeout"


def test_step_error_inside_the_window_still_fails(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    w.end(1, 4)
    progress(step, 4)
    slurm.records["100"] = rec("FAILED", exit_code="1:0", run_seconds=52, time_limit_seconds=60)
    assert one(mon, step).decision.action is Action.FAIL


def _count_opens() -> list[int]:
    import sys

    box = [0, 0]  # [counting?, opens]

    def hook(event: str, args: tuple) -> None:
        if box[0] and event == "open":
            box[1] += 1

    sys.addaudithook(hook)
    return box


_OPENS = _count_opens()


def test_unchanged_jobs_read_no_files_and_changed_ones_read_only_the_new_events(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    w = writer(step)
    w.start(0)
    for i in range(1, 200):
        w.checkpoint(i)
    slurm.records["100"] = rec("RUNNING")
    one(mon, step)  # first sight: reads the folder
    assert step.folder is not None
    offset = step.folder._offset  # noqa: SLF001 - where the incremental read stopped
    assert offset == step.folder.paths.events.stat().st_size
    _OPENS[0], _OPENS[1] = 1, 0
    try:
        for _ in range(5):
            assert one(mon, step).decision.action is Action.WAIT
        assert _OPENS[1] == 0  # same state: no events, progress or marker read
        w.stop(199, "SIGTERM")
        w.end(75, 199)
        progress(step, 199)
        slurm.records["100"] = rec("FAILED", exit_code="75:0", run_seconds=55, time_limit_seconds=60)
        p = one(mon, step)
    finally:
        _OPENS[0] = 0
    assert p.decision.action is Action.RESUBMIT and p.observation.stopped_step == 199
    assert step.folder._offset == step.folder.paths.events.stat().st_size > offset  # noqa: SLF001 - read on from there


def test_fast_poll_only_while_a_preemptible_step_runs(tmp_path: Path) -> None:
    slurm, mon, step = make(tmp_path)
    slurm.records["100"] = rec("PENDING")
    assert not mon.fast_poll(mon.plan([("k", step)]))
    slurm.records["100"] = rec("RUNNING")
    assert mon.fast_poll(mon.plan([("k", step)]))
    slurm.records["100"] = rec("RUNNING", partition="normal")
    assert not mon.fast_poll(mon.plan([("k", step)]))


def test_unchanged_waiting_job_is_not_decided_again_but_held_ones_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snakemake_executor_plugin_rkslurm import monitor as mon

    calls: list[str] = []
    real = mon.decide
    monkeypatch.setattr(mon, "decide", lambda obs, hist, settings=None: calls.append(obs.state.value) or real(obs, hist, settings))
    slurm, m, step = make(tmp_path, max_held_polls=2)
    slurm.records["100"] = rec("PENDING")
    for _ in range(4):
        (p,) = m.plan([("k", step)])
        step.history = p.decision.history  # as the executor does
        assert p.decision.action is Action.WAIT
    assert calls == ["PENDING"]
    slurm.records["100"] = rec("REQUEUE_HOLD")  # a held job counts its polls: decided every time
    actions = []
    for _ in range(3):
        (p,) = m.plan([("k", step)])
        step.history = p.decision.history
        actions.append(p.decision.action)
    assert actions == [Action.WAIT, Action.WAIT, Action.FAIL] and calls.count("REQUEUE_HOLD") == 3
