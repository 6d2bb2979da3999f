"""Structured attempt events: the step says what it did, the executor reads it.

Each attempt of a step appends JSON lines to ``<checkpoint folder>/rkstep.events.jsonl``::

    {"event": "start", "job": "123", "restart": 0, "step": 0, "ranks": 4, ...}
    {"event": "restore", "step": 400, "chain": ["wavesim-000000000400-full.rkcp"]}
    {"event": "checkpoint", "step": 500}
    {"event": "stop", "step": 512, "signal": "SIGTERM"}
    {"event": "end", "rc": 75, "step": 512}

An attempt with a ``start`` and no ``end`` was killed (SIGKILL, OOM killer, a
node that went away): nothing else can end a process without running its
``finally``. So was a multi-rank attempt whose rank 0 wrote ``rank-lost``
(another rank was killed; rank 0 survived it and ended rc 1). Readers replace grepping log text; a torn last line (the writer
killed mid-write) is skipped, never an error.

``ranks`` in ``start`` is how many processes run the attempt (``rkrun``: the
MPI world size, 1 alone). Only rank 0 of a multi-rank step writes events, so
this is the one record of the attempt's rank count (the timeline reads it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .env import JobEnvironment
from .protocol import EX_FAILURE, EX_TEMPFAIL
from .safeio import FolderError, append_line, ensure_private_folder, finite_number, parse_json, read_tail

__all__ = [
    "Attempt",
    "AttemptLog",
    "EventWriter",
    "NullWriter",
    "attempts",
    "latest_attempt",
    "newest_checkpoint",
    "parse_events",
    "read_events",
    "run_attempt",
    "summarise",
    "writer_for",
]

#: ``<kernel>-<step:012d>-<full|delta>...``: the step of a chain's first (full) checkpoint
_CHAIN_NAME = re.compile(r"-(\d{12})-full\b")
#: a whole events file larger than this is read from its tail (the newest events)
EVENTS_MAX_BYTES = 16 << 20
#: an event line is a few hundred bytes; a longer one is not ours
LINE_MAX_BYTES = 64 << 10
#: a ``start`` event's rank count above this is not one a launcher gave
MAX_RANKS = 1 << 20


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

        env = JobEnvironment.current()
        job, restart = env.job_id, env.restart_count or 0
        path = StepPaths(Path(folder)).events
        if job is not None and env.restart_count is None:
            # Slurm sets SLURM_RESTART_COUNT in the batch script of a requeued job only; a
            # job step may not see it. Earlier starts of the same job id tell the count.
            restart = sum(
                1 for e in read_events(path, warn=kw.get("warn", _stderr_warning)) if e["event"] == "start" and e.get("job") == job
            )
        return cls(path, job=job, restart=restart, **kw)

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, "t": round(time.time(), 3), "job": self.job, "restart": self.restart, "pid": os.getpid(), **fields}
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode()
        try:
            append_line(self.path, line)  # never through a planted link, never into a FIFO
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


def writer_for(checkpoint_dir: str | os.PathLike[str], warn: Callable[[str], None] = _stderr_warning) -> EventWriter:
    """The running attempt's writer for a checkpoint folder, or a :class:`NullWriter` for a URL.

    The folder is created 0700 and checked (ours, a real folder, not writable by
    others) *before* the events file is opened; a folder that fails the check
    gets a :class:`NullWriter` and one warning (the step's own storage refuses it too).
    """
    text = os.fspath(checkpoint_dir)
    if "://" in text:
        return NullWriter(Path(os.devnull))
    try:
        ensure_private_folder(Path(text))
    except FolderError as exc:
        warn(f"not recording attempt events: {exc}")
        return NullWriter(Path(os.devnull))
    except OSError:
        pass  # reported by the first event that cannot be written
    return EventWriter.for_folder(text, warn=warn)


def run_attempt(checkpoint_dir: str | os.PathLike[str], body: Callable[[EventWriter], int], **start: Any) -> int:
    """Run one attempt between a ``start`` and an ``end`` event.

    ``end`` carries ``body``'s exit code, or 1 when it raised (the exception
    propagates). Only a signal that cannot be caught leaves the start alone.
    ``start``: further fields of the ``start`` event (``ranks``: how many
    processes run this attempt, so readers need no record of their own).
    """
    events = writer_for(checkpoint_dir)
    events.start(**start)
    rc = EX_FAILURE
    try:
        rc = body(events)
        return rc
    finally:
        events.end(rc)


def _int(v: Any, minimum: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def _checked(rec: Any) -> dict[str, Any] | None:
    """The event with its fields' types checked (job as text), or None when any field is not what a writer writes."""
    if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
        return None
    job = rec.get("job")
    if job is not None and not (isinstance(job, str) and len(job) <= 64) and not _int(job, 0):
        return None
    for name in ("restart", "pid"):
        if rec.get(name) is not None and not _int(rec[name], 0):
            return None
    for name in ("step", "rc"):
        if rec.get(name) is not None and not _int(rec[name]):
            return None
    if rec.get("ranks") is not None and not (_int(rec["ranks"], 1) and rec["ranks"] <= MAX_RANKS):
        return None
    if rec.get("t") is not None and not finite_number(rec["t"]):
        return None
    if rec.get("signal") is not None and not isinstance(rec["signal"], str):
        return None
    chain = rec.get("chain")
    if chain is not None and not (isinstance(chain, list) and all(isinstance(c, str) for c in chain)):
        return None
    return {**rec, "job": None if job is None else str(job), "restart": rec.get("restart") or 0}


