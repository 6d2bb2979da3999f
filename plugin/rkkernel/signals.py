"""SIGTERM/SIGUSR1 → "stop at the next batch boundary", never an exception mid-write.

The handler only records the first signal; later ones (e.g. Slurm's SIGTERM
after a ``--signal=USR1@...`` warning, or a second scancel while the final
checkpoint is being written) are counted and otherwise ignored, so nothing
half-written can result from them.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("rkrun")

# SIGINT too: Ctrl-C under the local executor should keep the steps since the last checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass
class StopFlag:
    signal_name: str | None = None
    extra: list[str] = field(default_factory=list)
    _old: dict[int, object] = field(default_factory=dict)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
        else:
            self.extra.append(name)

    def install(self) -> StopFlag:
        """(Re)install the handlers; cheap, so callers re-arm after native code that may
        have replaced them (LLVM, used by pocl, takes SIGUSR1 and SIGTERM when it loads)."""
        for s in STOP_SIGNALS:
            old = signal.signal(s, self._handler)
            self._old.setdefault(s, old)
        return self

    @contextmanager
    def held(self) -> Iterator[StopFlag]:
        """Hold the stop signals back while native code may replace our handlers.

        LLVM (inside pocl) installs its own SIGUSR1/SIGTERM handlers when an
        OpenCL context is created; a SIGUSR1 landing before ``install`` takes
        them back runs LLVM's handler and is lost (Slurm's "time is nearly up"
        warning, silently ignored). So the signals are blocked in this thread
        for the duration, our handlers are re-installed, and only then is the
        mask restored: a signal that came in meanwhile stays pending and is
        delivered to *our* handler. Threads started inside (pocl's workers)
        inherit the blocked mask and never take a stop signal. The mask is
        restored on every exit path, exceptions included.
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield self
        finally:
            try:
                self.install()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()


def ignore_stop_signals() -> None:
    """Once the exit status is decided: Python resets its handlers to SIG_DFL during
    interpreter shutdown, so a late SIGTERM would otherwise turn exit 75 into -15."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
