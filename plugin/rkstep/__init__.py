"""The step protocol: what a checkpointed step (``rkrun`` or any command) and the
rkslurm executor agree on, in one place.

Core dependencies only (no Snakemake, no numpy): ``rkrun`` imports it at start-up
and the workflow scripts read its events without the executor installed.

- :mod:`rkstep.protocol`: folder layout and file names, exit codes, the stop
  marker, the content fingerprint, the submission tag.
- :mod:`rkstep.events`: structured JSONL attempt events (start, restore,
  checkpoint, stop, end) written by the step, read by the executor, the
  workflow scripts and the demo.
- :mod:`rkstep.folder`: :class:`StepFolder`, the one owner of a step's folder
  (creation, ownership, preparation, observation).
- :mod:`rkstep.fingerprint`: what a step's checkpoints belong to.
- :mod:`rkstep.env`: the job's environment (``SLURM_*``), read in one place.
- :mod:`rkstep.safeio`: reading files anyone could have planted.
"""

from __future__ import annotations

from .env import JobEnvironment
from .events import Attempt, AttemptLog, EventWriter, NullWriter, attempts, latest_attempt, read_events, run_attempt, writer_for
from .fingerprint import FingerprintError, step_fingerprint
from .folder import FolderError, FolderRefused, StepFolder, Story, rkslurm_checkpoint_dir
from .protocol import (
    ENV_CHECKPOINT_DIR,
    EX_FAILURE,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    StepPaths,
    fingerprint,
    fingerprint_tag,
    submission_tag,
)

__all__ = [
    "ENV_CHECKPOINT_DIR",
    "EX_FAILURE",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_USAGE",
    "Attempt",
    "AttemptLog",
    "EventWriter",
    "FingerprintError",
    "FolderError",
    "FolderRefused",
    "JobEnvironment",
    "NullWriter",
    "StepFolder",
    "StepPaths",
    "Story",
    "attempts",
    "fingerprint",
    "fingerprint_tag",
    "latest_attempt",
    "read_events",
    "rkslurm_checkpoint_dir",
    "run_attempt",
    "step_fingerprint",
    "submission_tag",
    "writer_for",
]
