"""Reading and appending files in a step folder that anyone able to write the
folder may have replaced: a symlink (to ``/dev/zero``, to another user's file),
a FIFO, a directory, a file of gigabytes.

Why a module of its own: every reader of the folder (the executor's status
loop, rkrun counting its restarts, the workflow's plots) goes through these few
functions, so no reader can hang on a FIFO, follow a planted link or allocate
what a file claims. Each path is opened with ``O_NOFOLLOW | O_NONBLOCK`` and
checked to be a regular file with ``fstat`` *before* a byte is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FolderError",
    "HostileFileError",
    "Tail",
    "append_line",
    "atomic_write",
    "ensure_private_folder",
    "load_json_object",
    "parse_json",
    "read_capped",
    "read_tail",
]

#: small JSON markers (stop marker, progress, fingerprint, owner): anything bigger is not ours
MARKER_MAX_BYTES = 64 << 10


class HostileFileError(OSError):
    """The path exists but is not a plain regular file we may read (a link, FIFO, device, directory)."""


def _open_regular(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> tuple[int, os.stat_result]:
    """``os.open`` without following a final symlink and without blocking on a FIFO; the fd of a regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostileFileError(f"{os.fspath(path)}: not a regular file (mode {stat.filemode(st.st_mode)})")
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def _read_range(fd: int, start: int, n: int) -> bytes:
    chunks: list[bytes] = []
    while n > 0:
        b = os.pread(fd, min(n, 1 << 20), start)
        if not b:
            break
        chunks.append(b)
        start += len(b)
        n -= len(b)
    return b"".join(chunks)


def read_capped(path: str | os.PathLike[str], cap: int) -> bytes:
    """The whole file, or :class:`ValueError` when it is larger than ``cap``; ``OSError`` when unreadable."""
    fd, st = _open_regular(path, os.O_RDONLY)
    try:
        if st.st_size > cap:
            raise ValueError(f"{os.fspath(path)}: {st.st_size} bytes, more than the {cap} allowed")
        data = _read_range(fd, 0, cap + 1)
        if len(data) > cap:  # grew after fstat
            raise ValueError(f"{os.fspath(path)}: more than the {cap} bytes allowed")
        return data
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Tail:
    """Bytes read from ``start`` to ``end``; ``skipped`` bytes before ``start`` were not read (over the cap)."""

    data: bytes
    start: int
    end: int
    skipped: int = 0
    #: the file is shorter than the offset asked for: it was truncated or replaced
    shrunk: bool = False


def read_tail(path: str | os.PathLike[str], since: int, cap: int) -> Tail:
    """Complete lines appended after byte ``since``, at most ``cap`` bytes of them (the newest).

    Only whole lines are returned (``end`` stops after the last newline), so a
    line being written is read on the next call. When more than ``cap`` bytes
    are new, the older ones are skipped up to the first line boundary after them.
    """
    fd, st = _open_regular(path, os.O_RDONLY)
    try:
        size = st.st_size
        shrunk = size < since
        start = 0 if shrunk else max(0, since)
        skipped = 0
        if size - start > cap:
            skipped = size - cap - start
            start = size - cap
        data = _read_range(fd, start, size - start)
        if skipped:
            nl = data.find(b"\n")
            cut = len(data) if nl < 0 else nl + 1
            data, start, skipped = data[cut:], start + cut, skipped + cut
        last = data.rfind(b"\n")
        data = data[: last + 1] if last >= 0 else b""
        return Tail(data, start, start + len(data), skipped, shrunk)
    finally:
        os.close(fd)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses NaN/Infinity; ``ValueError`` on anything wrong.

    Callers cap the size first (a line, a marker), so nesting is bounded by that
    cap; nesting deeper than the interpreter allows (``"[" * 100000``) raises
    RecursionError in the C decoder, reported here as ``ValueError``.
    """
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_json_object(path: str | os.PathLike[str], cap: int = MARKER_MAX_BYTES) -> dict[str, Any] | None:
    """A small JSON object file, or None when missing, hostile, too big or not a JSON object."""
    try:
        doc = parse_json(read_capped(path, cap))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def append_line(path: str | os.PathLike[str], line: bytes, mode: int = 0o600) -> None:
    """Append one line to a regular file (created ``mode``) that is ours; never through a link or into a FIFO.

    Raises ``OSError`` (``ELOOP`` for a link, ``ENXIO`` for a FIFO without a
    reader, :class:`HostileFileError` for anything else or a file of another user).
    """
    fd, st = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        if st.st_uid != os.geteuid():
            raise HostileFileError(f"{os.fspath(path)}: owned by uid {st.st_uid}, not by us")
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Temp file beside ``path``, fsync, rename over it, fsync the folder: a reader sees the old or the new bytes."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FolderError(RuntimeError):
    """The folder cannot be used safely (a link, not ours, writable by others)."""


def ensure_private_folder(path: Path, create: bool = True) -> None:
    """Create ``path`` 0700 (when ``create``) and check it is a real folder of ours that others cannot write."""
    if create:
        os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise FolderError(f"checkpoint folder {path} is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(st.st_mode):
        raise FolderError(f"checkpoint folder {path} is not a folder")
    if st.st_uid != os.geteuid():
        raise FolderError(f"checkpoint folder {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
    if st.st_mode & 0o022:
        raise FolderError(
            f"checkpoint folder {path} is writable by group or others (mode {stat.filemode(st.st_mode)}); fix: chmod go-w {path}"
        )
