"""Folder layout, file names, exit codes and fingerprint of a checkpointed step.

In the manner of submitit's ``JobPaths``: every name the step and the executor
both use is a property of :class:`StepPaths` or a constant here, so neither
side spells a file name or an exit code of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: environment variable through which the executor hands a step its checkpoint folder (or URL)
ENV_CHECKPOINT_DIR = "RKSLURM_CHECKPOINT_DIR"

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
#: prefix of the ``sbatch --comment`` that names the step of every submission
TAG_PREFIX = "rkslurm:"


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


def _hash_file(h: Any, path: str | os.PathLike[str]) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        h.update(f"<unreadable: {exc.strerror}>".encode())


def fingerprint(doc: Mapping[str, Any], files: Iterable[str | os.PathLike[str]] = ()) -> str:
    """SHA-256 over a JSON document (rule, params, code: whatever decides the
    result) and the *contents* of the given files.

    Contents, not mtimes: a touched or copied input keeps the checkpoints
    resumable, and the local and the rkslurm executor compute the same value
    for the same inputs, so switching between them does not wipe a folder.
    """
    h = hashlib.sha256(json.dumps(dict(doc), sort_keys=True, default=repr).encode())
    for f in files:
        h.update(b"\0file\0" + os.fspath(f).encode() + b"\0")
        _hash_file(h, f)
    return h.hexdigest()


def declared_fingerprint(text: str, files: Iterable[str | os.PathLike[str]] = ()) -> str:
    """The fingerprint of a rule that states what decides its result (a text such as
    ``grid=... steps=...``) plus its input files. The workflow's own preparation
    script (local executor) and the rkslurm executor both call this, so a folder
    prepared under one is resumed under the other."""
    return fingerprint({"declared": str(text)}, files)


def submission_tag(checkpoint_key: str) -> str:
    """``sbatch --comment`` naming the step: the same folder always gives the same tag,
    so a new head process finds the live job of a step an earlier head submitted."""
    return TAG_PREFIX + hashlib.sha256(checkpoint_key.encode()).hexdigest()[:24]


def slurm_attempt() -> tuple[str | None, int]:
    """(Slurm job id, requeue count) of the running attempt, from the job's environment."""
    job = os.environ.get("SLURM_JOB_ID") or None
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return job, int(restart) if restart.isdigit() else 0
