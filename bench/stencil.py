#!/usr/bin/env python3
"""Stencil throughput of the wave kernel vs this machine's memory roofline and the numba peer.

Prints Mcells/s per back end and grid size, this machine's memory bandwidth
for the stencil's own traffic pattern (12 bytes per cell update: read cur
and prev, write next in place; the 2-D velocity model stays in cache),
measured two ways on all cores (NumPy ``a += b`` in threads, and the same
pattern as an OpenCL kernel on the device the stencil runs on), and the
ratios the issue asks for. The roofline is the higher of the two
bandwidths: the strictest honest bound, not the one that flatters.

``opencl`` is what rkrun runs: on a CPU device, 4 steps per sweep over z
(``fdtd_sweep``, temporal blocking), so a cell update moves about 3 bytes
from memory instead of 12, and the roofline stops being the bound.
``opencl-1`` is the one-step-per-launch kernel (``fdtd_bulk``, what a GPU
runs), for comparison. ``NAME@K`` runs in synchronised batches of K steps,
as rkrun does with ``--checkpoint-every K``: ``tt-opencl@2`` is traveltime
at the README's and demo's interval (2-deep sweeps since issue 19; before,
single ``tt_step`` launches, which ``tt-opencl-1@2`` still shows). ``tt-opencl`` / ``tt-opencl-1`` are the same two
forms of the traveltime kernel (``tt_sweep`` / ``tt_step``); its traffic
per cell update is the same 12 bytes or less, but the 26-neighbour minimum
makes it compute-bound on a CPU. Both give the same bits. Each gets one row per
working OpenCL platform (``opencl:pocl``, ``opencl:intel``, ...), and the
last line says which CPU platform is fastest here next to the order
``--backend auto`` uses (``clprobe.CPU_PLATFORM_PREFERENCE``).

The machine is a shared VM whose memory bandwidth swings by 30-50% from
second to second, so every figure is the best of several *interleaved*
rounds (bandwidth, then each back end, then again), not of back-to-back
repetitions: the roofline and the kernels get the same chances at a quiet
moment. Timings include the per-step control kernel (what rkrun really
runs) and exclude compilation. Figures only; nothing here is asserted.

    python3 bench/stencil.py                      # numpy, opencl, opencl-1 (per platform), numba at 128^3 and 256^3
    python3 bench/stencil.py --backends opencl:intel --sizes 256
    python3 bench/stencil.py --backends cuda cuda-loop --sizes 512
    python3 bench/stencil.py --backends tt-opencl --sizes 128    # the traveltime kernel (tt-numpy, tt-cuda too)
    python3 bench/stencil.py --backends tt-opencl tt-opencl-1:pocl --sizes 128
    python3 bench/stencil.py --backends tt-opencl tt-opencl@2 tt-opencl-1@2 --sizes 128   # the demo's interval
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np

BYTES_PER_CELL = 12


def numpy_stream(threads: int, mib: int = 256) -> Callable[[], float]:
    """In-place ``a += b`` split over ``threads`` cores: the stencil's traffic pattern.

    A cell update reads cur and prev and writes prev in place (no
    write-allocate), 12 bytes, like this loop. NumPy releases the GIL in
    ufuncs, so plain threads run in parallel; its big arrays are madvised
    for huge pages, like the OpenCL back end's buffers on a CPU.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.ones(n, dtype=np.float32)
    parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    ex = ThreadPoolExecutor(threads)

    def one(s: slice) -> None:
        np.add(a[s], b[s], out=a[s])

    list(ex.map(one, parts))

    def measure(reps: int = 5) -> float:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(one, parts))
            best = min(best, time.perf_counter() - t)
        return 3 * a.nbytes / best / 1e9

    return measure


