"""OpenCL back end (pyopencl; pocl on CPU-only machines).

State lives in device buffers for the kernel's whole life. Kernels are built
once and their ``cl.Kernel`` objects created once per (launch, step parity)
with arguments bound up front, so enqueuing a step is only
``enqueue_nd_range_kernel`` calls — no per-step argument setting, no
host synchronisation inside a batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..cache import setup_opencl_cache
from ..control import CONTROL_BLOCK_DTYPE
from ..spec import CONTROL, KERNELS_DIR, SAMPLE_LEVELS, SAMPLE_ROW, SUM_SCRATCH, SUMS, SYNC, KernelSpec, Launch, Swap
from .base import Backend, BackendUnavailable, check_out, resolve_arg
from .clprobe import Verdict, build_environment, explain, probe_candidates
from .hostmem import HUGE_PAGE_MIN_BYTES, cpu_device_buffer
from .icd import register_pip_runtimes

log = logging.getLogger("rkkernel")

#: Options every build gets: the same arithmetic on every device. Deliberately
#: no -cl-denorms-are-zero: it *allows* a device to flush intermediates (pocl
#: does, others may not), which would make bits vendor-dependent; kernels
#: flush stored values explicitly instead (rk_ftz).
BASE_OPTIONS = ["-cl-std=CL1.2"]


def _cl():
    setup_opencl_cache()
    register_pip_runtimes()
    import pyopencl as cl

    return cl


def program_for(spec: KernelSpec | None) -> tuple[str, list[str]]:
    """The OpenCL source and build options of ``spec`` (the runtime header alone without one)."""
    source = (KERNELS_DIR / "rk_runtime_cl.h").read_text()
    options = list(BASE_OPTIONS)
    if spec is not None:
        source += "\n" + spec.source_text("opencl")
        options += list(spec.build_options.get("opencl", []))
    return source, options


_verdicts: dict[tuple, list[Verdict]] = {}


def verdicts(spec: KernelSpec | None = None, selector: str | None = None) -> list[Verdict]:
    """Every OpenCL device's verdict on ``spec``'s program, best first (memoised per process)."""
    source, options = program_for(spec)
    try:
        cl = _cl()  # first: it may register pip-installed runtimes (OCL_ICD_VENDORS, part of the key)
    except Exception as exc:  # noqa: BLE001 - pyopencl missing or its loader broken
        raise BackendUnavailable(f"pyopencl cannot be loaded: {type(exc).__name__}: {exc}") from exc
    key = (
        hashlib.sha256(source.encode()).hexdigest(),
        tuple(options),
        selector,
        os.environ.get("RKKERNEL_OPENCL_DEVICE"),
        os.environ.get("RKKERNEL_OPENCL_EXCLUDE"),
        tuple(build_environment()),  # the disk cache's key too: pocl's flags, the ICD list
    )
    if key not in _verdicts:
        _verdicts[key] = probe_candidates(cl, source, options, selector)
    return _verdicts[key]


def _pick_device(spec: KernelSpec | None = None, selector: str | None = None):
    """The best device that builds ``spec``'s program, as a pyopencl device."""
    vs = verdicts(spec, selector)
    good = [v for v in vs if v.ok]
    if not good:
        raise BackendUnavailable(f"no OpenCL device can run the program: {explain(vs)}")
    c = good[0].candidate
    return _cl().get_platforms()[c.platform_index].get_devices()[c.device_index]


def probe(spec: KernelSpec | None = None, selector: str | None = None) -> tuple[bool, str]:
    """(usable, why): the device that would be used, or why none can be."""
    try:
        vs = verdicts(spec, selector)
    except BackendUnavailable as exc:
        return False, str(exc)
    good = [v for v in vs if v.ok]
    if not good:
        return False, explain(vs)
    return True, good[0].candidate.label


