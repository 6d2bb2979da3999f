"""The step loop of a multi-rank step: stop together, coordinated checkpoint sets, elastic restore.

Why a loop of its own: every rank runs the ordinary :class:`~rkkernel.runner.StepLoop`
on its slab (``rkkernel.decomp``), but three decisions must be the same on
every rank or the ranks drift apart and hang in a halo exchange:

* **when to stop.** A stop signal reaches the ranks at different moments (or
  only some of them), so at each batch boundary the ranks take the max of
  their stop flags (``allreduce_int``); once it is set, every rank writes its
  part of the final set and all exit 75 at the same step.
* **which checkpoint exists.** Each rank writes its part (its local regions,
  a full or a delta of its own chain ``<kernel>.r<rank>of<ranks>``) in the
  background, with the manager's queue of two. A set exists only once rank 0
  has written its commit record, and rank 0 writes it only after every rank
  reported its part durable (the parts' names and digests are gathered at a
  batch boundary). Sets handed over but not committed wait in ``pending``
  (oldest first); at each boundary the oldest is resolved first, and a newer
  one is never committed before it (its delta chain may need it). On
  two-level storage "durable" means in the shared store (every file of the
  part's chain: ``TwoLevelStorage.durable``), so a commit record never
  reaches the shared store ahead of its parts. A kill at any moment before
  the commit leaves the previous set the newest one.
* **what to restore.** Rank 0 picks the newest set whose headers and
  manifest agree (``latest_set``; a plain single-process chain counts as a
  1-part set) and broadcasts it; the ranks check its parts' contents between
  them (``_choose_set``), then each reads only the planes it now owns (plus
  its halo planes), so a set written by N ranks restores on M ranks.

A rank that dies makes the others' next collective miss its deadline
(``comm.RankLost``): they log which operation and which rank is gone (or
stopped), and exit 1 at once, without MPI's finalize.

One process (``rkrun`` without a launcher) runs :class:`SoloLoop`: the plain
``StepLoop``, except that a committed set newer than its own chain is
restored from (N ranks -> 1). What a rank reads and writes of a set is in
``rkkernel.rankstate``.

Test signal points (``rkckpt.testhook``; each also as ``point@rN``, for rank N
only): ``batch`` (a batch boundary, before the stop agreement),
``handed-K`` (a periodic part was handed over, leaving K sets pending),
``part-written`` (this rank's part of a set is durable, not yet reported),
``before-commit`` (rank 0: every part durable, no commit record yet) and
``committed`` (rank 0: the commit record is durable).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rkckpt import testhook
from rkckpt.chain import INDEX_NAME
from rkckpt.errors import CheckpointError
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotResponse
from rkstep.protocol import EX_TEMPFAIL, EX_USAGE

from .comm import DEFAULT_TIMEOUT, Comm, RankLost, world
from .rankstate import (
    IDENTITY_KEY,
    Layout,
    PartManager,
    global_identity,
    layout_of,
    names_in_manifests,
    own_files_after,
    read_set_state,
    retention_off,
    set_from_doc,
    set_to_doc,
    unlocked,
)
from .runner import StepLoop, _write_marker
from .runtime import RestoreMismatch

if TYPE_CHECKING:
    from rkckpt.chain import ChainIndex, Entry
    from rkckpt.ckptset import CheckpointSet
    from rkckpt.storage import Storage
    from rkstep.events import EventWriter

    from .plugin import KernelPlugin
    from .signals import StopFlag

log = logging.getLogger("rkrun")

#: Committed sets kept (older ones and the part files only they need are deleted).
KEEP_SETS = 2
#: Seconds a rank that lost a peer waits before it leaves, so that the other survivors, whose
#: deadlines pass a moment later, name only the rank that died (``lost_ranks``).
LINGER = 1.0
#: Exit status when a rank is lost: the step failed and nothing new was committed.
EX_RANK_LOST = 1
#: Part write states reported at a batch boundary (reduced with "min").
_IN_FLIGHT, _FAILED, _DURABLE = 0, 1, 2
#: Sets waiting for their commit at most; beyond, the oldest is dropped (a newer set covers it).
MAX_SETS_PENDING = 4
#: Share of the collective deadline a rank may spend waiting for uploads (its stop checkpoint, a commit record).
FLUSH_SHARE = 0.5


def fire(point: str, rank: int) -> None:
    """A test signal point (``rkckpt.testhook``), also as ``point@rRANK`` to signal one rank only."""
    testhook.fire(point)
    testhook.fire(f"{point}@r{rank}")


def lost_ranks(peers: list[Any], comm: Comm) -> str:
    """Which ranks are lost, as far as this host can tell: a process that is gone, or stopped (a hung rank)."""
    host = socket.gethostname()
    mine = {r: int(p[1]) for r, p in enumerate(peers) if r != comm.rank and isinstance(p, list) and p[0] == host}
    states = {r: _state(pid) for r, pid in mine.items()}
    gone = [str(r) for r, st in states.items() if st in ("", "Z", "X")]
    stopped = [f"{r} (pid {mine[r]})" for r, st in states.items() if st in ("T", "t")]
    me = f"rank {comm.rank} of {comm.size}"
    if gone:
        return f"{me}: lost rank(s) {', '.join(gone)} (process gone)"
    if stopped:
        return f"{me}: lost rank(s) {', '.join(stopped)}: stopped, not responding"
    return f"{me}: lost a rank (not on this host, or running but not responding)"


def _state(pid: int) -> str:
    """The process state letter from /proc (``R``, ``S``, ``T`` stopped, ``Z`` zombie), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # noqa: PTH123
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class RankLoop(StepLoop):
    """``StepLoop`` for one rank of a multi-rank step (see the module docstring)."""

    def __init__(self, plugin: KernelPlugin, values: Mapping[str, Any], stop: StopFlag, events: EventWriter | None, comm: Comm) -> None:
        super().__init__(plugin, values, stop, events)
        self.comm = comm
        self.layout: Layout
        #: step of the newest committed set this run restored from or committed (None: neither)
        self.committed: int | None = None
        #: sets handed to the managers, not yet committed or dropped, oldest first: (step, ordinal of the write)
        self.pending: list[tuple[int, int]] = []
        #: writes handed to this rank's manager so far, and the step of the last periodic one
        self.handed = 0
        self.last_handed: int | None = None
        #: step of the newest part this rank saw durable (the ``part-written`` test point fires once per part)
        self.durable_seen: int | None = None
        #: names the lineage of sets: kept across restores, new for a run from step 0
        self.run_id = ""
        #: (host, pid) of every rank, to name the one that is gone when a collective times out
        self.peers: list[Any] = []
        #: the whole simulation, in every part's metadata (JSON of ``global_identity``)
        self.identity = ""
        #: a collective missed its deadline: this rank leaves without MPI's finalize
        self.lost = False

    @property
    def part_id(self) -> str:
        from rkckpt.ckptset import part_kernel_id

        return part_kernel_id(self.cfg.kernel_id, self.comm.rank, self.comm.size)

    # ------------------------------------------------------------ start
    def _open_storage(self) -> Storage:
        """The checkpoint folder (a test may wrap it to hold uploads back)."""
        from rkckpt.storage import open_storage

        return open_storage(self.cfg.checkpoint_dir)

    def _make_manager(self, policy: CheckpointPolicy) -> CheckpointManager:
        if "auto" in (self.cfg.checkpoint_every, self.cfg.checkpoint_seconds):
            raise ValueError("--checkpoint-every/--checkpoint-seconds auto is not supported on several ranks yet: give a number")
        self.layout = layout_of(self)
        self.identity = json.dumps(global_identity(self), sort_keys=True)
        storage = self._open_storage()
        if self.comm.rank != 0:
            unlocked(storage)
        # the manager's queue of two: every hand-over is in ``pending`` until its set is resolved
        return PartManager(storage, retention_off(policy), self.part_id)

    def _start(self) -> int | None:
        try:
            return super()._start()
        except ValueError as exc:
            log.error("%s", exc)
            return EX_USAGE

    # ------------------------------------------------------------ restore
    def _choose_set(self) -> CheckpointSet | None:
        """The newest restorable set, the same on every rank.

        Rank 0 finds the newest set whose headers and manifest agree; the ranks
        then check its parts' contents between them (part ``p`` by rank
        ``p % size``: ``verify_parts``), so no rank reads the whole set. A bad
        part passes the set over for the next older one, named in rank 0's log.
        """
        from rkckpt.ckptset import SetError, latest_set, verify_parts

        rejected: list[str] = []
        while True:
            doc = None
            if self.comm.rank == 0:
                found = latest_set(self.mgr.storage, self.cfg.kernel_id, decomposed=self.layout.decomposed, full=False, exclude=rejected)
                doc = set_to_doc(found)
            doc = self.comm.bcast_json(doc)
            if doc is None:
                return None
            s = set_from_doc(doc)  # type: ignore[arg-type]
            if s.name is None:  # the plain chain: rank 0's latest_set read and checked it whole
                return s
            problem = ""
            try:
                verify_parts(self.mgr.storage, s, range(self.comm.rank, s.ranks, self.comm.size))
            except SetError as exc:
                problem = str(exc)
            if not self.comm.allreduce_int(1 if problem else 0, "max"):
                return s
            problems = self.comm.gather_json(problem)
            if self.comm.rank == 0:
                why = "; ".join(str(p) for p in problems or [] if p)
                log.warning("skipping checkpoint set %s: %s", s.name, why)
            rejected.append(s.name)

    def _restore(self) -> int | None:
        self.peers = list(self.comm.bcast_json(self.comm.gather_json([socket.gethostname(), os.getpid()])) or [])  # type: ignore[arg-type]
        s = self._choose_set()
        self.run_id = str(self.comm.bcast_json(s.run_id if s is not None and s.run_id else uuid.uuid4().hex))
        if s is None:
            log.info("no checkpoint set in %s; starting from step 0", self.cfg.checkpoint_dir)
            self._continue_chain(None)
            self.step = 0
            return None
        fire("restore", self.comm.rank)
        problem, rc = "", 0
        try:
            rp = read_set_state(self, s, self.comm.rank, self.comm.size, self.layout)
            series = self._series_from(rp, rp.chain[-1] if rp.chain else "<set>")
            step = self.kernel.restore_from_checkpoint(rp.checkpoint, source=s.name)
        except RestoreMismatch as exc:
            problem, rc = f"refusing to restore: {exc}", EX_USAGE
        except (CheckpointError, ValueError, TypeError, KeyError, OSError) as exc:
            problem, rc = f"cannot restore set {s.name or 'chain'} at step {s.step}: {exc}", 1
        worst = self.comm.allreduce_int(rc, "max")
        if worst:
            log.error("%s", problem or "another rank could not restore its slab; see its messages")
            return worst
        self.step, self.series, self.restored, self.committed = step, series, rp, s.step
        self._continue_chain(s)
        log.info("restored step %d from %s (%d rank(s)) on %d rank(s)", step, s.name or "the single-process chain", s.ranks, self.comm.size)
        if self.comm.rank == 0:
            self.events.restore(step, [p.name for p in s.parts])
        if step > self.cfg.steps:
            log.error("the checkpoint is at step %d, beyond --steps %d; refusing to go back", step, self.cfg.steps)
            return EX_USAGE
        return None

    def _continue_chain(self, s: CheckpointSet | None) -> None:
        """Point this rank's manager at its part of ``s`` (a delta continues it), or at a fresh chain.

        This rank's part files after the set's step that no manifest names were
        never committed: they are deleted, so the run writes those names anew
        instead of replacing files whose headers other ranks may have cached
        (the cache in the index file checks sizes only). Then rank 0 removes that
        cache: it may still describe the deleted files.
        """
        storage, kid = self.mgr.storage, self.part_id
        step = -1 if s is None else s.step
        named = names_in_manifests(storage, self.cfg.kernel_id)
        stale = [n for n in own_files_after(storage, kid, step) if n not in named]
        for name in stale:
            storage.delete(name)
        if stale:  # two-level: the deletes are queued; both levels must be rid of a name before it is written anew
            try:
                storage.flush()
            except CheckpointError as exc:
                log.warning("rank %d: uncommitted parts not yet removed from %s: %s", self.comm.rank, storage.url, exc)
        self.comm.barrier()
        if self.comm.rank == 0 and storage.exists(INDEX_NAME):
            storage.delete(INDEX_NAME)
        self.comm.barrier()
        after = own_files_after(storage, kid, step)  # parts of newer sets that did not restore: may be replaced
        if s is not None and s.name is not None and s.ranks == self.comm.size:
            rp = self.mgr.latest(exclude=after)
            if rp is not None and rp.chain and rp.chain[-1] == s.parts[self.comm.rank].name:
                return
        self.mgr.latest(exclude=own_files_after(storage, kid, -1))

    def _snapshot(self, reason: str) -> SnapshotResponse:
        """This rank's part: its local state, naming the whole simulation (``IDENTITY_KEY``)."""
        resp = super()._snapshot(reason)
        c = resp.checkpoint
        c.metadata = dataclasses.replace(c.metadata, kernel_id=self.part_id).with_custom(**{IDENTITY_KEY: self.identity})
        return resp

    # ------------------------------------------------------------ batch boundaries
    def _should_stop(self) -> bool:
        """Stop when any rank got a stop signal: the max of the flags, on every rank at the same step."""
        fire("batch", self.comm.rank)
        self.stopping = self.comm.allreduce_int(1 if self.stop.requested else 0, "max") > 0
        if self.stopping and not self.stop.requested:
            log.info("rank %d: another rank got a stop signal; stopping with it at step %d", self.comm.rank, self.step)
        return self.stopping

    def _checkpoint_due(self) -> bool:
        due = self.mgr.due(self.step)
        if self.mgr.policy.every_seconds:  # wall clocks differ between ranks: one rank due makes all due
            due = self.comm.allreduce_int(int(due), "max") > 0
        return due

    def _boundary(self) -> None:
        """Hand-overs and commits: each periodic part handed over is pending until its set is resolved."""
        handed = self.submitted[0] if self.submitted is not None else None
        if handed is not None and handed != self.last_handed:
            self.handed += 1
            self.last_handed = handed
            self.pending.append((handed, self.handed))
            fire(f"handed-{len(self.pending)}", self.comm.rank)
            if len(self.pending) > MAX_SETS_PENDING:  # the same on every rank: hand-overs are at the same steps
                old, _ = self.pending.pop(0)
                log.warning("rank %d: the checkpoint set at step %d is dropped: %d newer sets wait", self.comm.rank, old, MAX_SETS_PENDING)
        hold = testhook.sets_held()
        if hold > 1:  # the test window: keep hold - 1 sets pending, resolving the older ones once written
            if len(self.pending) >= hold:
                self.mgr.wait()
                self._resolve_pending(keep=hold - 1)
            return
        self._resolve_pending()

    def _resolve_pending(self, *, keep: int = 0, settle: bool = False) -> None:
        """Resolve the pending sets oldest first, up to the first one still being written (``settle``: all),
        leaving at least ``keep``."""
        while len(self.pending) > keep:
            step, ordinal = self.pending[0]
            if self._resolve(step, ordinal, settle=settle) is None:
                return
            self.pending.pop(0)

    def _part_state(self, step: int, ordinal: int) -> tuple[int, dict[str, Any] | None]:
        """Whether this rank's part of ``step`` is durable, failed or still being written; its entry."""
        index = copy.copy(self.mgr.index)  # the writer thread adds entries: read a snapshot
        index.entries = dict(index.entries)
        for e in reversed(index.sorted(self.part_id)):
            if e.step == step:
                state = self._uploaded(index, e)
                return state, ({"rank": self.comm.rank, "name": e.name, "digest": str(e.state_digest)} if state == _DURABLE else None)
        st = self.mgr.stats
        return (_FAILED if st.completed + st.failed >= ordinal else _IN_FLIGHT), None

    def _uploaded(self, index: ChainIndex, e: Entry) -> int:
        """Durable once every file of the part's chain is (two-level storage: in the shared store)."""
        storage = self.mgr.storage
        chain, _ = index.chain_of(e)
        waiting = [c.name for c in chain if not storage.durable(c.name)]
        if not waiting:
            return _DURABLE
        failed = [(n, why) for n in waiting if (why := storage.upload_failed(n))]
        if not failed:
            return _IN_FLIGHT
        storage.retry()  # a newer set on this chain may still make it
        log.warning("rank %d: %s did not reach the shared store: %s", self.comm.rank, *failed[0])
        return _FAILED

    def _resolve(self, step: int, ordinal: int, *, settle: bool = False) -> bool | None:
        """Commit the set of ``step`` once every part is durable (True); False: dropped (a part failed,
        or still not durable when ``settle``); None: still being written."""
        state, entry = self._part_state(step, ordinal)
        if state == _DURABLE and (self.durable_seen is None or step > self.durable_seen):  # once per part
            self.durable_seen = step
            fire("part-written", self.comm.rank)
        worst = self.comm.allreduce_int(state, "min")
        if worst == _IN_FLIGHT and not settle:
            return None
        if worst != _DURABLE:
            why = "failed to write" if worst == _FAILED else "is still being written or uploaded"
            log.warning("rank %d: the checkpoint set at step %d is not committed: a rank's part %s", self.comm.rank, step, why)
            return False
        lay = self.layout
        part = {**(entry or {}), "z0": lay.z0, "z1": lay.z1, "offset": lay.lo}
        docs = self.comm.gather_json(part)
        ok = self._commit(step, docs) if self.comm.rank == 0 else None
        if self.comm.bcast_json(ok) is not True:
            log.warning("rank %d: the checkpoint set at step %d could not be committed", self.comm.rank, step)
            return False
        self.committed = step
        return True

    def _commit(self, step: int, docs: list[Any] | None) -> bool:
        """Rank 0: write the commit record of ``step`` (every part is durable), then drop old sets."""
        from rkckpt.ckptset import CheckpointSet, Part, commit_set, gc_sets

        fire("before-commit", self.comm.rank)
        parts = tuple(Part(**d) for d in docs or ())
        s = CheckpointSet(self.cfg.kernel_id, step, self.run_id, self.comm.size, self.layout.nz, self.layout.decomposed, parts)
        try:
            name = commit_set(self.mgr.storage, s, timeout=self._flush_timeout())  # two-level: in the shared store
        except (CheckpointError, OSError, ValueError) as exc:
            log.error("cannot commit the checkpoint set at step %d: %s", step, exc)
            return False
        log.debug("committed %s", name)
        fire("committed", self.comm.rank)
        try:
            gone = gc_sets(self.mgr.storage, self.cfg.kernel_id, KEEP_SETS)
            if gone:
                log.debug("removed %d file(s) of older sets", len(gone))
        except (CheckpointError, OSError) as exc:  # retention is best effort; data stays
            log.warning("checkpoint set retention in %s failed: %s", self.mgr.storage.url, exc)
        return True

    def _report_written(self) -> None:
        """A ``checkpoint`` event (rank 0) once a set is committed: only then can a restore start there."""
        if self.committed is not None and self.committed != self.reported_step and self.comm.rank == 0:
            self.reported_step = self.committed
            self.events.checkpoint(self.committed)

    # ------------------------------------------------------------ stop and end
    def _settle(self) -> None:
        """Wait for the periodic writes in flight and their uploads, then commit (or drop) every pending set."""
        self.mgr.wait()
        self._flush("periodic")
        self._resolve_pending(settle=True)

    def _flush_timeout(self) -> float:
        """Seconds a rank may wait for uploads: less than the peers' collective deadline."""
        return float(getattr(self.comm, "timeout", DEFAULT_TIMEOUT)) * FLUSH_SHARE

    def _flush(self, what: str) -> bool:
        """This rank's saves durable (two-level: in the shared store) within a deadline shorter than the
        peers' collective deadline; False, with a clear error, when an upload failed or is still going."""
        storage = self.mgr.storage
        try:
            storage.flush(timeout=self._flush_timeout())
        except (CheckpointError, OSError) as exc:
            log.error("rank %d: the %s checkpoint did not reach %s: %s", self.comm.rank, what, storage.url, exc)
            return False
        return True

    def _write_final(self, reason: str) -> bool:
        """Every rank writes its part of the current step and flushes it, then the set is committed."""
        self._settle()
        if self.committed == self.step:
            log.info("step %d is already checkpointed; nothing new to write", self.step)
            return True
        try:
            self.mgr.final(self._snapshot(reason))
        except (CheckpointError, OSError) as exc:
            log.error("rank %d: the %s checkpoint at step %d failed: %s", self.comm.rank, reason, self.step, exc)
        self._flush(reason)
        self.handed += 1
        ok = self._resolve(self.step, self.handed, settle=True)
        self._report_written()
        return ok is True

    def _stopped(self) -> int:
        if not self._write_final("signal"):
            log.error("stopped at step %d on %s, but the final checkpoint set was not committed", self.step, self.stop.signal_name)
            return 1
        if self.comm.rank == 0:
            doc = {
                "step": self.step,
                "signal": self.stop.signal_name or "peer",
                "kernel": self.plugin.name,
                "kernel_id": self.cfg.kernel_id,
            }
            _write_marker(self.mgr, {**doc, "steps": self.cfg.steps, "ranks": self.comm.size})
            self.events.stop(self.step, self.stop.signal_name or "peer")
        self._log_checkpoint_stats()
        log.info(
            "rank %d: stopped at step %d (%s); checkpoint set committed",
            self.comm.rank,
            self.step,
            self.stop.signal_name or "a peer's signal",
        )
        return EX_TEMPFAIL

    def _final_checkpoint(self, start_step: int) -> None:
        if self.step == start_step and self.restored is not None:
            return  # a rerun after completion writes nothing new
        if not self._write_final("final"):
            self.checkpoint_failures.append(f"final checkpoint set at step {self.step} not committed")

    # ------------------------------------------------------------ run
    def run(self) -> int:
        try:
            return super().run()
        except RankLost as exc:
            self.lost = True
            who = lost_ranks(self.peers, self.comm)
            log.error("%s: %s; this rank stops now (the last committed set stays the restore point)", who, exc)
            # rank 0's events say so: the executor resumes the step like a killed one (rkstep.events.Attempt.killed)
            self.events.emit("rank-lost", step=self.committed, reason=f"{who}: {exc}"[:500])
            return EX_RANK_LOST