def opencl_platforms() -> list[str]:
    """One selector per OpenCL platform whose best device builds the wave program (pocl, intel, ...)."""
    from rkkernel.backends.opencl_backend import verdicts
    from rkkernel.wavesim import WaveParams, make_spec

    out: list[str] = []
    for v in verdicts(make_spec(WaveParams(8, 8, 8))):
        if v.ok and v.candidate.alias not in out:
            out.append(v.candidate.alias)
    return out


def opencl_stream(n: int = 256, selector: str | None = None) -> Callable[[], float]:
    """``b = 2a - b`` over two n^3 float32 buffers on the OpenCL device the stencil uses.

    Same 12 bytes per element, same device, same huge-page host memory as
    the stencil's fields (see rkkernel.backends.hostmem), without the
    neighbours: what the stencil could reach if it were a pure stream.
    """
    from rkkernel.backends.hostmem import cpu_device_buffer
    from rkkernel.backends.opencl_backend import _cl, _pick_device

    cl = _cl()
    dev = _pick_device(None, selector)
    ctx = cl.Context([dev])
    q = cl.CommandQueue(ctx)
    src = "__kernel void s(__global const float *restrict a, __global float *restrict b)"
    src += " { const size_t i = get_global_id(0); b[i] = 2.0f * a[i] - b[i]; }"
    k = cl.Kernel(cl.Program(ctx, src).build(), "s")
    on_cpu = bool(dev.type & cl.device_type.CPU)
    if on_cpu:
        bufs, host = zip(*(cpu_device_buffer(cl, ctx, np.zeros(n**3, np.float32)) for _ in range(2)), strict=True)
    else:
        bufs, host = [cl.Buffer(ctx, cl.mem_flags.READ_WRITE, n**3 * 4) for _ in range(2)], None
    for buf in bufs:
        cl.enqueue_fill_buffer(q, buf, np.float32(1), 0, n**3 * 4)
    local = (512,) if on_cpu and n**3 % 512 == 0 else None

    def measure(reps: int = 10) -> float:
        best = float("inf")
        for i in range(reps + 1):
            k.set_args(bufs[i % 2], bufs[(i + 1) % 2])
            t = time.perf_counter()
            cl.enqueue_nd_range_kernel(q, k, (n**3,), local)
            q.finish()
            if i:
                best = min(best, time.perf_counter() - t)
        return BYTES_PER_CELL * n**3 / best / 1e9

    measure._keep = (ctx, q, host, bufs)  # type: ignore[attr-defined]
    return measure


