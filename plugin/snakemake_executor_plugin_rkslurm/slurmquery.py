"""Ask Slurm about our jobs without trusting any single tool.

``scontrol show job`` is authoritative while slurmctld still knows a job (it
alone shows Restarts, and never a transient PREEMPTED under PreemptMode=
REQUEUE); ``sacct`` covers jobs slurmctld has purged and the time slurmctld is
restarting; with accounting disabled only scontrol/squeue exist. A failing
tool is reported as an error, never as a job state, so a slurmctld restart
cannot fail a job.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass


class QueryError(RuntimeError):
    """Every available tool failed; the caller waits and retries."""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    state: str
    exit_code: str | None = None
    restarts: int | None = None
    node: str | None = None
    partition: str | None = None
    requeue: bool | None = None
    run_seconds: int | None = None
    time_limit_seconds: int | None = None
    #: slurmctld chose this run as a preemption victim (scontrol PreemptTime); None: unknown (sacct)
    preempted: bool | None = False
    source: str = "scontrol"
    comment: str | None = None


def parse_duration(text: str | None) -> int | None:
    """Slurm ``[D-]HH:MM:SS`` / ``MM:SS`` / minutes → seconds; None for UNLIMITED etc."""
    if not text:
        return None
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
    if not m:
        return None
    days = int(m.group(1) or 0)
    parts = [int(p) for p in m.group(2, 3, 4) if p is not None]
    if len(parts) == 3:
        h, mi, s = parts
    elif len(parts) == 2:
        # "MM:SS", or "D-HH:MM" when a day part is present
        if m.group(1):
            h, mi, s = parts[0], parts[1], 0
        else:
            h, mi, s = 0, parts[0], parts[1]
    else:
        h, mi, s = (parts[0], 0, 0) if m.group(1) else (0, parts[0], 0)
    return ((days * 24 + h) * 60 + mi) * 60 + s


def _kv_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces`` → dict (spaces join into the previous value)."""
    out: dict[str, str] = {}
    last: str | None = None
    for tok in line.split(" "):
        if not tok:
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9_/:]*)=(.*)$", tok)
        if m:
            last = m.group(1)
            out[last] = m.group(2)
        elif last is not None:
            out[last] += " " + tok
    return out


def _null(v: str | None) -> str | None:
    return None if v in (None, "", "(null)", "None") else v


def _preempted_this_run(kv: dict[str, str]) -> bool:
    """PreemptTime set and not older than this run's StartTime (a requeued job keeps its old one)."""
    pt, st = _null(kv.get("PreemptTime")), _null(kv.get("StartTime"))
    if pt is None or pt == "Unknown":
        return False
    return st is None or st == "Unknown" or pt >= st  # same ISO format: string order is time order


def parse_scontrol(text: str) -> dict[str, JobRecord]:
    jobs: dict[str, JobRecord] = {}
    for line in text.splitlines():
        kv = _kv_line(line.strip())
        if "JobId" not in kv:
            continue
        restarts = kv.get("Restarts")
        jobs[kv["JobId"]] = JobRecord(
            job_id=kv["JobId"],
            state=kv.get("JobState", "UNKNOWN"),
            exit_code=kv.get("ExitCode"),
            restarts=int(restarts) if restarts and restarts.isdigit() else None,
            node=_null(kv.get("BatchHost")) or _null(kv.get("NodeList")),
            partition=_null(kv.get("Partition")),
            requeue=kv.get("Requeue") == "1" if "Requeue" in kv else None,
            run_seconds=parse_duration(kv.get("RunTime")),
            time_limit_seconds=parse_duration(kv.get("TimeLimit")),
            preempted=_preempted_this_run(kv),
            source="scontrol",
            comment=_null(kv.get("Comment")),
        )
    return jobs


def parse_sacct(text: str) -> dict[str, JobRecord]:
    jobs: dict[str, JobRecord] = {}
    for line in text.splitlines():
        f = line.strip().split("|")
        if len(f) < 7 or not f[0]:
            continue
        jobs[f[0]] = JobRecord(
            job_id=f[0],
            state=f[1],
            exit_code=f[2] or None,
            node=_null(f[3]) if f[3] != "None assigned" else None,
            partition=_null(f[4]),
            run_seconds=parse_duration(f[5]),
            time_limit_seconds=parse_duration(f[6]),
            preempted=None,
            source="sacct",
        )
    return jobs


def _run(cmd: list[str], timeout: float) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise QueryError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[:300]}")
    return p.stdout


def query(job_ids: Iterable[str], use_sacct: bool = True, timeout: float = 20.0) -> dict[str, JobRecord]:
    """Current record of each id that any tool knows about.

    Raises QueryError only when no tool answered at all. Ids missing from
    the result are unknown to every tool that answered.
    """
    ids = [str(i) for i in job_ids]
    if not ids:
        return {}
    errors: list[str] = []
    found: dict[str, JobRecord] = {}
    try:
        # one call per id: ask only about our jobs, not every job on the cluster
        for i in ids:
            found.update({k: v for k, v in parse_scontrol(_scontrol_job(i, timeout)).items() if k == i})
    except (QueryError, OSError, subprocess.SubprocessError) as e:
        errors.append(str(e))
    missing = [i for i in ids if i not in found]
    if missing and use_sacct:
        try:
            out = _run(
                ["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", "JobIDRaw,State,ExitCode,NodeList,Partition,Elapsed,Timelimit"],
                timeout,
            )
            recs = parse_sacct(out)
            found.update({i: recs[i] for i in missing if i in recs})
        except (QueryError, OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    if len(errors) == (2 if (missing and use_sacct) else 1) and not found:
        raise QueryError("; ".join(errors))
    return found


def _scontrol_job(job_id: str, timeout: float) -> str:
    """``scontrol show job -o ID``; "" for an id slurmctld no longer knows (purged: sacct's turn)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return ""
        raise QueryError(f"scontrol show job {job_id} exited {p.returncode}: {p.stderr.strip()[:300]}")
    return p.stdout


def tagged_jobs(tag: str, timeout: float = 20.0) -> list[tuple[str, str]]:
    """(job id, state) of this user's queued or running jobs whose ``--comment`` has the word ``tag``.

    Raises QueryError when squeue fails: the caller must not take "cannot
    ask" for "no such job" (that would submit a duplicate).
    """
    user = os.environ.get("USER") or getpass.getuser()
    out = _run(["squeue", "-h", "-u", user, "-o", "%i|%k|%T"], timeout)
    found = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and tag in parts[1].split():
            found.append((parts[0], parts[2]))
    return found


def partition_preempt_modes(timeout: float = 20.0) -> dict[str, str]:
    """PreemptMode per partition (upper case), e.g. {"scavenger": "CANCEL"}; {} on failure."""
    try:
        out = _run(["scontrol", "show", "partition", "-o"], timeout)
    except (QueryError, OSError, subprocess.SubprocessError):
        return {}
    modes: dict[str, str] = {}
    for line in out.splitlines():
        kv = _kv_line(line.strip())
        if "PartitionName" in kv:
            modes[kv["PartitionName"]] = kv.get("PreemptMode", "OFF").upper()
    return modes


def default_partition(timeout: float = 20.0) -> str | None:
    try:
        out = _run(["scontrol", "show", "partition", "-o"], timeout)
    except (QueryError, OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        kv = _kv_line(line.strip())
        if kv.get("Default") == "YES":
            return kv.get("PartitionName")
    return None


def cancel(job_id: str, timeout: float = 20.0) -> None:
    try:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        pass
