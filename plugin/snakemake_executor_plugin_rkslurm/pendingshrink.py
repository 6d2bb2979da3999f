"""Shrink a multi-rank step whose resubmission cannot start at full size.

After a preemption the step is resubmitted with the shape it had (or Slurm
requeues the same job id). When the urgent work that preempted it still
holds some of the partition's nodes, that job waits in the queue (reason
``Resources``, ``Priority``, ``ReqNodeNotAvail``) although the step could go
on, on fewer ranks, right now: its checkpoint restores on any rank count.
With ``--rkslurm-min-nodes`` (or the rule's ``rkslurm_min_nodes``) set, a
resubmitted or requeued multi-rank job that has waited for nodes longer than
``--rkslurm-shrink-after`` seconds is cancelled (it never ran, so nothing of
its checkpoint folder is touched) and resubmitted on as many nodes as are
free now, tasks scaled down like after a node failure (:func:`.ranks.shrink`).

A shrunk step grows back: every later resubmission (after a preemption, a
requeue or a node failure of the smaller job) asks for the rule's full size
again, less what the partition cannot give after node failures
(:func:`resubmit_shape`); if that size cannot start, it shrinks again by the
same rule.

Pure rules here; the executor asks Slurm (one ``squeue`` for the pending
reasons and one ``sinfo`` per partition, per poll, and only while such a
step waits) and acts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .ranks import Geometry, expand_hostlist, shrink, usable

__all__ = [
    "NODE_REASONS",
    "Candidate",
    "free_nodes",
    "parse_free",
    "parse_reasons",
    "per_node_cpus",
    "plan_shrinks",
    "resubmit_shape",
    "shrunk",
    "waits_for_nodes",
]

#: pending reasons that say "not enough free nodes/CPUs for this size" (prefixes; Slurm appends detail)
NODE_REASONS = ("Resources", "Priority", "ReqNodeNotAvail", "Nodes_required_for_job_are_DOWN")

#: node states (sinfo ``%t``, any suffix flag) that can take a new job
_USABLE_STATES = ("idle", "mix")


@dataclass(frozen=True)
class Candidate:
    """A multi-rank step's current job as the shrink rule sees it."""

    job_id: str
    geometry: Geometry
    min_nodes: int | None
    #: the job is a resubmission or a requeue of a step that already ran (not the first submission)
    again: bool
    pending: bool
    #: seconds since it was submitted (or requeued)
    waited: float
    partition: str | None
    cpus_per_node: int = 1

    def eligible(self, shrink_after: float) -> bool:
        """Worth asking Slurm about: it may shrink, it waits again, and long enough."""
        can_shrink = self.min_nodes is not None and (self.geometry.nodes or 1) > max(1, self.min_nodes)
        return self.geometry.multi_rank and can_shrink and self.again and self.pending and self.waited >= shrink_after


def waits_for_nodes(reason: str | None) -> bool:
    """The pending reason says the job waits for nodes (not for a begin time, a hold, a dependency)."""
    return bool(reason) and any(str(reason).strip().startswith(r) for r in NODE_REASONS)


def shrunk(c: Candidate, reason: str | None, free: int) -> Geometry | None:
    """The smaller shape to resubmit ``c`` on now, or None (keep waiting).

    None when the job does not wait for nodes, when the full size fits the
    free nodes (Slurm starts it by itself), or when fewer than the allowed
    minimum are free.
    """
    if not waits_for_nodes(reason) or free >= (c.geometry.nodes or 1) or free < 1:
        return None
    new = shrink(c.geometry, free, c.min_nodes)
    if isinstance(new, str) or new == c.geometry:
        return None
    return new


def resubmit_shape(
    full: Geometry, current: Geometry, partition_nodes: Iterable[str] | None, excluded: Iterable[str], floor: int | None
) -> Geometry | str:
    """The shape of a multi-rank step's next submission, or why there is none.

    It starts from the rule's ``full`` size, never from the ``current`` (maybe
    shrunk) one: the nodes that were busy or down when it shrank may be back.
    Nodes excluded after a node failure still count against it. Without the
    partition's node list: the full size, which shrinks again in the queue if
    it cannot start; after a node failure, the current shape (the full size
    might not fit beside the excluded nodes at all, and sbatch would refuse it).
    """
    nodes = list(partition_nodes or ())
    excluded = list(excluded)
    if not nodes:
        return current if excluded else full
    return shrink(full, usable(nodes, excluded), floor)


def per_node_cpus(g: Geometry, cpus_per_task: int) -> int:
    """CPUs one node must have free for ``g``: its tasks per node (rounded up) x CPUs per task."""
    nodes = g.nodes or 1
    per_node = -(-(g.tasks or nodes) // nodes)
    return max(1, per_node) * max(1, cpus_per_task)


def parse_reasons(text: str) -> dict[str, str]:
    """``squeue -h -O JobID:|,Reason:`` rows → {job id: reason}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        job, sep, reason = line.partition("|")
        if sep and job.strip():
            out[job.strip()] = reason.strip()
    return out


def parse_free(text: str) -> dict[str, int]:
    """``sinfo -h -N -o %N|%t|%C`` rows → {node: idle CPUs} for nodes that can take a job."""
    free: dict[str, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 3 or not parts[0]:
            continue
        name, state, cpus = parts
        if not state.rstrip("*~#!%$@^-+").startswith(_USABLE_STATES) or "*" in state:
            continue  # down, drained, allocated, not responding (``*``)
        fields = cpus.split("/")
        if len(fields) == 4 and fields[1].isdigit():
            free[name] = int(fields[1])
    return free


def free_nodes(idle_cpus: dict[str, int], need: int, excluded: Iterable[str]) -> int:
    """How many nodes have ``need`` CPUs idle and are not excluded after a failure."""
    gone = {n for e in excluded for n in expand_hostlist(e)}
    return len([n for n, cpus in idle_cpus.items() if cpus >= need and n not in gone])


def plan_shrinks(
    candidates: list[Candidate],
    shrink_after: float,
    reasons: Callable[[list[str]], dict[str, str]],
    idle: Callable[[str | None], dict[str, int]],
    excluded: Callable[[Candidate], Iterable[str]] = lambda c: (),
) -> list[tuple[Candidate, Geometry, str]]:
    """The candidates to cancel and resubmit smaller now: (candidate, new shape, why).

    Slurm is asked only when some candidate is eligible: one ``reasons`` call
    for all of them, one ``idle`` call per partition.
    """
    waiting = [c for c in candidates if c.eligible(shrink_after)]
    if not waiting:
        return []
    why_pending = reasons([c.job_id for c in waiting])
    per_partition: dict[str | None, dict[str, int]] = {}
    out: list[tuple[Candidate, Geometry, str]] = []
    for c in waiting:
        if c.partition not in per_partition:
            per_partition[c.partition] = idle(c.partition)
        free = free_nodes(per_partition[c.partition], c.cpus_per_node, excluded(c))
        reason = why_pending.get(c.job_id)
        new = shrunk(c, reason, free)
        if new is not None:
            why = (
                f"job {c.job_id} has waited {c.waited:.0f} s (reason {reason}) for {c.geometry.describe()}, "
                f"but only {free} node(s) with {c.cpus_per_node} free CPU(s) are free now"
            )
            out.append((c, new, why))
    return out
