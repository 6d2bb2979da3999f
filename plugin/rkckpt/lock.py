"""Checks that keep other users out of a checkpoint folder before we write to it.

A folder that already exists keeps its owner and mode, so another user can
prepare one under ``/tmp`` (or a shared scratch) with a ``.rkckpt.lock``
symlink pointing at one of our files: opening the lock with ``O_CREAT`` and
truncating it would then cut that file. So a writer only uses a folder that
is its own and not writable by group or others, and opens the lock file
with ``O_NOFOLLOW`` and checks what it got (a plain file of ours, one link)
before writing a byte.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .storage.base import StorageError, UnsafeFolderError


def check_private_folder(folder: str | os.PathLike[str]) -> None:
    """Raise ``UnsafeFolderError`` unless ``folder`` is ours and writable by us alone."""
    path = os.fspath(folder)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StorageError(path, f"cannot use the checkpoint folder: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(path, "not a folder")
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeFolderError(
            path, f"checkpoint folder is owned by uid {st.st_uid}, not by you (uid {me}); refusing to write checkpoints into it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        raise UnsafeFolderError(
            path,
            f"checkpoint folder is writable by group or others (mode {mode:04o}), so they could plant or replace "
            f"checkpoints; run: chmod go-w {path}",
        )


def open_lock_file(path: str | os.PathLike[str], mode: int = 0o600) -> int:
    """Open (creating it if needed) the lock file without following links; return the fd.

    Refuses a symlink, anything but a regular file, a file owned by someone
    else and a file with more than one link (a hard link to another file).
    """
    p = Path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(p, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFolderError(p, "lock file is a symbolic link; refusing to follow it (remove it if you made it)") from None
        raise StorageError(p, f"opening the lock file failed: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "lock file is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"lock file is owned by uid {st.st_uid}, not by you"
        elif st.st_nlink != 1:
            problem = f"lock file has {st.st_nlink} hard links; refusing to write to it"
        if problem is not None:
            raise UnsafeFolderError(p, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd
