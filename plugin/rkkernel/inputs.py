"""Reading rkrun's input files (``--config``, ``--velocity``) so that no file can hang or flood it.

A FIFO named as ``--config`` blocks ``open()`` until a writer appears, with
the stop signals held: SIGTERM would be ignored and the Slurm job would burn
its allocation. ``/dev/zero`` never ends. So every input file is opened with
``O_NONBLOCK`` (an open of a FIFO returns at once), checked to be a regular
file with ``fstat`` on the open descriptor (no race with a rename), and read
with a size cap. A ``.npy`` header is parsed on its own first (no pickle) and
its shape, dtype and byte count are checked before the array is allocated.

Every problem is an :class:`InputFileError` (a ``ValueError``) whose one-line
message names the file and the problem.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: A config file is a handful of keys; anything near this size is not one.
CONFIG_MAX_BYTES = 1 << 20
#: Longest .npy header accepted (numpy's own default for untrusted files).
NPY_MAX_HEADER = 10_000


class InputFileError(ValueError):
    """An input file that cannot be used; the message names the file and the problem (one line)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (parsers' messages span several), cut at ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str) -> tuple[int, int]:
    """An open descriptor of ``path`` and its size; refuses anything but a regular file, without blocking."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot open {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bounded(path: str | os.PathLike[str], what: str, max_bytes: int = CONFIG_MAX_BYTES) -> bytes:
    """The whole of a regular file of at most ``max_bytes`` bytes (checked before and while reading)."""
    fd, size = open_regular(path, what)
    try:
        if size > max_bytes:
            raise InputFileError(f"{path}: {what} is {size} bytes, more than the {max_bytes} allowed")
        chunks, total = [], 0
        while True:  # the file may grow after fstat: never read more than the cap
            try:
                b = os.read(fd, min(1 << 16, max_bytes + 1 - total))
            except OSError as exc:
                raise InputFileError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > max_bytes:
                raise InputFileError(f"{path}: {what} is more than the {max_bytes} bytes allowed")
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_text(data: bytes, path: str | os.PathLike[str], what: str) -> str:
    """``data`` as UTF-8 text; a binary file is named as such, not as a decoding traceback."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise InputFileError(f"{path}: {what} is a binary file (NUL byte at offset {nul}), not UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_npy(path: str | os.PathLike[str], shape: tuple[int, ...], what: str, axes: str = "") -> np.ndarray:
    """A numeric ``.npy`` array of exactly ``shape`` (``axes`` names them in messages, e.g. ``(nz, nx)``).

    Header, dtype and byte count are checked before anything the size of the array is allocated.
    """
    import numpy as np
    from numpy.lib import format as npf

    fd, size = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        try:
            version = npf.read_magic(f)
            if version == (1, 0):
                got, fortran, dtype = npf.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
            elif version in ((2, 0), (3, 0)):
                got, fortran, dtype = npf.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (OSError, ValueError, SyntaxError, TypeError) as exc:
            raise InputFileError(f"{path}: {what} is not a readable .npy array ({one_line(exc)})") from None
        if tuple(got) != tuple(shape):
            label = f"{axes} = " if axes else ""
            raise InputFileError(f"{path}: {what} must have shape {label}{tuple(shape)}, got {tuple(got)}")
        if dtype.hasobject or dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
            raise InputFileError(f"{path}: {what} must be numeric (int or float), got {dtype}")
        count = 1
        for n in got:
            count *= int(n)
        need = count * dtype.itemsize
        have = size - f.tell()
        if have < need:
            raise InputFileError(f"{path}: {what} is truncated: its header promises {need} bytes of data, the file holds {have}")
        data = f.read(need)
        if len(data) != need:
            raise InputFileError(f"{path}: {what} is truncated: read {len(data)} of {need} bytes of data")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(got[::-1]).T if fortran else arr.reshape(got)
