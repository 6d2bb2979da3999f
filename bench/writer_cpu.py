#!/usr/bin/env python3
"""CPU one checkpoint costs the writer: ``CheckpointManager`` on wave-shaped states, no kernel running.

On a 2-core node the kernel already keeps both cores busy, so every CPU
second the writer spends (copying into the page cache, checksums, the delta
compare, the HDF5 wrapper, retention) is taken from the kernel; wall-clock
rates on a shared machine swing by 2-4x between rounds, CPU seconds much
less. Each row is the process CPU time (all threads: the writer, its CRC
helper) of ``submit`` + ``wait`` per checkpoint, median over rounds, in a
fresh process per tree and round (interleaved):

* ``full``: two float32 fields of n^3 that change everywhere (a wave that
  filled the grid): every checkpoint is a full one;
* ``growing``: the changed part grows by 5% of the grid per checkpoint (a wave
  spreading from its source): deltas until they stop paying, then fulls.

The first checkpoint of each run is left out (it pays one-off costs: the
``.rk.h5`` layout template, the index). Figures only; nothing is asserted.

    python3 bench/writer_cpu.py --sizes 128 192 --rounds 3 --trees before=/work/main/plugin after=plugin
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, shutil, sys, tempfile, time
import numpy as np
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
n, kind, count, folder = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
p = rng.standard_normal(n**3).astype(np.float32)
q = rng.standard_normal(n**3).astype(np.float32)
def state(i):
    k = p.size if kind == "full" else min(p.size, int(p.size * 0.05 * (i + 1)))
    p[:k] += 1.0
    q[:k] -= 1.0
    c = Checkpoint(Metadata("bench", "wave", 20 * (i + 1)))
    c.add_region("p", p.copy())
    c.add_region("q", q.copy())
    return c
states = [state(i) for i in range(count + 1)]
d = tempfile.mkdtemp(dir=folder)
cpu = []
with CheckpointManager(d, CheckpointPolicy(every_steps=20), "bench") as m:
    for c in states:
        c0 = time.process_time()
        m.submit(SnapshotResponse(SnapshotRequest(c.metadata.current_step), c))
        m.wait()
        cpu.append(time.process_time() - c0)
    stats = m.stats
print(json.dumps({"cpu": cpu[1:], "full": stats.full, "deltas": stats.deltas, "bytes": stats.bytes_written / len(states),
                  "phases": {k: v / len(states) for k, v in getattr(stats, "phase_cpu", {}).items()}}))
shutil.rmtree(d)
"""


def run_one(n: int, kind: str, count: int, folder: str, tree: str | None) -> dict:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).absolute()), *filter(None, [env.get("PYTHONPATH")])])
    p = subprocess.run([sys.executable, "-c", CHILD, str(n), kind, str(count), folder], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"writer bench {n} {kind} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--kinds", nargs="+", default=["full", "growing"], choices=["full", "growing"])
    ap.add_argument("--checkpoints", type=int, default=8, help="checkpoints per run (after the first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the checkpoints (default: a temp folder)")
    ap.add_argument("--trees", nargs="+", default=[], metavar="LABEL=PATH", help="compare plugin source trees")
    a = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="writer_cpu-", dir=a.dir)
    trees = [tuple(t.split("=", 1)) for t in a.trees] or [("", None)]
    jobs = [(f"{tl + ': ' if tl else ''}{n}^3 {k}", n, k, tree) for tl, tree in trees for n in a.sizes for k in a.kinds]
    per: dict[str, list[float]] = {j[0]: [] for j in jobs}
    last: dict[str, dict] = {}
    for r in range(a.rounds):
        for label, n, kind, tree in jobs:
            t = run_one(n, kind, a.checkpoints, folder, tree)
            per[label].append(statistics.median(t["cpu"]))
            last[label] = t
            print(f"round {r + 1}/{a.rounds} {label:<24} {per[label][-1] * 1e3:7.1f} ms CPU per checkpoint", file=sys.stderr, flush=True)
    print(f"\nwriter CPU per checkpoint (process CPU of submit + wait), median of {a.rounds} interleaved rounds; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| run | CPU ms/checkpoint | MiB/checkpoint | CPU ms/MiB | full | deltas |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, _kind, _tree in jobs:
        t, cpu = last[label], statistics.median(per[label])
        mib = 2 * 4 * n**3 / 2**20
        print(f"| {label} | {cpu * 1e3:.1f} | {t['bytes'] / 2**20:.1f} | {cpu * 1e3 / mib:.2f} | {t['full']} | {t['deltas']} |")


if __name__ == "__main__":
    main()
