"""Write time of one coordinated checkpoint of the same global state as 1, 2 and 4 parts.

The global state is two float32 fields of ``n^3`` (default 128^3: 16 MiB)
split into slabs along z, each part holding its owned planes plus one halo
plane on each inner side (as ``rkkernel.decomp`` lays them out). Every part
is written by ``rkkernel.rankstate.PartManager`` (what rkrun's ranks use: no
shared index, retention left to ``gc_sets``); every write is durable (fsync
of file and folder). Steady state: each writer process writes ``--writes``
checkpoints of a state that changed everywhere (a wave: every write is a
full), and the first write of a process (imports, the ``.rk.h5`` layout
template of its shape) is shown apart from the median of the others.

* ``MPI ranks``: ``mpiexec -n N python bench/multirank_ckpt.py --mpi-child``;
  each rank writes its part, rank 0 gathers the parts (name and digest from
  each writer's own index, as ``ranks._part_state``) and commits the set
  (``commit_set``: the manifest, written last; ``gc_sets`` after it is not
  timed); time = barrier to the
  committed set (``MPI.Wtime``), median of ``--rounds`` rounds after
  ``--warm`` rounds; the ratio is to the 1-rank row (one writer);
* ``gather+1``: the other design at the same rank count
  (``--mpi-gather-child``): every rank's owned planes gathered to rank 0
  (``Gatherv``), which writes one checkpoint of the whole state; ``vs
  gather`` is parts' time over it (below 1: parts per rank are faster);
* ``parts/proc``: the same with forked processes (no MPI), commit timed
  after the parts; ``parts/thread``: one thread per part in one process
  (first write only);
* ``one file``: a single writer writes every slab into one checkpoint, one
  region per slab (the region table): what gathering the parts to rank 0
  and writing one file would cost, without the gather itself.

CPU columns are process CPU (all threads) per write: the median over a
part's writes, and the sum over the parts. Also printed: reading the 4-part
set back as 2 ranks' slabs (``read_planes``), rank 0's ``gc_sets(keep=2)``
after each of 4 commits and ``latest_set`` with full and header-only checks.

Usage: python bench/multirank_ckpt.py [--n 128] [--writes 6] [--rounds 7] [--repeat 3] [--dir /tmp] [--no-mpi]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
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
from rkkernel.decomp import plan

KID = "bench"
STEP = 100
POLICY = CheckpointPolicy(every_steps=1, keep_chains=None)


def fields(n: int) -> dict[str, np.ndarray]:
    x = np.linspace(-1, 1, n, dtype=np.float32)
    a = np.exp(-20 * (x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)).astype(np.float32)
    return {"u": a, "v": np.roll(a, 3, axis=0) * 0.5}


def moved(g: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """The fields ``i`` steps on: every cell changed (a wave), so every write is a full."""
    return {k: v + np.float32(i) for k, v in g.items()}


def slabs(nz: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's owned planes [z0, z1), as rkrun splits the grid (``rkkernel.decomp.plan``)."""
    return [(s.z0, s.z1) for s in plan(nz, ranks, 1)]


def part_state(g: dict[str, np.ndarray], rank: int, ranks: int, step: int = STEP) -> tuple[Checkpoint, int]:
    z0, z1 = slabs(len(g["u"]), ranks)[rank]
    lo, hi = max(0, z0 - 1), min(len(g["u"]), z1 + 1)
    ck = Checkpoint(Metadata(ckptset.part_kernel_id(KID, rank, ranks), "bench", step))
    for name, a in g.items():
        ck.add_region(name, np.ascontiguousarray(a[lo:hi]))
    return ck, z0 - lo


def part_manager(folder: str, rank: int, ranks: int, *, lock: bool = True) -> CheckpointManager:
    """Rank ``rank``'s writer as rkrun makes it (``ranks._make_manager``): only rank 0 takes the folder lock.

    ``lock=False``: not rank 0 either (threads started together: taking the lock
    deletes the temporary files of the other parts' writes in flight).
    """
    from rkkernel.rankstate import PartManager, retention_off, unlocked

    storage = FileStorage(folder)
    if rank != 0 or not lock:
        unlocked(storage)
    return PartManager(storage, retention_off(POLICY), ckptset.part_kernel_id(KID, rank, ranks), max_pending=1)


def write_part(folder: str, ck: Checkpoint, rank: int, ranks: int) -> None:
    step = ck.metadata.current_step
    mgr = part_manager(folder, rank, ranks, lock=False)
    mgr.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
    mgr.close()


