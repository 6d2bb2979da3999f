"""The step protocol: events written by a step, read back by the executor."""

from __future__ import annotations

from pathlib import Path

from rkstep import EventWriter, StepPaths, attempts, latest_attempt, read_events, submission_tag
from rkstep.protocol import EX_TEMPFAIL, fingerprint


def test_events_roundtrip_into_attempts(tmp_path: Path) -> None:
    p = StepPaths(tmp_path)
    w = EventWriter(p.events, job="5", restart=0)
    w.start(0)
    w.checkpoint(10)
    w.stop(12, "SIGTERM")
    w.end(EX_TEMPFAIL, 12)
    w2 = EventWriter(p.events, job="6", restart=0)
    w2.start(12)
    w2.restore(12, ["k-000000000012-full.rkcp"])
    (a, b) = attempts(read_events(p.events))
    assert a.job == "5" and a.ended and a.stopped and not a.killed and a.last_checkpoint == 12
    assert b.job == "6" and b.killed and b.restored_from == 12 and b.chain == ["k-000000000012-full.rkcp"]
    assert latest_attempt(read_events(p.events), "6") is not None
    assert latest_attempt(read_events(p.events), "7") is None


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    p = StepPaths(tmp_path)
    EventWriter(p.events, job="1").start(0)
    with open(p.events, "a") as f:
        f.write('{"event": "checkpoint", "st')  # killed mid-write
    (a,) = attempts(read_events(p.events))
    assert a.killed and a.checkpoints == []


def test_missing_file_reads_as_no_events(tmp_path: Path) -> None:
    assert read_events(tmp_path / "nope.jsonl") == []


def test_writer_reports_a_deleted_folder_once_and_never_raises(tmp_path: Path) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    said: list[str] = []
    w = EventWriter(StepPaths(folder).events, job="1", warn=said.append)
    w.start(0)
    (folder / "rkstep.events.jsonl").unlink()
    folder.rmdir()
    w.checkpoint(1)
    w.checkpoint(2)
    assert len(said) == 1 and "no longer exists" in said[0] and str(folder) in said[0]


def test_writer_takes_job_and_restart_from_slurm(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    w = EventWriter.for_folder(tmp_path)
    w.start(3)
    (a,) = attempts(read_events(StepPaths(tmp_path).events))
    assert (a.job, a.restart, a.start_step) == ("42", 2, 3)


def test_fingerprint_and_tag_are_stable_and_content_based(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    a = fingerprint({"rule": "r"}, [f])
    assert a == fingerprint({"rule": "r"}, [str(f)])
    f.write_bytes(b"abd")
    assert a != fingerprint({"rule": "r"}, [f])
    assert submission_tag("/a/b") == submission_tag("/a/b") != submission_tag("/a/c")
    assert submission_tag("/a/b").startswith("rkslurm:") and len(submission_tag("/a/b")) < 64


def test_run_attempt_brackets_the_body_and_records_its_exit(tmp_path: Path) -> None:
    from rkstep import run_attempt

    assert run_attempt(tmp_path, lambda ev: (ev.checkpoint(3), EX_TEMPFAIL)[1]) == EX_TEMPFAIL

    def boom(ev: EventWriter) -> int:
        raise RuntimeError("x")

    try:
        run_attempt(tmp_path, boom)
    except RuntimeError:
        pass
    a, b = attempts(read_events(StepPaths(tmp_path).events))
    assert a.ended and a.end_rc == EX_TEMPFAIL and a.checkpoints == [3]
    assert b.ended and b.end_rc == 1 and not b.killed


def test_url_checkpoint_location_records_nothing(tmp_path: Path) -> None:
    from rkstep import NullWriter, writer_for

    w = writer_for("s3://bucket/ck")
    assert isinstance(w, NullWriter)
    w.start(0)  # no file, no error


def test_requeued_run_counts_its_restart_from_earlier_starts(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A job step may not see SLURM_RESTART_COUNT; the events file knows the job id ran before."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    EventWriter.for_folder(tmp_path).start(0)
    EventWriter.for_folder(tmp_path).start(5)
    assert [a.restart for a in attempts(read_events(StepPaths(tmp_path).events))] == [0, 1]


def test_events_of_another_attempt_do_not_end_the_current_one(tmp_path: Path) -> None:
    p = StepPaths(tmp_path)
    EventWriter(p.events, job="1").start(0)
    EventWriter(p.events, job="2").end(2)  # job 2 failed before its start event
    (a,) = attempts(read_events(p.events))
    assert a.job == "1" and a.killed