def device_bandwidth_gbs(mib: int = 1024, reps: int = 10) -> float | None:
    """Copy bandwidth of the CUDA device (cupy), the GPU's roofline input."""
    try:
        import cupy as cp
    except ImportError:
        return None
    a = cp.ones(mib * 2**20 // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    cp.copyto(b, a)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        cp.copyto(b, a)
    end.record()
    end.synchronize()
    secs = cp.cuda.get_elapsed_time(start, end) / 1e3
    return 2 * a.nbytes * reps / secs / 1e9


def bench_runtime(backend: str, n: int, steps: int) -> Callable[[], float]:
    from rkkernel.runtime import PersistentKernel
    from rkkernel.wavesim import WaveParams, make_spec

    # NAME@K: batches of K steps, each synchronised, as rkrun runs with --checkpoint-every K
    backend, _, every = backend.partition("@")
    batch = int(every) if every else steps

    if backend.startswith("tt-"):  # the traveltime kernel (26-neighbour relaxation, same 12 B/cell traffic)
        from rkkernel.traveltime import make_spec as tt_spec

        make_spec = tt_spec  # noqa: N806
        backend = backend.removeprefix("tt-")
    if backend in ("cuda", "cuda-loop"):
        # cuda: one launch per step; cuda-loop: the persistent cooperative kernel
        os.environ["RKKERNEL_CUDA_PERSISTENT"] = "1" if backend == "cuda-loop" else "0"
        backend = "cuda"
    # opencl[:platform]: what rkrun runs (4 steps per sweep on a CPU device); opencl-1[:platform]: one step per launch
    family, _, selector = backend.partition(":")
    os.environ["RKKERNEL_OPENCL_FUSED"] = "0" if family == "opencl-1" else "1"
    name = family.removesuffix("-1") + (f":{selector}" if selector else "")
    k = PersistentKernel(make_spec(WaveParams(n, n, n)), name)
    k.run(2)  # warm-up: first launches, page faults
    k.step  # noqa: B018 - synchronise

    def measure() -> float:
        t = time.perf_counter()
        for _ in range(steps // batch):
            k.run(batch)
        _ = k.step  # synchronise
        return (n - 2) ** 3 * (steps // batch * batch) / (time.perf_counter() - t) / 1e6

    measure._keep = k  # type: ignore[attr-defined]
    return measure


def bench_numba(n: int, steps: int) -> Callable[[], float] | None:
    try:
        import numba
    except ImportError:
        return None
    from rkkernel.ftz import FTZ_LIMIT
    from rkkernel.wavesim import WaveParams, r2, velocity_model

    lim = np.float32(FTZ_LIMIT)

    @numba.njit(parallel=True, fastmath=False, cache=False)
    def step(cur, nxt, vel, rr):
        nz, ny, nx = cur.shape
        for z in numba.prange(1, nz - 1):
            for y in range(1, ny - 1):
                for x in range(1, nx - 1):
                    p = cur[z, y, x]
                    s = cur[z, y, x - 1] + cur[z, y, x + 1]
                    s = s + cur[z, y - 1, x]
                    s = s + cur[z, y + 1, x]
                    s = s + cur[z - 1, y, x]
                    s = s + cur[z + 1, y, x]
                    lap = s - np.float32(6) * p
                    v = vel[z, x]
                    c = (v * v) * rr
                    o = (np.float32(2) * p - nxt[z, y, x]) + c * lap
                    nxt[z, y, x] = o if abs(o) >= lim else np.float32(0)

    params = WaveParams(n, n, n)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = rng.standard_normal((n, n, n)).astype(np.float32)
    vel = velocity_model(params)
    rr = r2(params)
    step(a, b, vel, rr)  # compile

    def measure() -> float:
        t = time.perf_counter()
        for i in range(steps):
            if i % 2 == 0:
                step(a, b, vel, rr)
            else:
                step(b, a, vel, rr)
        return (n - 2) ** 3 * steps / (time.perf_counter() - t) / 1e6

    return measure


def _cpu_order() -> tuple[str, ...]:
    from rkkernel.backends.clprobe import CPU_PLATFORM_PREFERENCE

    return CPU_PLATFORM_PREFERENCE


CPU_ORDER = _cpu_order()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--backends", nargs="+", default=["numpy", "opencl", "opencl-1", "numba", "tt-opencl", "tt-opencl@2"])
    ap.add_argument("--steps", type=int, default=None, help="steps per timing (default: by size)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds; each figure is the best of them")
    args = ap.parse_args()
    # "opencl", "opencl-1" and "tt-opencl" without a platform: one row per working OpenCL platform
    per_platform = ("opencl", "opencl-1", "tt-opencl", "tt-opencl-1")
    platforms = opencl_platforms() if any(b.partition("@")[0] in per_platform for b in args.backends) else []

    def expand(b: str) -> list[str]:
        name, at, every = b.partition("@")
        if not platforms or name not in per_platform:
            return [b]
        return [f"{name}:{p}{at}{every}" for p in platforms]

    args.backends = [x for b in args.backends for x in expand(b)]

    gpu = any(b.startswith("cuda") for b in args.backends)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; best of {args.rounds} interleaved rounds")
    bandwidths: dict[str, Callable[[], float]] = {}
    if gpu:
        bw = device_bandwidth_gbs()
        if bw is not None:
            bandwidths["cupy device copy, 1 GiB"] = lambda: bw
    else:
        cores = os.cpu_count() or 1
        bandwidths[f"numpy a += b, {cores} threads, 2x256 MiB"] = numpy_stream(cores)
        for plat in platforms or ([None] if any(b.startswith("opencl") for b in args.backends) else []):
            try:
                bandwidths[f"OpenCL b = 2a - b, 2x64 MiB, {plat or 'default'} device, stencil's memory"] = opencl_stream(selector=plat)
            except Exception as exc:  # noqa: BLE001 - no OpenCL: the numpy figure stands alone
                print(f"OpenCL stream unavailable: {type(exc).__name__}: {exc}")

    runners: dict[tuple[str, int], Callable[[], float]] = {}
    for n in args.sizes:
        for be in args.backends:
            # a multiple of 4, like rkrun's default batch (32): whole 4-step sweeps on a CPU device
            steps = args.steps or max(4, int(4e8 // n**3) // 4 * 4)
            if be.startswith("cuda"):
                steps = args.steps or 100
            if be in ("numpy", "tt-numpy"):
                steps = max(2, steps // 20)
            try:
                fn = bench_numba(n, steps) if be == "numba" else bench_runtime(be, n, steps)
            except Exception as exc:  # noqa: BLE001 - a missing back end is a line, not a crash
                print(f"{be:<8} {n:>5}^3   unavailable: {type(exc).__name__}: {exc}")
                continue
            if fn is None:
                print(f"{be:<8} {n:>5}^3   unavailable (not installed)")
                continue
            runners[(be, n)] = fn

    best_bw = dict.fromkeys(bandwidths, 0.0)
    results = dict.fromkeys(runners, 0.0)
    for _ in range(args.rounds):
        for name, fn in bandwidths.items():
            best_bw[name] = max(best_bw[name], fn())
        for key, fn in runners.items():
            results[key] = max(results[key], fn())

    print(f"memory bandwidth at {BYTES_PER_CELL} B/cell (read, read, write in place):")
    for name, gbs in best_bw.items():
        print(f"  {name:<62} {gbs:6.1f} GB/s -> {gbs * 1e9 / BYTES_PER_CELL / 1e6:6.0f} Mcells/s")
    first = next(iter(best_bw.values()), 0.0)
    roof = max(best_bw.values(), default=0.0) * 1e9 / BYTES_PER_CELL / 1e6
    print(f"roofline (the higher bandwidth): {roof:.0f} Mcells/s")
    numpy_roof = first * 1e9 / BYTES_PER_CELL / 1e6
    print(f"{'backend':<16} {'grid':>6} {'Mcells/s':>10} {'x roofline':>11}")
    for (be, n), v in results.items():
        print(f"{be:<16} {n:>5}^3 {v:>10.0f} {v / roof if roof else float('nan'):>11.2f}")
    for n in args.sizes:
        for be in args.backends:
            if not be.startswith(("opencl", "cuda", "tt-")) or (be, n) not in results:
                continue
            v = results[(be, n)]
            line = f"ratios {n}^3: {be}/roofline {v / roof:.2f}"
            if len(best_bw) > 1:
                line += f", {be}/numpy-stream-roofline {v / numpy_roof:.2f}"
            for peer in ("numba", "numpy"):
                if (peer, n) in results:
                    line += f", {be}/{peer} {v / results[(peer, n)]:.2f}"
            print(line)
        fused = {p: results[(f"opencl:{p}", n)] for p in platforms if (f"opencl:{p}", n) in results}
        if len(fused) > 1:
            best = max(fused, key=fused.__getitem__)
            others = ", ".join(f"{best}/{p} {fused[best] / v:.2f}" for p, v in fused.items() if p != best)
            print(f"platforms {n}^3: fastest is {best} ({others}); rkrun's auto order: {' > '.join(CPU_ORDER)}")


if __name__ == "__main__":
    main()