def commit(folder: str | FileStorage, g: dict[str, np.ndarray], ranks: int, step: int = STEP) -> None:
    """Rank 0's commit of the set of ``step``: the parts' headers read, the manifest written last (a folder or rank 0's storage)."""
    storage = FileStorage(folder) if isinstance(folder, str) else folder
    parts = []
    for r in range(ranks):
        z0, z1 = slabs(len(g["u"]), ranks)[r]
        parts.append(ckptset.written_part(storage, KID, r, ranks, step, z0, z1, 0 if r == 0 else 1))
    ckptset.commit_set(storage, ckptset.CheckpointSet(KID, step, "bench", ranks, len(g["u"]), ("u", "v"), tuple(parts)))
    if isinstance(folder, str):
        storage.close()


def _proc(folder: str, g: dict[str, np.ndarray], rank: int, ranks: int, writes: int, bar: object, out: object) -> None:
    """One writer process: ``writes`` checkpoints, each started with the others; rank 0 commits each set."""
    mgr = part_manager(folder, rank, ranks)
    mgr.due(STEP - 1)  # the run loop's first batch boundary: the writer's warm-up starts
    for i in range(writes):
        ck, _ = part_state(moved(g, i), rank, ranks, STEP + i)  # the snapshot copy is the kernel's, not the write's
        bar.wait()  # type: ignore[attr-defined]
        t0, c0 = time.perf_counter(), time.process_time()  # CLOCK_MONOTONIC: one clock for every process
        mgr.final(SnapshotResponse(SnapshotRequest(STEP + i, "final"), ck))
        t1, cpu = time.perf_counter(), time.process_time() - c0
        bar.wait()  # type: ignore[attr-defined]
        tc = 0.0
        if rank == 0:
            c = time.perf_counter()
            commit(mgr.storage, g, ranks, STEP + i)  # type: ignore[arg-type]
            tc = time.perf_counter() - c
        out.put((i, rank, t0, t1, cpu, tc))  # type: ignore[attr-defined]
    mgr.close()


