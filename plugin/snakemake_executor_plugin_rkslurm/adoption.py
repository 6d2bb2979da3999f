"""Which live Slurm job of a step a new head process may adopt, cancel, or must leave alone.

Why its own module: adoption is where a wrong answer costs data. A job is only
ever adopted or cancelled when

- Slurm says it belongs to this process's *real* uid -- ``squeue --me`` lists
  it (``--me`` asks slurmctld for our uid; ``$USER`` is not consulted) and
  ``scontrol show job`` confirms its ``UserId``: another user's job that
  carries our tag (forged, or a shared workflow folder) is never touched;
- its ``--comment`` carries the step's tag *and* the fingerprint this head
  computes now (:func:`rkstep.protocol.fingerprint_tag`): a live job of older
  inputs, params or code is cancelled and the step resubmitted, never adopted.

:func:`plan_adoption` is pure (rows in, decision out) and unit-tested; the
Slurm calls are :func:`list_my_jobs` and :func:`job_uid`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .slurmquery import QueryError

__all__ = ["AdoptionPlan", "LiveJob", "job_uid", "list_my_jobs", "parse_squeue", "plan_adoption", "wait_gone"]

#: ``squeue`` format: the comment goes last, since it may itself hold ``|``
SQUEUE_FORMAT = "%i|%U|%T|%k"


@dataclass(frozen=True)
class LiveJob:
    """One row of ``squeue --me``: the shared row type of the adoption and status listings."""

    job_id: str
    #: ``--comment`` (the stock ``rule_…`` word, the step tag, the fingerprint tag)
    comment: str
    #: numeric UserId as squeue reports it; None when it could not be read
    user_id: int | None
    state: str

    @property
    def words(self) -> list[str]:
        return self.comment.split()


def parse_squeue(text: str) -> list[LiveJob]:
    rows = []
    for line in text.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) < 4 or not parts[0]:
            continue
        uid = int(parts[1]) if parts[1].isdigit() else None
        rows.append(LiveJob(job_id=parts[0], comment=parts[3], user_id=uid, state=parts[2]))
    return rows


def _run(cmd: list[str], timeout: float) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise QueryError(f"{' '.join(cmd)}: {e}") from e
    if p.returncode != 0:
        raise QueryError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[:300]}")
    return p.stdout


def list_my_jobs(timeout: float = 20.0) -> list[LiveJob]:
    """This uid's queued and running jobs (``squeue --me``). Raises QueryError when squeue fails:
    "cannot ask" must never be taken for "no such job" (that would submit a duplicate)."""
    return parse_squeue(_run(["squeue", "--me", "-h", "-o", SQUEUE_FORMAT], timeout))


_USERID = re.compile(r"\bUserId=[^\s(]*\((\d+)\)")


def job_uid(job_id: str, timeout: float = 20.0) -> int | None:
    """``UserId`` of a job as slurmctld records it (``scontrol show job``); None when it does not say."""
    m = _USERID.search(_run(["scontrol", "show", "job", "-o", str(job_id)], timeout))
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class AdoptionPlan:
    """What to do with the live jobs that carry a step's tag."""

    #: the job to adopt (ours, this fingerprint, the newest)
    adopt: LiveJob | None = None
    #: our jobs to cancel, each with the reason to tell the user
    cancel: tuple[tuple[LiveJob, str], ...] = ()
    #: jobs never to touch (not ours), with the reason
    ignore: tuple[tuple[LiveJob, str], ...] = ()


def _order(job: LiveJob) -> int:
    head = job.job_id.split("_")[0]
    return int(head) if head.isdigit() else 0


def plan_adoption(
    rows: Sequence[LiveJob], tag: str, fingerprint_tag: str, uid: int | None = None, owner_of: Callable[[str], int | None] | None = None
) -> AdoptionPlan:
    """Decide for the rows carrying ``tag``: adopt the newest of ours with ``fingerprint_tag``,
    cancel our others, ignore every job of another uid (by squeue's row *and* ``owner_of``)."""
    me = os.getuid() if uid is None else uid
    same: list[LiveJob] = []
    cancel: list[tuple[LiveJob, str]] = []
    ignore: list[tuple[LiveJob, str]] = []
    for r in sorted((r for r in rows if tag in r.words), key=_order):
        if r.user_id != me:
            ignore.append((r, f"it belongs to uid {r.user_id}, not to this process's uid {me}"))
            continue
        confirmed = owner_of(r.job_id) if owner_of is not None else me
        if confirmed != me:
            ignore.append((r, f"scontrol says it belongs to uid {confirmed}, not to this process's uid {me}"))
            continue
        if fingerprint_tag not in r.words:
            cancel.append(
                (r, "it was submitted for other inputs, params or code (its fingerprint differs), so its checkpoints are not this step's")
            )
            continue
        same.append(r)
    for r in same[:-1]:
        cancel.append((r, "more than one live job of this step; keeping the newest"))
    return AdoptionPlan(adopt=same[-1] if same else None, cancel=tuple(cancel), ignore=tuple(ignore))


def wait_gone(job_ids: Sequence[str], timeout: float, list_jobs: Callable[[], list[LiveJob]] = list_my_jobs, interval: float = 1.0) -> bool:
    """Wait until none of ``job_ids`` is queued, running or completing any more; False on timeout.

    A cancelled step gets SIGTERM and may still write its final checkpoint:
    its folder may be cleared only after it is gone, or the new job would
    resume the old job's state.
    """
    wanted = {str(i) for i in job_ids}
    deadline = time.monotonic() + timeout
    while True:
        left = wanted & {r.job_id for r in list_jobs()}
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
