"""Atomic file replacement: temp file beside the target, fsync, rename, fsync folder.

Every writer in the project goes through here, so a process killed at any
instant leaves either the old file or the new one under the final name,
never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_file_mode() -> int:
    """0666 minus the umask: what a plain ``open()`` creates (``mkstemp`` uses 0600)."""
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None, mkdir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that opens files by name (h5py).

    On success the file is fsynced, given ``mode`` (default: owner-only, as
    ``mkstemp`` made it), renamed over ``path`` and the folder fsynced; on any
    exception the temporary file is removed and the old ``path`` is untouched.
    """
    target = Path(path)
    folder = _folder(target)
    if mkdir:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, mode: int | None = None, mkdir: bool = False) -> Iterator[BinaryIO]:
    """Like ``atomic_path`` but yields an unbuffered binary file open for writing."""
    with atomic_path(path, mode=mode, mkdir=mkdir) as tmp, open(tmp, "wb", buffering=0) as fh:
        yield fh
