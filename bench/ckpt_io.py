"""Checkpoint I/O benchmark (issue 2): rkckpt vs raw disk, np.save and h5py.

Prints save+fsync and cold-load GB/s on a 128 MiB two-field float32 wave
state, ratios against the raw disk figures of the same run, and delta sizes.
Cold reads drop the file from the page cache (fsync, then
posix_fadvise(DONTNEED)) before reading. Each figure is the best of --repeat.

    python3 bench/ckpt_io.py [--mib 128] [--repeat 3] [--dir DIR] [--no-large]
    python3 bench/ckpt_io.py --h5-rounds 5 [--mib 128] [--fresh-mib 16] [--compare OLD_PLUGIN_DIR]

``--h5-rounds N`` runs only the ``.rk.h5`` figures of issue 19 item 5, in N
interleaved rounds (the order of the operations shuffled in each round) and
prints medians: save and cold load into fresh memory against the raw disk in
this process, then cold loads in fresh processes (import and load timed
apart, ``.rk.h5`` against ``.rkcp``), and what the libhdf5 probe costs per
file. ``--compare DIR`` also runs the fresh-process loads with
``PYTHONPATH=DIR`` (e.g. ``/work/main/plugin``, the old code) in the same
rounds, each version reading files it wrote itself.

Unless --no-large (or less than 10 GiB free), it also round-trips a 3 GiB
state (sharded extension) in two fresh processes and prints their peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rkckpt import codec, container, hdf5
from rkckpt.chain import checkpoint_name, load_checkpoint
from rkckpt.delta import make_delta
from rkckpt.model import Checkpoint, Metadata
from rkckpt.storage import FileStorage


def wave_fields(mib: int) -> tuple[np.ndarray, np.ndarray]:
    """Two float32 fields (pressure, velocity) of a spread-out travelling wave."""
    n = (mib << 20) // 8  # floats per field
    side = round(n ** (1 / 3))
    nz = n // (side * side)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, k, dtype=np.float32) for k in (nz, side, side)), indexing="ij", sparse=True)
    r = np.sqrt(x * x + y * y + z * z)
    p = (np.sin(40 * r - 3 * x) * np.exp(-2 * r * r)).astype(np.float32)
    v = (np.cos(40 * r + 2 * y) * np.exp(-2 * r * r)).astype(np.float32)
    return p, v


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def best(fn: Callable[[], object], repeat: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-large", action="store_true", help="skip the 3 GiB sharded round trip")
    ap.add_argument("--h5-rounds", type=int, default=0, help="only the .rk.h5 figures, in N interleaved rounds (medians)")
    ap.add_argument("--fresh-mib", type=int, default=16, help="state size of the fresh-process loads (16 MiB: two 128^3 fields)")
    ap.add_argument("--compare", default=None, help="plugin folder of another version for the fresh-process loads")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rkckpt-bench-", dir=args.dir))
    try:
        if args.h5_rounds:
            h5_rounds(args, work)
            return
        run(args, work)
        if not args.no_large:
            large(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wave_state(mib: int) -> tuple[np.ndarray, np.ndarray, Checkpoint]:
    """The two wave fields of about ``mib`` MiB and the checkpoint holding them (both benchmarks' state)."""
    p, v = wave_fields(mib)
    ck = Checkpoint(Metadata("bench", "wave_3d", 1), created_at=1)
    ck.add_region("pressure", p)
    ck.add_region("velocity", v)
    return p, v, ck


def run(args: argparse.Namespace, work: Path) -> None:
    p, v, ck = _wave_state(args.mib)
    nbytes = p.nbytes + v.nbytes
    gb = nbytes / 1e9
    print(f"state: 2 float32 fields {p.shape}, {nbytes / 2**20:.0f} MiB; cpus={os.cpu_count()}; dir={work}")
    rows: list[tuple[str, float, float]] = []

    # raw disk: write + fsync to a fresh file, cold read into a preallocated buffer
    raw = work / "raw.bin"

    def raw_write() -> None:
        raw.unlink(missing_ok=True)
        with open(raw, "wb", buffering=0) as f:
            f.write(memoryview(p).cast("B"))
            f.write(memoryview(v).cast("B"))
            os.fsync(f.fileno())

    buf = np.empty(nbytes, np.uint8)

    def raw_read() -> None:
        with open(raw, "rb", buffering=0) as f:
            mv, got = memoryview(buf), 0
            while got < nbytes:
                got += f.readinto(mv[got:])

    rows.append(("raw bytes", gb / best(raw_write, args.repeat), gb / best(raw_read, args.repeat, lambda: drop_cache(raw))))

    def raw_read_fresh() -> None:  # what any loader that returns new memory pays on top: first-touch page faults
        fresh = np.empty(nbytes, np.uint8)
        with open(raw, "rb", buffering=0) as f:
            mv, got = memoryview(fresh), 0
            while got < nbytes:
                got += f.readinto(mv[got:])

    fresh_r = gb / best(raw_read_fresh, args.repeat, lambda: drop_cache(raw))

    def rk(name: str, path: Path, options: codec.WriteOptions) -> None:
        def save() -> None:
            path.unlink(missing_ok=True)
            container.write(path, ck, options)

        def load() -> None:
            got = container.load(path)
            assert got.chunks[0].size == p.nbytes

        rows.append((name, gb / best(save, args.repeat), gb / best(load, args.repeat, lambda: drop_cache(path))))
        print(f"  {name}: {path.stat().st_size / 2**20:.1f} MiB on disk")

    rk("rkckpt .rkcp", work / "s.rkcp", codec.WriteOptions())
    rk("rkckpt .rkcp compat", work / "c.rkcp", codec.COMPAT)
    rk("rkckpt .rkcp adaptive=size", work / "z.rkcp", codec.WriteOptions(adaptive="size"))
    rk("rkckpt .rk.h5", work / "s.rk.h5", codec.WriteOptions())
    h5_row = len(rows) - 1
    # the emitted form: what CheckpointManager writes (FileStorage temp file, fsync, rename)
    store = FileStorage(work / "store")
    name = checkpoint_name("bench", 1, "full", "rk.h5")

    def emitted_save() -> None:
        store.save(name, lambda f: hdf5.write_to(f, ck, codec.WriteOptions()))

    def emitted_load() -> None:
        assert load_checkpoint(store, name).chunks[0].size == p.nbytes

    emitted_save()
    rows.append(
        (
            "rkckpt .rk.h5 (manager)",
            gb / best(emitted_save, args.repeat),
            gb / best(emitted_load, args.repeat, lambda: drop_cache(store.path(name))),
        )
    )
    store.close()
    # raw again, right after: on a shared machine the disk's speed drifts; the better raw figure is the reference
    again = (gb / best(raw_write, args.repeat), gb / best(raw_read, args.repeat, lambda: drop_cache(raw)))
    rows.insert(1, ("raw bytes (again)", *again))
    h5_row += 1

    npy = work / "s.npz"

    def np_save() -> None:
        with open(npy, "wb") as f:
            np.save(f, p)
            np.save(f, v)
            f.flush()
            os.fsync(f.fileno())

    def np_load() -> None:
        with open(npy, "rb") as f:
            np.load(f)
            np.load(f)

    rows.append(("np.save", gb / best(np_save, args.repeat), gb / best(np_load, args.repeat, lambda: drop_cache(npy))))

    import h5py

    def h5(name: str, path: Path, **kw: object) -> None:
        def save() -> None:
            with h5py.File(path, "w") as f:
                f.create_dataset("pressure", data=p, **kw)
                f.create_dataset("velocity", data=v, **kw)
            fsync_path(path)

        def load() -> None:
            with h5py.File(path, "r") as f:
                f["pressure"][...]
                f["velocity"][...]

        rows.append((name, gb / best(save, args.repeat), gb / best(load, args.repeat, lambda: drop_cache(path))))
        print(f"  {name}: {path.stat().st_size / 2**20:.1f} MiB on disk")

    h5("h5py contiguous", work / "c.h5")
    try:
        import hdf5plugin

        h5("h5py + zstd (hdf5plugin)", work / "z.h5", chunks=(1, p.shape[1], p.shape[2]), **hdf5plugin.Zstd(clevel=1))
    except ImportError:
        print("  note: hdf5plugin not installed, h5py+zstd skipped")

    raw_w, raw_r = max(rows[0][1], rows[1][1]), max(rows[0][2], rows[1][2])
    print(f"\n{'format':28s} {'save GB/s':>10s} {'load GB/s':>10s} {'save/raw':>9s} {'load/raw':>9s}")
    print(
        f"(raw load reads into one buffer reused across repeats; into a fresh buffer each time: {fresh_r:.3f} GB/s = {fresh_r / raw_r:.2f}x)"
    )
    for name, w, r in rows:
        print(f"{name:28s} {w:10.3f} {r:10.3f} {w / raw_w:9.2f} {r / raw_r:9.2f}")

    # deltas: three equal regions
    third = p.size // 3
    regions = [p.reshape(-1)[i * third : (i + 1) * third].copy() for i in range(3)]

    def state(arrs: list[np.ndarray], step: int) -> Checkpoint:
        c = Checkpoint(Metadata("bench", "wave_3d", step), created_at=step)
        for i, a in enumerate(arrs):
            c.add_region(f"r{i}", a)
        return c

    base = state(regions, 1)
    region_bytes = regions[0].nbytes
    changed_a = [regions[0], (regions[1] * np.float32(0.5) + np.float32(0.1)).astype(np.float32), regions[2]]
    r1 = regions[1].copy()
    start = r1.size // 3
    r1[start : start + r1.size // 20] += np.float32(0.25)  # 5 % of one region's bytes, one place
    changed_b = [regions[0], r1, regions[2]]
    print(f"\ndeltas (three regions of {region_bytes / 2**20:.1f} MiB each; file sizes, default options):")
    for label, arrs in (("(a) one region changed", changed_a), ("(b) 5% of one region", changed_b)):
        for mode in ("whole", "block"):
            d = make_delta(base, state(arrs, 2), mode=mode)
            path = work / f"d-{mode}.rkcp"
            size = container.write(path, d, codec.WriteOptions())
            print(f"  {label:24s} {mode:5s}: {size / 2**20:8.2f} MiB = {size / region_bytes * 100:6.2f} % of a region")
    db = container.write(work / "db.rkcp", make_delta(base, state(changed_b, 2), mode="block"), codec.WriteOptions())
    rk_w, rk_r = rows[2][1], rows[2][2]
    print("\ntargets (against the better of the two raw figures):")
    print(f"  save .rkcp >= 0.85x raw: {rk_w / raw_w:.2f}x {'OK' if rk_w >= 0.85 * raw_w else 'MISSED'}")
    print(f"  load .rkcp >= 0.85x raw: {rk_r / raw_r:.2f}x {'OK' if rk_r >= 0.85 * raw_r else 'MISSED'}")
    for i in (h5_row, h5_row + 1):
        label, w, r = rows[i]
        print(f"  save {label} >= 0.95x raw: {w / raw_w:.2f}x {'OK' if w >= 0.95 * raw_w else 'MISSED'}")
        print(
            f"  load {label} >= 0.95x raw: {r / raw_r:.2f}x {'OK' if r >= 0.95 * raw_r else 'MISSED'}"
            f" ({r / fresh_r:.2f}x the raw read into a fresh buffer, which a loader returning new memory pays)"
        )
    print(f"  block delta (b) <= 6 % of region: {db / region_bytes * 100:.2f} % {'OK' if db <= 0.06 * region_bytes else 'MISSED'}")


_FRESH = """
import json, sys, time
t0 = time.perf_counter()
from rkckpt import container
t1 = time.perf_counter()
ck = container.load(sys.argv[1])
t2 = time.perf_counter()
assert ck.chunks[0].size > 0
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "h5py": "h5py" in sys.modules}))
"""

_FRESH_WRITE = """
import sys, numpy as np
from rkckpt import codec, container
from rkckpt.model import Checkpoint, Metadata
n = int(sys.argv[2]) << 20
ck = Checkpoint(Metadata("bench", "wave_3d", 1), created_at=1)
rng = np.random.default_rng(1)
ck.add_region("pressure", rng.random(n // 8, dtype=np.float32))
ck.add_region("velocity", rng.random(n // 8, dtype=np.float32))
container.write(sys.argv[1], ck, codec.WriteOptions())
"""


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def h5_rounds(args: argparse.Namespace, work: Path) -> None:
    """Issue 19 item 5: .rk.h5 save/load against raw, interleaved rounds, medians (see the module docstring)."""
    import random

    p, v, ck = _wave_state(args.mib)
    nbytes = p.nbytes + v.nbytes
    gb = nbytes / 1e9
    raw, h5p, rkcp = work / "raw.bin", work / "s.rk.h5", work / "s.rkcp"
    store = FileStorage(work / "store")
    name = checkpoint_name("bench", 1, "full", "rk.h5")

    def raw_write() -> None:
        raw.unlink(missing_ok=True)
        with open(raw, "wb", buffering=0) as f:
            f.write(memoryview(p).cast("B"))
            f.write(memoryview(v).cast("B"))
            os.fsync(f.fileno())

    def raw_read_fresh() -> None:
        fresh = np.empty(nbytes, np.uint8)
        with open(raw, "rb", buffering=0) as f:
            mv, got = memoryview(fresh), 0
            while got < nbytes:
                got += f.readinto(mv[got:])

    def h5_save() -> None:
        h5p.unlink(missing_ok=True)
        container.write(h5p, ck, codec.WriteOptions())

    def h5_load() -> None:
        assert container.load(h5p).chunks[0].size == p.nbytes

    def rkcp_save() -> None:
        rkcp.unlink(missing_ok=True)
        container.write(rkcp, ck, codec.WriteOptions())

    def rkcp_load() -> None:
        assert container.load(rkcp).chunks[0].size == p.nbytes

    def mgr_save() -> None:
        store.save(name, lambda f: hdf5.write_to(f, ck, codec.WriteOptions()))

    def mgr_load() -> None:
        assert load_checkpoint(store, name).chunks[0].size == p.nbytes

    ops: dict[str, tuple[Callable[[], object], Callable[[], object] | None, bool]] = {
        "raw write": (raw_write, None, True),
        "raw cold read (fresh)": (raw_read_fresh, lambda: drop_cache(raw), False),
        ".rk.h5 save": (h5_save, None, True),
        ".rk.h5 cold load": (h5_load, lambda: drop_cache(h5p), False),
        ".rk.h5 save (manager)": (mgr_save, None, True),
        ".rk.h5 cold load (manager)": (mgr_load, lambda: drop_cache(store.path(name)), False),
        ".rkcp save": (rkcp_save, None, True),
        ".rkcp cold load": (rkcp_load, lambda: drop_cache(rkcp), False),
    }
    for fn in (raw_write, h5_save, mgr_save, rkcp_save):
        fn()  # the files exist before the first load
    times: dict[str, list[float]] = {k: [] for k in ops}
    rng = random.Random(0)
    for _ in range(args.h5_rounds):
        order = list(ops)
        rng.shuffle(order)
        for k in order:
            fn, before, _w = ops[k]
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    store.close()
    med = {k: gb / _median(t) for k, t in times.items()}
    print(f"state {nbytes / 2**20:.0f} MiB, {args.h5_rounds} interleaved rounds, medians (GB/s); cpus={os.cpu_count()}")
    print(f"{'operation':30s} {'GB/s':>8s} {'x raw':>7s}")
    for k in ops:
        ref = med["raw write"] if ops[k][2] else med["raw cold read (fresh)"]
        print(f"{k:30s} {med[k]:8.3f} {med[k] / ref:7.2f}")
    for k, target in ((".rk.h5 save", "raw write"), (".rk.h5 cold load", "raw cold read (fresh)")):
        r = med[k] / med[target]
        print(f"  target {k} >= 0.95x {target}: {r:.2f}x {'OK' if r >= 0.95 else 'MISSED'}")

    # fresh processes: cold load of a --fresh-mib state, import and load timed apart
    versions = {"this": str(Path(hdf5.__file__).parents[1])}
    if args.compare:
        versions["compare"] = args.compare
    files: dict[tuple[str, str], Path] = {}
    # bytecode cached outside the source trees, as an installed package has it (no compile in the timings)
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    base_env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    for label, plugin in versions.items():
        env = dict(base_env, PYTHONPATH=plugin)
        for fmt in ("rk.h5", "rkcp"):
            path = work / f"fresh-{label}.{fmt}"
            subprocess.run([sys.executable, "-c", _FRESH_WRITE, str(path), str(args.fresh_mib)], check=True, env=env)
            files[(label, fmt)] = path
            subprocess.run([sys.executable, "-c", _FRESH, str(path)], check=True, capture_output=True, env=env)  # warm the cache
    fresh: dict[tuple[str, str], list[dict]] = {k: [] for k in files}
    for _ in range(args.h5_rounds):
        order = list(files)
        rng.shuffle(order)
        for key in order:
            drop_cache(files[key])
            env = dict(base_env, PYTHONPATH=versions[key[0]])
            out = subprocess.run([sys.executable, "-c", _FRESH, str(files[key])], check=True, capture_output=True, text=True, env=env)
            fresh[key].append(json.loads(out.stdout))
    print(f"\nfresh process, cold {args.fresh_mib} MiB state, {args.h5_rounds} interleaved rounds, medians (ms):")
    print(f"{'version':10s} {'format':7s} {'import rkckpt':>14s} {'load':>8s} {'h5py imported':>14s}")
    for (label, fmt), runs in fresh.items():
        imp = _median([r["import"] for r in runs]) * 1e3
        load = _median([r["load"] for r in runs]) * 1e3
        print(f"{label:10s} {fmt:7s} {imp:14.1f} {load:8.1f} {str(runs[0]['h5py']):>14s}")
    for label, plugin in versions.items():
        print(f"  {label}: PYTHONPATH={plugin}")

    # what the libhdf5 probe costs per file (a file that is not laid out as rkckpt writes it takes it)
    small = work / "probe.rk.h5"
    container.write(small, Checkpoint(Metadata("bench", "wave_3d", 1), created_at=1), codec.WriteOptions())
    costs = []
    for _ in range(max(5, args.h5_rounds)):
        t = time.perf_counter()
        assert hdf5._probe_child(str(small), 30.0) is None
        costs.append(time.perf_counter() - t)
    print(f"\nlibhdf5 probe (fork, open, attributes, tables) per file, h5py already imported: median {_median(costs) * 1e3:.1f} ms")


_LARGE_WRITE = """
import json, os, sys, time, numpy as np
from rkckpt import codec, container
from rkckpt.model import Checkpoint, Metadata
n, step = 3 << 30, 1 << 24
ck = Checkpoint(Metadata("big", "wave_3d", 1), created_at=1)
rng = np.random.default_rng(0)
for name, size in (("pressure", n // 4 * 3 // 4), ("velocity", n // 16)):
    a = np.empty(size, np.float32)
    for s in range(0, size, step):
        x = np.arange(s, min(size, s + step), dtype=np.float32)
        a[s : s + step] = np.sin(x * np.float32(1e-4)) + rng.random(x.size, dtype=np.float32) * np.float32(1e-3)
    ck.add_region(name, a)
t = time.perf_counter()
size = container.write(sys.argv[1], ck, codec.WriteOptions())
dt = time.perf_counter() - t
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"digest": ck.content_digest(), "size": size, "seconds": dt, "hwm": hwm, "state": n}))
"""

_LARGE_READ = """
import json, sys, time
from rkckpt import container
t = time.perf_counter()
ck = container.load(sys.argv[1])
dt = time.perf_counter() - t
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"digest": ck.content_digest(), "seconds": dt, "hwm": hwm}))
"""


def large(work: Path) -> None:
    """3 GiB state through the sharded extension, each side in a fresh process."""
    if shutil.disk_usage(work).free < 10 << 30:
        print("\n3 GiB round trip skipped: less than 10 GiB free disk")
        return
    path = work / "large.rkcp"

    def run(code: str) -> dict:
        out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    w = run(_LARGE_WRITE)
    drop_cache(path)
    r = run(_LARGE_READ)
    state = w["state"]
    ok = r["digest"] == w["digest"]
    print(
        f"\n3 GiB state (sharded): file {w['size'] / 2**30:.2f} GiB, save {state / w['seconds'] / 1e9:.2f} GB/s, cold load {state / r['seconds'] / 1e9:.2f} GB/s"
    )
    print(
        f"  peak RSS: writer {w['hwm'] / state:.2f}x state, reader {r['hwm'] / state:.2f}x state; digest {'matches' if ok else 'DIFFERS'}"
    )
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
