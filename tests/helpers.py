"""Helpers every test package shares (not a fixture module): where the repository is, waiting, states.

One home for what test files used to define each for itself: ``REPO`` (four
copies), ``wait_until``/``wait_for`` (two names for one loop) and the small
``state(step)`` builders (a dozen copies that differed only in sizes).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rkckpt.model import Checkpoint, Metadata

REPO = Path(__file__).resolve().parent.parent
#: tests/ itself: the shared helpers live here, the tests one folder per package below it
TESTS = REPO / "tests"
DATA = TESTS / "data"
PLUGIN = REPO / "plugin"
#: The reference implementation's files and manifest, carried in the repository (tests/data/README.md).
VECTORS = DATA / "ringkernel-core-1.1.0"


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition", interval: float = 0.02) -> None:
    """Poll ``pred`` until it holds; fail naming ``what`` after ``timeout`` seconds.

    For waiting on another process (a checkpoint written, a job started): the
    test's outcome never depends on how long that took, only on whether it
    happened before the generous ``timeout``.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def chain_state(
    kid: str,
    step: int,
    *,
    big: int = 2048,
    small: int = 32,
    small_dtype: type[np.generic] = np.int64,
    big_every: int = 0,
) -> Checkpoint:
    """A state for chains of full checkpoints and deltas: region ``big`` and region ``small``.

    ``big`` (float32 ramp) is constant, so deltas stay small, or changes every
    ``big_every`` steps; ``small`` holds ``step`` and so changes every step.
    """
    c = Checkpoint(Metadata(kid, "test", step))
    scale = step // big_every + 1 if big_every else 1
    c.add_region("big", np.arange(big, dtype=np.float32) * scale)
    c.add_region("small", np.full(small, step, dtype=small_dtype))
    return c


def flat_state(kid: str, step: int, n: int = 512, name: str = "a") -> Checkpoint:
    """A one-region state whose float32 values are all ``step``: every step differs, every file is small."""
    c = Checkpoint(Metadata(kid, "test", step))
    c.add_region(name, np.full(n, step, dtype=np.float32))
    return c


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real, small tmpfs mounted at ``where`` (made here) for a full-disk test; skips where mounting is not allowed."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
