"""What periodic coordinated checkpoints cost a multi-rank step: wall time with and without them.

Runs ``mpiexec -n RANKS rkrun wavesim`` (NumPy) twice per round: with a
checkpoint set every ``--every`` steps, and with none but the final one;
prints the medians and their ratio. The part writers' queue (``ranks.py``:
the manager's queue of two, sets pending in a list) is what keeps the
ratio near 1. Point ``PYTHONPATH`` at another tree's ``plugin`` to compare
(e.g. the earlier ``max_pending=1``), on the same machine, interleaved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(ranks: int, grid: list[str], steps: int, every: int, ck: Path) -> float:
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if mpiexec is None:
        raise SystemExit("no mpiexec (pip install mpich)")
    args = ["wavesim", "--grid", *grid, "--steps", str(steps), "--checkpoint-every", str(every), "--batch", "5"]
    args += ["--backend", "numpy", "--checkpoint-dir", str(ck), "--out", str(ck / "out.h5")]
    t0 = time.perf_counter()
    subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "rkkernel.cli", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--grid", nargs=3, default=["48", "48", "96"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with_ck, without = [], []
    for _ in range(a.rounds):
        with tempfile.TemporaryDirectory() as d:
            with_ck.append(_run(a.ranks, a.grid, a.steps, a.every, Path(d) / "a"))
            without.append(_run(a.ranks, a.grid, a.steps, a.steps * 10, Path(d) / "b"))
    w, n = statistics.median(with_ck), statistics.median(without)
    print(f"{a.ranks} ranks, grid {'x'.join(a.grid)}, {a.steps} steps, a set every {a.every} steps ({a.rounds} rounds, median)")
    print(f"  with periodic sets: {w:.2f} s   final set only: {n:.2f} s   ratio {w / n:.2f}x")


if __name__ == "__main__":
    main()
