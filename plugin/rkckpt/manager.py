"""Periodic checkpointing for a running kernel: when, full or delta, where, how many.

Kernels hand over a ``SnapshotResponse`` (their full state) and never see
storage, deltas or retention. Design decisions:

* **Back-pressure: submit waits when two writes are queued.** One write is in
  flight and one more may wait behind it (``MAX_PENDING``); a ``submit`` beyond
  that blocks until the write in flight finishes. A checkpoint the kernel asked
  for is never dropped silently, and memory stays bounded at the delta parent
  plus the queued states. ``stats.wait_seconds`` shows how long the compute
  loop was held up.
* The response's checkpoint belongs to the manager after ``submit``: the
  caller must not mutate its buffers (kernels copy device memory out anyway).
  Once the manager no longer reads a state (a newer one became the delta
  parent), ``reusable()`` hands it back so the next snapshot can be copied
  into memory that is already mapped instead of a fresh allocation.
* The writer thread runs ``WRITER_NICE`` steps nicer than the compute loop;
  each chunk's CRC-32 is computed once per checkpoint: it gives the content
  digest (passed to the delta) and, for a full, the stream and index CRCs
  (``stream.known_crcs``). ``stats.phase_cpu`` says where the writer's CPU goes.
* A full checkpoint starts a chain; then deltas, until ``full_every`` deltas
  were written or a delta would exceed ``max_delta_fraction`` of a full one.
  Block deltas compare ``delta_block`` bytes at a time (64: small enough
  that a thin advancing front does not drag whole rows of unchanged cells
  into the delta, see ``CheckpointPolicy``).
* Retention keeps the newest ``keep_chains`` chains whose full checkpoint
  reads back intact, never deletes anything a kept delta depends on, and
  deletes deltas before their root (``rkckpt.retention``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np

from . import delta as rkdelta
from . import forms, h5write, retention, stream
from .chain import DEFAULT_FORMAT, ChainIndex, Entry, RestorePoint, SelfParentError, checkpoint_name, latest_restorable
from .codec import WriteOptions
from .crc import crc32
from .delta import STATE_DIGEST_KEY
from .errors import CheckpointError
from .model import Checkpoint, digest_from_crcs
from .storage import ExistsError, Storage, StorageError, open_storage

log = logging.getLogger("rkckpt.manager")

__all__ = ["CheckpointManager", "CheckpointPolicy", "ManagerStats", "RestorePoint", "SnapshotRequest", "SnapshotResponse"]

Reason = Literal["periodic", "signal", "final"]
Kind = Literal["full", "delta"]


@dataclass(frozen=True)
class SnapshotRequest:
    step: int
    reason: Reason | str = "periodic"


@dataclass(frozen=True)
class SnapshotResponse:
    request: SnapshotRequest
    checkpoint: Checkpoint
    #: Waits until the checkpoint's buffers hold the state (an asynchronous device->host copy,
    #: ``PersistentKernel.snapshot``); the writer calls it before reading a byte. None: complete already.
    ready: Callable[[], None] | None = None


@dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int | None = None
    every_seconds: float | None = None
    full_every: int = 8
    max_delta_fraction: float = 0.5
    #: Bytes per block of a block delta (the patch records it, so any size reads
    #: back). A sparse change is a thin surface through the grid: with 4 KiB
    #: blocks (eight 128-cell rows) nearly every row the surface crosses is
    #: stored whole. The traveltime front at 128^3, a checkpoint every 2 steps:
    #: the average delta is 23% of a full state with 4096-byte blocks, 20% with
    #: 256, 7.5% with 64 (a cache line, 16 floats), 5.4% with 32; below 64 the
    #: 16-byte run entries and the per-block work grow faster than the savings.
    delta_block: int = 64
    #: A delta is only made when the change estimate (``_estimated_change``, within about
    #: 0.03 of the real delta on the wave and traveltime states) is at most this. Making a
    #: delta costs about as much as writing a full (19-53 ms per 16 MiB: a compare pass over
    #: parent and child plus the patch), so it never pays in time on a local disk; it pays in
    #: bytes (disk, object store, the flush to it) when it stores a small part of the state.
    #: Below 0.3 a delta saves at least 70% of them; between this and ``max_delta_fraction``
    #: it saves little and, near that limit, may be built only to be thrown away.
    delta_try_fraction: float = 0.3
    #: newest verified chains retention keeps; None: no retention (a part of a checkpoint set: ``ckptset.gc_sets`` decides)
    keep_chains: int | None = 2
    compat: bool = False
    level: int | None = None  # zstd level; None: the codec's default
    #: file form of the chain: "rk.h5" (the stream wrapped in HDF5) or "rkcp" (the bare stream)
    checkpoint_format: str = DEFAULT_FORMAT


@dataclass
class ManagerStats:
    completed: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0  # time spent waiting for the snapshot's device->host copy, encoding + writing
    #: (step, writer seconds: encode, write, retention) of the newest successful write (--checkpoint-every auto measures it)
    last_write: tuple[int, float] | None = None
    wait_seconds: float = 0.0  # time callers were blocked by back-pressure
    full: int = 0
    deltas: int = 0
    full_bytes: int = 0  # of bytes_written, in full checkpoints (the rest are deltas)
    deleted: int = 0
    last_error: str | None = None
    #: step of the newest checkpoint saved to storage (what a restore may start from)
    last_written_step: int | None = None
    #: writer time per phase of ``_write`` (ready, digest, decide, encode, store, record, retain), summed over
    #: checkpoints: wall seconds, and CPU seconds of the writer thread itself (the CRC helper thread of a
    #: write is not in it). Tells a copy wait from a slow disk from CPU the write takes from the kernel.
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    phase_cpu: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def add_phase(self, name: str, wall: float, cpu: float) -> None:
        self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + wall
        self.phase_cpu[name] = self.phase_cpu.get(name, 0.0) + cpu


#: The index (a cache) is saved after a write at most this often; ``final``, ``flush`` and ``close`` save the rest.
INDEX_SAVE_SECONDS = 1.0

#: Writes queued at most (the one in flight plus those waiting): ``submit`` returns at once
#: while fewer are queued, so one slow write (a page-cache flush, a busy disk, the writer
#: descheduled on a loaded node) does not stall the kernel; a second one still applies
#: back-pressure, so memory stays bounded at the delta parent plus this many states.
MAX_PENDING = 2

#: The writer thread (and the CRC helper it starts) runs this much nicer than
#: the compute loop: on a busy node the loop keeps its core and the write
#: takes the slack; the loop only waits when back-pressure says so.
WRITER_NICE = 5

_SAMPLE_BLOCKS = 64
_SAMPLE_BLOCK = 4096


def _make_delta(parent: Checkpoint, parent_digest: str, child: Checkpoint, child_digest: str, block: bool, block_size: int) -> Checkpoint:
    mode = "block" if block else "whole"
    return rkdelta.make_delta(parent, child, mode, block_size=block_size, parent_digest=parent_digest, state_digest=child_digest)


def _estimated_change(parent: Checkpoint, child: Checkpoint, block: int = _SAMPLE_BLOCK) -> float:
    """Fraction of the child's bytes a block delta of ``block``-byte blocks would store, from a strided sample.

    Lets a fully rewritten state (every cell of a stencil changes each step)
    go straight to a full checkpoint without paying for a delta it would
    throw away; a small estimate is always confirmed by the real delta.
    Each sampled window counts the fraction of its ``block``-byte blocks that
    changed, so the estimate sees what the delta will store: a thin front
    changes every 4 KiB window it crosses but few 64-byte blocks of each.
    """
    base = {c.identity: c for c in parent.chunks}
    total = changed = 0
    for c in child.chunks:
        n = c.size
        total += n
        old = base.get(c.identity)
        if old is None or old.size != n:
            changed += n
            continue
        if n <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
            changed += n if bytes(memoryview(old.data).cast("B")) != bytes(memoryview(c.data).cast("B")) else 0
            continue
        a, b = np.frombuffer(memoryview(old.data).cast("B"), np.uint8), np.frombuffer(memoryview(c.data).cast("B"), np.uint8)
        stride = (n - _SAMPLE_BLOCK) // (_SAMPLE_BLOCKS - 1)
        starts = range(0, n - _SAMPLE_BLOCK + 1, stride)
        changed += int(n * _sampled_hits(a, b, starts, block) / len(starts))
    return changed / max(1, total)


def _sampled_hits(a: np.ndarray, b: np.ndarray, starts: range, block: int) -> float:
    """Sum over the windows at ``starts`` of the fraction of their ``block``-byte blocks that differ.

    All windows are compared in one NumPy pass (strided views, no copy): one small
    call per window held the GIL and cost some 3 ms per 8 MiB region on the writer
    thread, as much as the region's CRC. The sum is taken window by window in the
    same order as before, so the estimate is bit-identical.
    """
    if _SAMPLE_BLOCK % block:  # blocks straddle windows: one window at a time
        return sum(float(rkdelta.changed_blocks(a[i : i + _SAMPLE_BLOCK], b[i : i + _SAMPLE_BLOCK], block).mean()) for i in starts)
    if block % 8 == 0:
        per_block = _changed_blocks_by_words(a, b, starts, block)
    else:
        view = np.lib.stride_tricks.sliding_window_view
        wa = view(a, _SAMPLE_BLOCK)[starts.start : starts.stop : starts.step]
        wb = view(b, _SAMPLE_BLOCK)[starts.start : starts.stop : starts.step]
        per_block = (wa != wb).reshape(len(starts), _SAMPLE_BLOCK // block, block).any(axis=2)
    return sum(float(x) for x in per_block.mean(axis=1))


def _changed_blocks_by_words(a: np.ndarray, b: np.ndarray, starts: range, block: int) -> np.ndarray:
    """(windows, blocks per window) bools: which ``block``-byte blocks of the windows at ``starts`` differ.

    Compares 8 bytes at a time (windows as unaligned uint64 rows: a view, no
    copy), and folds each block's word flags with one integer view where a
    block is 1, 2, 4 or 8 words (a 64-byte block: 8 flag bytes read as one
    uint64), instead of an ``any`` over 64 byte flags: a fifth of the CPU of
    the byte compare, same answer (a block differs iff one of its words does).
    """
    rows, words = len(starts), _SAMPLE_BLOCK // 8
    strides = (starts.step if rows > 1 else _SAMPLE_BLOCK, 8)
    wa = np.ndarray((rows, words), np.uint64, buffer=a, offset=starts.start, strides=strides)
    wb = np.ndarray((rows, words), np.uint64, buffer=b, offset=starts.start, strides=strides)
    differ = wa != wb
    k = block // 8
    if k in (1, 2, 4, 8):
        return differ.view(np.dtype(f"u{k}")) != 0
    return differ.reshape(rows, _SAMPLE_BLOCK // block, k).any(axis=2)


def _chunk_crcs(state: Checkpoint) -> list[int]:
    """CRC-32 of each chunk's data: one pass, shared by the content digest and the stream checksum of a full."""
    return [crc32(c.data) for c in state.chunks]


