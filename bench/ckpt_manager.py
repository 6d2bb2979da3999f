"""Checkpoint overhead of ``CheckpointManager`` on a running compute loop.

A two-field float32 state (default 256^3, 128 MiB) evolves with a numpy
stencil; every K steps the loop copies its state out (into buffers the
manager hands back via ``reusable()``, as a GPU kernel reuses its staging
buffers) and submits it; the manager writes in a background thread, the last
checkpoint synchronously. Each repetition runs, back to back, the plain loop,
the checkpointed loop and the raw writes, so all three see the same
background load; the best of each is printed with every sample. Printed:

* overhead = wall(loop with checkpoints) - wall(same loop without); it
  includes the snapshot copies and the final synchronous checkpoint, which
  are shown separately,
* raw write = time to write + fsync the same number of files of the same
  bytes with plain ``open().write()``, and the ratio overhead / raw
  (target <= 1.2: the manager may cost at most 20 % more than just dumping
  the bytes synchronously, although it also encodes, checksums, deltas,
  indexes and retains),
* flush throughput of a two-level store (node-local -> SeaweedFS S3).

Usage: python bench/ckpt_manager.py [--n 256] [--steps 24] [--every 6] [--repeat 3] [--no-s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rkckpt import container  # noqa: E402
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

    def snapshot(self, reuse: Checkpoint | None = None) -> Checkpoint:
        """A copy of the state; into ``reuse``'s buffers when the manager handed one back."""
        c = Checkpoint(Metadata("bench", "wave", self.step, grid_size=self.a.shape))
        for name, arr in (("a", self.a), ("b", self.b)):
            dst = None
            if reuse is not None and name in reuse.regions():
                dst = reuse.region(name)
                if dst.shape != arr.shape or dst.dtype != arr.dtype or not dst.flags.writeable:
                    dst = None
            if dst is None:
                c.add_region(name, arr.copy())
            else:
                np.copyto(dst, arr)
                c.add_region(name, dst)
        return c


@dataclass
class LoopTimes:
    wall: float = 0.0
    snapshot: float = 0.0  # copying the state out, on the compute thread
    final: float = 0.0  # the synchronous final checkpoint + flush


def run_loop(n: int, steps: int, every: int, mgr: CheckpointManager | None, reuse: bool = True) -> LoopTimes:
    sim = Sim(n)
    out = LoopTimes()
    t0 = time.perf_counter()
    for _ in range(steps):
        sim.advance()
        if mgr is not None and sim.step % every == 0 and sim.step < steps:
            ts = time.perf_counter()
            snap = sim.snapshot(mgr.reusable() if reuse else None)
            out.snapshot += time.perf_counter() - ts
            mgr.submit(SnapshotResponse(SnapshotRequest(sim.step), snap))
    if mgr is not None:
        ts = time.perf_counter()
        snap = sim.snapshot(mgr.reusable() if reuse else None)
        tf = time.perf_counter()
        out.snapshot += tf - ts
        mgr.final(SnapshotResponse(SnapshotRequest(sim.step, "final"), snap))
        mgr.flush()
        out.final = time.perf_counter() - tf
    out.wall = time.perf_counter() - t0
    return out


def raw_write(data: bytes, folder: Path, count: int) -> float:
    """``count`` files of ``data``: open/write/fsync each, as a kernel dumping its state would."""
    folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for i in range(count):
        with open(folder / f"raw{i}.bin", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    t = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)  # untimed, like the manager's retention is not separated out
    return t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rkbench-", dir=args.dir))
    try:
        n, steps, every = args.n, args.steps, args.every
        state_mib = 2 * n**3 * 4 / 2**20
        print(f"state: 2 x float32 {n}^3 = {state_mib:.0f} MiB; {steps} steps, checkpoint every {every} + final")
        run_loop(min(n, 64), 2, every, None)  # warm-up
        sim = Sim(n)
        sim.advance()
        blob = container.encode(sim.snapshot(), WriteOptions())
        # each repetition runs plain loop, checkpointed loop and raw writes back to back, so all
        # three see the same background load; the best of each is the least disturbed
        policy = CheckpointPolicy(every_steps=every, keep_chains=2)
        plain: list[float] = []
        ck: list[LoopTimes] = []
        raw: list[float] = []
        st = None
        for rep in range(args.repeat):
            plain.append(run_loop(n, steps, every, None).wall)
            mgr = CheckpointManager(FileStorage(base / f"ck{rep}"), policy, "bench")
            t = run_loop(n, steps, every, mgr)
            mgr.close()
            if not ck or t.wall < min(c.wall for c in ck):
                st = mgr.stats
            ck.append(t)
            shutil.rmtree(base / f"ck{rep}", ignore_errors=True)
            # the same bytes as the checkpointed run wrote: as many files, scaled to its byte count
            scale = mgr.stats.bytes_written / max(1, len(blob) * mgr.stats.completed)
            raw.append(raw_write(blob, base / "raw", mgr.stats.completed) * scale)
        assert st is not None
        best = min(ck, key=lambda c: c.wall)
        t_plain, t_ck, t_raw = min(plain), best.wall, min(raw)
        print(f"compute only:            {t_plain:7.2f} s  (best of {args.repeat}: {' '.join(f'{x:.2f}' for x in plain)})")
        print(
            f"compute + checkpoints:   {t_ck:7.2f} s  (best of {args.repeat}: {' '.join(f'{c.wall:.2f}' for c in ck)}; "
            f"{st.completed} written: {st.full} full, {st.deltas} delta; {st.bytes_written / 2**20:.0f} MiB)"
        )
        print(
            f"  on the compute thread: snapshot copies {best.snapshot:.2f} s, final checkpoint + flush {best.final:.2f} s, "
            f"blocked by back-pressure {st.wait_seconds:.2f} s; writer thread busy {st.seconds:.2f} s, failed {st.failed}"
        )
        overhead = t_ck - t_plain
        print(
            f"raw write of same bytes: {t_raw:7.2f} s  (best of {args.repeat}: {' '.join(f'{x:.2f}' for x in raw)}; open/write/fsync, "
            f"{st.bytes_written / 2**20 / max(t_raw, 1e-9):.0f} MiB/s)"
        )
        print(f"overhead:                {overhead:7.2f} s  = {overhead / max(t_raw, 1e-9):.2f} x raw write time (target <= 1.2)")
        paired = sorted(c.wall - p for c, p in zip(ck, plain, strict=True))
        med = paired[len(paired) // 2]
        print(
            f"  per repetition (checkpointed - plain, same load): {' '.join(f'{x:.2f}' for x in paired)} s; "
            f"median {med:.2f} s = {med / max(t_raw, 1e-9):.2f} x raw"
        )
        print(
            f"  of which outside snapshot copies: {overhead - best.snapshot:.2f} s = "
            f"{(overhead - best.snapshot) / max(t_raw, 1e-9):.2f} x raw (copies are the kernel's, not the writer's)"
        )
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
                t_two = run_loop(n, steps, every, mgr).wall  # flush() inside waits for the uploads
                flushed = two.flushed_bytes
                mgr.close()
                print(
                    f"two-level (local->S3):   {t_two:7.2f} s loop incl. final flush; uploaded {flushed / 2**20:.0f} MiB in "
                    f"{two.flush_seconds:.2f} s of upload time = {flushed / 2**20 / max(two.flush_seconds, 1e-9):.0f} MiB/s to SeaweedFS"
                )
            finally:
                stop_weed(srv.proc)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
