"""Which checkpoint files may be deleted, and deleting them in a crash-safe order.

Retention (the manager after each write) and ``rkckpt gc`` share one rule:
a file may only go when a *verified*, newer restorable chain supersedes it.
Headers alone are not enough: a full checkpoint with a flipped payload byte
has a perfect header, and planning from headers would delete the older,
valid chain in favour of a corrupt one. So the roots of the chains that are
kept are read in full (checksums, sizes and the recorded state digest)
before anything older is deleted; the result is remembered per file size in
``ChainIndex.verified`` so retention after every write stays cheap.

The running writer knows more than the files say, and tells retention in a
``WriterView``: the chain it extends (never deleted, whatever else the plan
says) and the newer files its restore passed over (a chain the caller
could not restore, for a reason of its own such as a series with steps out
of order, is never counted as a kept chain, or it would supersede the chain
the run restored from). Files the writer just wrote and checked by CRC as
it wrote them are marked with ``trust_written`` so they are not read back
in full; older files still are.

Deletion goes newest step first, so a chain loses its deltas before its
root: a SIGKILL at any instant leaves a shorter chain, never an orphaned
delta. Orphans left by older versions (or by hand) that a verified root
supersedes are removed by the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .chain import ChainIndex, Entry, verify_chain
from .errors import CheckpointError
from .setmanifest import is_part_kernel
from .storage.base import Storage, StorageError

log = logging.getLogger("rkckpt.retention")

ORPHANED = "orphaned"


@dataclass(frozen=True)
class WriterView:
    """What the running writer knows about its folder that the files alone do not say.

    ``chain``: the files of the chain it extends, oldest first (restored
    from, or written since): never deleted. ``passed_over``: files newer than
    its restore point, which its restore could not use: never counted as a
    kept chain (retention applies the caller's verdicts, not only CRCs).
    """

    chain: tuple[str, ...] = ()
    passed_over: frozenset[str] = frozenset()


def trust_written(index: ChainIndex, name: str, size: int) -> None:
    """Count ``name`` (of ``size`` bytes) as read back intact without reading it.

    For a writer that checked the file's chunk CRCs and state digest while
    writing it: retention then skips the full read-back of new files, and
    ``rkckpt verify`` (and retention of files it did not write) still read
    everything. A file whose size later differs is read again.
    """
    index.verified[name] = size


def _verified(index: ChainIndex, root: Entry) -> bool:
    """True when ``root`` (a full checkpoint) reads back completely and matches its digest."""
    if index.verified.get(root.name) == root.size:
        return True
    try:
        ck = verify_chain(index.storage, [root], {})
        if root.state_digest is not None and ck.content_digest() != root.state_digest:
            raise CheckpointError(root.name, f"content digest differs from the recorded {root.state_digest}")
    except (CheckpointError, StorageError) as exc:
        root.error = exc.problem
        log.warning("not counting %s as a kept chain: %s", root.name, exc.problem)
        return False
    index.verified[root.name] = root.size
    return True


def _plan_kernel(index: ChainIndex, es: list[Entry], keep: int, writer: WriterView) -> list[Entry]:
    fulls = sorted((e for e in es if e.kind == "full" and e.ok and e.name not in writer.passed_over), key=lambda e: e.step, reverse=True)
    chains = {e.name: index.chain_of(e) for e in es}
    orphans = [e for e in es if e.kind == "delta" and (chains[e.name][1] or "").startswith(ORPHANED)]
    older = [e for e in es if fulls and e.step < fulls[min(keep, len(fulls)) - 1].step]
    if not orphans and (len(fulls) <= keep or not older):
        return []  # nothing could go: skip reading the roots
    roots: list[Entry] = []
    for r in fulls:
        if len(roots) == keep:
            break
        if _verified(index, r):
            roots.append(r)
    if not roots:
        return []
    newest = roots[0].step
    root_names = {r.name for r in roots}
    kept = {c.name for e in es if chains[e.name][0] and chains[e.name][0][0].name in root_names for c in chains[e.name][0]}
    doomed: dict[str, Entry] = {}
    for e in orphans:  # unrestorable anyway, and a verified chain at least as new supersedes them
        if e.step <= newest:
            doomed[e.name] = e
    if len(roots) == keep:
        cutoff = roots[-1].step
        for e in es:
            if e.step < cutoff and e.name not in kept:
                doomed[e.name] = e
    # anything newer than the newest verified chain is not superseded: keep its whole chain
    for e in es:
        if e.step > newest:
            for c in chains[e.name][0]:
                doomed.pop(c.name, None)
    # what would lose an ancestor goes too (it is no newer than a verified chain): no orphans left behind
    for e in es:
        if e.name not in doomed and e.name not in kept and any(c.name in doomed for c in chains[e.name][0]):
            doomed[e.name] = e
    for n in writer.chain:  # the chain being extended stays whole, whatever the files say
        doomed.pop(n, None)
    return list(doomed.values())


def plan(index: ChainIndex, keep: int, kernel_id: str | None = None, *, writer: WriterView | None = None) -> list[str]:
    """Names to delete, in the order to delete them (newest step first, deltas before fulls).

    Keeps the newest ``keep`` chains whose full checkpoint verifies (and,
    with a ``writer``, that its restore did not pass over); nothing at or
    after the oldest of those is touched, nor the writer's chain. With fewer
    verified chains than ``keep`` only orphaned deltas older than the newest
    verified chain go. Without a ``kernel_id``, the part chains of checkpoint
    sets (``<kernel>.r<rank>of<ranks>``) are left out: a part is kept or
    deleted with its set (``ckptset.gc_sets``), not as a chain of its own.
    """
    writer = writer or WriterView()
    if keep < 1:
        raise ValueError("keep must be at least 1")
    by_kernel: dict[str, list[Entry]] = {}
    for e in index.sorted(kernel_id):
        if kernel_id is None and is_part_kernel(e.kernel_id):
            continue  # a part of a checkpoint set: only ``ckptset.gc_sets`` knows which of its files a set needs
        by_kernel.setdefault(e.kernel_id, []).append(e)
    doomed: list[Entry] = []
    for es in by_kernel.values():
        doomed.extend(_plan_kernel(index, es, keep, writer))
    doomed.sort(key=lambda e: (e.step, e.kind == "delta", e.name), reverse=True)
    return [e.name for e in doomed]


def delete(storage: Storage, index: ChainIndex, names: Iterable[str], *, durable_index: bool = True) -> list[str]:
    """Delete ``names`` in the given order and save the index (``durable_index=False``: without fsyncs, it is
    a cache; the checkpoint manager after each write); return what was deleted."""
    done = []
    for n in names:
        storage.delete(n)
        index.remove(n)
        index.verified.pop(n, None)
        done.append(n)
    if done:
        index.save(durable=durable_index)
    return done


def gc(storage: Storage, keep: int, kernel_id: str | None = None, *, index: ChainIndex | None = None) -> list[str]:
    """Plan from the files (not the cached index alone) and delete; return the deleted names."""
    index = index or ChainIndex(storage)
    index.refresh(trust_cache=False)
    return delete(storage, index, plan(index, keep, kernel_id))
