"""Write time of one coordinated checkpoint of the same global state as 1, 2 and 4 parts.

The global state is two float32 fields of ``n^3`` (default 128^3: 16 MiB)
split into slabs along z, each part holding its owned planes plus one halo
plane on each inner side (as ``rkkernel.decomp`` lays them out). Layouts:

* ``parts/proc``: one ``CheckpointManager`` per part in its own process (as
  MPI ranks write), started together; time = first start to the last part
  durable, plus rank 0's ``commit_set`` (the manifest, written last);
* ``parts/thread``: the same with one thread per part in one process;
* ``one file``: a single writer writes every slab into one checkpoint, one
  region per slab (the region table): what gathering the parts to rank 0
  and writing one file would cost, without the gather itself.

Every write is durable (fsync of file and folder). Each layout runs
``--repeat`` times on a fresh folder; the best and all samples are printed.
Also printed: reading the 4-part set back as 2 ranks' slabs (``read_planes``),
rank 0's ``gc_sets(keep=2)`` after each of 4 commits (the first samples keep
everything; later ones read the newly kept set once) and ``latest_set`` with
full and header-only checks.

Usage: python bench/multirank_ckpt.py [--n 128] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from rkckpt import ckptset
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage

KID = "bench"
STEP = 100
POLICY = CheckpointPolicy(every_steps=1, keep_chains=None)


def fields(n: int) -> dict[str, np.ndarray]:
    x = np.linspace(-1, 1, n, dtype=np.float32)
    a = np.exp(-20 * (x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)).astype(np.float32)
    return {"u": a, "v": np.roll(a, 3, axis=0) * 0.5}


def slabs(nz: int, ranks: int) -> list[tuple[int, int]]:
    base, extra = divmod(nz, ranks)
    out, at = [], 0
    for r in range(ranks):
        out.append((at, at + base + (r < extra)))
        at = out[-1][1]
    return out


def part_state(g: dict[str, np.ndarray], rank: int, ranks: int, step: int = STEP) -> tuple[Checkpoint, int]:
    z0, z1 = slabs(len(g["u"]), ranks)[rank]
    lo, hi = max(0, z0 - 1), min(len(g["u"]), z1 + 1)
    ck = Checkpoint(Metadata(ckptset.part_kernel_id(KID, rank, ranks), "bench", step))
    for name, a in g.items():
        ck.add_region(name, np.ascontiguousarray(a[lo:hi]))
    return ck, z0 - lo


def write_part(folder: str, ck: Checkpoint, rank: int, ranks: int) -> None:
    """One rank: its own storage handle and manager, without the folder lock (as ranks other than 0 run)."""
    storage = FileStorage(folder)
    storage.acquire_lock = lambda: None  # type: ignore[method-assign]
    step = ck.metadata.current_step
    CheckpointManager(storage, POLICY, ckptset.part_kernel_id(KID, rank, ranks)).final(SnapshotResponse(SnapshotRequest(step, "final"), ck))


def _proc(folder: str, g: dict[str, np.ndarray], rank: int, ranks: int, go: object, done: object) -> None:
    ck, _ = part_state(g, rank, ranks)  # the snapshot copy is the kernel's, not the write's
    go.wait()  # type: ignore[attr-defined]
    write_part(folder, ck, rank, ranks)
    done.put(time.perf_counter())  # type: ignore[attr-defined]  # CLOCK_MONOTONIC: one clock for every process


def commit(folder: str, g: dict[str, np.ndarray], ranks: int, step: int = STEP) -> None:
    storage = FileStorage(folder)
    parts = []
    for r in range(ranks):
        z0, z1 = slabs(len(g["u"]), ranks)[r]
        parts.append(ckptset.written_part(storage, KID, r, ranks, step, z0, z1, 0 if r == 0 else 1))
    ckptset.commit_set(storage, ckptset.CheckpointSet(KID, step, "bench", ranks, len(g["u"]), ("u", "v"), tuple(parts)))
    storage.close()


def run_procs(folder: str, g: dict[str, np.ndarray], ranks: int) -> float:
    """Parts durable (the last process's own clock) plus the commit; process start-up and exit are not counted."""
    ctx = mp.get_context("fork")
    go, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(folder, g, r, ranks, go, done)) for r in range(ranks)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # every process is up and waiting: the clock measures the writes, not the forks
    t0 = time.perf_counter()
    go.set()
    ends = [done.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a writer process failed ({p.exitcode})")
    t1 = time.perf_counter()
    commit(folder, g, ranks)
    return max(ends) - t0 + time.perf_counter() - t1


def run_threads(folder: str, g: dict[str, np.ndarray], ranks: int, step: int = STEP) -> float:
    cks = [part_state(g, r, ranks, step)[0] for r in range(ranks)]
    t0 = time.perf_counter()
    ts = [threading.Thread(target=write_part, args=(folder, cks[r], r, ranks)) for r in range(ranks)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    commit(folder, g, ranks, step)
    return time.perf_counter() - t0


def run_one_file(folder: str, g: dict[str, np.ndarray], ranks: int) -> float:
    """Every slab as its own region of one checkpoint, written by one writer."""
    ck = Checkpoint(Metadata(KID, "bench", STEP))
    for r in range(ranks):
        part, _ = part_state(g, r, ranks)
        for name in g:
            ck.add_region(f"{name}.r{r}", part.region(name))
    t0 = time.perf_counter()
    CheckpointManager(FileStorage(folder), POLICY, KID).final(SnapshotResponse(SnapshotRequest(STEP, "final"), ck))
    return time.perf_counter() - t0


def time_commit(folder: str, g: dict[str, np.ndarray]) -> float:
    """``commit_set`` again (the manifest is replaced by the same bytes): headers read, manifest written durably."""
    t0 = time.perf_counter()
    commit(folder, g, 4)
    return time.perf_counter() - t0


def retention(folder: str, g: dict[str, np.ndarray]) -> list[tuple[str, int, list[float]]]:
    """Rank 0's work after a commit: ``gc_sets(keep=2)`` (reads each newly kept set once), and a restore's ``latest_set``."""
    gc, again = [], []
    for step in range(STEP, STEP + 4):
        run_threads(folder, g, 4, step)
        storage = FileStorage(folder)
        t0 = time.perf_counter()
        ckptset.gc_sets(storage, KID, 2)
        t1 = time.perf_counter()
        ckptset.gc_sets(storage, KID, 2)
        gc.append(t1 - t0)
        again.append(time.perf_counter() - t1)
        storage.close()
    t0 = time.perf_counter()
    ckptset.latest_set(FileStorage(folder), KID)
    t1 = time.perf_counter()
    ckptset.latest_set(FileStorage(folder), KID, full=False)
    t2 = time.perf_counter()
    return [
        ("gc_sets after a commit", 4, gc),
        ("gc_sets, nothing new", 4, again),
        ("latest_set, full check", 4, [t1 - t0]),
        ("latest_set, headers", 4, [t2 - t1]),
    ]


def read_back(folder: str, g: dict[str, np.ndarray]) -> float:
    storage = FileStorage(folder)
    s = ckptset.latest_set(storage, KID, full=False)
    assert s is not None and s.ranks == 4
    t0 = time.perf_counter()
    for z0, z1 in slabs(len(g["u"]), 2):
        for name in g:
            assert np.array_equal(ckptset.read_planes(storage, s, name, z0, z1), g[name][z0:z1])
    return time.perf_counter() - t0


def measure(base: Path, g: dict[str, np.ndarray], repeat: int) -> list[tuple[str, int, list[float]]]:
    rows: list[tuple[str, int, list[float]]] = []
    layouts = [("parts/proc", run_procs), ("parts/thread", run_threads), ("one file", run_one_file)]
    for label, fn in layouts:
        for ranks in (1, 2, 4):
            if label == "one file" and ranks == 1:
                continue
            samples = []
            for i in range(repeat):
                folder = base / f"{label.replace('/', '-').replace(' ', '-')}-{ranks}-{i}"
                samples.append(fn(str(folder), g, ranks))
                if not (label == "parts/proc" and ranks == 4 and i == 0):
                    shutil.rmtree(folder)
            rows.append((label, ranks, samples))
    rows.append(("commit (manifest) alone", 4, [time_commit(str(base / "parts-proc-4-0"), g)]))
    rows.append(("read 4 parts as 2 slabs", 4, [read_back(str(base / "parts-proc-4-0"), g)]))
    rows += retention(str(base / "retention"), g)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the folders go (default: a temporary folder)")
    args = ap.parse_args()
    g = fields(args.n)
    mib = sum(a.nbytes for a in g.values()) / 2**20
    base = Path(tempfile.mkdtemp(prefix="rkbench-sets-", dir=args.dir))
    run_threads(str(base / "warm-up"), fields(8), 2)  # imports and first-use costs, before any process forks
    try:
        rows = measure(base, g, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"global state: 2 x {args.n}^3 float32 = {mib:.0f} MiB; durable writes; best of {args.repeat}")
    print(f"{'layout':<24} {'parts':>5} {'best s':>8} {'MiB/s':>8}  samples")
    for label, ranks, samples in rows:
        best = min(samples)
        if label.startswith(("commit", "gc_sets", "latest_set")):
            print(f"{label:<24} {ranks:>5} {best:8.3f} {'':>8}  {' '.join(f'{s:.3f}' for s in samples)}")
            continue
        print(f"{label:<24} {ranks:>5} {best:8.3f} {mib / best:8.0f}  {' '.join(f'{s:.3f}' for s in samples)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
