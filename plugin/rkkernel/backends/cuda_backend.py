"""CUDA back end (cupy + NVRTC).

Same protocol as the OpenCL back end: device-resident regions, control block
and queues; a batch is a poll plus one launch group per step, with no host
synchronisation inside it. When the spec names a persistent CUDA kernel and
the device supports cooperative launches, a whole batch is a single launch
of that kernel, which loops over the steps itself with ``grid.sync()``
between them (a true persistent kernel). Built with ``--fmad=false`` so the
arithmetic matches the NumPy reference bit for bit.

Tests skip this back end without cupy and a GPU; ``bench/gpu_check.sh``
exercises it on a GPU machine.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..control import CONTROL_BLOCK_DTYPE
from ..spec import CONTROL, H2K, K2H, KERNELS_DIR, STEPS, KernelSpec
from .base import Backend, BackendUnavailable, check_out, resolve_arg

log = logging.getLogger("rkkernel")

NVRTC_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17")


def cuda_program(spec: KernelSpec, persistent: bool = False) -> tuple[str, tuple[str, ...]]:
    """The CUDA source text and NVRTC options this back end compiles for ``spec``.

    One definition for the back end and for tests/rkkernel/test_cuda_compile.py, which
    compiles exactly this with NVRTC on machines without a GPU or cupy.
    ``persistent`` builds the separate cooperative module (``-DRK_PERSISTENT``)
    that also holds the spec's persistent kernel. The target architecture and
    the CUDA include paths are left to the compiler driver (cupy adds them).
    """
    # the CUDA prelude, then the runtime shared with OpenCL, then the spec's kernels
    runtime = (KERNELS_DIR / "rk_runtime_cuda.h").read_text() + "\n" + (KERNELS_DIR / "rk_runtime_cl.h").read_text()
    source = runtime + "\n" + spec.source_text("cuda")
    source += "\n" + (KERNELS_DIR / "rk_reduce.cu").read_text()  # the series' Σx² (see rkkernel.reduce)
    options = NVRTC_OPTIONS + tuple(spec.build_options.get("cuda", []))
    if persistent:
        options += ("-DRK_PERSISTENT",)
    return source, options


def _device_name(cp, index: int) -> str:
    props = cp.cuda.runtime.getDeviceProperties(index)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def usable_device(spec: KernelSpec | None = None) -> tuple[int | None, str]:
    """(index of the first CUDA device that builds ``spec``'s program, or None; why).

    Every device is tried in turn (a node may mix GPU generations), with the
    real program when a spec is given, so a device NVRTC cannot target is a
    logged rejection instead of a failure at start-up.
    """
    try:
        import cupy as cp
    except ImportError:
        return None, "cupy is not installed"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no device, ...
        return None, f"{type(exc).__name__}: {exc}"
    if n < 1:
        return None, "no CUDA device"
    rejected = []
    for i in range(n):
        try:
            name = _device_name(cp, i)
            if spec is not None:
                with cp.cuda.Device(i):
                    source, options = cuda_program(spec)
                    cp.RawModule(code=source, options=options).get_function("rk_advance")
        except Exception as exc:  # noqa: BLE001 - a compile error or a broken device is a verdict
            rejected.append(f"device {i}: {type(exc).__name__}: {' '.join(str(exc).split())[-300:]}")
            continue
        skipped = f" (rejected {'; '.join(rejected)})" if rejected else ""
        return i, f"CUDA device {i}: {name}{skipped}"
    return None, "no CUDA device can build the program: " + "; ".join(rejected)


def probe(spec: KernelSpec | None = None) -> tuple[bool, str]:
    index, why = usable_device(spec)
    return index is not None, why


def _no_wait() -> None:
    return None


def _pinned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Page-locked host memory (a real asynchronous DMA target), else ordinary memory."""
    try:
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)
    except Exception:  # noqa: BLE001 - no pinned memory to be had: a pageable copy still works
        return np.empty(shape, dtype=dtype)


