"""Checkpoint overhead of ``CheckpointManager`` on a running compute loop.

A two-field float32 state (default 256^3, 128 MiB) evolves with a numpy
stencil; every K steps the loop hands a snapshot to the manager, which
writes in a background thread. Printed:

* overhead = wall(loop with checkpoints) - wall(same loop without),
* raw write = time to write + fsync the same encoded bytes with plain
  ``open().write()`` in the same run, and the ratio overhead / raw
  (target <= 1.2: the manager may cost at most 20 % more than just dumping
  the bytes synchronously, although it also encodes, checksums, deltas,
  indexes and retains),
* flush throughput of a two-level store (node-local -> SeaweedFS S3).

Usage: python bench/ckpt_manager.py [--n 256] [--steps 24] [--every 6] [--repeat 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rkckpt import format as rkformat  # noqa: E402
from rkckpt.codec import WriteOptions  # noqa: E402
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse  # noqa: E402
from rkckpt.model import Checkpoint, Metadata  # noqa: E402
from rkckpt.storage import FileStorage, TwoLevelStorage, open_storage  # noqa: E402


class Sim:
    """Leapfrog wave update on two fields; enough work per step to be a real loop."""

    def __init__(self, n: int) -> None:
        x = np.linspace(-1, 1, n, dtype=np.float32)
        self.a = np.exp(-20 * (x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)).astype(np.float32)
        self.b = self.a.copy()
        self.step = 0
        self._lap = np.empty_like(self.a)

    def advance(self) -> None:
        a, b, lap = self.a, self.b, self._lap
        lap[...] = -6.0 * a
        lap[1:] += a[:-1]
        lap[:-1] += a[1:]
        lap[:, 1:] += a[:, :-1]
        lap[:, :-1] += a[:, 1:]
        lap[:, :, 1:] += a[:, :, :-1]
        lap[:, :, :-1] += a[:, :, 1:]
        lap *= np.float32(0.1)
        lap += np.float32(2.0) * a
        lap -= b
        self.b, self.a, self._lap = a, lap, b
        self.step += 1

    def snapshot(self) -> Checkpoint:
        c = Checkpoint(Metadata("bench", "wave", self.step, grid_size=self.a.shape))
        c.add_region("a", self.a.copy())
        c.add_region("b", self.b.copy())
        return c


def run_loop(n: int, steps: int, every: int, mgr: CheckpointManager | None) -> float:
    sim = Sim(n)
    t0 = time.perf_counter()
    for _ in range(steps):
        sim.advance()
        if mgr is not None and sim.step % every == 0 and sim.step < steps:
            mgr.submit(SnapshotResponse(SnapshotRequest(sim.step), sim.snapshot()))
    if mgr is not None:
        mgr.final(SnapshotResponse(SnapshotRequest(sim.step, "final"), sim.snapshot()))
        mgr.flush()
    return time.perf_counter() - t0


def raw_write(data: bytes, folder: Path, count: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        with open(folder / f"raw{i}.bin", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rkbench-", dir=args.dir))
    try:
        n, steps, every = args.n, args.steps, args.every
        state_mib = 2 * n**3 * 4 / 2**20
        print(f"state: 2 x float32 {n}^3 = {state_mib:.0f} MiB; {steps} steps, checkpoint every {every} + final")
        run_loop(min(n, 64), 2, every, None)  # warm-up
        # alternate plain and checkpointed runs; the best of each is least disturbed by other load
        t_plain = t_ck = float("inf")
        policy = CheckpointPolicy(every_steps=every, keep_chains=2)
        for rep in range(args.repeat):
            t_plain = min(t_plain, run_loop(n, steps, every, None))
            mgr = CheckpointManager(FileStorage(base / f"ck{rep}"), policy, "bench")
            t = run_loop(n, steps, every, mgr)
            mgr.close()
            if t < t_ck:
                t_ck, st = t, mgr.stats
            shutil.rmtree(base / f"ck{rep}", ignore_errors=True)
        print(f"compute only:            {t_plain:7.2f} s  (best of {args.repeat})")
        print(f"compute + checkpoints:   {t_ck:7.2f} s  ({st.completed} written: {st.full} full, {st.deltas} delta; {st.bytes_written / 2**20:.0f} MiB; "
              f"writer busy {st.seconds:.2f} s, loop blocked {st.wait_seconds:.2f} s, failed {st.failed})")
        sim = Sim(n)
        sim.advance()
        blob = rkformat.encode(sim.snapshot(), WriteOptions())
        (base / "raw").mkdir()
        t_raw = min(raw_write(blob, base / "raw", st.completed) for _ in range(args.repeat)) * (st.bytes_written / max(1, len(blob) * st.completed))
        overhead = t_ck - t_plain
        print(f"raw write of same bytes: {t_raw:7.2f} s  (open/write/fsync, {st.bytes_written / 2**20 / max(t_raw, 1e-9):.0f} MiB/s)")
        print(f"overhead:                {overhead:7.2f} s  = {overhead / max(t_raw, 1e-9):.2f} x raw write time (target <= 1.2)")
        if not args.no_s3:
            try:
                from fixtures_s3 import start_weed, stop_weed
            except ImportError as exc:
                print(f"S3: skipped ({exc})")
                return 0
            import pytest

            try:
                srv = start_weed(base / "weed")
            except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # type: ignore[attr-defined]
                print(f"S3: skipped ({exc})")
                return 0
            try:
                shared = open_storage(f"s3://{srv.bucket()}", **srv.options())
                two = TwoLevelStorage(FileStorage(base / "local"), shared)
                mgr = CheckpointManager(two, policy, "bench")
                t_two = run_loop(n, steps, every, mgr)  # flush() inside waits for the uploads
                flushed = two.flushed_bytes
                mgr.close()
                print(f"two-level (local->S3):   {t_two:7.2f} s loop incl. final flush; uploaded {flushed / 2**20:.0f} MiB in "
                      f"{two.flush_seconds:.2f} s of upload time = {flushed / 2**20 / max(two.flush_seconds, 1e-9):.0f} MiB/s to SeaweedFS")
            finally:
                stop_weed(srv.proc)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