def _lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (Linux: niceness is per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not permitted or not supported: run at normal priority
        pass


def _warm_up() -> None:
    """The warm-up thread (``CheckpointManager._start_warm_up``): best effort, it never fails a run."""
    _lower_thread_priority(WRITER_NICE)
    try:
        h5write.warm_up()
    except Exception:  # noqa: BLE001 - the first write pays the cost, or reports its own error
        log.debug("writer warm-up failed", exc_info=True)


def _payload_bytes(c: Checkpoint) -> int:
    return sum(ch.size for ch in c.chunks)


def _create(storage: Storage, name: str, data: object) -> int:
    """Save a checkpoint that must not replace anything (``Storage.create``; ``save`` for stores without it)."""
    create = getattr(storage, "create", None)
    if create is None:
        if storage.exists(name):
            raise ExistsError(f"{storage.url.rstrip('/')}/{name}", "a checkpoint with this name exists; refusing to replace it")
        return storage.save(name, data)  # type: ignore[arg-type]
    return create(name, data)


def _writer(ckpt: Checkpoint, options: WriteOptions, fmt: str, chain_base: str | None):  # noqa: ANN202
    """Streaming writer for ``Storage.save`` in the chain's file form."""
    form = forms.by_format(fmt)
    return lambda f: form.write_to(f, ckpt, options, chain_base)


@dataclass(frozen=True)
class _Plan:
    """One checkpoint on its way to storage (``CheckpointManager._encode``)."""

    step: int
    kind: Kind
    state: Checkpoint  # the full state: the next delta's parent once saved
    digest: str  # content digest of ``state``
    body: Checkpoint  # what is saved: ``state`` or its delta, with the state digest recorded
    name: str
    base: str | None  # digest of the full checkpoint the chain starts from


class CheckpointManager:
    """Decides when to checkpoint and writes chains of full + delta files."""

    def __init__(
        self,
        storage_or_url: str | os.PathLike[str] | Storage,
        policy: CheckpointPolicy | None = None,
        kernel_id: str = "kernel",
        *,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, not {max_pending}")
        self.max_pending = max_pending
        self.policy = policy or CheckpointPolicy()
        if (
            self.policy.full_every < 0
            or not 0 < self.policy.max_delta_fraction <= 1
            or not 0 <= self.policy.delta_try_fraction <= 1
            or (self.policy.keep_chains is not None and self.policy.keep_chains < 1)
            or self.policy.delta_block < 1
        ):
            raise ValueError(f"invalid checkpoint policy {self.policy}")
        if self.policy.checkpoint_format not in forms.FORMS:
            raise ValueError(f"checkpoint_format must be one of {sorted(forms.FORMS)}, not {self.policy.checkpoint_format!r}")
        if not kernel_id or "/" in kernel_id:
            raise ValueError(f"invalid kernel id {kernel_id!r}")
        self.storage: Storage = open_storage(storage_or_url)
        acquire = getattr(self.storage, "acquire_lock", None)
        if acquire is not None:
            acquire()
        self.kernel_id = kernel_id
        self.options = WriteOptions(compat=True) if self.policy.compat else WriteOptions(compat=False)
        if not self.policy.compat and self.policy.level is not None:
            self.options = dataclasses.replace(self.options, level=self.policy.level)
        self.stats = ManagerStats()
        self.index = ChainIndex(self.storage)
        self._indexed = False
        self._parent: Checkpoint | None = None  # materialised state of the last file written
        self._parent_digest: str | None = None
        self._chain_base: str | None = None  # digest of the full checkpoint the current chain starts from
        self._parent_step: int | None = None  # step of _parent: a delta is only ever written at a later step
        self._chain: list[str] = []  # files of the chain being extended, oldest first (retention keeps them)
        self._passed_over: frozenset[str] = frozenset()  # newer files the restore could not use (retention never counts them)
        self._handed_in: set[int] = set()  # id() of live states that came through submit/final
        self._released: Checkpoint | None = None  # one of those the manager no longer reads
        self._deltas_since_full = 0
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._cond = threading.Condition()
        self._jobs: deque[SnapshotResponse] = deque()  # the write in flight first, then the pending one
        self._closed = False
        self._thread: threading.Thread | None = None
        self._index_saved_at = -float("inf")  # monotonic time of the last index save (``_index_after_write``)
        self._index_dirty = False  # a write since then is not in the saved index
        self._warm: threading.Thread | None = None  # the warm-up thread, started by the first ``due``
        self._warm_asked = False

    def _start_warm_up(self) -> None:
        """Pay the writer's one-off costs (imports, libhdf5's first file) on a background thread, once.

        Why: otherwise the first checkpoint of a run pays them (some 40-60 ms of
        CPU for ``.rk.h5``, ``h5write.warm_up``), on the compute thread when it is
        a synchronous ``final`` (every rank's stop checkpoint) and as a late first
        write otherwise. Started by the first ``due`` (the run loop's first batch
        boundary), not by ``__init__``: the restore before it then neither shares
        the CPU with the warm-up nor forks its libhdf5 probe (``h5probe``) while
        another thread is inside libhdf5. The thread is as nice as the writer; a
        write that starts before it is done just shares the import lock with it.
        """
        self._warm_asked = True
        if self.policy.checkpoint_format != forms.H5.name or h5write.is_warm():
            return
        self._warm = threading.Thread(target=_warm_up, name="rkckpt-warm", daemon=True)
        self._warm.start()

    # ------------------------------------------------------------ scheduling
    def due(self, step: int, now: float | None = None) -> bool:
        """True when ``step`` should be checkpointed (by step count or wall time)."""
        if not self._warm_asked:
            self._start_warm_up()
        if step == self._last_step:
            return False
        p = self.policy
        if p.every_steps and step % p.every_steps == 0:
            return True
        now = time.monotonic() if now is None else now
        return bool(p.every_seconds and now - self._last_time >= p.every_seconds)

    # ------------------------------------------------------------ restore
    def latest(self, exclude: Iterable[str] = ()) -> RestorePoint | None:
        """Newest restorable state (not one of ``exclude``); later deltas continue its chain."""
        self._wait_idle()
        rp = latest_restorable(self.storage, self.kernel_id, index=self.index, exclude=exclude)
        self._indexed = True
        if rp is not None:
            self._parent = rp.checkpoint  # the caller holds it too: never handed back by reusable()
            self._handed_in.discard(id(rp.checkpoint))
            self._parent_digest = rp.checkpoint.content_digest()
            self._chain_base = None  # the chain's first file knows it; not needed to continue
            self._deltas_since_full = len(rp.chain) - 1
            self._last_step = rp.step
            self._parent_step = rp.step
            self._chain = list(rp.chain)
            root = self.index.entries.get(rp.chain[0]) if rp.chain else None
            if root is not None and root.kind == "full":  # restore read it in full and matched its digest
                retention.trust_written(self.index, root.name, root.size)
        else:
            self._parent = self._parent_digest = self._parent_step = None
            self._chain = []
        self._passed_over = self._newer_than(rp, exclude)
        return rp

    def _newer_than(self, rp: RestorePoint | None, exclude: Iterable[str]) -> frozenset[str]:
        """Files the restore passed over: everything after its restore point, and what the caller excluded."""
        es = self.index.sorted(self.kernel_id)
        if rp is not None and rp.chain:
            keys = [(e.step, e.kind == "delta", e.name) for e in es]
            tail = self.index.entries.get(rp.chain[-1])
            if tail is not None:
                at = (tail.step, tail.kind == "delta", tail.name)
                return frozenset(e.name for e, k in zip(es, keys, strict=True) if k > at) | frozenset(exclude)
        return frozenset(e.name for e in es) | frozenset(exclude)

    # ------------------------------------------------------------ writing
    def _write(self, resp: SnapshotResponse, *, stopping: bool = False) -> int:
        """Write one checkpoint: decide (full or delta) -> encode -> store -> record, then retention."""
        t0 = time.perf_counter()
        with self._phase("ready"):
            self._prepare(resp)
        state = resp.checkpoint
        with self._phase("digest"):
            crcs = _chunk_crcs(state)
            digest = digest_from_crcs((c.chunk_type, c.chunk_id, crc, c.size) for c, crc in zip(state.chunks, crcs, strict=True))
        with self._phase("decide"):
            kind = self._decide(state, stopping)
        with self._phase("encode"):
            plan = self._encode(resp, digest, kind)
        if plan.kind == "full":  # its raw chunks are these very buffers: the stream CRC reuses their CRCs
            known = {k: crc for c, crc in zip(state.chunks, crcs, strict=True) if (k := stream.buffer_key(c.data)) is not None}
        else:
            known = {}
        try:
            with self._phase("store"), stream.known_crcs(known):
                n = self._store(plan)
        except (CheckpointError, OSError) as exc:
            with self._cond:
                self._handed_in.discard(id(state))
                self.stats.failed += 1
                self.stats.last_error = str(exc)
            raise
        with self._phase("record"):
            self._record(plan, n, t0)
        with self._phase("retain"):
            self._retain()
        with self._cond:
            self.stats.last_write = (plan.step, time.perf_counter() - t0)
        return plan.step

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Time one phase of a write into ``stats`` (wall and this thread's CPU), also when it fails."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            with self._cond:
                self.stats.add_phase(name, wall, cpu)

    def _prepare(self, resp: SnapshotResponse) -> None:
        """Wait for the snapshot's buffers; learn about files from earlier runs before retention."""
        if resp.ready is not None:
            resp.ready()  # the device->host copy, overlapped with the kernel until now
        if not self._indexed:
            try:
                self.index.refresh()
                self._indexed = True
            except (CheckpointError, OSError) as exc:  # the write itself may still succeed
                log.warning("cannot read the checkpoint index of %s: %s", self.storage.url, exc)

    def _decide(self, state: Checkpoint, stopping: bool) -> Kind:
        """ "delta" when the chain allows one and the sampled change estimate says it pays; else "full".

        The estimate reads 64 small windows per region (``_estimated_change``), so a
        state that changed everywhere (a wave field) goes straight to a full write
        without the compare pass of a delta it would throw away.
        """
        p = self.policy
        if (
            self._parent is not None
            and self._parent_digest is not None
            and (self._deltas_since_full < p.full_every or (stopping and p.full_every > 0))
            and state.metadata.kernel_id == self._parent.metadata.kernel_id
            and _estimated_change(self._parent, state, p.delta_block) <= min(p.max_delta_fraction, p.delta_try_fraction)
        ):
            return "delta"
        return "full"

    def _encode(self, resp: SnapshotResponse, digest: str, kind: Kind) -> _Plan:
        """What goes to storage: the state itself, or its delta when that is small enough."""
        p = self.policy
        state = resp.checkpoint
        body = state
        if kind == "delta":
            assert self._parent is not None and self._parent_digest is not None  # _decide checked
            d = _make_delta(self._parent, self._parent_digest, state, digest, block=not p.compat, block_size=p.delta_block)
            if _payload_bytes(d) <= p.max_delta_fraction * max(1, _payload_bytes(state)):
                body = d
            else:
                kind = "full"
        meta = body.metadata.with_custom(**{STATE_DIGEST_KEY: digest})
        step = resp.request.step
        return _Plan(
            step=step,
            kind=kind,
            state=state,
            digest=digest,
            body=Checkpoint(meta, body.chunks, created_at=body.created_at),
            name=checkpoint_name(self.kernel_id, step, kind, p.checkpoint_format),
            base=digest if kind == "full" else self._chain_base,
        )

    def _store(self, plan: _Plan) -> int:
        """Save ``plan.body`` under its name (created, never replacing, but for a file the restore passed over)."""
        name = plan.name
        if plan.kind == "delta" and self._parent_step is not None and plan.step <= self._parent_step:
            raise SelfParentError(
                f"{self.storage.url.rstrip('/')}/{name}",
                f"refusing a delta at step {plan.step} on a parent at step {self._parent_step}: a checkpoint's parent is never itself",
            )
        try:
            write = _writer(plan.body, self.options, self.policy.checkpoint_format, plan.base or "")
            if name in self._passed_over and self.storage.exists(name):
                # The only files ever replaced: newer than the restore point, which the restore could
                # not use (damaged, refused). Any other name is created, never replaced.
                log.warning("%s: the restore could not use this file; the new checkpoint replaces it", name)
                return self.storage.save(name, write)
            return _create(self.storage, name, write)
        except CheckpointError as exc:
            if exc.source is None:  # an encoder error: say which checkpoint it was writing
                raise CheckpointError(f"{self.storage.url.rstrip('/')}/{name}", exc.problem) from None
            raise

    def _record(self, plan: _Plan, n: int, t0: float) -> None:
        """After a successful save: index, chain, delta parent, reusable buffers, counters."""
        name, kind, state = plan.name, plan.kind, plan.state
        self._passed_over -= {name}
        self.index.add(Entry(name, self.kernel_id, plan.step, kind, n, plan.digest, plan.body.metadata.parent_digest))
        if kind == "full":
            # Retention keeps a chain only when its root is known intact. This one was just encoded
            # from the state whose digest is recorded in it, every chunk checksummed on the way out:
            # reading it straight back would read the page cache, not the disk, and prove nothing
            # more. Older files (from other processes) are still read back in full by retention.
            retention.trust_written(self.index, name, n)
        old = self._parent  # this state is the parent of the next delta
        self._parent, self._parent_digest, self._parent_step = state, plan.digest, plan.step
        self._chain = [name] if kind == "full" else [*self._chain, name]
        self._deltas_since_full = 0 if kind == "full" else self._deltas_since_full + 1
        self._chain_base = plan.base
        with self._cond:
            if old is not None and old is not state and id(old) in self._handed_in:
                self._handed_in.discard(id(old))
                self._released = old
            self.stats.completed += 1
            self.stats.bytes_written += n
            self.stats.seconds += time.perf_counter() - t0
            self.stats.last_written_step = plan.step
            if kind == "full":
                self.stats.full += 1
                self.stats.full_bytes += n
            else:
                self.stats.deltas += 1

    def _retain(self) -> None:
        if self.policy.keep_chains is None:  # retention off: the owner of the folder (ckptset.gc_sets) deletes
            self._index_after_write()
            return
        try:
            writer = retention.WriterView(tuple(self._chain), self._passed_over)
            doomed = retention.plan(self.index, self.policy.keep_chains, self.kernel_id, writer=writer)
            self.stats.deleted += len(retention.delete(self.storage, self.index, doomed, durable_index=False))
            if doomed:  # retention.delete saved the index
                self._index_saved_at, self._index_dirty = time.monotonic(), False
            else:
                self._index_after_write()
        except (CheckpointError, OSError) as exc:  # retention is best effort; data stays
            log.warning("checkpoint retention in %s failed: %s", self.storage.url, exc)

    def _save_index(self) -> None:
        """Save ``rkckpt-index.json`` after a write: atomically, but without its own fsyncs where the storage allows.

        The index is a cache (readers treat a missing, stale or damaged one as a
        miss and read the headers); after a crash it may lag the files, never
        lose them. Fsyncing it and its folder at every checkpoint doubled the
        fsyncs of a write for nothing a reader relies on.
        """
        self.index.save(durable=False)

    def _index_after_write(self) -> None:
        """Save the index after a write when ``INDEX_SAVE_SECONDS`` passed since the last save; else leave it for later.

        Replacing the index (a temporary file renamed over the old one, which
        ext4 also flushes) costs 0.3-3 ms per checkpoint, for a cache: checkpoints
        a few per second apart share one save, and ``final``, ``flush`` and
        ``close`` save what is left. After a crash the index lags by at most that
        long; a reader reads the headers of the files it lacks.
        """
        now = time.monotonic()
        if now - self._index_saved_at >= INDEX_SAVE_SECONDS:
            self._save_index()
            self._index_saved_at, self._index_dirty = now, False
        else:
            self._index_dirty = True

    def _flush_index(self) -> None:
        """Save the index if a write since the last save left it behind (best effort: it is a cache)."""
        if not self._index_dirty:
            return
        try:
            self._save_index()
            self._index_saved_at, self._index_dirty = time.monotonic(), False
        except (CheckpointError, OSError) as exc:
            log.warning("cannot save the checkpoint index of %s: %s", self.storage.url, exc)

    def _mark_written(self, step: int) -> None:
        self._last_step = step
        self._last_time = time.monotonic()

    def _run(self) -> None:
        _lower_thread_priority(WRITER_NICE)
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs[0]
            try:
                self._write(job)
            except (CheckpointError, OSError) as exc:
                log.error("checkpoint at step %d failed: %s", job.request.step, exc)
            except Exception as exc:  # noqa: BLE001 - never kill the writer thread silently
                log.exception("checkpoint at step %d failed unexpectedly", job.request.step)
                with self._cond:
                    self.stats.failed += 1
                    self.stats.last_error = repr(exc)
            with self._cond:
                self._jobs.popleft()
                self._cond.notify_all()

    def _wait_queued(self, limit: int) -> None:
        """Block while more than ``limit`` writes are queued (in flight + pending); counted in ``wait_seconds``."""
        t0 = time.perf_counter()
        with self._cond:
            while len(self._jobs) > limit:
                self._cond.wait()
        self.stats.wait_seconds += time.perf_counter() - t0

    def _wait_idle(self) -> None:
        self._wait_queued(0)

    def wait(self) -> None:
        """Wait until the background write (if any) has finished, without flushing the storage."""
        self._wait_idle()

    def submit(self, resp: SnapshotResponse) -> None:
        """Write ``resp`` in the background; waits only while ``max_pending`` writes are queued already."""
        if self._closed:
            raise CheckpointError(self.storage.url, "checkpoint manager is closed")
        self._wait_queued(self.max_pending - 1)
        self._mark_written(resp.request.step)
        self._handed_in.add(id(resp.checkpoint))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rkckpt-writer", daemon=True)
            self._thread.start()
        with self._cond:
            self._jobs.append(resp)
            self._cond.notify_all()

    def final(self, resp: SnapshotResponse) -> int:
        """Write one last checkpoint synchronously (delta when possible); return its step."""
        self._wait_idle()
        self._mark_written(resp.request.step)
        self._handed_in.add(id(resp.checkpoint))
        # Under a grace period the smallest write wins: a stop checkpoint is a
        # delta whenever the chain allows one, even one past ``full_every``.
        step = self._write(resp, stopping=True)
        self._flush_index()
        return step

    def reusable(self) -> Checkpoint | None:
        """A state handed in earlier that the manager will never read again, or None.

        Its chunk buffers may be overwritten with the next snapshot: copying
        into memory already mapped avoids allocating and page-faulting a fresh
        copy of the whole state on the compute thread each checkpoint (the way
        a GPU kernel reuses its pinned staging buffers). Each state is returned
        at most once; one not taken is simply dropped.
        """
        with self._cond:
            ckpt, self._released = self._released, None
        return ckpt

    def flush(self) -> None:
        """Wait for the background write and for the storage to make it durable."""
        self._wait_idle()
        self._flush_index()
        try:
            self.storage.flush()
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(self.storage.url, f"flush failed: {exc}") from None

    def close(self) -> None:
        if self._closed:
            return
        self._wait_idle()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._warm is not None:
            self._warm.join()
        self._flush_index()
        self.storage.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
