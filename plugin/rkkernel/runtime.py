"""The persistent kernel: device-resident state, command queues, checkpoints.

The host never synchronises inside a batch: ``run`` enqueues a poll and N
steps and only then reads the control block. Commands (snapshot, terminate,
inject) are written into the device's H2K ring and take effect when the
device's step counter reaches their step; snapshot and inject pause the
kernel there, and ``run`` serves them and resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rkckpt.delta import make_delta
from rkckpt.errors import CheckpointError
from rkckpt.model import Checkpoint, Chunk, ChunkType, Metadata

from .backends import Backend, make_backend, select_backend
from .control import (
    CONTROL_BLOCK_DTYPE,
    DEFAULT_QUEUE_CAPACITY,
    HLC_DTYPE,
    MESSAGE_DTYPE,
    Command,
    Reply,
    new_control_block,
    new_queue,
)
from .spec import KernelSpec

log = logging.getLogger("rkkernel")

FINGERPRINT_KEY = "rkkernel.params_fingerprint"
BACKEND_KEY = "rkkernel.backend"
HALOS_KEY = "rkkernel.halos"


class RestoreMismatch(CheckpointError):
    """The checkpoint belongs to another simulation (kernel type, grid or parameters)."""


class RestoreInvalid(CheckpointError):
    """The checkpoint claims to be of this simulation but its state does not fit the kernel's
    declaration (a region missing, of another shape or dtype): damaged, so an older one is wanted."""


def _reusable_buffer(ckpt: Checkpoint | None, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """Region ``name`` of ``ckpt`` as a writable array to read the next state into, if it fits."""
    if ckpt is None:
        return None
    info = ckpt.regions().get(name)
    if info is None or np.dtype(info.dtype) != dtype or tuple(info.shape) != shape:
        return None
    try:
        arr = ckpt.region(name)
    except CheckpointError:
        return None
    return arr if arr.flags.writeable and arr.flags.c_contiguous else None


@dataclass
class KernelEvent:
    kind: Reply
    step: int
    arg: int
    a: int
    b: int


@dataclass
class PersistentKernel:
    """A kernel whose state stays on one device between batches of steps."""

    spec: KernelSpec
    backend_name: str = "auto"
    kernel_id: str = "kernel-0"
    node_id: int = 0
    queue_capacity: int = DEFAULT_QUEUE_CAPACITY
    on_event: Callable[[KernelEvent, PersistentKernel], None] | None = None
    backend: Backend = field(init=False)
    _h2k_tail: int = field(init=False, default=0)
    #: step of the last halo exchange (decomposed kernels); None: due before the next step
    _halo_step: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.spec.validate()
        self.backend_name = select_backend(self.backend_name, self.spec)
        self.backend = make_backend(self.backend_name)
        cb = new_control_block(self.queue_capacity)
        self._load(self.spec.initial(), cb, new_queue(self.queue_capacity), new_queue(self.queue_capacity))

    def _load(self, regions: dict[str, np.ndarray], cb: np.ndarray, h2k: np.ndarray, k2h: np.ndarray) -> None:
        for r in self.spec.regions:
            arr = regions[r.name]
            if arr.shape != tuple(r.shape) or arr.dtype != np.dtype(r.dtype):
                raise ValueError(f"region {r.name!r}: got {arr.dtype}{list(arr.shape)}, declared {r.dtype}{list(r.shape)}")
        self.backend.load(self.spec, regions, cb, h2k, k2h)
        self._h2k_tail = int(cb[0]["input_tail"])

    # ------------------------------------------------------------ state
    @property
    def description(self) -> str:
        return self.backend.description

    def control(self) -> np.ndarray:
        """Synchronise and return a copy of the control block."""
        return self.backend.read_control()

    @property
    def step(self) -> int:
        return int(self.control()[0]["current_step"])

    def region(self, name: str) -> np.ndarray:
        return self.backend.read_region(name)

    # ------------------------------------------------------------ commands
    def send(self, kind: Command, step: int, *, arg: int = 0, a: int = 0, b: int = 0) -> None:
        """Append a command to the device's H2K ring (ordered after queued work)."""
        cb = self.control()[0]
        cap = int(cb["input_capacity"])
        if self._h2k_tail - int(cb["input_head"]) >= cap:
            raise RuntimeError(f"H2K queue full ({cap} messages pending)")
        msg = np.zeros(1, dtype=MESSAGE_DTYPE)
        msg["kind"], msg["arg"], msg["step"], msg["a"], msg["b"] = int(kind), arg, step, a, b
        self.backend.write_message(self._h2k_tail & (cap - 1), msg)
        self._h2k_tail += 1
        phys = max(int(time.time() * 1e6), int(cb["hlc_physical"]))
        self.backend.write_control("hlc_physical", phys)
        self.backend.write_control("input_tail", self._h2k_tail)

    def _drain_k2h(self) -> list[KernelEvent]:
        cb = self.control()[0]
        head, tail = int(cb["output_head"]), int(cb["output_tail"])
        if head == tail:
            return []
        ring = self.backend.read_queue("k2h")
        mask = int(cb["output_mask"])
        events = []
        for i in range(head, tail):
            m = ring[i & mask]
            events.append(KernelEvent(Reply(int(m["kind"])), int(m["step"]), int(m["arg"]), int(m["a"]), int(m["b"])))
        self.backend.write_control("output_head", tail)
        return events

    def _serve(self, ev: KernelEvent) -> None:
        if ev.kind == Reply.INJECT_READY:
            spec = self.spec.regions[ev.arg]
            arr = self.backend.read_region(spec.name)
            flat = arr.reshape(-1)
            val = np.array([ev.b & 0xFFFFFFFF], dtype="<u4").view("<f4")[0]
            flat[ev.a] = flat.dtype.type(flat[ev.a] + val)
            self.backend.write_region(spec.name, arr)
        if self.on_event is not None:
            self.on_event(ev, self)

    # ------------------------------------------------------------ running
    def _halo_chunk(self, target: int) -> int:
        """Steps the next chunk may run before a halo exchange is due (exchanging first if it is)."""
        step = self.step
        if self._halo_step is None or step - self._halo_step >= self.spec.halo_steps:
            assert self.spec.halo_exchange is not None
            self.spec.halo_exchange(self)
            self._halo_step = step
        return min(target - step, self._halo_step + self.spec.halo_steps - step)

    def run(self, count: int) -> list[KernelEvent]:
        """Advance ``count`` steps in one batch (fewer if terminated); serve pauses.

        Returns the kernel→host events seen. A snapshot pause calls
        ``on_event`` while the device holds the state of that step. A
        decomposed kernel runs in chunks of at most ``spec.halo_steps`` steps
        with a halo exchange before each.
        """
        if self.spec.halo_exchange is None:
            return self._run(count)
        events: list[KernelEvent] = []
        target = self.step + count
        while True:
            before = self.step
            n = self._halo_chunk(target)
            events += self._run(n)
            if self.step >= target or self.step != before + n or self.terminated:
                return events

    def _run(self, count: int) -> list[KernelEvent]:
        events: list[KernelEvent] = []
        start = self.step
        target = start + count
        while True:
            cb = self.control()[0]
            step = int(cb["current_step"])
            if cb["has_terminated"] or step >= target:
                # Commands due exactly at the target step still run (a zero-step poll).
                if not cb["has_terminated"] and self._pending_due(cb, step):
                    self.backend.enqueue_steps(step, 0)
                    new = self._after_batch()
                    events.extend(new)
                    if new:
                        continue
                break
            self.backend.enqueue_steps(step, target - step, frozenset(self._pending_steps(cb)))
            events.extend(self._after_batch())
        return events

    def run_sampled(self, count: int, samples: Sequence[tuple[int, str]]) -> tuple[list[KernelEvent], list[np.ndarray]]:
        """``run(count)`` that also takes Σx² of region ``name`` at each ``(step, name)`` of ``samples``.

        The sums are per z plane (float64[nz], the order of ``rkkernel.reduce``;
        ``reduce.combine_planes`` gives the total), in the order of ``samples``,
        whose steps must be ascending and within ``[step, step + count]``. The
        reductions are enqueued between the batch's steps and read back with
        it: the batch is not cut at the sample steps and no field is copied to
        the host (on OpenCL and CUDA). With commands pending (which may pause
        or end the run inside the batch) it runs to each sample step in turn.
        """
        if self.spec.halo_exchange is not None and samples:
            return self._run_sampled_chunks(count, samples)
        start = self.step
        target = start + count
        steps = [t for t, _ in samples]
        if steps != sorted(steps) or (steps and (steps[0] < start or steps[-1] > target)):
            raise ValueError(f"sample steps {steps} must be ascending and within [{start}, {target}]")
        if not samples:
            return self.run(count), []
        cb = self.control()[0]
        if self._pending_steps(cb) or cb["has_terminated"] or not cb["is_active"]:
            events: list[KernelEvent] = []
            sums = []
            for t, name in samples:
                if self.step < t:
                    events += self.run(t - self.step)
                if self.step != t:
                    break  # terminated before the sample step
                sums.append(self.sumsq_now(name))
            if self.step < target and not self.terminated:
                events += self.run(target - self.step)
            return events, sums
        self.backend.reserve_sums(len(samples), samples[0][1])
        self.backend.enqueue_steps_sampled(start, count, [(t, name, slot) for slot, (t, name) in enumerate(samples)])
        self.backend.start_read_sums(len(samples))
        events = self._after_batch()
        sums = list(self.backend.finish_read_sums()[: len(samples)])
        if self.step != target:  # no command was pending, so nothing may stop the batch early
            raise RuntimeError(f"batch with samples ended at step {self.step}, expected {target}")
        return events, sums

    def _run_sampled_chunks(self, count: int, samples: Sequence[tuple[int, str]]) -> tuple[list[KernelEvent], list[np.ndarray]]:
        """``run_sampled`` of a decomposed kernel: chunks between halo exchanges, each with its samples."""
        events: list[KernelEvent] = []
        sums: list[np.ndarray] = []
        target = self.step + count
        rest = list(samples)
        while True:
            before = self.step
            n = self._halo_chunk(target)
            mine = [s for s in rest if s[0] <= before + n]
            rest = rest[len(mine) :]
            halo, self.spec.halo_exchange = self.spec.halo_exchange, None
            try:
                ev, got = self.run_sampled(n, mine)
            finally:
                self.spec.halo_exchange = halo
            events += ev
            sums += got
            if self.step >= target or self.step != before + n or self.terminated:
                return events, sums

    def sumsq_now(self, name: str) -> np.ndarray:
        """Σx² per z plane of region ``name`` at the current step (see ``run_sampled``)."""
        self.backend.reserve_sums(1, name)
        self.backend.enqueue_sumsq(name, 0)
        self.backend.start_read_sums(1)
        return np.array(self.backend.finish_read_sums()[0], copy=True)

    def _pending_steps(self, cb: np.void) -> list[int]:
        """Steps of the commands still in the H2K ring, oldest first."""
        head, tail = int(cb["input_head"]), int(cb["input_tail"])
        if head == tail:
            return []
        ring = self.backend.read_queue("h2k")
        mask = int(cb["input_mask"])
        return [int(ring[i & mask]["step"]) for i in range(head, min(tail, head + mask + 1))]

    def _pending_due(self, cb: np.void, step: int) -> bool:
        pending = self._pending_steps(cb)
        return bool(pending) and pending[0] <= step

    def _after_batch(self) -> list[KernelEvent]:
        events = self._drain_k2h()
        for ev in events:
            self._serve(ev)
        cb = self.control()[0]
        if not cb["is_active"] and not cb["has_terminated"]:
            self.backend.write_control("is_active", 1)  # resume after a pause
        return events

    @property
    def terminated(self) -> bool:
        return bool(self.control()[0]["has_terminated"])

    # ------------------------------------------------------------ checkpoints
    def create_checkpoint(self, reuse: Checkpoint | None = None) -> Checkpoint:
        """Full state at the current step boundary (device → host copy), complete on return.

        See ``snapshot`` for ``reuse`` and for the asynchronous form.
        """
        ckpt, wait = self.snapshot(reuse)
        wait()
        return ckpt

    def snapshot(self, reuse: Checkpoint | None = None) -> tuple[Checkpoint, Callable[[], None]]:
        """Full state at the current step boundary, copied to the host asynchronously.

        Returns the checkpoint and a ``wait()``: the region copies are queued
        on the device behind the steps already run and ahead of any enqueued
        later, so the kernel may go on at once and, once ``wait()`` returned,
        the region buffers hold exactly this step's state (bit-identical to a
        synchronous copy). Nothing may read the region buffers before that
        (the checkpoint manager calls it first thing on its writer thread).
        The control block, queues, HLC and halos are small and copied now.

        ``reuse``: an earlier checkpoint of this kernel that nobody reads any
        more (``CheckpointManager.reusable()``); its region buffers are
        overwritten with this state instead of allocating new ones, which on
        a big grid saves the page faults of a fresh copy of every field at
        every checkpoint. Regions it lacks, or holds read-only, get fresh
        buffers.
        """
        cb = self.control()
        c = cb[0]
        hlc = np.zeros(1, dtype=HLC_DTYPE)
        hlc["physical"], hlc["logical"], hlc["node_id"] = c["hlc_physical"], c["hlc_logical"], self.node_id
        meta = Metadata(
            kernel_id=self.kernel_id,
            kernel_type=self.spec.kernel_type,
            current_step=int(c["current_step"]),
            grid_size=tuple(int(g) for g in self.spec.grid),
            tile_size=tuple(int(t) for t in self.spec.tile_size),
            hlc=(int(c["hlc_physical"]), int(c["hlc_logical"]), self.node_id),
            custom={FINGERPRINT_KEY: self.spec.fingerprint(), BACKEND_KEY: self.backend_name},
        )
        ckpt = Checkpoint(meta, [], created_at=int(time.time() * 1e6))
        ckpt.chunks.append(Chunk(int(ChunkType.CONTROL_BLOCK), 0, cb.tobytes()))
        ckpt.chunks.append(Chunk(int(ChunkType.H2K_QUEUE), 0, self.backend.read_queue("h2k").tobytes()))
        ckpt.chunks.append(Chunk(int(ChunkType.K2H_QUEUE), 0, self.backend.read_queue("k2h").tobytes()))
        ckpt.chunks.append(Chunk(int(ChunkType.HLC_STATE), 0, hlc.tobytes()))
        halos = []
        halo_bytes = []
        offset = 0
        waits: list[Callable[[], None]] = []
        for r in self.spec.regions:
            out = _reusable_buffer(reuse, r.name, np.dtype(r.dtype), tuple(r.shape))
            if r.role == "halo":
                arr = self.backend.read_region(r.name, out)
            else:
                arr, wait = self.backend.read_region_async(r.name, out)
                waits.append(wait)
            if r.role == "halo":
                halos.append({"name": r.name, "dtype": np.dtype(r.dtype).str, "shape": list(r.shape), "offset": offset})
                halo_bytes.append(arr.tobytes())
                offset += arr.nbytes
            else:
                ckpt.add_region(r.name, arr)
        if halos:
            ckpt.chunks.append(Chunk(int(ChunkType.HALO_BUFFERS), 0, b"".join(halo_bytes)))
            ckpt.metadata = ckpt.metadata.with_custom(**{HALOS_KEY: json.dumps(halos, sort_keys=True, separators=(",", ":"))})

        def wait_all() -> None:
            for w in waits:
                w()

        return ckpt, wait_all

    def create_incremental_checkpoint(self, base: Checkpoint) -> Checkpoint:
        """Delta against ``base`` (a full state, e.g. the last checkpoint written)."""
        return make_delta(base, self.create_checkpoint())

    def check_compatible(self, ckpt: Checkpoint, source: str | None = None) -> None:
        m = ckpt.metadata
        if m.kernel_type != self.spec.kernel_type:
            raise RestoreMismatch(source, f"checkpoint is of kernel type {m.kernel_type!r}, this kernel is {self.spec.kernel_type!r}")
        if tuple(m.grid_size) != tuple(self.spec.grid):
            raise RestoreMismatch(source, f"checkpoint grid is {list(m.grid_size)}, this run's grid is {list(self.spec.grid)}")
        fp = m.custom.get(FINGERPRINT_KEY)
        if fp != self.spec.fingerprint():
            raise RestoreMismatch(
                source, f"parameter fingerprint {fp} differs from this run's {self.spec.fingerprint()} (other physical parameters)"
            )
        # Same simulation by its metadata: from here on a misfit is damage, not another run.
        try:
            regions = ckpt.regions()
        except CheckpointError as exc:
            raise RestoreInvalid(source, exc.problem) from None
        for r in self.spec.regions:
            if r.role == "halo":
                continue
            info = regions.get(r.name)
            if info is None:
                raise RestoreInvalid(source, f"checkpoint has no region {r.name!r}")
            if np.dtype(info.dtype) != np.dtype(r.dtype) or tuple(info.shape) != tuple(r.shape):
                raise RestoreInvalid(
                    source,
                    f"region {r.name!r} is {info.dtype}{list(info.shape)} in the checkpoint, {np.dtype(r.dtype).str}{list(r.shape)} declared",
                )

    def restore_from_checkpoint(self, ckpt: Checkpoint, source: str | None = None) -> int:
        """Replace the device state with ``ckpt`` (a full state); returns its step."""
        self.check_compatible(ckpt, source)

        def chunk(t: ChunkType, size: int | None) -> bytes:
            c = ckpt.find(int(t))
            if c is None:
                raise CheckpointError(source, f"{t.name} chunk missing")
            data = bytes(memoryview(c.data))
            if size is not None and len(data) != size:
                raise CheckpointError(source, f"{t.name} chunk is {len(data)} bytes, expected {size}")
            return data

        cb = np.frombuffer(chunk(ChunkType.CONTROL_BLOCK, CONTROL_BLOCK_DTYPE.itemsize), dtype=CONTROL_BLOCK_DTYPE).copy()
        cap_in, cap_out = int(cb[0]["input_capacity"]), int(cb[0]["output_capacity"])
        for cap in (cap_in, cap_out):
            if cap <= 0 or cap > 1 << 20 or cap & (cap - 1):
                raise CheckpointError(source, f"control block has invalid queue capacity {cap}")
        c0 = cb[0]
        for q, cap in (("input", cap_in), ("output", cap_out)):
            head, tail, mask = int(c0[f"{q}_head"]), int(c0[f"{q}_tail"]), int(c0[f"{q}_mask"])
            if not 0 <= tail - head <= cap or mask != cap - 1:
                raise CheckpointError(
                    source, f"control block {q} queue is inconsistent (head {head}, tail {tail}, mask {mask}, capacity {cap})"
                )
        h2k = np.frombuffer(chunk(ChunkType.H2K_QUEUE, cap_in * MESSAGE_DTYPE.itemsize), dtype=MESSAGE_DTYPE).copy()
        k2h = np.frombuffer(chunk(ChunkType.K2H_QUEUE, cap_out * MESSAGE_DTYPE.itemsize), dtype=MESSAGE_DTYPE).copy()
        if int(cb[0]["current_step"]) != ckpt.metadata.current_step:
            raise CheckpointError(
                source, f"control block step {int(cb[0]['current_step'])} differs from metadata step {ckpt.metadata.current_step}"
            )
        regions: dict[str, np.ndarray] = {}
        halos_raw = ckpt.metadata.custom.get(HALOS_KEY)
        halo_data = chunk(ChunkType.HALO_BUFFERS, None) if halos_raw else b""
        halo_layout = {h["name"]: h for h in json.loads(halos_raw)} if halos_raw else {}
        for r in self.spec.regions:
            if r.role == "halo":
                h = halo_layout.get(r.name)
                if h is None:
                    raise RestoreInvalid(source, f"checkpoint has no halo buffer {r.name!r}")
                off, n = int(h["offset"]), r.nbytes
                if off < 0 or off + n > len(halo_data):
                    raise CheckpointError(source, f"halo {r.name!r} lies outside the HaloBuffers chunk")
                regions[r.name] = np.frombuffer(halo_data[off : off + n], dtype=r.dtype).reshape(r.shape).copy()
            else:
                try:
                    regions[r.name] = np.array(ckpt.region(r.name), copy=True)
                except CheckpointError as exc:
                    raise RestoreInvalid(source, exc.problem) from None
        for r in self.spec.regions:
            self.backend.write_region(r.name, regions[r.name])
        self.backend.write_queue("h2k", h2k)
        self.backend.write_queue("k2h", k2h)
        self.backend.write_control_block(cb)
        self._h2k_tail = int(cb[0]["input_tail"])
        self._halo_step = None  # the checkpoint's halo planes may be stale: exchange before the next step
        return int(cb[0]["current_step"])
