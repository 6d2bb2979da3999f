"""The run's story from its log: attempts, restores, stops (preemptions), completion.

The simulate rule appends every attempt's rkrun output to one log beside the
step's checkpoints, between ``rkslurm attempt start``/``end`` lines it writes
itself (with UTC timestamps, Slurm job id and exit code). rkrun's own lines
that matter are ``restored from step S (chain: ...) = full step F + N delta(s)``,
``no checkpoint ...; starting from step 0``, ``stopped at step S on SIGTERM`` and ``done: step S``. Lines are
matched loosely (any prefix, optional timestamp) so a change of log format
costs markers, not a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

_TS = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)")
_ATTEMPT_START = re.compile(r"rkslurm attempt start\b(?P<rest>.*)")
_ATTEMPT_END = re.compile(r"rkslurm attempt end\b(?P<rest>.*)")
_RESTORED = re.compile(r"restored from (?:checkpoint )?(?:at )?step (\d+)", re.I)
_CHAIN = re.compile(r"= full step (\d+) \+ (\d+) delta", re.I)
_FRESH = re.compile(r"starting from step 0|no checkpoint\b", re.I)
_STOPPED = re.compile(r"stopped at step (\d+)(?: on (\w+))?", re.I)
_DONE = re.compile(r"\bdone: step (\d+)", re.I)
_PROGRESS = re.compile(r"\bstep (\d+)/(\d+)\b")
_KV = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class Event:
    kind: str  # attempt_start | attempt_end | restored | fresh | progress | stopped | done
    step: int | None = None
    time: float | None = None  # POSIX seconds
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class Attempt:
    job: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    start_step: int = 0
    end_step: int | None = None
    restored: bool = False
    #: the chain restored from: (step of its full checkpoint, number of deltas applied), when the log says
    chain: tuple[int, int] | None = None
    stopped: bool = False
    stop_signal: str | None = None
    done: bool = False
    rc: int | None = None
    #: another attempt followed without this one saying it ended (killed hard)
    superseded: bool = False
    #: (time, step) points seen during the attempt, for the timeline
    points: list[tuple[float, int]] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        """Ended without finishing: stopped on a signal, exit 75, or killed before saying anything."""
        return not self.done and (self.stopped or self.rc not in (None, 0) or self.superseded)


def _parse_time(text: str) -> float | None:
    m = _TS.search(text)
    if not m:
        return None
    raw = m.group(1).replace(",", ".").replace(" ", "T")
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_line(line: str) -> Event | None:
    t = _parse_time(line)
    if m := _ATTEMPT_START.search(line):
        return Event("attempt_start", None, t, dict(_KV.findall(m.group("rest"))))
    if m := _ATTEMPT_END.search(line):
        return Event("attempt_end", None, t, dict(_KV.findall(m.group("rest"))))
    if m := _RESTORED.search(line):
        c = _CHAIN.search(line)
        return Event("restored", int(m.group(1)), t, {"full_step": c.group(1), "deltas": c.group(2)} if c else {})
    if m := _STOPPED.search(line):
        return Event("stopped", int(m.group(1)), t, {"signal": m.group(2)} if m.group(2) else {})
    if m := _DONE.search(line):
        return Event("done", int(m.group(1)), t)
    if _FRESH.search(line):
        return Event("fresh", 0, t)
    if m := _PROGRESS.search(line):
        return Event("progress", int(m.group(1)), t, {"of": m.group(2)})
    return None


#: the step protocol's JSONL attempt events (rkstep.events, ``rkstep.events.jsonl``) → kinds here
_RKSTEP_KINDS = {"start": "attempt_start", "restore": "restored", "checkpoint": "progress", "stop": "stopped", "end": "attempt_end"}


def _from_json(doc: dict) -> list[Event]:
    kind = _RKSTEP_KINDS.get(doc["event"], doc["event"])
    step = doc.get("step")
    tm = doc.get("time", doc.get("t"))
    info = {k: str(v) for k, v in doc.items() if k not in ("event", "step", "time", "t") and v is not None}
    ev = Event(kind, int(step) if isinstance(step, int) else None, float(tm) if isinstance(tm, int | float) else None, info)
    if kind == "attempt_start" and "restart" in doc:  # an rkstep start: the step, if given, is where it began
        return [Event("attempt_start", None, ev.time, info)] + ([Event("fresh", 0, ev.time)] if step == 0 else [])
    if kind == "attempt_end" and doc.get("rc") == 0 and isinstance(step, int):
        return [Event("done", step, ev.time), ev]
    return [ev]


def parse_log(text: str) -> list[Event]:
    """Events from log text, or from JSON lines: rkstep attempt events
    (``rkstep.events.jsonl``, preferred: no log format to guess) or
    ``{"event": kind, "step": S, "time": t}``."""
    events: list[Event] = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("{"):
            try:
                doc = json.loads(s)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("event"), str):
                events.extend(_from_json(doc))
                continue
        ev = parse_line(line)
        if ev is not None:
            events.append(ev)
    return events


def read_events(path: str | Path) -> list[Event]:
    return parse_log(Path(path).read_text(errors="replace"))


def attempts(events: list[Event]) -> list[Attempt]:
    """Group events into attempts (one per Slurm job or rkrun start)."""
    out: list[Attempt] = []
    cur: Attempt | None = None

    def begin(ev: Event) -> Attempt:
        if out and not out[-1].done:
            out[-1].superseded = True
        a = Attempt(job=ev.info.get("job"), start_time=ev.time)
        out.append(a)
        return a

    for ev in events:
        if ev.kind == "attempt_start":
            cur = begin(ev)
            continue
        if cur is None or (ev.kind in ("restored", "fresh") and (cur.restored or cur.stopped or cur.done)):
            # rkrun lines without our wrapper: a restore/fresh start opens an attempt
            cur = begin(ev)
        if ev.time is not None and ev.step is not None:
            cur.points.append((ev.time, ev.step))
        if ev.kind == "progress":
            cur.end_step = max(cur.end_step or 0, ev.step or 0) if not (cur.stopped or cur.done) else cur.end_step
            continue
        if ev.kind == "restored":
            cur.restored, cur.start_step = True, ev.step or 0
            if ev.info.get("full_step", "").isdigit() and ev.info.get("deltas", "").isdigit():
                cur.chain = (int(ev.info["full_step"]), int(ev.info["deltas"]))
            cur.start_time = cur.start_time if cur.start_time is not None else ev.time
        elif ev.kind == "fresh":
            cur.start_step = 0
            cur.start_time = cur.start_time if cur.start_time is not None else ev.time
        elif ev.kind == "stopped":
            cur.stopped, cur.end_step, cur.stop_signal = True, ev.step, ev.info.get("signal")
            cur.end_time = ev.time if ev.time is not None else cur.end_time
        elif ev.kind == "done":
            cur.done, cur.end_step = True, ev.step
            cur.end_time = ev.time if ev.time is not None else cur.end_time
        elif ev.kind == "attempt_end":
            rc = ev.info.get("rc")
            cur.rc = int(rc) if rc is not None and rc.lstrip("-").isdigit() else None
            cur.end_time = ev.time if ev.time is not None else cur.end_time
            cur = None
    return out


def summarise(runs: list[Attempt]) -> dict[str, object]:
    return {
        "attempts": len(runs),
        "interruptions": sum(1 for a in runs if a.interrupted),
        "stops_on_signal": sum(1 for a in runs if a.stopped),
        "restores": sum(1 for a in runs if a.restored),
        "restored_from": [a.start_step for a in runs if a.restored],
        "restored_chains": [list(a.chain) for a in runs if a.restored and a.chain is not None],
        "stopped_at": [a.end_step for a in runs if a.stopped],
        "completed": any(a.done for a in runs),
        "jobs": [a.job for a in runs if a.job],
    }
