"""Small checkpoint folders for the chain, retention and index tests (not a fixture module)."""

from __future__ import annotations

import os

from helpers import chain_state
from rkckpt.chain import checkpoint_name
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse


def ckpt_name(kid: str, step: int, kind: str) -> str:
    return checkpoint_name(kid, step, kind)


def write_steps(d: str | os.PathLike[str], kid: str, steps, *, full_every: int = 2) -> None:
    """Checkpoint ``steps`` with retention off: with full_every=2, steps 1..5 give full 1, delta 2 3, full 4, delta 5."""
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=full_every, keep_chains=1000), kid) as m:
        for s in steps:
            m.submit(SnapshotResponse(SnapshotRequest(s), chain_state(kid, s)))
