"""Ask Slurm about our jobs without trusting any single tool.

slurmctld's view (one ``squeue -j`` call for all of this head's ids per
poll, see the table above :data:`SQUEUE_FIELDS`) is authoritative while it
still knows a job (Restarts, PreemptTime, and never a transient PREEMPTED
under PreemptMode=REQUEUE); ``sacct`` covers jobs slurmctld has purged and
the time slurmctld is restarting; with accounting disabled only squeue/scontrol
exist. A failing tool is reported as an error, never as a job state, so a
slurmctld restart cannot fail a job; a rate-limited or slow slurmctld is
:class:`SlurmBusy` (the caller backs off).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .pendingshrink import parse_free, parse_reasons
from .ranks import expand_hostlist


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
    #: the job's whole node list (Slurm's compact form, ``n[1-2]``); filled for node failures and by sacct
    nodes: str | None = None
    #: of ``nodes``, those Slurm reports down, drained or failed now (asked only for a node failure)
    failed_nodes: tuple[str, ...] | None = None


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
            nodes=_null(f[3]) if f[3] != "None assigned" else None,
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


# Which tool gives which field (checked on Slurm 22.05.8, the local cluster; the
# same fields exist in 23.02, 23.11 and 24.05 by their man pages):
#
# | field            | squeue -O (22.05+)        | squeue --json         | scontrol show job      | sacct -j           |
# |------------------|---------------------------|-----------------------|------------------------|--------------------|
# | state            | State                     | job_state             | JobState               | State              |
# | restarts         | RestartCnt                | restart_cnt           | Restarts               | -- (no field)      |
# | PreemptTime      | PreemptTime (+StartTime)  | preempt_time          | PreemptTime            | -- (no field)      |
# | node             | BatchHost / NodeList      | batch_host            | BatchHost              | NodeList           |
# | exit code        | exit_code (raw wait status| exit_code             | ExitCode (code:signal) | ExitCode           |
# |                  |  e.g. 768 = exit 3)       |                       |                        |                    |
# | run time / limit | TimeUsed / TimeLimit      | (start/end times)     | RunTime / TimeLimit    | Elapsed/Timelimit  |
# | many ids at once | yes (-j a,b,c -t all)     | yes, but ~40x output  | no: one id, or ALL jobs| yes                |
#
# So one ``squeue -h -t all -j ID,ID,... -O ...`` call answers every field for every
# job slurmctld still holds (running, pending, and finished ones for MinJobAge,
# 300 s by default), with our ids only. ``scontrol show job`` is one id per call
# (the old N-calls-per-poll cost); ``--json`` needs the data_parser plugin and
# prints ~4 KiB per job. sacct lacks Restarts and PreemptTime, so it is only the
# fallback for ids slurmctld no longer knows (one call for all of them).
SQUEUE_FIELDS = (
    "JobID",
    "State",
    "RestartCnt",
    "PreemptTime",
    "StartTime",
    "BatchHost",
    "exit_code",
    "TimeUsed",
    "TimeLimit",
    "Partition",
    "Requeue",
    "Comment",  # last: it may hold the separator
)
_SEP = "|"
SQUEUE_FORMAT = ",".join(f"{f}:{_SEP}" if f != SQUEUE_FIELDS[-1] else f"{f}:" for f in SQUEUE_FIELDS)
SACCT_FIELDS = "JobIDRaw,State,ExitCode,NodeList,Partition,Elapsed,Timelimit"

#: stderr of a Slurm client that says "slurmctld is busy or away", not "bad request"
BUSY_ERROR = re.compile(
    r"rate limit|Request rate limit exceeded|Socket timed out|timed out|Unable to contact slurm controller|"
    r"Slurm temporarily unable|temporarily unavailable|Connection refused|Zero Bytes were transmitted|"
    r"Resource temporarily unavailable|Transport endpoint",
    re.I,
)


class SlurmBusy(QueryError):
    """slurmctld rate-limited us, timed out or is away: back off and ask again later."""


def _raw_exit(text: str | None) -> str | None:
    """squeue's ``exit_code`` is the raw wait status (768 = exit 3, 9 = signal 9) → ``code:signal``."""
    t = _null(text)
    if t is None or not t.isdigit():
        return t
    raw = int(t)
    return f"{(raw >> 8) & 0xFF}:{raw & 0x7F}"


