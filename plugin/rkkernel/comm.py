"""The ranks of one multi-rank step: halo exchange, small reductions, gathers, with a deadline.

Why a module of its own: the kernels and the step loop must not care whether
they run alone or as one rank of many, so they talk to a :class:`Comm`. A
single process gets :class:`SingleComm` (no mpi4py import at all: everything
works as before when MPI is missing). A process started by an MPI launcher
(``mpiexec``, ``srun --mpi=pmi2``) gets :class:`MPIComm`.

Why non-blocking with a deadline: a rank that dies (SIGKILL, node failure)
would leave the others blocked forever in a collective. Every operation here
is posted as non-blocking requests and polled until ``$RKSLURM_RANK_TIMEOUT``
seconds (default 60) have passed; then :class:`RankLost` names the operation
and the rank, and the caller exits with a clear message instead of hanging.

No pickle: arrays travel as raw buffers with a JSON header, documents as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TIMEOUT_ENV = "RKSLURM_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 60.0

_SUM_OPS = ("sum", "max", "min")
#: Seconds a wait polls without sleeping (see ``MPIComm._wait``).
SPIN_SECONDS = 0.001


class RankLost(RuntimeError):
    """A collective did not complete within the deadline (a rank died or stopped talking)."""


def rank_timeout(timeout: float | None = None) -> float:
    """The deadline in seconds: ``timeout``, else ``$RKSLURM_RANK_TIMEOUT``, else 60."""
    if timeout is not None:
        return float(timeout)
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"${TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def _reduce_py(values: list[int], op: str) -> int:
    if op == "sum":
        return int(sum(values))
    return int(max(values) if op == "max" else min(values))


def _check_op(op: str) -> None:
    if op not in _SUM_OPS:
        raise ValueError(f"allreduce_int: op must be one of {_SUM_OPS}, got {op!r}")


@dataclass
class Comm:
    """The interface every rank sees; this base class is the one-rank implementation's parent."""

    rank: int = 0
    size: int = 1

    def exchange_planes(self, low: np.ndarray | None, high: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Send ``low`` to rank-1 and ``high`` to rank+1; return (planes from rank-1, planes from rank+1).

        ``None`` where there is no neighbour. A received block has the shape and
        dtype of the block sent on the same side (every rank exchanges the same
        number of planes of the same plane shape).
        """
        raise NotImplementedError

    def allreduce_int(self, value: int, op: str) -> int:
        """The ``op`` ("sum", "max", "min") of one integer over all ranks, on every rank."""
        raise NotImplementedError

    def gather_arrays(self, arr: np.ndarray) -> list[np.ndarray] | None:
        """Every rank's array on rank 0, in rank order; None on the other ranks."""
        raise NotImplementedError

    def gather_json(self, doc: object) -> list[object] | None:
        """Every rank's small JSON document on rank 0, in rank order; None elsewhere."""
        raise NotImplementedError

    def bcast_json(self, doc: object) -> object:
        """Rank 0's JSON document on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Return once every rank got here."""
        raise NotImplementedError

    def abort(self, code: int) -> None:
        """End every rank now (after RankLost: the survivors must not wait in MPI_Finalize)."""
        os._exit(code)


@dataclass
class SingleComm(Comm):
    """One process, rank 0 of 1: every operation is local and immediate."""

    def exchange_planes(self, low: np.ndarray | None, high: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        return None, None

    def allreduce_int(self, value: int, op: str) -> int:
        _check_op(op)
        return int(value)

    def gather_arrays(self, arr: np.ndarray) -> list[np.ndarray] | None:
        return [np.array(arr, copy=True)]

    def gather_json(self, doc: object) -> list[object] | None:
        return [json.loads(json.dumps(doc))]

    def bcast_json(self, doc: object) -> object:
        return json.loads(json.dumps(doc))

    def barrier(self) -> None:
        return None


@dataclass
class MPIComm(Comm):
    """One rank of an MPI world; every operation is non-blocking with a deadline."""

    timeout: float = DEFAULT_TIMEOUT
    mpi: Any = field(default=None, repr=False)
    world: Any = field(default=None, repr=False)

    def _wait(self, reqs: list[Any], what: str) -> None:
        """Poll ``reqs`` until all complete; RankLost when the deadline passes first.

        Polling drives MPI's progress (a large message takes several rounds),
        so for the first ``SPIN_SECONDS`` a poll only yields the core (to a
        device runtime's threads on an oversubscribed node): a halo exchange
        between ranks that arrive together costs no sleep. Later polls sleep
        a little, then more, so a rank waiting long for a slow peer leaves
        the cores to the ranks still computing.
        """
        start = time.monotonic()
        deadline = start + self.timeout
        while not self._test(reqs, what):
            now = time.monotonic()
            if now > deadline:
                self._cancel(reqs)
                raise RankLost(
                    f"rank {self.rank} of {self.size}: {what} did not complete within {self.timeout:g} s "
                    f"(${TIMEOUT_ENV}); another rank died or stopped responding"
                )
            waited = now - start
            time.sleep(0 if waited < SPIN_SECONDS else 0.0001 if waited < 0.05 else 0.002)

    @staticmethod
    def _cancel(reqs: list[Any]) -> None:
        for r in reqs:
            try:
                r.Cancel()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def _test(self, reqs: list[Any], what: str) -> bool:
        try:
            return bool(self.mpi.Request.Testall(reqs))
        except self.mpi.Exception as e:
            raise RankLost(f"rank {self.rank} of {self.size}: {what} failed: {e}") from e

    def exchange_planes(self, low: np.ndarray | None, high: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        reqs: list[Any] = []
        got_low = got_high = None
        below, above = self.rank - 1, self.rank + 1
        if below >= 0 and low is not None:
            low = np.ascontiguousarray(low)
            got_low = np.empty_like(low)
            reqs.append(self.world.Irecv(got_low, source=below, tag=11))
            reqs.append(self.world.Isend(low, dest=below, tag=12))
        if above < self.size and high is not None:
            high = np.ascontiguousarray(high)
            got_high = np.empty_like(high)
            reqs.append(self.world.Irecv(got_high, source=above, tag=12))
            reqs.append(self.world.Isend(high, dest=above, tag=11))
        self._wait(reqs, f"halo exchange with ranks {below} and {above}")
        return got_low, got_high

    def allreduce_int(self, value: int, op: str) -> int:
        _check_op(op)
        MPI = self.mpi
        mop = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
        send = np.array([int(value)], dtype=np.int64)
        recv = np.zeros(1, dtype=np.int64)
        self._wait([self.world.Iallreduce(send, recv, op=mop)], f"allreduce({op})")
        return int(recv[0])

    def _gather_bytes(self, payload: bytes, what: str) -> list[bytes] | None:
        """Variable-length byte strings to rank 0, in rank order (lengths first, then Igatherv)."""
        n = np.array([len(payload)], dtype=np.int64)
        lens = np.zeros(self.size, dtype=np.int64) if self.rank == 0 else None
        self._wait([self.world.Igather(n, lens, root=0)], f"{what} (sizes)")
        buf = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, dtype=np.uint8)
        if self.rank != 0:
            self._wait([self.world.Igatherv(buf, None, root=0)], what)
            return None
        assert lens is not None
        out = np.empty(int(lens.sum()), dtype=np.uint8)
        offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        self._wait([self.world.Igatherv(buf, [out, lens, offs, self.mpi.BYTE], root=0)], what)
        return [out[int(o) : int(o) + int(c)].tobytes() for o, c in zip(offs, lens, strict=True)]

    def gather_arrays(self, arr: np.ndarray) -> list[np.ndarray] | None:
        a = np.ascontiguousarray(arr)
        head = json.dumps({"dtype": a.dtype.str, "shape": list(a.shape)}).encode()
        heads = self._gather_bytes(head, "gather_arrays header")
        blobs = self._gather_bytes(a.tobytes(), "gather_arrays")
        if heads is None or blobs is None:
            return None
        out = []
        for h, b in zip(heads, blobs, strict=True):
            d = json.loads(h)
            out.append(np.frombuffer(b, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy())
        return out

    def gather_json(self, doc: object) -> list[object] | None:
        got = self._gather_bytes(json.dumps(doc).encode(), "gather_json")
        return None if got is None else [json.loads(b) for b in got]

    def bcast_json(self, doc: object) -> object:
        payload = json.dumps(doc).encode() if self.rank == 0 else b""
        n = np.array([len(payload)], dtype=np.int64)
        self._wait([self.world.Ibcast(n, root=0)], "bcast_json (size)")
        buf = np.frombuffer(payload, dtype=np.uint8).copy() if self.rank == 0 else np.empty(int(n[0]), dtype=np.uint8)
        self._wait([self.world.Ibcast(buf, root=0)], "bcast_json")
        return json.loads(buf.tobytes())

    def barrier(self) -> None:
        self._wait([self.world.Ibarrier()], "barrier")

    def abort(self, code: int) -> None:
        try:
            self.world.Abort(code)
        finally:
            os._exit(code)


def launched_size() -> int:
    """The world size an MPI launcher announced in the environment, or 0 when none did."""
    env = os.environ
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        raw = env.get(key, "").strip()
        if raw.isdigit():
            return int(raw)
    if env.get("MPI_LOCALRANKID", "").strip().isdigit() or env.get("PMIX_RANK", "").strip().isdigit():
        return 2  # a launcher that gives the rank but not the size: let MPI tell
    raw = env.get("SLURM_STEP_NUM_TASKS", "").strip()
    if raw.isdigit() and int(raw) > 1 and (env.get("PMI_FD") or env.get("PMI_RANK") or env.get("PMIX_NAMESPACE")):
        return int(raw)
    return 0


_WORLD: Comm | None = None


def world(timeout: float | None = None) -> Comm:
    """This process's Comm: MPIComm under an MPI launcher with mpi4py importable, else SingleComm.

    The first call decides (MPI is initialised once per process); ``timeout``
    overrides the deadline of the returned Comm.
    """
    global _WORLD
    limit = rank_timeout(timeout)
    if _WORLD is None:
        _WORLD = _make_world(limit)
    if isinstance(_WORLD, MPIComm):
        _WORLD.timeout = limit
    return _WORLD


def _make_world(limit: float) -> Comm:
    size = launched_size()
    if size <= 1:
        return SingleComm()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        logging.getLogger("rkrun").warning(
            "started by an MPI launcher as one of %d ranks, but mpi4py cannot be imported (%s): running as a single "
            "process (install rkslurm[mpi])",
            size,
            exc,
        )
        return SingleComm()
    w = MPI.COMM_WORLD
    w.Set_errhandler(MPI.ERRORS_RETURN)
    if w.Get_size() <= 1:
        return SingleComm()
    return MPIComm(rank=w.Get_rank(), size=w.Get_size(), timeout=limit, mpi=MPI, world=w)
