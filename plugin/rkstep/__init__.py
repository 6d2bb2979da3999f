"""The step protocol: what a checkpointed step (``rkrun`` or any command) and the
rkslurm executor agree on, in one place.

Core dependencies only (no Snakemake, no numpy): ``rkrun`` imports it at start-up
and the workflow scripts read its events without the executor installed.

- :mod:`rkstep.protocol`: folder layout and file names, exit codes, the stop
  marker, the content fingerprint, the submission tag.
- :mod:`rkstep.events`: structured JSONL attempt events (start, restore,
  checkpoint, stop, end) written by the step, read by the executor, the
  workflow scripts and the demo.
"""

from __future__ import annotations

from .events import Attempt, EventWriter, NullWriter, attempts, latest_attempt, read_events, run_attempt, writer_for
from .protocol import (
    ENV_CHECKPOINT_DIR,
    EX_FAILURE,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    StepPaths,
    fingerprint,
    submission_tag,
)

__all__ = [
    "ENV_CHECKPOINT_DIR",
    "EX_FAILURE",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_USAGE",
    "Attempt",
    "EventWriter",
    "NullWriter",
    "StepPaths",
    "attempts",
    "fingerprint",
    "latest_attempt",
    "read_events",
    "run_attempt",
    "submission_tag",
    "writer_for",
]