def parse_squeue(text: str) -> dict[str, JobRecord]:
    """Rows of ``squeue -h -O SQUEUE_FORMAT`` → records (source ``squeue``)."""
    jobs: dict[str, JobRecord] = {}
    n = len(SQUEUE_FIELDS)
    for line in text.splitlines():
        f = line.rstrip("\n").split(_SEP, n - 1)
        if len(f) < n - 1 or not f[0].strip():
            continue
        f = [x.strip() for x in f] + [""] * (n - len(f))
        kv = dict(zip(SQUEUE_FIELDS, f, strict=True))
        restarts = kv["RestartCnt"]
        pt = _null(kv["PreemptTime"])
        jobs[kv["JobID"]] = JobRecord(
            job_id=kv["JobID"],
            state=kv["State"] or "UNKNOWN",
            exit_code=_raw_exit(kv["exit_code"]),
            restarts=int(restarts) if restarts.isdigit() else None,
            node=None if kv["BatchHost"].lower() == "n/a" else _null(kv["BatchHost"]),
            partition=_null(kv["Partition"]),
            requeue=kv["Requeue"] == "1" if kv["Requeue"] in ("0", "1") else None,
            run_seconds=parse_duration(kv["TimeUsed"]),
            time_limit_seconds=parse_duration(kv["TimeLimit"]),
            preempted=_preempted_this_run({"PreemptTime": "" if pt in (None, "N/A") else pt, "StartTime": kv["StartTime"]}),
            source="squeue",
            comment=_null(kv["Comment"]),
        )
    return jobs


def _check(cmd: list[str], p: subprocess.CompletedProcess[str]) -> str:
    if p.returncode != 0:
        err = p.stderr.strip()[:300]
        cls = SlurmBusy if BUSY_ERROR.search(err) else QueryError
        raise cls(f"{' '.join(cmd[:2])} exited {p.returncode}: {err}")
    return p.stdout


