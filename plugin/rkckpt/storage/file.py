"""A checkpoint folder on a POSIX file system, written crash-safely.

Every save goes to a temporary file in the same folder, is fsynced, renamed
over the final name and the folder is fsynced, so a SIGKILL or power loss at
any instant leaves either the old state or the complete new file. One
exclusive ``flock`` per folder stops two writers from interleaving.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

from .. import testhook
from ..atomic import fsync_dir
from ..errors import CheckpointError
from ..lock import check_private_folder, open_lock_file
from ..source import open_regular
from .base import ExistsError, LockedError, Payload, StorageBase, StorageError, check_range, validate_name, write_payload

LOCK_NAME = ".rkckpt.lock"
TMP_PREFIX = ".rkckpt-tmp-"


def _oserror(path: object, op: str, exc: OSError) -> StorageError:
    what = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        what = "no space left on device (the file system is full)"
    elif exc.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    return StorageError(os.fspath(path), f"{op} failed: {what}")  # type: ignore[arg-type]


def _link_no_replace(tmp: str, final: Path) -> None:
    """Give the finished ``tmp`` the name ``final`` unless that exists (FileExistsError), then drop ``tmp``.

    File systems without hard links fall back to check-then-rename, which
    the folder's writer lock makes safe against our own writers.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            raise FileExistsError(errno.EEXIST, "exists", os.fspath(final)) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


class FileStorage(StorageBase):
    """Checkpoint objects as files in one folder.

    ``file_mode``/``dir_mode`` default to owner-only: checkpoints can hold
    anything a simulation keeps in memory.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, file_mode: int = 0o600, dir_mode: int = 0o700, create: bool = True, fsync: bool = True
    ) -> None:
        self.root = Path(root).expanduser()
        self.url = os.fspath(self.root)
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.fsync = fsync
        self._lock_fd: int | None = None
        if create and not self.root.exists():
            try:
                self.root.mkdir(mode=dir_mode, parents=True, exist_ok=True)
                os.chmod(self.root, dir_mode)
            except OSError as exc:
                raise _oserror(self.root, "creating the checkpoint folder", exc) from None
        elif not self.root.is_dir() and create:
            raise StorageError(self.url, "not a folder")

    # ---------------------------------------------------------------- lock
    def acquire_lock(self) -> None:
        """Become the only writer of this folder (held until ``close``).

        The folder must be ours and not writable by anyone else, and the lock
        file is opened without following links: a ``.rkckpt.lock`` symlink or
        hard link planted by someone else is refused, never truncated.
        """
        if self._lock_fd is not None:
            return
        check_private_folder(self.root)
        fd = open_lock_file(self.root / LOCK_NAME, self.file_mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = "".join(c for c in os.pread(fd, 64, 0).decode(errors="replace") if c.isdigit())[:20] or "unknown"
            finally:
                os.close(fd)
            raise LockedError(
                self.url, f"checkpoint folder is locked by another writer (pid {holder}); refusing to interleave writes"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        # we hold the lock, so any temp file is the leftover of a killed writer
        for p in self.root.glob(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # releases the flock

    # ---------------------------------------------------------------- primitives
    def path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def local_path(self, name: str) -> Path | None:
        """The file itself, for readers that stream from a path; a symbolic link is refused (see ``_open``)."""
        p = self.path(name)
        return p if self.exists(name) else None

    def _open(self, name: str, op: str) -> int:
        """A read fd of the regular file ``name``; a symlink, FIFO or device under the name is refused.

        Why links are refused: this folder's files are only ever created by
        rename from our own temporary files, so a link under a checkpoint's
        name was planted. Following it could restore a *valid* checkpoint of
        another run (same kernel, newer step) as if it were this one's.
        """
        p = self.path(name)
        try:
            return open_regular(p, follow_links=False)
        except CheckpointError as exc:
            cause = exc.__context__
            if isinstance(cause, OSError) and cause.errno != errno.ELOOP:
                raise _oserror(p, op, cause) from None
            raise StorageError(str(p), f"{op} refused: {exc.problem}") from None

    def save(self, name: str, data: Payload) -> int:
        return self._put(name, data, replace=True, fsync=self.fsync)

    def save_cache(self, name: str, data: Payload) -> int:
        """``save`` for a file that is only a cache (the chain index): atomic rename, no fsyncs."""
        return self._put(name, data, replace=True, fsync=False)

    def create(self, name: str, data: Payload) -> int:
        """Atomic put-no-replace: the complete file appears under ``name`` only if nothing is there.

        ``link(2)`` of the finished temporary file fails with EEXIST instead of
        replacing, so even a second process that ignored the lock cannot make
        us overwrite a checkpoint.
        """
        return self._put(name, data, replace=False, fsync=self.fsync)

    def _put(self, name: str, data: Payload, *, replace: bool, fsync: bool) -> int:
        final = self.path(name)
        self.acquire_lock()
        if not replace and self.exists(name):  # fail before writing the bytes
            raise ExistsError(os.fspath(final), "a checkpoint with this name exists; refusing to replace it")
        try:
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.root)
        except OSError as exc:
            raise _oserror(final, "creating a temporary file", exc) from None
        try:
            os.fchmod(fd, self.file_mode)
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                write_payload(f, data)
                f.flush()
                size = f.tell()
                if fsync:
                    os.fsync(f.fileno())
            if replace:
                os.replace(tmp, final)
            else:
                testhook.fire("write")  # a checkpoint's bytes are down, its name not yet: a write in flight
                _link_no_replace(tmp, final)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(exc, FileExistsError):
                raise ExistsError(os.fspath(final), "a checkpoint with this name exists; refusing to replace it") from None
            if isinstance(exc, OSError):
                raise _oserror(final, "writing", exc) from None
            raise
        if fsync:
            fsync_dir(self.root)
        return size

    def load(self, name: str) -> bytes:
        with self.open_read(name) as f:
            try:
                return f.read()
            except OSError as exc:
                raise _oserror(self.path(name), "reading", exc) from None

    def open_read(self, name: str) -> BinaryIO:
        return os.fdopen(self._open(name, "opening"), "rb")

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        p = self.path(name)
        check_range(str(p), offset, length)
        fd = self._open(name, "reading")
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _oserror(p, "reading", exc) from None
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        p = self.path(name)
        try:
            return os.lstat(p).st_size  # of a link itself: reading it is refused with the reason (``_open``)
        except OSError as exc:
            raise _oserror(p, "stat", exc) from None

    def list(self) -> list[str]:
        try:
            searchable = not self.root.is_dir() or os.access(
                self.root, os.R_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids
            )
        except OSError as exc:
            raise _oserror(self.root, "listing", exc) from None
        if not searchable:
            raise StorageError(
                self.url, "permission denied: the checkpoint folder cannot be listed and searched (it needs r and x for you)"
            )
        try:
            return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_file())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _oserror(self.root, "listing", exc) from None

    def delete(self, name: str) -> None:
        p = self.path(name)
        self.acquire_lock()
        try:
            p.unlink(missing_ok=True)
        except OSError as exc:
            raise _oserror(p, "deleting", exc) from None

    def exists(self, name: str) -> bool:
        """True for a regular file (not a link to one); a folder we may not search is an error, not "absent"."""
        p = self.path(name)
        try:
            return stat.S_ISREG(os.lstat(p).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _oserror(p, "checking", exc) from None

    def __repr__(self) -> str:
        return f"FileStorage({self.url!r})"