def run_procs(folder: str, g: dict[str, np.ndarray], ranks: int, writes: int) -> list[tuple[float, list[float]]]:
    """Per write: (first start to last part durable, plus the commit; CPU of each part's write)."""
    ctx = mp.get_context("fork")
    bar, out = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(folder, g, r, ranks, writes, bar, out)) for r in range(ranks)]
    for p in procs:
        p.start()
    rows = []
    while len(rows) < ranks * writes:
        try:
            rows.append(out.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit("a writer process failed") from None
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a writer process failed ({p.exitcode})")
    per = []
    for i in range(writes):
        rs = [r for r in rows if r[0] == i]
        per.append((max(r[3] for r in rs) - min(r[2] for r in rs) + sum(r[5] for r in rs), [r[4] for r in sorted(rs, key=lambda r: r[1])]))
    return per


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


def run_one_file(folder: str, g: dict[str, np.ndarray], ranks: int, writes: int) -> list[tuple[float, list[float]]]:
    """Every slab as its own region of one checkpoint, written by one writer, ``writes`` times."""
    per = []
    with CheckpointManager(FileStorage(folder), POLICY, KID) as mgr:
        for i in range(writes):
            ck = Checkpoint(Metadata(KID, "bench", STEP + i))
            gi = moved(g, i)
            for r in range(ranks):
                part, _ = part_state(gi, r, ranks)
                for name in g:
                    ck.add_region(f"{name}.r{r}", part.region(name))
            t0, c0 = time.perf_counter(), time.process_time()
            mgr.final(SnapshotResponse(SnapshotRequest(STEP + i, "final"), ck))
            per.append((time.perf_counter() - t0, [time.process_time() - c0]))
    return per


def mpi_child(n: int, warm: int, rounds: int, folder: str, out: str) -> None:
    """One MPI rank: ``warm + rounds`` coordinated checkpoints timed barrier to commit (rank 0 writes ``out``)."""
    from mpi4py import MPI

    from rkkernel.comm import world

    comm = world()  # rkrun's own: collectives that sleep while they wait, so a rank done early leaves the CPU to the others
    rank, ranks = comm.rank, comm.size
    g = fields(n)
    z0, z1 = slabs(n, ranks)[rank]
    mgr = part_manager(folder, rank, ranks)
    mgr.due(STEP - 1)  # the run loop's first batch boundary: the writer's warm-up starts
    storage = mgr.storage
    walls, cpus = [], []
    for i in range(warm + rounds):
        step = STEP + i
        ck, offset = part_state(moved(g, i), rank, ranks, step)
        comm.barrier()
        t0, c0 = MPI.Wtime(), time.process_time()
        mgr.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
        mgr.flush()
        cpu = time.process_time() - c0
        e = [e for e in mgr.index.sorted(mgr.kernel_id) if e.step == step][-1]  # as ``ranks._part_state``: no header read
        docs = comm.gather_json([rank, e.name, str(e.state_digest), z0, z1, offset])
        if rank == 0:
            parts = tuple(ckptset.Part(*d) for d in docs)  # type: ignore[misc, union-attr]
            ckptset.commit_set(storage, ckptset.CheckpointSet(KID, step, "bench", ranks, n, ("u", "v"), parts))
            storage.flush()
        comm.barrier()
        wall = MPI.Wtime() - t0
        all_cpu = comm.gather_json(cpu)
        if rank == 0:
            ckptset.gc_sets(storage, KID, 2)  # rkrun's rank 0 does this after the commit: not in the time
            if i >= warm:
                walls.append(wall)
                cpus.append(all_cpu)
            else:
                print(
                    f"  mpi {ranks} rank(s): warm-up round {i + 1}: {wall:.3f} s, CPU ms per rank {[round(c * 1e3, 1) for c in all_cpu]}",
                    file=sys.stderr,
                )
        comm.barrier()
    mgr.close()
    if rank == 0:
        Path(out).write_text(json.dumps({"walls": walls, "cpus": cpus}))


def mpi_gather_child(n: int, warm: int, rounds: int, folder: str, out: str) -> None:
    """The other design at the same rank count: every rank's owned planes gathered to rank 0, which writes one
    checkpoint of the whole state (one writer); timed barrier to durable, as ``mpi_child``."""
    from mpi4py import MPI

    from rkkernel.comm import world

    comm = world()
    rank, ranks = comm.rank, comm.size
    g = fields(n)
    z0, z1 = slabs(n, ranks)[rank]
    mgr = CheckpointManager(FileStorage(folder), POLICY, KID) if rank == 0 else None
    if mgr is not None:
        mgr.due(STEP - 1)
    walls = []
    for i in range(warm + rounds):
        mine = moved(g, i)
        comm.barrier()
        t0 = MPI.Wtime()
        gathered = {name: comm.gather_arrays(np.ascontiguousarray(a[z0:z1])) for name, a in mine.items()}
        if mgr is not None:
            ck = Checkpoint(Metadata(KID, "bench", STEP + i))
            for name, slabs_of in gathered.items():
                ck.add_region(name, np.concatenate(slabs_of))  # type: ignore[arg-type]
            mgr.final(SnapshotResponse(SnapshotRequest(STEP + i, "final"), ck))
            mgr.flush()
        comm.barrier()
        if rank == 0 and i >= warm:
            walls.append(MPI.Wtime() - t0)
    if mgr is not None:
        mgr.close()
        Path(out).write_text(json.dumps({"walls": walls, "cpus": [[0.0]] * len(walls)}))


def run_mpi(base: Path, n: int, ranks: int, warm: int, rounds: int, mode: str = "--mpi-child") -> dict:
    folder = base / f"mpi-{ranks}{mode}"
    out = base / f"mpi-{ranks}{mode}.json"
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, __file__, mode, str(n), str(warm), str(rounds), str(folder), str(out)]
    subprocess.run(["timeout", "600", *cmd], check=True, env=dict(os.environ))
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads(out.read_text())


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


def steady_rows(base: Path, g: dict[str, np.ndarray], writes: int) -> list[tuple[str, int, list[tuple[float, list[float]]]]]:
    rows = []
    for label, fn in (("parts/proc", run_procs), ("one file", run_one_file)):
        for ranks in (1, 2, 4):
            if label == "one file" and ranks == 1:
                continue
            folder = base / f"{label.replace('/', '-').replace(' ', '-')}-{ranks}"
            rows.append((label, ranks, fn(str(folder), g, ranks, writes)))
            shutil.rmtree(folder)
    return rows


def other_rows(base: Path, g: dict[str, np.ndarray], repeat: int) -> list[tuple[str, int, list[float]]]:
    rows: list[tuple[str, int, list[float]]] = []
    for ranks in (1, 2, 4):
        samples = []
        for i in range(repeat):
            folder = base / f"thread-{ranks}-{i}"
            samples.append(run_threads(str(folder), g, ranks))
            if not (ranks == 4 and i == 0):
                shutil.rmtree(folder)
        rows.append(("parts/thread, 1st write", ranks, samples))
    rows.append(("commit (manifest) alone", 4, [time_commit(str(base / "thread-4-0"), g)]))
    rows.append(("read 4 parts as 2 slabs", 4, [read_back(str(base / "thread-4-0"), g)]))
    rows += retention(str(base / "retention"), g)
    return rows


