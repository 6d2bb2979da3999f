"""Delta checkpoints and chains (whole-chunk deltas, as the reference does).

A delta records its parent's content digest; applying it anywhere else is an
error, so a chain can never silently mix states.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import DeltaMismatchError
from .model import PARENT_DIGEST_KEY, Checkpoint, Chunk


def make_delta(parent: Checkpoint, child: Checkpoint) -> Checkpoint:
    """Whole-chunk delta: chunks of ``child`` that are new or differ from ``parent``."""
    base = {c.identity: c for c in parent.chunks}
    changed: list[Chunk] = []
    for c in child.chunks:
        old = base.get(c.identity)
        if old is None or bytes(memoryview(old.data)) != bytes(memoryview(c.data)):
            changed.append(c)
    meta = child.metadata.with_custom(**{PARENT_DIGEST_KEY: parent.content_digest()})
    return Checkpoint(meta, changed, created_at=child.created_at)


def apply_delta(base: Checkpoint, delta: Checkpoint, *, source: str | None = None) -> Checkpoint:
    """Materialise ``base`` + ``delta`` (reference semantics; see RKCKPT-FORMAT.md)."""
    want = delta.metadata.parent_digest
    have = base.content_digest()
    if want is None:
        raise DeltaMismatchError(source, "not a delta checkpoint (no parent digest)")
    if want != have:
        raise DeltaMismatchError(source, f"delta expects parent digest {want}, base has {have}")
    replacement = {c.identity: c for c in delta.chunks}
    out: list[Chunk] = []
    seen = set()
    for c in base.chunks:
        r = replacement.get(c.identity)
        out.append(c if r is None else r)
        seen.add(c.identity)
    out.extend(c for c in delta.chunks if c.identity not in seen)
    return Checkpoint(delta.metadata, out, created_at=delta.created_at)


def apply_chain(base: Checkpoint, deltas: Sequence[Checkpoint], sources: Sequence[str | None] | None = None) -> Checkpoint:
    state = base
    for i, d in enumerate(deltas):
        state = apply_delta(state, d, source=None if sources is None else sources[i])
    return state
