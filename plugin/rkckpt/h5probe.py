"""The forked probe: libhdf5 reads a file's HDF5 structure in a child before this process trusts it.

The HDF5 C library can crash (SIGSEGV) or spin forever on a damaged file's
metadata, which no ``except`` can catch. ``probe`` runs the caller's
structure read (``h5read`` passes its own) in a forked child with a
timeout, and remembers the verdict per file identity.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from .crc import crc32
from .errors import CheckpointError
from .source import FileSource

DEFAULT_PROBE_TIMEOUT = 20.0


class ProbeAbandoned(CheckpointError):
    """A probe given up because the process was asked to stop: no verdict on the file."""


_POLL = 0.05  # seconds between checks of the abandon hook while a probe runs
_abandon: Callable[[], bool] | None = None


def abandon_probes_when(check: Callable[[], bool] | None) -> None:
    """Give up a running probe as soon as ``check()`` is true (rkrun: a stop signal came in).

    A probe waits up to ``probe_timeout()`` for libhdf5; a process told to
    stop (SIGTERM under Slurm) must not sit that out. The signal handler only
    records the signal, so the wait polls ``check`` every 50 ms; an
    abandoned probe raises ``ProbeAbandoned`` (a CheckpointError: the file
    is skipped) and leaves no verdict behind.
    """
    global _abandon
    _abandon = check


def probe_timeout() -> float:
    """Seconds a probe waits for libhdf5 (``$RKCKPT_H5_PROBE_TIMEOUT``, default 20)."""
    try:
        value = float(os.environ.get("RKCKPT_H5_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT))
    except ValueError:
        return DEFAULT_PROBE_TIMEOUT
    return value if 0 < value < 1e6 else DEFAULT_PROBE_TIMEOUT


#: verdicts of earlier probes, by file identity (see ``_identity``) -> None (fine) or the problem
_PROBED: dict[tuple[object, ...], str | None] = {}
_EDGE = 64 << 10  # bytes at each end of the file that enter its identity


def _identity(path: str) -> tuple[object, ...] | None:
    """(path, device, inode, size, mtime, ctime, CRC-32 of the first and last 64 KiB).

    The CRCs: a file rewritten in place within one timestamp tick, at the
    same size, must not inherit the verdict of the bytes it replaced. The
    HDF5 structure this writer emits lies in those ranges.
    """
    try:
        with FileSource(path) as fs:
            st = os.fstat(fs.fd)
            head = crc32(fs.read(0, min(_EDGE, fs.size)))
            tail = crc32(fs.read(max(0, fs.size - _EDGE), min(_EDGE, fs.size)))
    except CheckpointError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, head, tail)


def probe(path: str | os.PathLike[str], read_structure: Callable[[str], None], *, timeout: float | None = None) -> None:
    """Read the file's HDF5 structure with libhdf5 in a forked child before trusting it here.

    The HDF5 C library can crash (SIGSEGV) or spin forever on a damaged
    file's metadata, which no ``except`` can catch. A damaged file ends as
    a CheckpointError naming it after at most ``timeout`` seconds (default
    ``probe_timeout()``); the wait is a ``select``, so this process's signal
    handlers keep running. A verdict is remembered for the same file
    (device, inode, size, mtime), so the CLI's probe-then-read pays once.
    ``read_structure(path)`` is what the child does: it raises a
    CheckpointError naming the problem, or returns. Bulk data is read with
    plain file I/O (see ``h5read._Opened.read``), so only the structure
    needs this.
    """
    src = os.fspath(path)
    if not hasattr(os, "fork"):
        return
    key = _identity(src)
    if key is not None and key in _PROBED:
        problem = _PROBED[key]
        if problem is not None:
            raise CheckpointError(src, problem)
        return
    wait = probe_timeout() if timeout is None else timeout
    problem = _probe_child(src, wait, read_structure)
    if key is not None:
        if len(_PROBED) >= 256:
            _PROBED.clear()
        _PROBED[key] = problem
    if problem is not None:
        raise CheckpointError(src, problem)


def _probe_child(src: str, timeout: float, read_structure: Callable[[str], None]) -> str | None:
    """Run ``read_structure(src)`` (libhdf5) in a child; the problem found, or None."""
    import faulthandler  # the probe's modules load with the first probe, not on the hot path
    import select
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no cleanup handlers, just the verdict
        code = 0
        try:
            os.close(r)
            faulthandler.disable()  # a crash is the expected, reported outcome: no dump
            # Runtimes loaded into this process (LLVM inside pocl or Intel's
            # OpenCL) install fatal-signal handlers that print, then return;
            # the child must die by the signal so the parent can report it.
            for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
                signal.signal(sig, signal.SIG_DFL)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)  # the parent's stop handlers are not this child's
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            try:
                read_structure(src)
            except CheckpointError as exc:
                os.write(w, exc.problem.encode("utf-8", "replace")[:4000])
                code = 3
            except BaseException as exc:  # noqa: BLE001 - reported, not raised
                os.write(w, f"damaged HDF5 structure: {type(exc).__name__}: {exc}".encode("utf-8", "replace")[:4000])
                code = 3
        finally:
            os._exit(code)
    os.close(w)
    try:
        deadline = time.monotonic() + timeout
        message = None
        abandoned = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([r], [], [], min(left, _POLL))
            if ready:
                message = os.read(r, 8192).decode("utf-8", "replace")
                break
            if _abandon is not None and _abandon():
                abandoned = True
                break
    except BaseException:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.close(r)
    if message is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if abandoned:
        raise ProbeAbandoned(src, "reading its HDF5 structure was abandoned: a stop was requested")
    if message is None:
        return f"the HDF5 library did not finish reading the file's structure within {timeout:g} s (damaged HDF5 structure)"
    if os.WIFSIGNALED(status):
        return f"damaged HDF5 structure: the HDF5 library crashed reading it (signal {os.WTERMSIG(status)})"
    if os.WEXITSTATUS(status) != 0:
        return message or "damaged HDF5 structure"
    return None
