"""Small helpers shared by the wavesim workflow scripts (atomic outputs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from rkckpt.atomic import atomic_path as _atomic_path
from rkckpt.atomic import plain_file_mode


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path`` atomically.

    A job killed half-way (preemption, Ctrl-C) then leaves either the old
    file or none, never a truncated one that a later rule would trust.
    """
    with _atomic_path(path, mode=plain_file_mode(), mkdir=True) as tmp:
        yield tmp
