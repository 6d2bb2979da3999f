#!/usr/bin/env python3
"""Stencil throughput of the wave kernel vs this machine's memory roofline and the numba peer.

Prints Mcells/s per back end and grid size, the measured memory bandwidth
(all cores, the stencil's own in-place read-read-write pattern), the roofline
(bandwidth / 12 bytes per cell update: read cur and prev, write next; the
2-D velocity model stays in cache) and the ratios the issue asks
for. Timings include the per-step control kernel (what rkrun really runs)
and exclude compilation. Figures only; nothing here is asserted.

    python3 bench/stencil.py                      # numpy, opencl, numba at 128^3 and 256^3
    python3 bench/stencil.py --backends cuda cuda-loop --sizes 512
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

BYTES_PER_CELL = 12


def bandwidth_gbs(mib: int = 256, reps: int = 5) -> float:
    """Single-thread copy bandwidth (the figure this script used to call the roofline)."""
    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9  # read + write, as STREAM "copy" counts


def stream_gbs(threads: int, mib: int = 256, reps: int = 10) -> float:
    """In-place ``a += b`` on all of ``threads`` cores: the stencil's own traffic pattern.

    A cell update reads cur and prev and writes prev in place (no
    write-allocate), 12 bytes, like this loop; the OpenCL and numba kernels
    run on every core, so their roofline must be every core's bandwidth
    (one thread reaches only about half of it on this kind of machine).
    NumPy releases the GIL in ufuncs, so plain threads run in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.ones(n, dtype=np.float32)
    parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def one(s: slice) -> None:
        np.add(a[s], b[s], out=a[s])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, parts))
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(one, parts))
            best = min(best, time.perf_counter() - t)
    return 3 * a.nbytes / best / 1e9


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


def bench_runtime(backend: str, n: int, steps: int) -> float:
    from rkkernel.runtime import PersistentKernel
    from rkkernel.wavesim import WaveParams, make_spec

    if backend in ("cuda", "cuda-loop"):
        # cuda: one launch per step; cuda-loop: the persistent cooperative kernel
        os.environ["RKKERNEL_CUDA_PERSISTENT"] = "1" if backend == "cuda-loop" else "0"
        backend = "cuda"
    k = PersistentKernel(make_spec(WaveParams(n, n, n)), backend)
    k.run(2)  # warm-up: first launches, page faults
    k.step  # noqa: B018 - synchronise
    best = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        t = time.perf_counter()
        k.run(steps)
        _ = k.step  # synchronise
        best = min(best, time.perf_counter() - t)
    k.backend.close()
    return (n - 2) ** 3 * steps / best / 1e6


def bench_numba(n: int, steps: int) -> float | None:
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
                    s = s if abs(s) >= lim else np.float32(0)
                    s = s + cur[z, y - 1, x]
                    s = s if abs(s) >= lim else np.float32(0)
                    s = s + cur[z, y + 1, x]
                    s = s if abs(s) >= lim else np.float32(0)
                    s = s + cur[z - 1, y, x]
                    s = s if abs(s) >= lim else np.float32(0)
                    s = s + cur[z + 1, y, x]
                    s = s if abs(s) >= lim else np.float32(0)
                    lap = s - np.float32(6) * p
                    lap = lap if abs(lap) >= lim else np.float32(0)
                    v = vel[z, x]
                    c = (v * v) * rr
                    a = c * lap
                    a = a if abs(a) >= lim else np.float32(0)
                    b = np.float32(2) * p - nxt[z, y, x]
                    b = b if abs(b) >= lim else np.float32(0)
                    o = b + a
                    nxt[z, y, x] = o if abs(o) >= lim else np.float32(0)

    params = WaveParams(n, n, n)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n, n)).astype(np.float32)
    b = rng.standard_normal((n, n, n)).astype(np.float32)
    vel = velocity_model(params)
    rr = r2(params)
    step(a, b, vel, rr)  # compile
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for i in range(steps):
            if i % 2 == 0:
                step(a, b, vel, rr)
            else:
                step(b, a, vel, rr)
        best = min(best, time.perf_counter() - t)
    return (n - 2) ** 3 * steps / best / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--backends", nargs="+", default=["numpy", "opencl", "numba"])
    ap.add_argument("--steps", type=int, default=None, help="steps per timing (default: by size)")
    args = ap.parse_args()

    gpu = any(b.startswith("cuda") for b in args.backends)
    old_roof = None
    bw = device_bandwidth_gbs() if gpu else None
    where = "cupy device copy, 1 GiB"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible")
    if bw is None:
        cores = os.cpu_count() or 1
        one = bandwidth_gbs()
        bw, where = stream_gbs(cores), f"numpy in-place a+=b on {cores} threads, 2x256 MiB, best of 10"
        old_roof = one * 1e9 / BYTES_PER_CELL / 1e6
        print(
            f"single-thread numpy copy: {one:.1f} GB/s -> {old_roof:.0f} Mcells/s (the old, single-core roofline; too low for all-core kernels)"
        )
    roof = bw * 1e9 / BYTES_PER_CELL / 1e6
    print(f"memory bandwidth ({where}): {bw:.1f} GB/s -> roofline {roof:.0f} Mcells/s at {BYTES_PER_CELL} B/cell")
    print(f"{'backend':<8} {'grid':>6} {'Mcells/s':>10} {'x roofline':>11}")
    results: dict[tuple[str, int], float] = {}
    for n in args.sizes:
        for be in args.backends:
            steps = args.steps or max(4, int(4e8 // n**3))
            if be.startswith("cuda"):
                steps = args.steps or 100
            if be == "numpy":
                steps = max(2, steps // 20)
            try:
                v = bench_numba(n, steps) if be == "numba" else bench_runtime(be, n, steps)
            except Exception as exc:  # noqa: BLE001 - a missing back end is a line, not a crash
                print(f"{be:<8} {n:>5}^3   unavailable: {type(exc).__name__}: {exc}")
                continue
            if v is None:
                print(f"{be:<8} {n:>5}^3   unavailable (not installed)")
                continue
            results[(be, n)] = v
            print(f"{be:<8} {n:>5}^3 {v:>10.0f} {v / roof:>11.2f}")
    for n in args.sizes:
        for be in ("opencl", "cuda", "cuda-loop"):
            if (be, n) not in results:
                continue
            line = f"ratios {n}^3: {be}/roofline {results[(be, n)] / roof:.2f}"
            if old_roof:
                line += f", {be}/single-core-roofline {results[(be, n)] / old_roof:.2f}"
            for peer in ("numba", "numpy"):
                if (peer, n) in results:
                    line += f", {be}/{peer} {results[(be, n)] / results[(peer, n)]:.2f}"
            print(line)


if __name__ == "__main__":
    main()
