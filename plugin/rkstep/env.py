"""The running job's environment, read in one place (in the manner of submitit's ``JobEnvironment``).

Slurm tells a job who it is through ``SLURM_*`` variables, and the executor
hands it its checkpoint folder through ``RKSLURM_CHECKPOINT_DIR``. Nothing else
in rkstep, rkrun or the workflow reads these variables, so a rename or a new
scheduler changes this file only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ENV_CHECKPOINT_DIR", "JobEnvironment"]

#: environment variable through which the executor hands a step its checkpoint folder (or URL)
ENV_CHECKPOINT_DIR = "RKSLURM_CHECKPOINT_DIR"


def _count(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


@dataclass(frozen=True)
class JobEnvironment:
    """Who this attempt is: Slurm job id (None outside Slurm), requeue count, node, checkpoint folder."""

    job_id: str | None = None
    #: ``SLURM_RESTART_COUNT``; None when Slurm did not set it (a job step may not see it)
    restart_count: int | None = None
    node: str | None = None
    checkpoint_dir: str | None = None

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> JobEnvironment:
        env = os.environ if environ is None else environ
        return cls(
            job_id=env.get("SLURM_JOB_ID") or None,
            restart_count=_count(env.get("SLURM_RESTART_COUNT")),
            node=env.get("SLURMD_NODENAME") or None,
            checkpoint_dir=env.get(ENV_CHECKPOINT_DIR) or None,
        )

    @property
    def under_slurm(self) -> bool:
        return self.job_id is not None
