"""Mean time between interruptions (MTBI): what a step is told about its partition.

The Young–Daly checkpoint interval (``rkkernel.autointerval``) needs M, the
mean time between interruptions of the job. Only the executor can know it
(it sees every preemption and time-out per partition, see
``snakemake_executor_plugin_rkslurm.interruptions``), so it passes M to the
step in one environment variable, read here and nowhere else.

When the variable is missing (a step run by hand, a first run on a
partition that never interrupted a job) or not a positive finite number,
``DEFAULT_MTBI_SECONDS`` is used: 4 hours, the order of a preemptible
partition's job lifetime on a shared cluster and of common Slurm time limits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

#: Seconds between interruptions, as the executor measured them for the job's partition.
ENV_MTBI_SECONDS = "RKSLURM_MTBI_SECONDS"
#: M when nothing better is known (see the module docstring).
DEFAULT_MTBI_SECONDS = 4 * 3600.0


@dataclass(frozen=True)
class Mtbi:
    """M and where it came from (for the log line that explains an interval)."""

    seconds: float
    source: str


def read_mtbi(env: Mapping[str, str] | None = None) -> Mtbi:
    """M from ``$RKSLURM_MTBI_SECONDS``, else the documented default (a bad value says so in ``source``)."""
    env = os.environ if env is None else env
    raw = env.get(ENV_MTBI_SECONDS)
    if raw is None or not raw.strip():
        return Mtbi(DEFAULT_MTBI_SECONDS, f"default ({ENV_MTBI_SECONDS} not set)")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        return Mtbi(DEFAULT_MTBI_SECONDS, f"default ({ENV_MTBI_SECONDS}={raw[:40]!r} is not a positive number of seconds)")
    return Mtbi(value, f"${ENV_MTBI_SECONDS}")