def _cpu_local_size(global_size: tuple[int, ...], wg_max: int, target: int = 512) -> tuple[int, ...] | None:
    """Work-group of whole x rows for a CPU device (pocl), or None to let the driver pick.

    pocl vectorises the loop over a work-group's x, so a group should be
    whole rows (contiguous x). For a 3-D launch with an even number of
    planes, one row in each of two consecutive planes: on pocl 3 (Zen 4,
    256^3 wave) that shape ran 3.8 Gcells/s against 3.0 for one row, 3.0 for
    two rows of one plane and 3.5 for 2x2. Otherwise a few rows per group (up
    to ``target`` work items, a divisor of the y extent) cut the per-group
    overhead on short rows. Same results whatever the group shape: work
    items are independent.
    """
    gs = tuple(int(g) for g in global_size)
    limit = min(wg_max, target)
    if not gs or gs[0] > limit or any(g <= 0 for g in gs):
        return None
    if len(gs) == 3 and gs[2] % 2 == 0 and 2 * gs[0] <= limit:
        return (gs[0], 1, 2)
    rows = 1
    if len(gs) > 1:
        rows = max(d for d in range(1, gs[1] + 1) if gs[1] % d == 0 and gs[0] * d <= limit)
    return (gs[0], rows, *(1 for _ in gs[2:]))[: len(gs)]


def _enqueue_pairs(cl, q, launches, step: int) -> None:
    """Enqueue one step's (or one sweep's) launches: the even or odd kernel of each ping-pong pair."""
    for global_size, local_size, pair in launches:
        cl.enqueue_nd_range_kernel(q, pair[step % 2], global_size, local_size)


@dataclass
class _Fused:
    """A FusedSteps bound to this device: its kernels per step parity and its SYNC buffer."""

    steps: int
    sync: object
    sync_bytes: int
    #: depth -> launches (global size, local size, kernels per parity); the full depth
    #: always, shallower ones down to ``FusedSteps.min_steps`` when the spec allows them
    by_depth: dict[int, list[tuple[tuple[int, ...], tuple[int, ...] | None, list[object]]]]

    #: depth -> the sampled launches (``FusedSteps.sampled``), with the argument
    #: indices of SUMS, SUM_SCRATCH, SAMPLE_LEVELS and SAMPLE_ROW; empty: none
    sampled: dict[int, tuple[list[tuple[tuple[int, ...], tuple[int, ...] | None, list[object]]], tuple[int, int, int, int]]]
    level_outputs: tuple[Swap, Swap] | None

    def depth(self, available: int) -> int:
        """The deepest sweep that fits ``available`` steps, or 0 (single steps)."""
        fits = [d for d in self.by_depth if d <= available]
        return max(fits) if fits else 0


def _no_wait() -> None:
    return None


