"""Read a step's events file incrementally, from the last offset.

The status loop used to re-read every step's whole ``rkstep.events.jsonl``
on every poll: with thousands of steps and long runs that is most of the
head's CPU and I/O. An :class:`EventFeed` remembers how far it has read and
parses only the complete lines appended since; it is asked only when the
step's Slurm job changed state. A file that shrank or was replaced is read
again from the start; a torn last line waits for its newline; a line longer
than :data:`MAX_LINE` is skipped, never buffered whole.

This is the one seam the status loop reads events through
(:meth:`EventFeed.latest_attempt`), so rkstep's ``StepFolder.observe`` can
replace it without touching the loop.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rkstep.events import Attempt, latest_attempt

__all__ = ["MAX_LINE", "EventFeed"]

#: longest event line kept (a real one is < 1 KiB); longer ones are hostile or torn garbage
MAX_LINE = 64 * 1024
#: most bytes read per call, so a huge file costs a bounded slice of one poll
MAX_READ = 4 * 1024 * 1024


@dataclass
class EventFeed:
    """The events of one step's file read so far, and where to read on."""

    path: Path
    offset: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    _ident: tuple[int, int] | None = None
    _skipping: bool = False
    #: times the file was opened (for the scale benchmark and tests)
    reads: int = 0

    def poll(self) -> list[dict[str, Any]]:
        """Events appended since the last call (and keep them)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            if ident != self._ident or st.st_size < self.offset:
                # replaced or truncated: what we parsed no longer describes the file
                self._ident, self.offset, self.events, self._skipping = ident, 0, [], False
            if st.st_size == self.offset:
                return []
            self.reads += 1
            os.lseek(fd, self.offset, os.SEEK_SET)
            data = os.read(fd, min(MAX_READ, st.st_size - self.offset))
        finally:
            os.close(fd)
        new: list[dict[str, Any]] = []
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= MAX_LINE:  # no newline in sight: drop it, resync at the next one
                self.offset += len(data)
                self._skipping = True
            return new
        chunk = data[: end + 1]
        self.offset += len(chunk)
        for line in chunk.split(b"\n")[:-1]:
            if self._skipping:  # the tail of an over-long line
                self._skipping = False
                continue
            if len(line) > MAX_LINE:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill mid-write
            if isinstance(rec, dict) and isinstance(rec.get("event"), str):
                new.append(rec)
        self.events.extend(new)
        return new

    def latest_attempt(self, job_id: str) -> Attempt | None:
        """The newest attempt of Slurm job ``job_id``, after reading what was appended."""
        self.poll()
        return latest_attempt(self.events, job_id)
