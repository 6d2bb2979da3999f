"""Put-no-replace cost (issue 18): ``FileStorage.create`` (link, unlink) vs ``save`` (rename).

Interleaved rounds, medians, on a real folder with fsync: what a checkpoint
write pays for never replacing a name.

    python3 bench/ckpt_create.py [--mib 8] [--rounds 15] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from rkckpt.storage import FileStorage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    blob = np.random.default_rng(0).integers(0, 255, args.mib << 20, dtype=np.uint8).tobytes()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        s = FileStorage(Path(d) / "ck")
        times: dict[str, list[float]] = {"save": [], "create": []}
        for i in range(args.rounds):
            for how in ("save", "create") if i % 2 == 0 else ("create", "save"):
                name = f"k-{i:012d}-{how}.rkcp".replace(f"-{how}.", "-full." if how == "save" else "-delta.")
                t0 = time.perf_counter()
                getattr(s, how)(name, blob)
                times[how].append(time.perf_counter() - t0)
        s.close()
    print(f"{args.mib} MiB per write, {args.rounds} interleaved rounds, median ms (min..max)")
    for how, ts in times.items():
        print(f"  {how:7s} {1000 * statistics.median(ts):8.2f}  ({1000 * min(ts):.2f}..{1000 * max(ts):.2f})")
    print(f"  create/save ratio of medians: {statistics.median(times['create']) / statistics.median(times['save']):.3f}")


if __name__ == "__main__":
    main()
