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
from dataclasses import dataclass

import numpy as np

from ..cache import setup_opencl_cache
from ..control import CONTROL_BLOCK_DTYPE
from ..spec import CONTROL, KERNELS_DIR, SYNC, KernelSpec, Launch
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


@dataclass
class _Fused:
    """A FusedSteps bound to this device: its kernels per step parity and its SYNC buffer."""

    steps: int
    sync: object
    sync_bytes: int
    launches: list[tuple[tuple[int, ...], tuple[int, ...] | None, list[object]]]


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
        launches = [((min(x.global_size[0], cus), *x.global_size[1:]), x.local_size, self._bind(x, placeholders)) for x in f.launches]
        return _Fused(f.steps, sync, sync_bytes, launches)

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
            if f is not None and s + f.steps <= end and not any(s < t < s + f.steps for t in stops):
                cl.enqueue_fill_buffer(q, f.sync, np.uint32(0), 0, f.sync_bytes)
                for global_size, local_size, pair in f.launches:
                    cl.enqueue_nd_range_kernel(q, pair[s % 2], global_size, local_size)
                taken = f.steps
            else:
                for global_size, local_size, pair in self.launches:
                    cl.enqueue_nd_range_kernel(q, pair[s % 2], global_size, local_size)
                taken = 1
            for _ in range(taken):
                cl.enqueue_nd_range_kernel(q, self.k_step, (1,), (1,))
            s += taken
        q.flush()

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

    def close(self) -> None:
        try:
            self.queue.finish()
        except Exception:  # noqa: BLE001
            pass
