"""One exception type for every way a checkpoint can be unusable.

Callers (the manager, the CLI, the executor) only ever need to know *which
file* is bad and *why*; they never need to distinguish a bad CRC from a short
read. A single typed error keeps `except` clauses honest.
"""

from __future__ import annotations

import os


class CheckpointError(Exception):
    """A checkpoint file (or stream) is malformed, corrupt or inconsistent."""

    def __init__(self, source: str | os.PathLike[str] | None, problem: str) -> None:
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        where = self.source if self.source is not None else "<checkpoint>"
        super().__init__(f"{where}: {problem}")


class DeltaMismatchError(CheckpointError):
    """A delta was applied to a base that is not its recorded parent."""
