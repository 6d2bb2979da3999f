"""Per-partition interruption history: the M that ``--checkpoint-every auto`` needs.

The step picks its checkpoint interval by the Young–Daly rule √(2·C·M)
(``rkkernel.autointerval``). C it measures itself; M, the mean time between
interruptions, only the executor can know: it sees every preemption, requeue,
time-out and node failure of the jobs it runs, per partition. This module
keeps that history and turns it into M:

* **What is recorded**, per partition: the seconds jobs were exposed
  (from submission, or the last requeue, to the end of that run: an
  interruption or a success/failure) and how many of those ends were
  interruptions. M = exposed seconds / interruptions. Exposure counts from
  submission, so queue time is included: M errs long, which makes the
  interval err long, the cheaper mistake for a short queue wait.
* **Where**: ``.snakemake/rkslurm/interruptions.json`` in the workflow's
  folder, so it outlives one Snakemake run and belongs to that workflow.
  Written atomically (temp file, fsync, rename, fsync folder); read
  defensively (bounded size and nesting, wrong types dropped): a damaged
  file is an empty history, never an error.
* **How the step learns it**: ``env_for(partition)`` gives
  ``{RKSLURM_MTBI_SECONDS: M}`` for the job's environment (``submitter``);
  with no interruption seen yet nothing is passed and the step uses the
  documented default (``rkstep.mtbi``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rkckpt import safejson
from rkckpt.atomic import fsync_dir
from rkstep.mtbi import ENV_MTBI_SECONDS

log = logging.getLogger("rkslurm.interruptions")

#: executor events (``executor._event``) that end a run by interrupting it
INTERRUPTIONS = frozenset({"preemption", "requeue", "requeued", "timeout", "node_failure", "interrupted"})
#: events that end a run without interrupting it (exposure only)
ENDS = frozenset({"succeeded", "failed"})
#: events that start a run
STARTS = frozenset({"submitted", "adopted"})
DEFAULT_PATH = Path(".snakemake") / "rkslurm" / "interruptions.json"
VERSION = 1
MAX_BYTES = 1 << 20
MAX_PARTITIONS = 512
#: a partition key when the job named none and Slurm has no default
UNKNOWN_PARTITION = "(default)"


@dataclass
class PartitionHistory:
    exposed_seconds: float = 0.0
    interruptions: int = 0
    last_event: float = 0.0

    @property
    def mtbi_seconds(self) -> float | None:
        """Mean seconds between interruptions, or None before the first one."""
        if self.interruptions <= 0 or self.exposed_seconds <= 0:
            return None
        return self.exposed_seconds / self.interruptions


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) and f >= 0 else None


class InterruptionHistory:
    """The history file of one workflow; thread-safe within the executor process."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()  # observe() holds it around record()
        #: run start time per step (its checkpoint folder), from the events seen by this process
        self._started: dict[str, float] = {}

    # ------------------------------------------------------------ reading
    def load(self) -> dict[str, PartitionHistory]:
        """The history as stored; a missing, oversized or malformed file reads as empty."""
        try:
            if not stat.S_ISREG(os.lstat(self.path).st_mode):  # a FIFO would block the open, a link point anywhere
                raise ValueError("not a regular file")
            doc = safejson.load_file(self.path, max_bytes=MAX_BYTES)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the interruption history %s: %s", self.path, exc)
            return {}
        parts = doc.get("partitions") if isinstance(doc, dict) and doc.get("version") == VERSION else None
        if not isinstance(parts, dict):
            log.warning("ignoring the interruption history %s: not a version %d history", self.path, VERSION)
            return {}
        out: dict[str, PartitionHistory] = {}
        for name, rec in list(parts.items())[:MAX_PARTITIONS]:
            if not isinstance(name, str) or not isinstance(rec, dict):
                continue
            exposed, n, last = _number(rec.get("exposed_seconds")), rec.get("interruptions"), _number(rec.get("last_event", 0.0))
            if exposed is None or isinstance(n, bool) or not isinstance(n, int) or n < 0 or last is None:
                continue
            out[name] = PartitionHistory(exposed, n, last)
        return out

    def mtbi_seconds(self, partition: str | None) -> float | None:
        rec = self.load().get(partition or UNKNOWN_PARTITION)
        return rec.mtbi_seconds if rec is not None else None

    def env_for(self, partition: str | None) -> dict[str, str]:
        """``{RKSLURM_MTBI_SECONDS: M}`` for a job on ``partition``, or {} while M is unknown there."""
        m = self.mtbi_seconds(partition)
        return {ENV_MTBI_SECONDS: f"{m:.6g}"} if m is not None else {}

    # ------------------------------------------------------------ recording
    def record(self, partition: str | None, ran_seconds: float, interrupted: bool, now: float | None = None) -> PartitionHistory:
        """Add one run of ``ran_seconds`` on ``partition`` that ended interrupted or not; returns the new totals."""
        key = partition or UNKNOWN_PARTITION
        now = time.time() if now is None else now
        with self._lock:
            hist = self.load()
            rec = hist.setdefault(key, PartitionHistory())
            rec.exposed_seconds += max(0.0, ran_seconds) if math.isfinite(ran_seconds) else 0.0
            rec.interruptions += 1 if interrupted else 0
            rec.last_event = now
            if len(hist) > MAX_PARTITIONS:  # keep the most recently used
                for k in sorted(hist, key=lambda k: hist[k].last_event)[: len(hist) - MAX_PARTITIONS]:
                    hist.pop(k)
            self._save(hist)
            return rec

    def observe(self, partition: str | None, step_key: str, event: str, now: float | None = None) -> None:
        """Feed one executor event of a step (``executor._event``); records a run when one ends."""
        now = time.time() if now is None else now
        with self._lock:
            if event in STARTS:
                self._started[step_key] = now
                return
            if event not in INTERRUPTIONS and event not in ENDS:
                return
            start = self._started.pop(step_key, None)
            if event == "requeued":
                self._started[step_key] = now  # Slurm runs the same job id again; a resubmission says "submitted"
            if start is None:
                return  # a run this process did not see start: no exposure to count
            try:
                self.record(partition, now - start, event in INTERRUPTIONS, now)
            except Exception as exc:  # noqa: BLE001 - a statistic: never fail a step for it
                log.warning("cannot update the interruption history %s: %s", self.path, exc)

    def _save(self, hist: dict[str, PartitionHistory]) -> None:
        doc = {
            "version": VERSION,
            "partitions": {
                k: {"exposed_seconds": v.exposed_seconds, "interruptions": v.interruptions, "last_event": v.last_event}
                for k, v in hist.items()
            },
        }
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(folder)


_default: InterruptionHistory | None = None
_default_lock = threading.Lock()


def default_history() -> InterruptionHistory:
    """The history of the workflow in the current folder (Snakemake runs in the workflow's folder)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = InterruptionHistory(DEFAULT_PATH.absolute())
        return _default


def job_env(env: Mapping[str, str], partition: str | None, history: InterruptionHistory | None = None) -> dict[str, str]:
    """A job's environment plus ``RKSLURM_MTBI_SECONDS`` for ``partition`` when known (a value already in ``env`` wins)."""
    return {**(history or default_history()).env_for(partition), **env}