class SoloLoop(StepLoop):
    """One process (``rkrun`` without MPI): exactly ``StepLoop``, but a committed set newer than the
    plain chain is restored from (a step written by N ranks goes on as one process)."""

    def _should_stop(self) -> bool:
        fire("batch", 0)  # the test point of a batch boundary, as on several ranks
        return super()._should_stop()

    def _restore(self) -> int | None:
        from rkckpt.ckptset import SET_SUFFIX, latest_set

        if not any(n.endswith(SET_SUFFIX) for n in self.mgr.storage.list()):
            return super()._restore()  # no set: the plain chain, as always
        s = latest_set(self.mgr.storage, self.cfg.kernel_id)
        if s is None or s.name is None:
            return super()._restore()
        fire("restore", 0)
        layout = Layout(0, s.nz, 0, 0, s.nz, tuple(s.decomposed))
        try:
            rp = read_set_state(self, s, 0, 1, layout)
            series = self._series_from(rp, s.name)
            step = self.kernel.restore_from_checkpoint(rp.checkpoint, source=s.name)
        except RestoreMismatch as exc:
            log.error("refusing to restore: %s", exc)
            return EX_USAGE
        except (CheckpointError, ValueError, TypeError, KeyError, OSError) as exc:
            log.error("cannot restore set %s at step %d: %s", s.name, s.step, exc)
            return 1
        self.step, self.series, self.restored = step, series, rp
        self.mgr.latest(exclude=own_files_after(self.mgr.storage, self.cfg.kernel_id, -1))  # a fresh chain from here
        log.info("restored step %d from %s (%d ranks) as one process", step, s.name, s.ranks)
        self.events.restore(step, [p.name for p in s.parts])
        if step > self.cfg.steps:
            log.error("the checkpoint is at step %d, beyond --steps %d; refusing to go back", step, self.cfg.steps)
            return EX_USAGE
        return None


def run_step(plugin: KernelPlugin, values: Mapping[str, Any], stop: StopFlag, comm: Comm | None = None) -> int:
    """``rkrun``'s run: one process, or one rank of an MPI launch (rank 0 keeps the attempt log).

    A rank that lost a peer leaves at once (``os._exit``): MPI's finalize at a
    normal exit would wait for the dead rank.
    """
    from rkstep.events import run_attempt

    comm = comm if comm is not None else world()
    ckdir = values["checkpoint_dir"]
    if comm.size == 1:
        return run_attempt(ckdir, lambda events: SoloLoop(plugin, values, stop, events).run(), ranks=1)
    loops: list[RankLoop] = []

    def body(events: EventWriter | None) -> int:
        loops.append(RankLoop(plugin, values, stop, events, comm))
        return loops[-1].run()

    rc = run_attempt(ckdir, body, ranks=comm.size) if comm.rank == 0 else body(None)
    if loops and loops[-1].lost:
        logging.shutdown()
        time.sleep(LINGER)  # peers that time out a moment later must still see this rank running
        os._exit(rc)
    return rc
