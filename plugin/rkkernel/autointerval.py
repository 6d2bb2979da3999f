"""``--checkpoint-every auto`` / ``--checkpoint-seconds auto``: the Young–Daly interval.

A checkpoint costs C seconds of lost progress; an interruption loses, on
average, half an interval of work. With M the mean time between
interruptions, the expected waste per unit of time is C/T + T/(2M),
smallest at T = √(2·C·M) (Young 1974; Daly 2006 refines it for C ≪ M,
which is the case that matters here).

* **C** is measured in this run, on the first checkpoint(s): the seconds
  the compute thread stalled to hand the snapshot over (the device→host
  copy and any back-pressure wait) **plus** the writer thread's seconds
  (encode, write, fsync). The writer runs beside the kernel, but on a busy
  node it takes cycles the kernel would have had, so counting it whole is
  the conservative choice (a longer interval, never a too-short one).
  ``PROBES`` (2) checkpoints are taken back to back from the first batch
  on, so C is known early; the first one's cost is left out when there are
  more (it carries one-off costs: importing h5py, the first file of the
  folder, about 0.1-0.2 s here, which would inflate C several times and the
  interval by its square root), the others are averaged.
* **M** comes from ``rkstep.mtbi`` (``$RKSLURM_MTBI_SECONDS``, set by the
  executor per partition, with a documented default).
* ``--checkpoint-every auto`` turns T into steps with the measured step
  rate (steps per second of compute, checkpoints excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: probe checkpoints taken before the interval is fixed (the first one's cost is left out when more)
PROBES = 2


def young_daly_seconds(cost_seconds: float, mtbi_seconds: float) -> float:
    """√(2·C·M); C and M in seconds, both positive and finite."""
    if not (math.isfinite(cost_seconds) and math.isfinite(mtbi_seconds)) or cost_seconds <= 0 or mtbi_seconds <= 0:
        raise ValueError(f"Young-Daly needs a positive checkpoint cost and MTBI, got C={cost_seconds!r} s, M={mtbi_seconds!r} s")
    return math.sqrt(2.0 * cost_seconds * mtbi_seconds)


@dataclass(frozen=True)
class AutoInterval:
    """The interval chosen and why (C, M, rate), as the log line says it."""

    cost_seconds: float
    mtbi_seconds: float
    mtbi_source: str
    seconds: float
    steps_per_second: float
    steps: int | None  # set for --checkpoint-every auto

    def describe(self) -> str:
        what = f"every {self.steps} steps" if self.steps is not None else f"every {self.seconds:.3g} s"
        rate = f" at {self.steps_per_second:.4g} steps/s" if self.steps is not None else ""
        return (
            f"checkpoint interval {what} (Young-Daly sqrt(2*C*M) = sqrt(2 * {self.cost_seconds:.4g} s * {self.mtbi_seconds:.4g} s) "
            f"= {self.seconds:.4g} s{rate}; C measured on this run's first checkpoint(s): compute-thread stall + writer time; "
            f"M from {self.mtbi_source})"
        )


def choose(cost_seconds: float, mtbi_seconds: float, mtbi_source: str, steps_per_second: float, in_steps: bool) -> AutoInterval:
    """The interval for a measured cost, an MTBI and the step rate (steps only when ``in_steps``)."""
    t = young_daly_seconds(cost_seconds, mtbi_seconds)
    steps = None
    if in_steps:
        if not math.isfinite(steps_per_second) or steps_per_second <= 0:
            raise ValueError(f"step rate must be positive, got {steps_per_second!r}")
        steps = max(1, round(t * steps_per_second))
    return AutoInterval(cost_seconds, mtbi_seconds, mtbi_source, t, steps_per_second, steps)


@dataclass
class _Probe:
    step: int
    stall_seconds: float
    failed_before: int


class Tuner:
    """Measures C and the step rate during a run and picks the interval once (see the module docstring).

    The step loop tells it about each batch (``batch``), asks whether to take a
    probe checkpoint (``probe_due``), reports the compute-thread stall of a
    probe (``probed``) and polls the manager's stats (``poll``) until the
    probe's write has landed; ``poll`` then returns the interval, once.
    """

    def __init__(self, in_steps: bool, mtbi_seconds: float, mtbi_source: str, probes: int = PROBES) -> None:
        self.in_steps = in_steps
        self.mtbi_seconds, self.mtbi_source = mtbi_seconds, mtbi_source
        self.probes = max(1, probes)
        self.costs: list[float] = []
        self.pending: _Probe | None = None
        self.result: AutoInterval | None = None
        self._batches: list[tuple[int, float]] = []

    def batch(self, steps: int, seconds: float) -> None:
        """One batch of ``steps`` steps took ``seconds`` of compute (checkpoints excluded)."""
        if steps > 0 and seconds > 0:
            self._batches.append((steps, seconds))

    @property
    def steps_per_second(self) -> float:
        # the first batch carries one-off costs (a kernel compile at its first launch): left out once others exist
        b = self._batches[1:] or self._batches
        s, t = sum(x for x, _ in b), sum(y for _, y in b)
        return s / t if t > 0 else math.nan

    def probe_due(self) -> bool:
        return self.result is None and self.pending is None and bool(self._batches)

    def probed(self, step: int, stall_seconds: float, failed_before: int) -> None:
        """A probe checkpoint of ``step`` was handed to the manager after ``stall_seconds`` on the compute thread."""
        self.pending = _Probe(step, stall_seconds, failed_before)

    def poll(self, last_write: tuple[int, float] | None, failed: int) -> AutoInterval | None:
        """The interval, when the pending probe's write has landed and enough probes were taken (else None).

        ``last_write``: (step, writer seconds) of the newest completed write
        (``ManagerStats.last_write``); ``failed``: writes failed so far.
        """
        p = self.pending
        if p is None or self.result is not None:
            return None
        if last_write is not None and last_write[0] == p.step:
            self.costs.append(p.stall_seconds + last_write[1])
            self.pending = None
        elif failed > p.failed_before:
            self.pending = None  # that write failed: its time says nothing; probe again
            return None
        else:
            return None
        if len(self.costs) < self.probes:
            return None
        costs = self.costs[1:] or self.costs
        cost = sum(costs) / len(costs)
        self.result = choose(max(cost, 1e-6), self.mtbi_seconds, self.mtbi_source, self.steps_per_second, self.in_steps)
        return self.result
