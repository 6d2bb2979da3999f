#!/usr/bin/env python3
"""The checkpoint manager's full/delta decisions on the traveltime kernel, against writing every checkpoint full.

Runs ``rkrun traveltime`` in-process twice on the same grid and checkpoint
interval: once with the manager's policy (a full checkpoint, then deltas
until ``--full-every`` or until a delta would exceed half a full one; block
deltas of ``CheckpointPolicy.delta_block`` bytes), once with every
checkpoint full (``full_every=0``). Prints how many of each were
written, their average sizes, the average delta as a fraction of a full one
and the bytes written by both. Figures only; nothing here is asserted.

    python3 bench/ckpt_deltas.py                         # the demo's: 128^3, a checkpoint every 2 steps (tt_checkpoint_every)
    python3 bench/ckpt_deltas.py --grid 96 96 96 --every 2 --backend numpy
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from rkkernel.plugin import finish_values, parse_values
from rkkernel.runner import StepLoop
from rkkernel.signals import StopFlag
from rkkernel.traveltime_plugin import PLUGIN


def run(grid: list[int], every: int, full_every: int, backend: str, root: Path) -> tuple[dict, float, int]:
    doc = {
        "grid": grid,
        "steps": 100_000,
        "checkpoint_dir": str(root / f"ck-{full_every}"),
        "checkpoint_every": every,
        "full_every": full_every,
        "backend": backend,
        "out": str(root / f"r-{full_every}.h5"),
    }
    values = finish_values(parse_values(PLUGIN, doc, "bench"), "bench")
    loop = StepLoop(PLUGIN, values, StopFlag())
    t = time.perf_counter()
    rc = loop.run()
    if rc != 0:
        raise SystemExit(f"rkrun traveltime failed with exit status {rc}")
    return loop.mgr.stats.as_dict(), time.perf_counter() - t, int(loop.done_at or loop.step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--every", type=int, default=2, help="steps between checkpoints (the demo's tt_checkpoint_every)")
    ap.add_argument("--full-every", type=int, default=8, help="the manager's policy: deltas between fulls")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rk-deltas-") as tmp:
        policy, t_policy, steps = run(args.grid, args.every, args.full_every, args.backend, Path(tmp))
        allfull, t_full, _ = run(args.grid, args.every, 0, args.backend, Path(tmp))
    g = "x".join(map(str, args.grid))
    print(f"traveltime {g}, converged at step {steps}, a checkpoint every {args.every} steps, backend {args.backend}")
    print(f"{'policy':<22} {'full':>5} {'delta':>6} {'avg full KiB':>13} {'avg delta KiB':>14} {'MiB written':>12} {'run s':>7}")
    for name, st, secs in ((f"manager (full_every={args.full_every})", policy, t_policy), ("all full", allfull, t_full)):
        full_avg = st["full_bytes"] / st["full"] / 1024 if st["full"] else 0.0
        delta_avg = (st["bytes_written"] - st["full_bytes"]) / st["deltas"] / 1024 if st["deltas"] else 0.0
        print(
            f"{name:<22} {st['full']:>5} {st['deltas']:>6} {full_avg:>13.0f} {delta_avg:>14.0f} {st['bytes_written'] / 2**20:>12.1f} {secs:>7.1f}"
        )
    full_avg = policy["full_bytes"] / max(1, policy["full"])
    delta_avg = (policy["bytes_written"] - policy["full_bytes"]) / max(1, policy["deltas"])
    print(f"average delta / average full: {delta_avg / full_avg:.2f}")
    print(f"bytes written, all full / manager: {allfull['bytes_written'] / max(1, policy['bytes_written']):.2f}x")


if __name__ == "__main__":
    main()