def parse_events(data: bytes, warn: Callable[[str], None] | None = None, source: str = "events") -> list[dict[str, Any]]:
    """Well-formed events of JSON lines ``data``; every other line is skipped, with one warning for all of them.

    A torn last line (the writer killed mid-write) never reaches here (readers
    take whole lines); a line that is too long, nested too deep, holds NaN, or
    whose fields have the wrong types is hostile or damaged, never an error.
    """
    out: list[dict[str, Any]] = []
    bad = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        rec = None
        if len(raw) <= LINE_MAX_BYTES:
            try:
                rec = _checked(parse_json(raw))
            except (ValueError, UnicodeDecodeError):
                rec = None
        if rec is None:
            bad += 1
        else:
            out.append(rec)
    if bad and warn is not None:
        warn(f"{source}: skipped {bad} line(s) that are not well-formed attempt events")
    return out


def read_events(path: str | os.PathLike[str], warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Well-formed events in the file, in order (its newest ``EVENTS_MAX_BYTES`` only); [] when it
    does not exist or is not a regular file (a FIFO, a link: never followed, never waited on)."""
    try:
        tail = read_tail(path, 0, EVENTS_MAX_BYTES)
    except OSError:
        return []
    if tail.skipped and warn is not None:
        warn(f"{os.fspath(path)}: {tail.skipped} bytes; reading only the newest {EVENTS_MAX_BYTES} bytes of events")
    return parse_events(tail.data, warn, os.fspath(path))


@dataclass
class Attempt:
    """One run of the step (one Slurm job id and restart count), from its events."""

    job: str | None
    restart: int
    #: the process that wrote the start (events of another process never end this attempt)
    pid: int | None = None
    start_step: int | None = None
    start_time: float | None = None
    #: processes (MPI ranks) that ran this attempt, from its ``start``; None when the writer did not say
    ranks: int | None = None
    restored_from: int | None = None
    chain: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    #: (time, step) of each checkpoint event, for timelines
    points: list[tuple[float, int]] = field(default_factory=list)
    stopped_step: int | None = None
    stop_signal: str | None = None
    end_rc: int | None = None
    end_step: int | None = None
    end_time: float | None = None
    ended: bool = False
    #: a multi-rank step whose rank 0 lost a peer (``rank-lost``): a rank was killed, the survivors ended
    rank_lost: bool = False

    @property
    def killed(self) -> bool:
        """Started and never said it ended, or lost a rank: killed by a signal it could not catch.

        A rank SIGKILLed (or on a node that died) never writes an end; rank 0,
        which keeps the events, survives it and ends rc 1. The attempt as a whole
        was still killed, so it is resumable like a one-process kill.
        """
        return not self.ended or self.rank_lost

    @property
    def stopped(self) -> bool:
        """Stopped on a signal after saving its final checkpoint (resumable)."""
        return self.stopped_step is not None or self.end_rc == EX_TEMPFAIL

    @property
    def last_checkpoint(self) -> int | None:
        steps = [*self.checkpoints, *([self.stopped_step] if self.stopped_step is not None else [])]
        return max(steps) if steps else None

    @property
    def reached(self) -> int | None:
        """The furthest step the events show: the end's step, else the newest checkpoint, else where it began."""
        if self.end_step is not None:
            return self.end_step
        last = self.last_checkpoint
        return last if last is not None else self.start_step

    @property
    def restored(self) -> bool:
        return self.restored_from is not None

    @property
    def done(self) -> bool:
        """Ended with exit code 0: the step finished."""
        return self.ended and self.end_rc == 0

    @property
    def interrupted(self) -> bool:
        """Ended without finishing: stopped on a signal, an error exit, or killed before saying anything."""
        return not self.done

    @property
    def chain_shape(self) -> tuple[int, int] | None:
        """(step of the full checkpoint, number of deltas) of the chain restored from, from its names."""
        if not self.chain:
            return None
        m = _CHAIN_NAME.search(self.chain[0])
        return (int(m.group(1)), len(self.chain) - 1) if m else None


class AttemptLog:
    """Attempts grouped from events fed in any number of pieces (the executor reads a file incrementally).

    Each ``start`` opens an attempt keyed by (job, restart, pid); every later
    event goes to the attempt of its own key, so two processes writing into
    the same file (a second rkrun started by hand, a requeue that overlapped)
    never end each other's attempts. Events of an unknown attempt are dropped.
    """

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        #: newest step any checkpoint/stop/restore event names, whether or not its attempt's start was read
        self.newest_checkpoint: int | None = None
        self._by_key: dict[tuple[str | None, int, int | None], Attempt] = {}

    def add(self, events: Iterable[dict[str, Any]]) -> None:
        for raw in events:
            e = _checked(raw)
            if e is not None:
                self._add(e)

    def _add(self, e: dict[str, Any]) -> None:
        kind, key = e["event"], (e["job"], e["restart"], e.get("pid"))
        if kind in ("checkpoint", "stop", "restore") and e.get("step") is not None:
            self.newest_checkpoint = e["step"] if self.newest_checkpoint is None else max(self.newest_checkpoint, e["step"])
        if kind == "start":
            a = Attempt(
                job=e["job"], restart=e["restart"], pid=e.get("pid"), start_step=e.get("step"), start_time=e.get("t"), ranks=e.get("ranks")
            )
            self.attempts.append(a)
            self._by_key[key] = a
            return
        a = self._by_key.get(key)
        if a is None and e.get("pid") is None:  # events written before pids were recorded
            a = next((x for x in reversed(self.attempts) if (x.job, x.restart) == key[:2]), None)
        if a is None:
            return  # an event of an attempt whose start we never saw
        if kind == "restore":
            a.restored_from = e.get("step")
            if a.start_step is None:
                a.start_step = e.get("step")
            a.chain = list(e.get("chain") or [])
        elif kind == "checkpoint" and e.get("step") is not None:
            a.checkpoints.append(e["step"])
            if e.get("t") is not None:
                a.points.append((float(e["t"]), e["step"]))
        elif kind == "stop":
            a.stopped_step = e.get("step")
            a.stop_signal = e.get("signal")
        elif kind == "rank-lost":
            a.rank_lost = True
        elif kind == "end":
            a.ended = True
            a.end_rc = e.get("rc")
            a.end_step = e.get("step")
            a.end_time = e.get("t")

    def latest(self, job: str) -> Attempt | None:
        """The newest attempt of Slurm job ``job`` (a requeued job has one per restart)."""
        mine = [(a.restart, i, a) for i, a in enumerate(self.attempts) if a.job == str(job)]
        return max(mine, key=lambda t: (t[0], t[1]))[2] if mine else None


def attempts(events: Iterable[dict[str, Any]]) -> list[Attempt]:
    """Group events into attempts (see :class:`AttemptLog`), in the order they started."""
    log = AttemptLog()
    log.add(events)
    return log.attempts


def newest_checkpoint(runs: Iterable[Attempt]) -> int | None:
    """The newest step any attempt checkpointed (or restored from), from the events alone."""
    steps = [s for a in runs for s in (a.last_checkpoint, a.restored_from) if s is not None]
    return max(steps) if steps else None


def latest_attempt(events: Iterable[dict[str, Any]], job: str) -> Attempt | None:
    """The newest attempt of Slurm job ``job`` (a requeued job has one per restart)."""
    log = AttemptLog()
    log.add(events)
    return log.latest(job)


def summarise(runs: list[Attempt]) -> dict[str, object]:
    """The numbers a report or a plot title needs about a step's attempts."""
    return {
        "attempts": len(runs),
        "interruptions": sum(1 for a in runs if a.interrupted),
        "stops_on_signal": sum(1 for a in runs if a.stopped),
        "restores": sum(1 for a in runs if a.restored),
        "restored_from": [a.restored_from for a in runs if a.restored],
        "restored_chains": [list(a.chain_shape) for a in runs if a.restored and a.chain_shape is not None],
        "stopped_at": [a.stopped_step for a in runs if a.stopped_step is not None],
        "completed": any(a.done for a in runs),
        "jobs": [a.job for a in runs if a.job],
    }
