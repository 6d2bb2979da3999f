"""Deterministic signal points for tests: a process signals itself at a named point.

Timing a signal from outside ("SIGTERM 0.3 s after start") only hits a window
by luck. With ``RKSLURM_TEST_SIGNAL=point:SIGNAL:n[,point:SIGNAL:n...]`` the
process sends itself ``SIGNAL`` the ``n``-th time it reaches ``point``, so a
test forces the window every time: ``start`` (before the kernel is built),
``restore`` (a chain found, its state not yet loaded into the kernel) and
``write`` (a checkpoint's bytes written to its temporary file, the name
not yet given: a write in flight). Unset, ``fire`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "RKSLURM_TEST_SIGNAL"
#: Multi-rank steps: keep this many sets minus one pending; once this many are, wait for their writes and
#: resolve the older ones (a deterministic window of two pending sets: ``handed-2``).
HOLD_SETS_ENV = "RKSLURM_TEST_HOLD_SETS"

_seen: Counter[str] = Counter()


def _plan(spec: str) -> dict[str, list[tuple[int, signal.Signals]]]:
    plan: dict[str, list[tuple[int, signal.Signals]]] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        point, sig, n = item.split(":")
        name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
        plan.setdefault(point, []).append((int(n), signal.Signals[name]))
    return plan


def fire(point: str) -> None:
    """Send the signal planned for the current visit of ``point``, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[point] += 1
    try:
        plan = _plan(spec)
    except (ValueError, KeyError):  # a malformed plan fires nothing (it is for tests only)
        return
    for n, sig in plan.get(point, ()):
        if n == _seen[point]:
            os.kill(os.getpid(), sig)


def sets_held() -> int:
    """Sets that must be pending before any is resolved: 1, more only under ``HOLD_SETS_ENV``."""
    try:
        return max(1, int(os.environ.get(HOLD_SETS_ENV, "1")))
    except ValueError:
        return 1