def print_steady(rows: list[tuple[str, int, list[tuple[float, list[float]]]]], mib: float) -> None:
    print(f"\nsteady state, forked processes: {len(rows[0][2])} writes per process, median of writes 2..; first write apart")
    print(f"{'layout':<12} {'parts':>5} {'1st s':>7} {'median s':>9} {'MiB/s':>7} {'vs 1':>6} {'CPU ms/part':>12} {'CPU ms sum':>11}")
    one = None
    for label, ranks, per in rows:
        wall = statistics.median(w for w, _ in per[1:])
        cpu_part = statistics.median(c for _, cs in per[1:] for c in cs)
        cpu_sum = statistics.median(sum(cs) for _, cs in per[1:])
        one = wall if (label, ranks) == ("parts/proc", 1) else one
        ratio = f"{wall / one:6.2f}" if one else ""
        print(
            f"{label:<12} {ranks:>5} {per[0][0]:7.3f} {wall:9.4f} {mib / wall:7.0f} {ratio:>6} {cpu_part * 1e3:12.1f} {cpu_sum * 1e3:11.1f}"
        )


def print_mpi(results: dict[int, dict], mib: float, gathered: dict[int, dict]) -> None:
    """Parts per rank against one writer: the 1-rank write, and (``vs gather``) the same ranks gathering to rank 0
    and writing one file, the other design issue 23 asks to measure."""
    rounds = len(next(iter(results.values()))["walls"])
    print(f"\nMPI ranks (mpiexec -n N, PartManager per rank, rank 0 commits), barrier to committed set, median of {rounds} rounds")
    print(
        f"{'ranks':>5} {'median s':>9} {'MiB/s':>7} {'vs 1 writer':>12} {'gather+1 s':>11} {'vs gather':>10} {'CPU ms/rank':>12} {'CPU ms sum':>11}  samples"
    )
    one = statistics.median(results[1]["walls"]) if 1 in results else None
    for ranks, r in sorted(results.items()):
        wall = statistics.median(r["walls"])
        cpu_rank = statistics.median(c for cs in r["cpus"] for c in cs)
        cpu_sum = statistics.median(sum(cs) for cs in r["cpus"])
        ratio = f"{wall / one:.2f}" if one else ""
        gat = statistics.median(gathered[ranks]["walls"]) if ranks in gathered else None
        gcol, gratio = (f"{gat:.4f}", f"{wall / gat:.2f}") if gat else ("", "")
        samples = " ".join(f"{w:.3f}" for w in r["walls"])
        print(
            f"{ranks:>5} {wall:9.4f} {mib / wall:7.0f} {ratio:>12} {gcol:>11} {gratio:>10} {cpu_rank * 1e3:12.1f} {cpu_sum * 1e3:11.1f}  {samples}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--mpi-child", "--mpi-gather-child"):
        n, warm, rounds, folder, out = sys.argv[2:7]
        (mpi_child if sys.argv[1] == "--mpi-child" else mpi_gather_child)(int(n), int(warm), int(rounds), folder, out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--writes", type=int, default=6, help="checkpoints per writer process (steady state)")
    ap.add_argument("--rounds", type=int, default=7, help="timed MPI rounds (after --warm)")
    ap.add_argument("--warm", type=int, default=2, help="MPI rounds not timed (first writes of each rank)")
    ap.add_argument("--repeat", type=int, default=3, help="samples of the first-write thread rows")
    ap.add_argument("--dir", default=None, help="where the folders go (default: a temporary folder)")
    ap.add_argument("--no-mpi", action="store_true", help="skip the mpiexec rows")
    args = ap.parse_args()
    g = fields(args.n)
    mib = sum(a.nbytes for a in g.values()) / 2**20
    base = Path(tempfile.mkdtemp(prefix="rkbench-sets-", dir=args.dir))
    run_threads(str(base / "warm-up"), fields(8), 2)  # imports and first-use costs, before any process forks
    try:
        mpi, gathered = {}, {}
        if not args.no_mpi:  # interleaved by rank count: a noisy neighbour hits both designs alike
            for r in (1, 2, 4):
                mpi[r] = run_mpi(base, args.n, r, args.warm, args.rounds)
                if r > 1:
                    gathered[r] = run_mpi(base, args.n, r, args.warm, args.rounds, "--mpi-gather-child")
        steady = steady_rows(base, g, args.writes)
        rows = other_rows(base, g, args.repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"global state: 2 x {args.n}^3 float32 = {mib:.0f} MiB; durable writes; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if mpi:
        print_mpi(mpi, mib, gathered)
    print_steady(steady, mib)
    print(f"\n{'other':<24} {'parts':>5} {'best s':>8} {'MiB/s':>8}  samples")
    for label, ranks, samples in rows:
        best = min(samples)
        rate = "" if label.startswith(("commit", "gc_sets", "latest_set")) else f"{mib / best:8.0f}"
        print(f"{label:<24} {ranks:>5} {best:8.3f} {rate:>8}  {' '.join(f'{s:.3f}' for s in samples)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
