"""Multi-rank steps: the shape of a step's allocation (nodes x tasks) and how its command runs.

A rule asks for several MPI ranks with the stock resource names, ``nodes`` and
``tasks``; the stock sbatch call already turns them into ``--nodes=N
--ntasks=T``. What the stock in-job executor (``slurm-jobstep``) does next is
wrong for an MPI step: it runs the step-level Snakemake inside ``srun -n1``
(which holds one CPU of the allocation, so an inner ``srun`` of T tasks can
wait forever for it) and strips every ``SLURM_*`` variable but the job id
from the rule's environment, so ``srun rkrun …`` starts one task per node
and ``mpiexec -n $SLURM_NTASKS`` gets no count. A multi-rank step therefore
runs its step-level Snakemake in the batch shell itself (:func:`batch_exec`):
the rule's command sees the whole allocation, and ``srun --mpi=pmi2 rkrun …``
or ``mpiexec -n $SLURM_NTASKS rkrun …`` starts one rank per task.

After a node failure the step is resubmitted without the failed node. When
the partition no longer has enough nodes for the full size, the user may
allow a smaller one (``--rkslurm-min-nodes``, resource ``rkslurm_min_nodes``):
:func:`shrink` picks it and scales the tasks down in proportion; the step
restores its checkpoint on the new rank count.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_NODES_RESOURCE", "Geometry", "apply", "batch_exec", "expand_hostlist", "min_nodes", "requested", "shrink", "usable"]

#: the rule resource that overrides ``--rkslurm-min-nodes`` for one rule
MIN_NODES_RESOURCE = "rkslurm_min_nodes"


@dataclass(frozen=True)
class Geometry:
    """Nodes and tasks of one submission; None where the rule leaves it to Slurm."""

    nodes: int | None = None
    tasks: int | None = None

    @property
    def multi_rank(self) -> bool:
        """More than one task or node: the command launches ranks itself (srun/mpiexec)."""
        return (self.tasks or 1) > 1 or (self.nodes or 1) > 1

    def describe(self) -> str:
        return f"{self.nodes or 1} node(s) x {self.tasks or 1} task(s)"


def _int(value: Any, name: str) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, bool):
        raise ValueError(f"resource {name} must be a whole number >= 1, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"resource {name} must be a whole number >= 1, got {value!r}") from None
    if n < 1 or n != float(value):
        raise ValueError(f"resource {name} must be a whole number >= 1, got {value!r}")
    return n


def requested(resources: Mapping[str, Any]) -> Geometry:
    """The rule's ``nodes``/``tasks`` resources (the stock names)."""
    return Geometry(nodes=_int(resources.get("nodes"), "nodes"), tasks=_int(resources.get("tasks"), "tasks"))


def min_nodes(resources: Mapping[str, Any], setting: int) -> int | None:
    """The fewest nodes the step may be resubmitted on: the rule's ``rkslurm_min_nodes``, else the
    setting; None (0 in the setting) means never fewer than requested."""
    own = _int(resources.get(MIN_NODES_RESOURCE), MIN_NODES_RESOURCE)
    if own is not None:
        return own
    return int(setting) if setting and int(setting) > 0 else None


def shrink(current: Geometry, available: int, floor: int | None) -> Geometry | str:
    """The geometry to resubmit on when only ``available`` nodes are left, or why there is none.

    Tasks shrink in proportion to nodes (2 x 4 on 1 node: 1 x 2), at least one per node.
    """
    want = current.nodes or 1
    if available >= want:
        return current
    if floor is None:
        return (
            f"needs {current.describe()} but only {available} usable node(s) are left in its partition; "
            f"set --rkslurm-min-nodes (or the rule's resource {MIN_NODES_RESOURCE}) to let it run on fewer nodes and ranks"
        )
    if available < max(1, floor):
        return f"needs at least {floor} node(s) ({MIN_NODES_RESOURCE}) but only {available} usable node(s) are left in its partition"
    tasks = None if current.tasks is None else max(available, current.tasks * available // want)
    return Geometry(nodes=available, tasks=tasks)


_NODES_OPT = re.compile(r"(?<=\s)(?:--nodes[=\s]|-N\s?)\S+")
_NTASKS_OPT = re.compile(r"(?<=\s)--ntasks[=\s]\S+")


def apply(call: str, g: Geometry) -> str:
    """The stock sbatch call with its ``--nodes``/``--ntasks`` set to ``g`` (a smaller resubmission)."""
    if g.nodes is not None:
        call = _NODES_OPT.sub(f"--nodes={g.nodes}", call) if _NODES_OPT.search(call) else f"{call} --nodes={g.nodes}"
    if g.tasks is not None:
        call = _NTASKS_OPT.sub(f"--ntasks={g.tasks}", call) if _NTASKS_OPT.search(call) else f"{call} --ntasks={g.tasks}"
    return call


def batch_exec(exec_line: str, jobstep_args: str) -> str:
    """The job's exec line without the in-job executor: the step-level Snakemake runs in the batch
    shell (local executor, ``--mode remote``), as ``slurm-jobstep`` would run it inside its ``srun -n1``."""
    if not jobstep_args or jobstep_args not in exec_line:
        raise ValueError(f"cannot find the in-job executor arguments {jobstep_args!r} in the job's exec line")
    return " ".join(exec_line.replace(jobstep_args, " ").split())


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets: ``n[1-2],gpu1`` -> [``n[1-2]``, ``gpu1``]."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in (x.strip() for x in parts) if p]


def _expand_one(item: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", item)
    if not m:
        return [item]
    prefix, body, rest = m.groups()
    out: list[str] = []
    for piece in body.split(","):
        r = _RANGE.match(piece.strip())
        if not r:
            raise ValueError(f"cannot read the host list range {piece!r} in {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) - int(lo) > 100_000:
            raise ValueError(f"host list range {piece!r} is implausibly large")
        out.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return [name + tail for name in out for tail in _expand_one(rest)] if rest else out


def expand_hostlist(text: str | None) -> list[str]:
    """Slurm's compact host list (``n[1-3,7],login``) as node names; [] for None, ``(null)``, ``None assigned``."""
    if not text or text.strip() in ("(null)", "None assigned", "n/a", "N/A"):
        return []
    return [n for item in _split_top(text.strip()) for n in _expand_one(item)]


def usable(nodes: Iterable[str], excluded: Iterable[str]) -> int:
    """How many of a partition's ``nodes`` are not excluded (entries of ``excluded`` may be comma lists)."""
    gone = {n for e in excluded for n in expand_hostlist(e)}
    return len([n for n in dict.fromkeys(nodes) if n not in gone])