def _run_checked(cmd: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SlurmBusy(f"{' '.join(cmd[:2])} timed out after {e.timeout} s") from None
    return _check(cmd, p)


def squeue_jobs(ids: list[str], timeout: float) -> dict[str, JobRecord]:
    """One ``squeue -j`` call for all ``ids``; {} when slurmctld knows none of them."""
    cmd = ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-O", SQUEUE_FORMAT]
    try:
        out = _run_checked(cmd, timeout)
    except QueryError as e:
        if "Invalid job id" in str(e):  # a single id slurmctld has purged: sacct's turn
            return {}
        raise
    wanted = set(ids)
    return {k: v for k, v in parse_squeue(out).items() if k in wanted}


def query(job_ids: Iterable[str], use_sacct: bool = True, timeout: float = 20.0, watch: Iterable[str] = ()) -> dict[str, JobRecord]:
    """Current record of each id that any tool knows about: at most two Slurm calls.

    One ``squeue`` call for all ids, then one ``sacct`` call for the ids
    slurmctld no longer knows. Raises :class:`SlurmBusy` when slurmctld is
    rate-limiting or unreachable and sacct did not cover every id, and
    QueryError only when no tool answered at all. Ids missing from the
    result are unknown to every tool that answered.
    """
    ids = list(dict.fromkeys(str(i) for i in job_ids))
    if not ids:
        return {}
    errors: list[QueryError] = []
    found: dict[str, JobRecord] = {}
    try:
        found.update(squeue_jobs(ids, timeout))
    except QueryError as e:
        errors.append(e)
    except OSError as e:
        errors.append(QueryError(str(e)))
    missing = [i for i in ids if i not in found]
    if missing and use_sacct:
        try:
            recs = parse_sacct(_run_checked(["sacct", "-X", "-n", "-P", "-j", ",".join(missing), "-o", SACCT_FIELDS], timeout))
            found.update({i: recs[i] for i in missing if i in recs})
        except QueryError as e:
            errors.append(e)
        except OSError as e:
            errors.append(QueryError(str(e)))
    if errors and not found:
        busy = any(isinstance(e, SlurmBusy) for e in errors)
        raise (SlurmBusy if busy else QueryError)("; ".join(str(e) for e in errors))
    return mark_failed_nodes(found, timeout, watch)


_NODE_FAILURES = ("NODE_FAIL", "BOOT_FAIL", "NF", "BF")
#: sinfo's node states that mean "this node is gone" (``down*``: also not responding)
DEAD_NODE_STATES = "down,drain,draining,fail,no_respond,future"
#: how a job ends when one of its nodes dies before slurmctld notices (the MPI launcher saw a rank vanish)
_ENDED_BADLY = ("FAILED", "CANCELLED", "OUT_OF_MEMORY", "F", "CA", "OOM")


def mark_failed_nodes(found: dict[str, JobRecord], timeout: float = 20.0, watch: Iterable[str] = ()) -> dict[str, JobRecord]:
    """Name the failed node(s) of each job that ended NODE_FAIL/BOOT_FAIL.

    A multi-node job's record names only its batch host; which of its nodes
    died is Slurm's node state. Asked only when some job just ended on a node
    failure, for all of them together: one ``squeue`` for their node lists
    (sacct's records carry theirs), one ``sinfo`` for the dead nodes; never
    a call per job. A failed answer leaves the records as they were (the
    policy then excludes the batch host, as for a single-node job).

    ``watch``: ids of multi-node jobs whose FAILED/CANCELLED end may be a node
    failure that slurmctld has not noticed yet (the surviving ranks' launcher
    gave up first); they are asked about too.
    """
    watched = set(watch)

    def state(r: JobRecord) -> str:
        return (r.state.split() or [""])[0].rstrip("+").upper()

    hit = [i for i, r in found.items() if state(r) in _NODE_FAILURES or (i in watched and state(r) in _ENDED_BADLY)]
    if not hit:
        return found
    try:
        lists = {i: found[i].nodes for i in hit if found[i].nodes}
        need = [i for i in hit if i not in lists]
        if need:
            out = _run_checked(["squeue", "-h", "-t", "all", "-j", ",".join(need), "-O", "JobID:|,NodeList:"], timeout)
            for line in out.splitlines():
                jid, _, nl = line.partition("|")
                if jid.strip() in need and _null(nl.strip()):
                    lists[jid.strip()] = nl.strip()
        dead = set(_run_checked(["sinfo", "-h", "-N", "-t", DEAD_NODE_STATES, "-o", "%N"], timeout).split())
    except (QueryError, OSError):
        return found
    out_recs = dict(found)
    for i, nl in lists.items():
        names = expand_hostlist(nl)
        out_recs[i] = replace(found[i], nodes=nl, failed_nodes=tuple(n for n in names if n in dead))
    return out_recs


@dataclass(frozen=True)
class QueueRow:
    """One live job of this user, as the adoption check needs it."""

    job_id: str
    name: str
    user_id: int | None
    state: str
    comment: str | None


LISTING_FORMAT = "JobID:|,Name:|,UserID:|,State:|,Comment:"


def parse_listing(text: str) -> list[QueueRow]:
    rows = []
    for line in text.splitlines():
        f = line.split("|", 4)
        if len(f) < 4 or not f[0].strip():
            continue
        f = [x.strip() for x in f] + [""] * (5 - len(f))
        uid = f[2]
        rows.append(QueueRow(f[0], f[1], int(uid) if uid.isdigit() else None, f[3], _null(f[4])))
    return rows


def my_jobs(timeout: float = 20.0) -> list[QueueRow]:
    """This user's queued and running jobs: one ``squeue --me`` call.

    Raises QueryError when squeue fails: the caller must not take "cannot
    ask" for "no such job" (that would submit a duplicate).
    """
    return parse_listing(_run_checked(["squeue", "--me", "-h", "-O", LISTING_FORMAT], timeout))


def tagged_jobs(tag: str, timeout: float = 20.0, rows: list[QueueRow] | None = None) -> list[tuple[str, str]]:
    """(job id, state) of this user's queued or running jobs whose ``--comment`` has the word ``tag``.

    ``rows``: a listing from :func:`my_jobs` to filter (no Slurm call); None asks squeue now.
    """
    rows = my_jobs(timeout) if rows is None else rows
    return [(r.job_id, r.state) for r in rows if r.comment and tag in r.comment.split()]


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


def partition_limits(timeout: float = 20.0) -> dict[str, int]:
    """Time limit in seconds per partition (DefaultTime, else MaxTime); unlimited ones left out."""
    try:
        out = _run(["scontrol", "show", "partition", "-o"], timeout)
    except (QueryError, OSError, subprocess.SubprocessError):
        return {}
    limits: dict[str, int] = {}
    for line in out.splitlines():
        kv = _kv_line(line.strip())
        if "PartitionName" not in kv:
            continue
        for key in ("DefaultTime", "MaxTime"):
            sec = parse_duration(kv.get(key))
            if sec:
                limits[kv["PartitionName"]] = sec
                break
    return limits


def partition_nodes(timeout: float = 20.0) -> dict[str, list[str]]:
    """The node names of each partition (``Nodes=n[1-2]`` expanded); {} on failure."""
    try:
        out = _run(["scontrol", "show", "partition", "-o"], timeout)
    except (QueryError, OSError, subprocess.SubprocessError):
        return {}
    nodes: dict[str, list[str]] = {}
    for line in out.splitlines():
        kv = _kv_line(line.strip())
        if "PartitionName" in kv:
            try:
                nodes[kv["PartitionName"]] = expand_hostlist(kv.get("Nodes"))
            except ValueError:
                continue
    return nodes


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


def cancel_pending(job_id: str, timeout: float = 20.0) -> bool:
    """Cancel ``job_id`` only if it is still waiting; True once it is cancelled, False if it started.

    Why not ``scancel`` and a state read before it: the job may start between
    the poll that saw it PENDING and the cancel. ``scancel --state=PENDING``
    is decided by slurmctld at the moment it acts, so a job that started is
    never signalled; the state read afterwards tells which happened. When that
    read fails the answer is False: a resubmission beside a job that might run
    would put two jobs on one checkpoint folder.
    """
    try:
        subprocess.run(["scancel", "--state=PENDING", str(job_id)], capture_output=True, timeout=timeout)
        out = _run_checked(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"], timeout)
    except (QueryError, OSError, subprocess.SubprocessError):
        return False
    states = {line.strip() for line in out.splitlines() if line.strip()}
    return states <= {"CANCELLED"}


def pending_reasons(job_ids: Iterable[str], timeout: float = 20.0) -> dict[str, str]:
    """Why each of ``job_ids`` waits (squeue's Reason): one call for all; raises QueryError."""
    ids = [str(i) for i in job_ids if i]
    if not ids:
        return {}
    return parse_reasons(_run_checked(["squeue", "-h", "-j", ",".join(ids), "-O", "JobID:|,Reason:"], timeout))


def idle_cpus(partition: str | None, timeout: float = 20.0) -> dict[str, int]:
    """The idle CPUs of each node of ``partition`` (all partitions for None) that can take a job now."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%t|%C"] + (["-p", partition] if partition else [])
    return parse_free(_run_checked(cmd, timeout))
