"""Cost of what the executor does per step with the step folder (issue 20): the fingerprint of a
resubmission (hash cache: a stat per input) and reading a step's events each poll (incremental).

    python bench/stepfolder.py [--input-mib 256] [--events-mib 128] [--rounds 5]

Interleaved rounds, medians; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from rkstep.events import EVENTS_MAX_BYTES, read_events
from rkstep.fingerprint import HashCache, step_fingerprint
from rkstep.folder import StepFolder


def _t(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-mib", type=int, default=256)
    ap.add_argument("--events-mib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        inp = root / "model.bin"
        with open(inp, "wb") as f:
            for _ in range(a.input_mib):
                f.write(os.urandom(1 << 20))
        os.utime(inp, (time.time() - 60, time.time() - 60))
        folder = StepFolder(root / "ck", key="sim/_")
        folder.prepare("x")
        line = (json.dumps({"event": "checkpoint", "job": "1", "restart": 0, "pid": 7, "t": 1.0, "step": 5}) + "\n").encode()
        with open(folder.paths.events, "wb") as f:
            f.write((json.dumps({"event": "start", "job": "1", "restart": 0, "pid": 7, "t": 1.0}) + "\n").encode())
            f.write(line * ((a.events_mib << 20) // len(line)))
        rows: dict[str, list[float]] = {
            k: [] for k in ("fingerprint, no cache", "fingerprint, cached", "events, whole read", "events, incremental poll")
        }
        for _ in range(a.rounds):
            rows["fingerprint, no cache"].append(_t(lambda: step_fingerprint("r", {}, "", [str(inp)], HashCache())))
            rows["fingerprint, cached"].append(_t(lambda: folder.fingerprint("r", {}, "", [str(inp)])))
            rows["events, whole read"].append(_t(lambda: read_events(folder.paths.events)))
            f2 = StepFolder(folder.path)
            f2.observe("1")
            with open(folder.paths.events, "ab") as f:
                f.write(line)
            rows["events, incremental poll"].append(_t(lambda f2=f2: f2.observe("1")))
        print(f"input {a.input_mib} MiB, events file {a.events_mib} MiB (read cap {EVENTS_MAX_BYTES >> 20} MiB), {a.rounds} rounds")
        print("| what | median ms | min ms |")
        print("|---|---:|---:|")
        for k, v in rows.items():
            print(f"| {k} | {statistics.median(v) * 1e3:.2f} | {min(v) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