class CudaBackend(Backend):
    name = "cuda"

    def load(self, spec: KernelSpec, regions, control, h2k, k2h) -> None:  # type: ignore[override]
        try:
            import cupy as cp
        except ImportError as exc:  # pragma: no cover - probed before
            raise BackendUnavailable("cupy is not installed") from exc
        self.cp = cp
        self.spec = spec
        index, why = usable_device(spec)
        if index is None:
            raise BackendUnavailable(why)
        cp.cuda.Device(index).use()
        self.description = why
        self.bufs = {r.name: cp.asarray(np.ascontiguousarray(regions[r.name], dtype=r.dtype)) for r in spec.regions}
        self.ctl = cp.asarray(control.view(np.uint8))
        self.h2k = cp.asarray(h2k.view(np.uint8))
        self.k2h = cp.asarray(k2h.view(np.uint8))
        self.msg_dtype = h2k.dtype
        self.h2k_len, self.k2h_len = len(h2k), len(k2h)
        source, options = cuda_program(spec)
        persistent = spec.persistent.get("cuda")
        self.module = cp.RawModule(code=source, options=options)
        self.k_advance = self.module.get_function("rk_advance")
        self.launches = []
        for launch in spec.launches:
            fn = self.module.get_function(launch.function)
            block, grid = _geometry(launch.global_size, launch.local_size)
            args = [tuple(self._arg(a, parity) for a in launch.args) for parity in (0, 1)]
            self.launches.append((fn, grid, block, args))
        self._cols = self._sums = None
        self.persistent = None
        if os.environ.get("RKKERNEL_CUDA_PERSISTENT", "1") != "0" and persistent:
            self.persistent = self._setup_persistent(persistent)

    def _setup_persistent(self, launch):
        cp = self.cp
        name = launch.function
        try:
            source, options = cuda_program(self.spec, persistent=True)
            fn = None
            # grid.sync() needs no separate compilation since CUDA 11; cupy's
            # enable_cooperative_groups (-rdc + cudadevrt) is the fallback.
            for coop_build in (False, True):
                try:
                    module = cp.RawModule(code=source, options=options, enable_cooperative_groups=coop_build)
                    fn = module.get_function(name)
                    self.persistent_module = module
                    break
                except Exception as exc:  # noqa: BLE001
                    log.debug("cuda: persistent build (cooperative=%s) failed: %s", coop_build, exc)
            if fn is None:
                raise RuntimeError("could not build the persistent kernel")
            dev = cp.cuda.Device()
            coop = dev.attributes.get("CooperativeLaunch", 0)
            if not coop:
                log.info("cuda: device has no cooperative launch; using one launch per step")
                return None
            block = 256
            per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, block, 0)
            blocks = max(1, per_sm) * dev.attributes["MultiProcessorCount"]
            log.info("cuda: persistent kernel %s, %d blocks x %d threads", name, blocks, block)
            return fn, blocks, block, launch.args
        except Exception as exc:  # noqa: BLE001
            log.info("cuda: persistent kernel unavailable (%s); using one launch per step", exc)
            return None

    def _arg(self, a, parity: int, steps: int = 0):
        placeholders = ((CONTROL, self.ctl), (H2K, self.h2k), (K2H, self.k2h), (STEPS, np.int32(steps)))
        return resolve_arg(a, parity, self.bufs, placeholders)

    def enqueue_steps(self, first_step: int, count: int, stops: frozenset[int] = frozenset()) -> None:
        if self.persistent is not None and count > 0:
            fn, blocks, block, spec_args = self.persistent
            args = tuple(self._arg(a, 0, count) for a in spec_args)
            try:
                fn((blocks,), (block,), args, enable_cooperative_groups=True)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. too many blocks for a cooperative launch
                log.warning("cuda: persistent launch failed (%s); using one launch per step from now on", exc)
                self.persistent = None
        self.k_advance((1,), (1,), (self.ctl, self.h2k, self.k2h, np.uint32(0)))
        for s in range(first_step, first_step + count):
            for fn, grid, block, args in self.launches:
                fn(grid, block, args[s % 2])
            self.k_advance((1,), (1,), (self.ctl, self.h2k, self.k2h, np.uint32(1)))

    def enqueue_sumsq(self, region: str, slot: int) -> None:
        """Σx² per z plane on the device (``rk_reduce.cu``, the order of ``rkkernel.reduce``)."""
        cp = self.cp
        f = self.bufs[region]
        nz, ny, nx = self._sumsq_shape(region)
        if self._cols is None or self._cols.size < nz * nx:
            self._cols = cp.empty(nz * nx, dtype=cp.float64)
        self._reserve_device_sums(slot + 1, nz)
        cols, planes = self.module.get_function("rk_sumsq_columns"), self.module.get_function("rk_sumsq_planes")
        bx = min(128, nx)
        cols(((nx + bx - 1) // bx, nz, 1), (bx, 1, 1), (f, self._cols, np.int32(nx), np.int32(ny), np.int32(nz)))
        planes(((nz + 63) // 64, 1, 1), (64, 1, 1), (self._cols, self._sums, np.int32(nx), np.int32(nz), np.int32(slot * nz)))

    def _reserve_device_sums(self, slots: int, nz: int) -> None:
        if self._sums is None or self._sums.size < slots * nz:
            old = self._sums
            self._sums = self.cp.zeros(max(slots, 8) * nz, dtype=self.cp.float64)
            if old is not None:
                self._sums[: old.size] = old
        self._sums_nz = nz

    def start_read_sums(self, count: int) -> None:
        self._sums_host = self.cp.asnumpy(self._sums[: count * self._sums_nz]).reshape(count, self._sums_nz)

    def finish_read_sums(self) -> np.ndarray:
        return self._sums_host

    def read_control(self) -> np.ndarray:
        return self.cp.asnumpy(self.ctl).view(CONTROL_BLOCK_DTYPE).copy()

    def write_control(self, field: str, value: int) -> None:
        dt, off = CONTROL_BLOCK_DTYPE.fields[field][:2]
        raw = np.array([value], dtype=dt).view(np.uint8)
        self.ctl[off : off + raw.size] = self.cp.asarray(raw)
        self.cp.cuda.Stream.null.synchronize()

    def write_control_block(self, control: np.ndarray) -> None:
        self.ctl[...] = self.cp.asarray(np.ascontiguousarray(control).view(np.uint8))
        self.cp.cuda.Stream.null.synchronize()

    def write_message(self, slot: int, message: np.ndarray) -> None:
        raw = np.ascontiguousarray(np.asarray(message, dtype=self.msg_dtype).reshape(1)).view(np.uint8)
        off = slot * self.msg_dtype.itemsize
        self.h2k[off : off + raw.size] = self.cp.asarray(raw)
        self.cp.cuda.Stream.null.synchronize()

    def read_queue(self, which: str) -> np.ndarray:
        buf = self.h2k if which == "h2k" else self.k2h
        return self.cp.asnumpy(buf).view(self.msg_dtype).copy()

    def write_queue(self, which: str, array: np.ndarray) -> None:
        buf = self.h2k if which == "h2k" else self.k2h
        buf[...] = self.cp.asarray(np.ascontiguousarray(array, dtype=self.msg_dtype).view(np.uint8))
        self.cp.cuda.Stream.null.synchronize()

    def read_region(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        buf = self.bufs[name]
        if out is None:
            return self.cp.asnumpy(buf)
        return buf.get(out=check_out(out, np.dtype(buf.dtype), buf.shape, name))

    def read_region_async(self, name: str, out: np.ndarray | None = None):  # noqa: ANN201 - see Backend
        """Device-to-device copy into a staging buffer on the compute stream, then a DMA into pinned
        host memory on a copy stream: the kernel goes on at once; ``wait()`` waits for the DMA.

        Ordering: the staging copy runs after the steps queued so far (same
        stream); the DMA waits for it (an event); the next staging copy of
        this region waits for the previous DMA (an event), so a staging
        buffer is never overwritten while it is read. Without the memory for
        a staging buffer the copy is synchronous.
        """
        cp = self.cp
        buf = self.bufs[name]
        if out is None:
            out = _pinned_empty(buf.shape, np.dtype(buf.dtype))
        else:
            check_out(out, np.dtype(buf.dtype), buf.shape, name)
        if not out.nbytes:
            return out, _no_wait
        if not hasattr(self, "_staging"):
            self._staging: dict[str, object] = {}
            self._staged: dict[str, object] = {}
            self._copy_stream = cp.cuda.Stream(non_blocking=True)
        null = cp.cuda.Stream.null
        staging = self._staging.get(name)
        if staging is None:
            try:
                staging = self._staging[name] = cp.empty_like(buf)
            except cp.cuda.memory.OutOfMemoryError:
                return self.read_region(name, out), _no_wait
        prev = self._staged.get(name)
        if prev is not None:
            null.wait_event(prev)
        with null:
            staging[...] = buf
        ready = cp.cuda.Event(disable_timing=True)
        ready.record(null)
        stream = self._copy_stream
        stream.wait_event(ready)
        cp.cuda.runtime.memcpyAsync(out.ctypes.data, staging.data.ptr, out.nbytes, cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        done = cp.cuda.Event(disable_timing=True)
        done.record(stream)
        self._staged[name] = done
        return out, done.synchronize

    def write_region(self, name: str, array: np.ndarray) -> None:
        buf = self.bufs[name]
        buf[...] = self.cp.asarray(np.ascontiguousarray(array, dtype=buf.dtype).reshape(buf.shape))
        self.cp.cuda.Stream.null.synchronize()

    def close(self) -> None:
        try:
            self.cp.cuda.Stream.null.synchronize()
        except Exception:  # noqa: BLE001
            pass


def _geometry(global_size: tuple[int, ...], local_size: tuple[int, ...] | None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """OpenCL-style sizes → CUDA (block, grid): x is tiled by the block, y and z are one block each."""
    gs = tuple(global_size) + (1,) * (3 - len(global_size))
    bx = local_size[0] if local_size else min(128, 1 << max(0, math.ceil(math.log2(max(1, gs[0])))))
    block = (int(bx), 1, 1)
    grid = ((gs[0] + bx - 1) // bx, gs[1], gs[2])
    return block, grid
