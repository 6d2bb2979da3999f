"""Structured attempt events: the step says what it did, the executor reads it.

Each attempt of a step appends JSON lines to ``<checkpoint folder>/rkstep.events.jsonl``::

    {"event": "start", "job": "123", "restart": 0, "step": 0, ...}
    {"event": "restore", "step": 400, "chain": ["wavesim-000000000400-full.rkcp"]}
    {"event": "checkpoint", "step": 500}
    {"event": "stop", "step": 512, "signal": "SIGTERM"}
    {"event": "end", "rc": 75, "step": 512}

An attempt with a ``start`` and no ``end`` was killed (SIGKILL, OOM killer, a
node that went away): nothing else can end a process without running its
``finally``. Readers replace grepping log text; a torn last line (the writer
killed mid-write) is skipped, never an error.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import EX_FAILURE, EX_TEMPFAIL, slurm_attempt

__all__ = ["Attempt", "EventWriter", "NullWriter", "attempts", "latest_attempt", "read_events", "run_attempt", "writer_for"]


def _stderr_warning(text: str) -> None:
    print(f"rkstep: {text}", file=sys.stderr, flush=True)


@dataclass
class EventWriter:
    """Appends this attempt's events; never raises (the checkpoint is what matters).

    A failing write (the folder deleted mid-run, a full disk) is reported
    once through ``warn`` -- by default on the process's stderr, which Slurm
    keeps in the job log outside the checkpoint folder.
    """

    path: Path
    job: str | None = None
    restart: int = 0
    warn: Callable[[str], None] = _stderr_warning
    _failed: bool = field(default=False, init=False, repr=False)

    @classmethod
    def for_folder(cls, folder: str | os.PathLike[str], **kw: Any) -> EventWriter:
        """The writer of the running attempt (job id and restart count from Slurm's environment)."""
        from .protocol import StepPaths

        job, restart = slurm_attempt()
        path = StepPaths(Path(folder)).events
        if job is not None and restart == 0 and "SLURM_RESTART_COUNT" not in os.environ:
            # Slurm sets SLURM_RESTART_COUNT in the batch script of a requeued job only; a
            # job step may not see it. Earlier starts of the same job id tell the count.
            restart = sum(1 for e in read_events(path) if e.get("event") == "start" and str(e.get("job")) == job)
        return cls(path, job=job, restart=restart, **kw)

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "t": round(time.time(), 3), "job": self.job, "restart": self.restart, "pid": os.getpid(), **fields}
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if self._failed:
                self._failed = False
                self.warn(f"writing {self.path} works again")
        except OSError as exc:
            if not self._failed:
                self._failed = True
                gone = "" if self.path.parent.is_dir() else " (the checkpoint folder no longer exists: was it deleted?)"
                self.warn(f"cannot record event {event!r} in {self.path}: {exc.strerror or exc}{gone}")

    def start(self, step: int | None = None, **kw: Any) -> None:
        """First event of an attempt (``step`` may follow in a ``restore`` event)."""
        self.emit("start", step=None if step is None else int(step), host=socket.gethostname(), **kw)

    def restore(self, step: int, chain: Iterable[str]) -> None:
        self.emit("restore", step=int(step), chain=list(chain))

    def checkpoint(self, step: int, **kw: Any) -> None:
        self.emit("checkpoint", step=int(step), **kw)

    def stop(self, step: int, signal: str | None) -> None:
        self.emit("stop", step=int(step), signal=signal)

    def end(self, rc: int, step: int | None = None) -> None:
        self.emit("end", rc=int(rc), step=step)


class NullWriter(EventWriter):
    """For a checkpoint location that is not a local folder (``s3://…``): records nothing."""

    def emit(self, event: str, **fields: Any) -> None:
        return None


def writer_for(checkpoint_dir: str | os.PathLike[str]) -> EventWriter:
    """The running attempt's writer for a checkpoint folder, or a :class:`NullWriter` for a URL."""
    text = os.fspath(checkpoint_dir)
    if "://" in text:
        return NullWriter(Path(os.devnull))
    try:
        os.makedirs(text, exist_ok=True)
    except OSError:
        pass  # reported by the first event that cannot be written
    return EventWriter.for_folder(text)


def run_attempt(checkpoint_dir: str | os.PathLike[str], body: Callable[[EventWriter], int]) -> int:
    """Run one attempt between a ``start`` and an ``end`` event.

    ``end`` carries ``body``'s exit code, or 1 when it raised (the exception
    propagates). Only a signal that cannot be caught leaves the start alone.
    """
    events = writer_for(checkpoint_dir)
    events.start()
    rc = EX_FAILURE
    try:
        rc = body(events)
        return rc
    finally:
        events.end(rc)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All well-formed events in the file, in order; [] when it does not exist."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write
        if isinstance(rec, dict) and isinstance(rec.get("event"), str):
            out.append(rec)
    return out


@dataclass
class Attempt:
    """One run of the step (one Slurm job id and restart count), from its events."""

    job: str | None
    restart: int
    start_step: int | None = None
    start_time: float | None = None
    restored_from: int | None = None
    chain: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    stopped_step: int | None = None
    stop_signal: str | None = None
    end_rc: int | None = None
    end_step: int | None = None
    end_time: float | None = None
    ended: bool = False

    @property
    def killed(self) -> bool:
        """Started and never said it ended: killed by a signal it could not catch."""
        return not self.ended

    @property
    def stopped(self) -> bool:
        """Stopped on a signal after saving its final checkpoint (resumable)."""
        return self.stopped_step is not None or self.end_rc == EX_TEMPFAIL

    @property
    def last_checkpoint(self) -> int | None:
        steps = [*self.checkpoints, *([self.stopped_step] if self.stopped_step is not None else [])]
        return max(steps) if steps else None


def attempts(events: Iterable[dict[str, Any]]) -> list[Attempt]:
    """Group events into attempts; each ``start`` opens a new one."""
    out: list[Attempt] = []
    for e in events:
        kind = e.get("event")
        if kind == "start":
            out.append(
                Attempt(
                    job=None if e.get("job") is None else str(e.get("job")),
                    restart=int(e.get("restart") or 0),
                    start_step=e.get("step"),
                    start_time=e.get("t"),
                )
            )
            continue
        if not out:
            continue
        a = out[-1]
        if "job" in e and (None if e["job"] is None else str(e["job"])) != a.job or int(e.get("restart") or 0) != a.restart:
            continue  # an event of another attempt (one that failed before its start, say)
        if kind == "restore":
            a.restored_from = e.get("step")
            if a.start_step is None:
                a.start_step = e.get("step")
            a.chain = [str(c) for c in e.get("chain") or []]
        elif kind == "checkpoint" and isinstance(e.get("step"), int):
            a.checkpoints.append(e["step"])
        elif kind == "stop":
            a.stopped_step = e.get("step")
            a.stop_signal = e.get("signal")
        elif kind == "end":
            a.ended = True
            a.end_rc = e.get("rc")
            a.end_step = e.get("step")
            a.end_time = e.get("t")
    return out


def latest_attempt(events: Iterable[dict[str, Any]], job: str) -> Attempt | None:
    """The newest attempt of Slurm job ``job`` (a requeued job has one per restart)."""
    mine = [a for a in attempts(events) if a.job == str(job)]
    return max(enumerate(mine), key=lambda t: (t[1].restart, t[0]))[1] if mine else None
