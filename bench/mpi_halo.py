#!/usr/bin/env python3
"""Halo-exchange overhead of a decomposed wave kernel: step rates on 1 and K ranks.

Each row runs ``wavesim``'s kernel (or ``--kernel traveltime``) (``rkkernel.runtime.PersistentKernel``, the
spec of one z slab: ``rkkernel.decomp``) for ``--steps`` steps in batches of
``--batch`` (rkrun's default), after a warm-up, between two barriers; the
K-rank rows are ``mpiexec -n K`` launches. It prints the global step rate,
its ratio to the 1-rank rate of the same back end, and the share of the time
the slowest rank spent in halo exchanges (device reads and writes of the halo
planes plus the MPI messages, including the wait for the slower neighbour),
and one exchange timed alone (all ranks idle, median of 20) against the
1-rank time of the 4 steps it serves: the exchange's own cost. Rounds are interleaved (1, K, 1, K, ...) and
each figure is the median. Figures only; nothing is asserted.

On a machine with fewer cores than ranks x the back end's threads the ratio
shows the oversubscription as much as the exchange: the exchange share is
the figure to read there.

    python3 bench/mpi_halo.py                                  # 96^3, numpy and opencl, ranks 1 and 2
    python3 bench/mpi_halo.py --size 128 --ranks 1 2 4 --backends opencl --rounds 5
    python3 bench/mpi_halo.py --kernel traveltime --backends opencl
    python3 bench/mpi_halo.py --backends opencl --split-cores   # pocl ranks share the cores instead of each taking all
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent.parent / "plugin"
SWEEP = 4  # rkkernel.wavesim.SWEEP_LEVELS: steps between two exchanges


def child(kernel: str, size: int, steps: int, batch: int, backend: str, out: str) -> None:
    """One rank's measurement (run under mpiexec, or alone for 1 rank)."""
    from rkkernel import traveltime, wavesim
    from rkkernel.comm import world
    from rkkernel.decomp import slab_run
    from rkkernel.runtime import PersistentKernel
    from rkkernel.wavesim import SWEEP_LEVELS, WaveParams

    comm = world()
    p = WaveParams(size, size, size)
    if kernel == "wavesim":
        make_spec, d = wavesim.make_spec, slab_run(p.nz, SWEEP_LEVELS, ("pressure_a", "pressure_b"), comm)
    else:
        make_spec, d = traveltime.make_spec, slab_run(p.nz, SWEEP_LEVELS, ("time_a", "time_b"), comm)
    spent = [0.0]
    if d is not None:
        exchange = d.exchange

        def timed(kernel: object) -> None:
            kernel.backend.read_control()  # type: ignore[attr-defined]  # the queued steps are not exchange time
            t = time.perf_counter()
            exchange(kernel)  # type: ignore[arg-type]
            spent[0] += time.perf_counter() - t

        d.exchange = timed  # type: ignore[method-assign]
    k = PersistentKernel(make_spec(p, decomp=d), backend)
    k.run(2 * SWEEP_LEVELS)  # warm-up: compile, first touch
    comm.barrier()
    spent[0] = 0.0
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        n = min(batch, steps - done)
        k.run(n)
        done += n
    k.control()  # wait for the device
    comm.barrier()
    seconds = time.perf_counter() - t0
    worst = comm.allreduce_int(int(spent[0] * 1e6), "max") / 1e6
    alone = _exchange_alone(k, d, comm) if d is not None else 0.0
    if comm.rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "exchange": worst, "alone": alone, "backend": k.backend_name}))
    k.backend.close()


def _exchange_alone(kernel: object, d: object, comm: object, rounds: int = 20) -> float:
    """Seconds of one halo exchange with nothing else running (median; the slowest rank's)."""
    times = []
    for _ in range(rounds):
        comm.barrier()  # type: ignore[attr-defined]
        t = time.perf_counter()
        d.exchange(kernel)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t)
    return comm.allreduce_int(int(statistics.median(times) * 1e7), "max") / 1e7  # type: ignore[attr-defined]


def measure(ranks: int, args: argparse.Namespace, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, __file__, "--child", args.kernel, str(args.size), str(args.steps), str(args.batch), backend, out]
        if ranks > 1:
            cmd = ["mpiexec", "-n", str(ranks), *cmd]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGIN), os.environ.get("PYTHONPATH", "")]))
        if args.split_cores:  # pocl: each rank gets its share of the cores instead of all of them
            env["POCL_CPU_MAX_CU_COUNT"] = str(max(1, (os.cpu_count() or 1) // ranks))
        subprocess.run(["timeout", "600", *cmd], check=True, env=env)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backends", nargs="+", default=["numpy", "opencl"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--split-cores", action="store_true", help="pocl: POCL_CPU_MAX_CU_COUNT = cores / ranks")
    ap.add_argument("--kernel", choices=["wavesim", "traveltime"], default="wavesim")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kernel, size, steps, batch, backend, out = args.child
        child(kernel, int(size), int(steps), int(batch), backend, out)
        return
    print(f"{args.kernel} {args.size}^3, {args.steps} steps in batches of {args.batch}, {args.rounds} rounds (medians)")
    print(f"{'backend':10} {'ranks':>5} {'steps/s':>10} {'vs 1 rank':>10} {'in exch.':>9} {'1 exch ms':>10} {'vs k steps':>10}")
    for backend in args.backends:
        rows: dict[int, list[dict]] = {r: [] for r in args.ranks}
        for _ in range(args.rounds):
            for r in args.ranks:
                rows[r].append(measure(r, args, backend))
        base = statistics.median(args.steps / x["seconds"] for x in rows[args.ranks[0]])
        for r in args.ranks:
            rate = statistics.median(args.steps / x["seconds"] for x in rows[r])
            share = statistics.median(x["exchange"] / x["seconds"] for x in rows[r])
            alone = statistics.median(x["alone"] for x in rows[r])
            # one exchange against the 1-rank time of the steps it serves
            rel = alone / (SWEEP / base)
            print(f"{rows[r][0]['backend']:10} {r:>5} {rate:>10.1f} {rate / base:>10.2f} {share:>8.1%} {alone * 1e3:>10.3f} {rel:>9.1%}")


if __name__ == "__main__":
    main()