class OpenCLBackend(Backend):
    name = "opencl"

    def __init__(self, selector: str | None = None) -> None:
        #: ``opencl:SELECTOR`` picks the device (see clprobe); None: the best that works.
        self.selector = selector

    def load(self, spec: KernelSpec, regions, control, h2k, k2h) -> None:  # type: ignore[override]
        cl = _cl()
        self.cl = cl
        self.spec = spec
        dev = _pick_device(spec, self.selector)
        self.description = f"OpenCL {dev.platform.name.strip()} / {dev.name.strip()}"
        self.ctx = cl.Context([dev])
        self.queue = cl.CommandQueue(self.ctx)
        mf = cl.mem_flags
        self.bufs = {}
        self.shapes = {}
        # On a CPU device the "device memory" is host memory: back big regions
        # with huge pages (see hostmem) and let the device use them in place.
        on_cpu = bool(dev.type & cl.device_type.CPU)
        self._host_backing = []
        for r in spec.regions:
            arr = np.ascontiguousarray(regions[r.name], dtype=r.dtype)
            self.shapes[r.name] = (np.dtype(r.dtype), tuple(r.shape))
            if not arr.nbytes:
                self.bufs[r.name] = cl.Buffer(self.ctx, mf.READ_WRITE, 4)
            elif on_cpu and arr.nbytes >= HUGE_PAGE_MIN_BYTES:
                self.bufs[r.name], host = cpu_device_buffer(cl, self.ctx, arr)
                self._host_backing.append(host)
            else:
                self.bufs[r.name] = cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=arr)
        self.ctl = cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=control)
        self.h2k = cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=h2k)
        self.k2h = cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=k2h)
        self.h2k_len = len(h2k)
        self.k2h_len = len(k2h)
        self.msg_dtype = h2k.dtype

        source, options = program_for(spec)
        cache_dir = str(setup_opencl_cache())
        try:
            with warnings.catch_warnings():  # compiler chatter (Intel prints some): the probe logged any problem
                warnings.simplefilter("ignore", cl.CompilerWarning)
                self.program = cl.Program(self.ctx, source).build(options=options, cache_dir=cache_dir)
        except cl.Error as exc:  # the probe built it, so this is rare: say which device, no traceback
            raise BackendUnavailable(f"{self.description}: program build failed: {' '.join(str(exc).split())[-600:]}") from exc

        # Kernel objects bound once: per launch, one per step parity.
        self.launches = []
        for launch in spec.launches_for("opencl"):
            pair = self._bind(launch, ((CONTROL, self.ctl),))
            local = launch.local_size
            if local is None and dev.type & cl.device_type.CPU:
                wg_max = pair[0].get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, dev)
                local = _cpu_local_size(launch.global_size, wg_max)
            self.launches.append((launch.global_size, local, pair))
        self.fused = self._load_fused(spec, dev)
        self.k_poll = cl.Kernel(self.program, "rk_advance")
        self.k_step = cl.Kernel(self.program, "rk_advance")
        for k, done in ((self.k_poll, 0), (self.k_step, 1)):
            k.set_args(self.ctl, self.h2k, self.k2h, np.uint32(done))

    def _load_fused(self, spec: KernelSpec, dev) -> _Fused | None:
        """The spec's multi-step launches, where this device may run them (see FusedSteps)."""
        f = spec.fused.get("opencl")
        kinds = {"cpu": self.cl.device_type.CPU, "gpu": self.cl.device_type.GPU}
        if f is None or os.environ.get("RKKERNEL_OPENCL_FUSED", "1") == "0":
            return None
        if not any(dev.type & kinds.get(t, 0) for t in f.device_types):
            return None
        sync_bytes = 4 * max(1, f.sync_words)
        sync = self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, sync_bytes)
        placeholders = ((CONTROL, self.ctl), (SYNC, sync))
        # A fused launch's global size is an upper bound: one work item per compute unit.
        cus = max(1, int(dev.max_compute_units))
        depths = [f.steps] if f.depth_arg is None else range(max(1, f.min_steps), f.steps + 1)

        def bind(launches: tuple[Launch, ...], d: int, extra: tuple = ()) -> list:
            out = []
            for x in launches:
                if f.depth_arg is not None:
                    args = list(x.args)
                    args[f.depth_arg] = np.int32(d)
                    x = Launch(x.function, x.global_size, tuple(args), x.local_size)  # noqa: PLW2901
                out.append(((min(x.global_size[0], cus), *x.global_size[1:]), x.local_size, self._bind(x, placeholders + extra)))
            return out

        by_depth = {d: bind(f.launches, d) for d in depths}
        sampled = {}
        if f.sampled and f.level_outputs is not None and self._sampled_sweep_builds(f.sampled):
            # bound with stand-ins; the real buffers, mask and row are set at each enqueue
            self._standin = self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, 8)
            extra = ((SUMS, self._standin), (SUM_SCRATCH, self._standin), (SAMPLE_LEVELS, np.int32(0)), (SAMPLE_ROW, np.int32(0)))
            index = tuple(
                next(i for i, a in enumerate(f.sampled[0].args) if a is p) for p in (SUMS, SUM_SCRATCH, SAMPLE_LEVELS, SAMPLE_ROW)
            )
            sampled = {d: (bind(f.sampled, d, extra), index) for d in depths}
        return _Fused(f.steps, sync, sync_bytes, by_depth, sampled, f.level_outputs)

    def _sampled_sweep_builds(self, launches: tuple[Launch, ...]) -> bool:
        """The sampled sweep kernels are in the program (they need float64; see kernels/fdtd3d.cl)."""
        names = set(self.program.get_info(self.cl.program_info.KERNEL_NAMES).split(";"))
        return all(x.function in names for x in launches)

    def _bind(self, launch: Launch, placeholders: tuple) -> list[object]:
        """The launch's kernel with its arguments set, once per step parity ([even, odd])."""
        pair = []
        for parity in (0, 1):
            k = self.cl.Kernel(self.program, launch.function)
            for i, a in enumerate(launch.args):
                k.set_arg(i, resolve_arg(a, parity, self.bufs, placeholders))
            pair.append(k)
        return pair

    def enqueue_steps(self, first_step: int, count: int, stops: frozenset[int] = frozenset()) -> None:
        cl = self.cl
        q = self.queue
        cl.enqueue_nd_range_kernel(q, self.k_poll, (1,), (1,))
        s, end = first_step, first_step + count
        f = self.fused
        while s < end:
            # a fused sweep never crosses a step at which a command is due
            depth = f.depth(min([end, *(t for t in stops if s < t < end)]) - s) if f is not None else 0
            if depth:
                cl.enqueue_fill_buffer(q, f.sync, np.uint32(0), 0, f.sync_bytes)
                _enqueue_pairs(cl, q, f.by_depth[depth], s)
                taken = depth
            else:
                _enqueue_pairs(cl, q, self.launches, s)
                taken = 1
            self._enqueue_counter(q, taken)
            s += taken
        q.flush()

    def _enqueue_counter(self, q, steps: int) -> None:
        """``steps`` launches of the one-work-item step counter (``rk_advance``) after the step kernels."""
        for _ in range(steps):
            self.cl.enqueue_nd_range_kernel(q, self.k_step, (1,), (1,))

    # -------------------------------------------------------- series reductions
    def _reducer(self):
        """The Σx² program (kernels/rk_reduce.cl), built on first use; None: this device has no float64."""
        if getattr(self, "_reduce", False) is not False:
            return self._reduce
        self._reduce = None
        dev = self.ctx.devices[0]
        if not int(getattr(dev, "double_fp_config", 0) or 0):
            log.info("%s has no float64: series sums are computed on the host", self.description)
            return None
        cl = self.cl
        src = (KERNELS_DIR / "rk_reduce.cl").read_text()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", cl.CompilerWarning)
                prog = cl.Program(self.ctx, src).build(options=list(BASE_OPTIONS), cache_dir=str(setup_opencl_cache()))
        except cl.Error as exc:
            log.warning("%s: the Σx² program does not build (%s); series sums are computed on the host", self.description, exc)
            return None
        self._reduce = (cl.Kernel(prog, "rk_sumsq_columns"), cl.Kernel(prog, "rk_sumsq_planes"))
        self._cols = None
        self._sums = None
        self._sums_nz = 0
        return self._reduce

    def enqueue_sumsq(self, region: str, slot: int) -> None:
        """Σx² per z plane on the device, in the order of ``rkkernel.reduce``; only ``nz`` doubles come back."""
        red = self._reducer()
        if red is None:
            super().enqueue_sumsq(region, slot)
            return
        cl, q = self.cl, self.queue
        nz, ny, nx = self._sumsq_shape(region)
        cols_k, planes_k = red
        if self._cols is None or self._cols.size < 8 * nz * nx:
            self._cols = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, 8 * nz * nx)
        if self._sums is None or self._sums.size < 8 * (slot + 1) * nz:
            # grown only between batches (the runtime reserves each batch's slots up front)
            self._sums = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, 8 * max(slot + 1, 64) * nz)
        self._sums_nz = nz
        dev = self.ctx.devices[0]
        local = None
        if dev.type & cl.device_type.CPU:
            wg_max = cols_k.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, dev)
            local = _cpu_local_size((nx, nz), wg_max)
        cols_k.set_args(self.bufs[region], self._cols, np.int32(nx), np.int32(ny))
        cl.enqueue_nd_range_kernel(q, cols_k, (nx, nz), local)
        planes_k.set_args(self._cols, self._sums, np.int32(nx), np.int32(slot * nz))
        cl.enqueue_nd_range_kernel(q, planes_k, (nz,), None)

    def enqueue_steps_sampled(self, first_step: int, count: int, samples: Sequence[tuple[int, str, int]]) -> None:
        """Fused sweeps that sample their levels themselves (``FusedSteps.sampled``): a sample costs
        no pass over memory and ends no sweep. Otherwise the default (reductions between steps)."""
        f = self.fused
        if f is None or not f.sampled or f.level_outputs is None or self._reducer() is None or not samples:
            super().enqueue_steps_sampled(first_step, count, samples)
            return
        cl, q = self.cl, self.queue
        nz, _, nx = self._sumsq_shape(samples[0][1])
        cus = max(g[0] for launches, _ in f.sampled.values() for g, _, _ in launches)
        if getattr(self, "_sweep_cols", None) is None or self._sweep_cols.size < 8 * cus * nx:
            self._sweep_cols = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, 8 * cus * nx)
        pending = list(samples)
        cl.enqueue_nd_range_kernel(q, self.k_poll, (1,), (1,))
        s, end = first_step, first_step + count
        while pending and pending[0][0] == s:  # a sample before the first step
            self.enqueue_sumsq(pending[0][1], pending[0][2])
            pending.pop(0)
        while s < end:
            depth = f.depth(end - s)
            inside = [p for p in pending if p[0] <= s + depth] if depth else []
            if any(name != f.level_outputs[(t - s - 1) % 2].pick(s % 2) for t, name, _ in inside):
                depth = f.depth(inside[0][0] - s)  # not what the sweep writes: end the sweep at the sample
                inside = []
            if depth:
                cl.enqueue_fill_buffer(q, f.sync, np.uint32(0), 0, f.sync_bytes)
                if inside:
                    launches, (i_sums, i_cols, i_mask, i_row) = f.sampled[depth]
                    mask = sum(1 << (t - s - 1) for t, _, _ in inside)
                    for global_size, local_size, pair in launches:
                        k = pair[s % 2]
                        k.set_arg(i_sums, self._sums)
                        k.set_arg(i_cols, self._sweep_cols)
                        k.set_arg(i_mask, np.int32(mask))
                        k.set_arg(i_row, np.int32(inside[0][2]))
                        cl.enqueue_nd_range_kernel(q, k, global_size, local_size)
                    del pending[: len(inside)]
                else:
                    _enqueue_pairs(cl, q, f.by_depth[depth], s)
                taken = depth
            else:
                _enqueue_pairs(cl, q, self.launches, s)
                taken = 1
            self._enqueue_counter(q, taken)
            s += taken
            while pending and pending[0][0] == s:  # after single steps or a sweep that did not sample it
                self.enqueue_sumsq(pending[0][1], pending[0][2])
                pending.pop(0)
        q.flush()

    def reserve_sums(self, slots: int, region: str) -> None:
        """Room for ``slots`` samples of ``region`` before a batch is enqueued (no reallocation inside it)."""
        if self._reducer() is None:
            return
        nz, _, _ = self._sumsq_shape(region)
        self._sums_nz = nz  # the row length start_read_sums reads, whoever writes the rows
        if self._sums is None or self._sums.size < 8 * slots * nz:
            self._sums = self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, 8 * max(slots, 64) * nz)

    def start_read_sums(self, count: int) -> None:
        if self._reducer() is None:
            super().start_read_sums(count)
            return
        # Non-blocking: enqueued behind the batch, it completes with the batch's own synchronisation.
        self._sums_host = np.empty((count, self._sums_nz), dtype=np.float64)
        self._sums_event = None
        if self._sums_host.nbytes:
            self._sums_event = self.cl.enqueue_copy(self.queue, self._sums_host, self._sums, is_blocking=False)
        self.queue.flush()

    def finish_read_sums(self) -> np.ndarray:
        if self._reducer() is None:
            return super().finish_read_sums()
        if self._sums_event is not None:
            self._sums_event.wait()
        return self._sums_host

    def read_control(self) -> np.ndarray:
        out = np.zeros(1, dtype=CONTROL_BLOCK_DTYPE)
        self.cl.enqueue_copy(self.queue, out, self.ctl, is_blocking=True)
        return out

    def write_control(self, field: str, value: int) -> None:
        dt = CONTROL_BLOCK_DTYPE.fields[field][0]
        off = CONTROL_BLOCK_DTYPE.fields[field][1]
        self.cl.enqueue_copy(self.queue, self.ctl, np.array([value], dtype=dt), dst_offset=off, is_blocking=True)

    def write_control_block(self, control: np.ndarray) -> None:
        self.cl.enqueue_copy(self.queue, self.ctl, np.ascontiguousarray(control), is_blocking=True)

    def write_message(self, slot: int, message: np.ndarray) -> None:
        msg = np.ascontiguousarray(np.asarray(message, dtype=self.msg_dtype).reshape(1))
        self.cl.enqueue_copy(self.queue, self.h2k, msg, dst_offset=slot * self.msg_dtype.itemsize, is_blocking=True)

    def read_queue(self, which: str) -> np.ndarray:
        buf, n = (self.h2k, self.h2k_len) if which == "h2k" else (self.k2h, self.k2h_len)
        out = np.zeros(n, dtype=self.msg_dtype)
        self.cl.enqueue_copy(self.queue, out, buf, is_blocking=True)
        return out

    def write_queue(self, which: str, array: np.ndarray) -> None:
        buf = self.h2k if which == "h2k" else self.k2h
        self.cl.enqueue_copy(self.queue, buf, np.ascontiguousarray(array, dtype=self.msg_dtype), is_blocking=True)

    def read_region(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        dt, shape = self.shapes[name]
        out = np.empty(shape, dtype=dt) if out is None else check_out(out, dt, shape, name)
        if out.nbytes:
            self.cl.enqueue_copy(self.queue, out, self.bufs[name], is_blocking=True)
        return out

    def read_region_async(self, name: str, out: np.ndarray | None = None):  # noqa: ANN201 - see Backend
        """A non-blocking ``enqueue_copy`` on the in-order queue; ``wait()`` waits for its event."""
        dt, shape = self.shapes[name]
        out = np.empty(shape, dtype=dt) if out is None else check_out(out, dt, shape, name)
        if not out.nbytes:
            return out, _no_wait
        event = self.cl.enqueue_copy(self.queue, out, self.bufs[name], is_blocking=False)
        self.queue.flush()  # start it now, not at the next blocking call
        return out, event.wait

    def write_region(self, name: str, array: np.ndarray) -> None:
        dt, shape = self.shapes[name]
        arr = np.ascontiguousarray(array, dtype=dt).reshape(shape)
        if arr.nbytes:
            self.cl.enqueue_copy(self.queue, self.bufs[name], arr, is_blocking=True)

    def read_planes(self, name: str, z0: int, z1: int) -> np.ndarray:
        """Only the bytes of planes [z0, z1) (z is the slowest axis: one contiguous range)."""
        dt, shape = self.shapes[name]
        out = np.empty((z1 - z0, *shape[1:]), dtype=dt)
        if out.nbytes:
            plane = out.nbytes // max(1, z1 - z0)
            self.cl.enqueue_copy(self.queue, out, self.bufs[name], src_offset=z0 * plane, is_blocking=True)
        return out

    def write_planes(self, name: str, z0: int, planes: np.ndarray) -> None:
        dt, shape = self.shapes[name]
        arr = np.ascontiguousarray(planes, dtype=dt).reshape((-1, *shape[1:]))
        if arr.nbytes:
            plane = arr.nbytes // len(arr)
            self.cl.enqueue_copy(self.queue, self.bufs[name], arr, dst_offset=z0 * plane, is_blocking=True)

    def close(self) -> None:
        try:
            self.queue.finish()
        except Exception:  # noqa: BLE001
            pass
