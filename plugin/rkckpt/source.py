"""Byte-range sources: one reader works on a file, a storage object, a slice of a file, or memory.

A source knows its size and hands out ranges; the container reader checks
every declared size against ``size`` before asking for it, so no source
ever sees a request past its end. Files are opened without blocking and
refused unless they are regular files: a FIFO or a device given as a
checkpoint ends in an error, not a hang.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import CheckpointError

Buffer = bytes | bytearray | memoryview
#: most bytes one ``preadv`` is asked for: a huge read goes in several syscalls (see ``FileSource.read_into``)
_MAX_PREAD = 32 << 20


@runtime_checkable
class Source(Protocol):
    name: str
    size: int

    def read(self, offset: int, n: int) -> memoryview:
        """Bytes [offset, offset+n) (a fresh buffer or a read-only view)."""

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset``."""


def _fresh(n: int) -> memoryview:
    return memoryview(np.empty(n, dtype=np.uint8)).cast("B")


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in, writable, without changing their contents
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_madvise: Any = None  # libc's madvise, where there is one
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        _madvise = None


def prefault(view: memoryview) -> None:
    """Fault in the pages of a fresh, writable buffer now, before data is read into them.

    Why: a loader returns new memory, and the kernel zeroes every new page
    on its first touch. Done by the helper thread for the piece after the one
    being read, that zeroing overlaps the read instead of adding to it.
    ``MADV_POPULATE_WRITE`` never changes what the pages hold, so it is safe
    even if the reader has already filled them. A hint only: where it is
    missing (old kernel, not Linux) pages fault in as the read touches them.
    """
    global _madvise
    if _madvise is None or not view.nbytes:
        return
    base = np.frombuffer(view, dtype=np.uint8).ctypes.data
    lo = (base + _PAGE - 1) & ~(_PAGE - 1)  # whole pages inside the view only
    hi = (base + view.nbytes) & ~(_PAGE - 1)
    if hi > lo and _madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == 22:
        _madvise = None  # EINVAL: this kernel lacks it; stop asking


class MemorySource:
    """Bytes already in memory; ranges are zero-copy views."""

    def __init__(self, data: Buffer, name: str | None = None) -> None:
        self.view = memoryview(data).cast("B")
        self.size = self.view.nbytes
        self.name = name or "<memory>"

    def read(self, offset: int, n: int) -> memoryview:
        return self.view[offset : offset + n]

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self.view[offset : offset + out.nbytes]

    def close(self) -> None:
        pass


def open_regular(path: str | os.PathLike[str], *, follow_links: bool = True) -> int:
    """An fd for reading ``path``, which must be a regular file (never blocks on a FIFO).

    ``follow_links=False`` refuses a symbolic link under the name itself: for
    small records (a set's manifest) that must be the file the writer renamed
    into place, not whatever a link points at.
    """
    src = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(src, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise CheckpointError(src, "a symbolic link, not a regular file (refusing to follow it)") from None
        raise CheckpointError(src, f"cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(src, "not a regular file (a FIFO, device or socket cannot be a checkpoint)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileSource:
    """A regular file read with ``pread``; ``close`` (or ``with``) releases it."""

    def __init__(self, path: str | os.PathLike[str], *, follow_links: bool = True) -> None:
        self.name = os.fspath(path)
        self.fd = open_regular(self.name, follow_links=follow_links)
        # no POSIX_FADV_SEQUENTIAL: measured on the bench VM, the kernel's own readahead
        # on 16 MiB reads is 6-10 % faster than with the doubled window that hint asks for
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, n: int) -> memoryview:
        out = _fresh(n)
        self.read_into(offset, out)
        return out

    def read_into(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < out.nbytes:
            try:
                got = os.preadv(self.fd, [out[done : min(out.nbytes, done + _MAX_PREAD)]], offset + done)
            except OSError as exc:
                raise CheckpointError(self.name, f"cannot read: {exc.strerror}") from None
            if not got:
                raise CheckpointError(self.name, f"file shrank while reading at offset {offset + done}")
            done += got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RangeSource:
    """``length`` bytes of another source starting at ``offset`` (e.g. an HDF5 dataset in its file)."""

    def __init__(self, inner: Source, offset: int, length: int, name: str | None = None) -> None:
        if offset < 0 or length < 0 or offset + length > inner.size:
            raise CheckpointError(inner.name, f"range {offset}+{length} lies outside the {inner.size}-byte file")
        self.inner, self.offset, self.size = inner, offset, length
        self.name = name or inner.name

    def read(self, offset: int, n: int) -> memoryview:
        return self.inner.read(self.offset + offset, n)

    def read_into(self, offset: int, out: memoryview) -> None:
        self.inner.read_into(self.offset + offset, out)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class StorageSource:
    """One object of a ``Storage`` (folder, S3, memory), read with range requests."""

    def __init__(self, storage: object, name: str, size: int | None = None) -> None:
        self.storage, self.name = storage, name
        self.size = int(storage.size(name) if size is None else size)  # type: ignore[attr-defined]

    def read(self, offset: int, n: int) -> memoryview:
        raw = self.storage.read_range(self.name, offset, n)  # type: ignore[attr-defined]
        if len(raw) != n:
            raise CheckpointError(self.name, f"object ended early: {len(raw)} of {n} bytes at offset {offset}")
        return memoryview(raw).cast("B")

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self.read(offset, out.nbytes)

    def close(self) -> None:
        pass
