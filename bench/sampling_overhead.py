#!/usr/bin/env python3
"""``rkrun wavesim`` with its default options against the bare kernel: what the step loop and sampling cost.

Issue 19: ``rkrun wavesim`` ran at about a quarter of its kernel's speed,
mostly from the energy samples (a host copy of both fields and float64
temporaries per sample, and batches cut at every sample). The energy is now
reduced on the device inside the batch (``rkkernel.reduce``). Rows, per grid:

- ``bare kernel``: ``PersistentKernel.run`` in 32-step batches (rkrun's
  ``--batch``), in this process, after a warm-up; no sampling, no checkpoint;
- ``rkrun --energy-every 0``: the step loop without sampling;
- ``rkrun (defaults)``: ``--energy-every 10`` (the default), device sampling;
- ``rkrun (defaults), before`` (``--before``): the same with an older checkout;
- ``one device sample``: the stand-alone reduction kernel (``sumsq_now``,
  ``kernels/rk_reduce.cl``: what a GPU runs between two steps), ms per
  sample. On a CPU OpenCL device rkrun's samples are taken inside the fused
  sweep instead (``fdtd_sweep_sampled``), so the ``rkrun (defaults)`` row
  against ``--energy-every 0`` is the cost that matters.

``32-step batch, CPU time``: the same kernel in this process, one batch
with the energy sampled inside it (every 10 steps) against one without,
in CPU time of all the process's threads (on a CPU device that is the
kernel's work; wall time on a shared VM swings by 2x): sampling's share.

The rkrun rates are rkrun's own (its last progress line: steps over the
time of the step loop, so process start, compilation and the final
checkpoint and result file are not counted). Interleaved rounds, medians;
the machine is shared, so the figures are noisy. Nothing is asserted.

    python3 bench/sampling_overhead.py --sizes 128 192 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

RATE_RE = re.compile(r"step (\d+)/(\d+) \(([\d.]+) steps/s")


def rkrun_rate(n: int, steps: int, backend: str, extra: tuple[str, ...], pythonpath: str | None = None) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    with tempfile.TemporaryDirectory(prefix="rk-sampling-") as d:
        cmd = [sys.executable, "-m", "rkkernel.cli", "wavesim", "--grid", str(n), str(n), str(n), "--steps", str(steps)]
        cmd += ["--backend", backend, "--checkpoint-dir", f"{d}/ck", "--out", f"{d}/r.h5", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr[-2000:]}")
        rates = [float(m[3]) for m in RATE_RE.finditer(p.stderr) if int(m[1]) == int(m[2])]
        if not rates:
            raise RuntimeError(f"no final progress line in:\n{p.stderr[-2000:]}")
        return rates[-1]


def bare(n: int, steps: int, backend: str) -> tuple[Callable[[], float], Callable[[], float]]:
    from rkkernel.runtime import PersistentKernel
    from rkkernel.wavesim import WaveParams, make_spec

    k = PersistentKernel(make_spec(WaveParams(n, n, n)), backend)
    k.run(64)
    k.sumsq_now("pressure_a")

    def rate() -> float:
        t = time.perf_counter()
        for _ in range(steps // 32):
            k.run(32)
        k.run(steps % 32)
        return steps / (time.perf_counter() - t)

    def sample_ms() -> float:
        t = time.perf_counter()
        for _ in range(10):
            k.sumsq_now("pressure_a" if k.step % 2 == 0 else "pressure_b")
        return (time.perf_counter() - t) / 10 * 1e3

    def batch_cpu_ms(sampled: bool) -> float:
        """CPU time (all of this process's threads: the device is the CPU) of one 32-step batch,
        with the energy sampled every 10 steps inside it or not: far less noisy than wall time
        on a shared machine."""
        s = k.step
        t = time.process_time()
        if sampled:
            k.run_sampled(32, [(x, "pressure_a" if x % 2 == 0 else "pressure_b") for x in range(s + 1, s + 33) if x % 10 == 0])
        else:
            k.run(32)
        return (time.process_time() - t) * 1e3

    return rate, sample_ms, batch_cpu_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: by size)")
    ap.add_argument("--before", default=None, help="PYTHONPATH of an older checkout's plugin/: adds its rkrun (defaults) row")
    args = ap.parse_args()
    rows: dict[tuple[int, str], list[float]] = {}
    kernels = {}
    for n in args.sizes:
        steps = args.steps or max(100, int(1.5e9 // n**3) // 10 * 10)
        kernels[n] = (steps, *bare(n, steps, "opencl" if args.backend == "auto" else args.backend))
    for _ in range(args.rounds):
        for n in args.sizes:
            steps, rate, sample_ms, batch_cpu_ms = kernels[n]
            for _ in range(5):
                rows.setdefault((n, "cpu plain"), []).append(batch_cpu_ms(False))
                rows.setdefault((n, "cpu sampled"), []).append(batch_cpu_ms(True))
            rows.setdefault((n, "bare kernel"), []).append(rate())
            rows.setdefault((n, "rkrun --energy-every 0"), []).append(rkrun_rate(n, steps, args.backend, ("--energy-every", "0")))
            rows.setdefault((n, "rkrun (defaults)"), []).append(rkrun_rate(n, steps, args.backend, ()))
            if args.before:
                rows.setdefault((n, "rkrun (defaults), before"), []).append(rkrun_rate(n, steps, args.backend, (), args.before))
            rows.setdefault((n, "sample only (ms)"), []).append(sample_ms())
    print(f"{os.cpu_count()} CPUs visible, backend {args.backend}; medians of {args.rounds} interleaved rounds")
    print(f"{'grid':>6} {'run':<24} {'steps/s':>9} {'x bare':>7}")
    for n in args.sizes:
        steps = kernels[n][0]
        base = statistics.median(rows[(n, "bare kernel")])
        for name in ("bare kernel", "rkrun --energy-every 0", "rkrun (defaults)", "rkrun (defaults), before"):
            if (n, name) not in rows:
                continue
            v = statistics.median(rows[(n, name)])
            print(f"{n:>5}^3 {name:<24} {v:>9.0f} {v / base:>7.2f}")
        ms = statistics.median(rows[(n, "sample only (ms)")])
        share = ms * (steps / 10) / (steps / base * 1e3)
        print(f"{n:>5}^3 {'one device sample':<24} {ms:>7.2f} ms = {share:.1%} of the bare kernel's time per 10 steps")
        plain, sampled = statistics.median(rows[(n, "cpu plain")]), statistics.median(rows[(n, "cpu sampled")])
        print(
            f"{n:>5}^3 32-step batch, CPU time: {plain:.1f} ms bare, {sampled:.1f} ms sampling every 10 "
            f"-> {plain / sampled:.2f}x the bare rate, sampling {1 - plain / sampled:.1%} of the time"
        )


if __name__ == "__main__":
    main()
