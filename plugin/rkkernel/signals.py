"""SIGTERM/SIGUSR1 → "stop at the next batch boundary", never an exception mid-write.

The handler only records the first signal; later ones (e.g. Slurm's SIGTERM
after a ``--signal=USR1@...`` warning, or a second scancel while the final
checkpoint is being written) are counted and otherwise ignored, so nothing
half-written can result from them.
"""

from __future__ import annotations

import logging
import signal
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

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()


def ignore_stop_signals() -> None:
    """Once the exit status is decided: Python resets its handlers to SIG_DFL during
    interpreter shutdown, so a late SIGTERM would otherwise turn exit 75 into -15."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
