"""Folder layout, file names, exit codes and fingerprint of a checkpointed step.

In the manner of submitit's ``JobPaths``: every name the step and the executor
both use is a property of :class:`StepPaths` or a constant here, so neither
side spells a file name or an exit code of its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .env import ENV_CHECKPOINT_DIR
from .fingerprint import CHECKPOINT_DIR_PARAM, declared_fingerprint, fingerprint, step_fingerprint

__all__ = [
    "CHECKPOINT_DIR_PARAM",
    "ENV_CHECKPOINT_DIR",
    "EX_FAILURE",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_USAGE",
    "StepPaths",
    "declared_fingerprint",
    "fingerprint",
    "fingerprint_tag",
    "step_fingerprint",
    "submission_tag",
]

EX_OK = 0
#: any error (bad data, I/O); not resumable by trying again
EX_FAILURE = 1
#: bad input, or a checkpoint of another simulation
EX_USAGE = 2
#: stopped on SIGTERM/SIGUSR1 after writing the final checkpoint (sysexits.h
#: EX_TEMPFAIL, "try again later"): run again to resume
EX_TEMPFAIL = 75

STOP_MARKER = "rkrun.stopped.json"
FINGERPRINT_FILE = "rkslurm.fingerprint.json"
#: optional: a step that does not write .rkcp chains reports its newest checkpointed step here
PROGRESS_FILE = "rkslurm.progress.json"
EVENTS_FILE = "rkstep.events.jsonl"
RUNLOG_FILE = "rkrun.runlog"
#: rkstep's ownership marker: the folder was empty or new when rkstep claimed it, for this step key
OWNER_FILE = "rkstep.owner.json"
#: content hashes of the step's inputs (see :class:`rkstep.fingerprint.HashCache`)
HASHCACHE_FILE = "rkstep.hashes.json"
#: prefix of the ``sbatch --comment`` word that names the step of every submission
TAG_PREFIX = "rkslurm:"
#: prefix of the ``sbatch --comment`` word that carries the submission's fingerprint
FINGERPRINT_TAG_PREFIX = "rkfp:"


@dataclass(frozen=True)
class StepPaths:
    """The files of one step's checkpoint folder."""

    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def stop_marker(self) -> Path:
        """Written by the step when it stopped on a signal with its final checkpoint; removed on success."""
        return self.folder / STOP_MARKER

    @property
    def fingerprint(self) -> Path:
        """What the checkpoints belong to (see :func:`fingerprint`): a mismatch wipes the folder."""
        return self.folder / FINGERPRINT_FILE

    @property
    def progress(self) -> Path:
        return self.folder / PROGRESS_FILE

    @property
    def events(self) -> Path:
        """One JSON object a line per attempt event (see :mod:`rkstep.events`)."""
        return self.folder / EVENTS_FILE

    @property
    def runlog(self) -> Path:
        return self.folder / RUNLOG_FILE

    @property
    def owner(self) -> Path:
        return self.folder / OWNER_FILE

    @property
    def hashcache(self) -> Path:
        return self.folder / HASHCACHE_FILE


def submission_tag(checkpoint_key: str) -> str:
    """``sbatch --comment`` naming the step: the same folder always gives the same tag,
    so a new head process finds the live job of a step an earlier head submitted."""
    return TAG_PREFIX + hashlib.sha256(checkpoint_key.encode()).hexdigest()[:24]


def fingerprint_tag(digest: str) -> str:
    """``sbatch --comment`` word carrying (a prefix of) the fingerprint the job was submitted for:
    a new head process adopts a live job only when it carries the fingerprint it computes now."""
    return FINGERPRINT_TAG_PREFIX + str(digest)[:24]
