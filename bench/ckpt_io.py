"""Checkpoint I/O benchmark (issue 2): rkckpt vs raw disk, np.save and h5py.

Prints save+fsync and cold-load GB/s on a 128 MiB two-field float32 wave
state, ratios against the raw disk figures of the same run, and delta sizes.
Cold reads drop the file from the page cache (fsync, then
posix_fadvise(DONTNEED)) before reading. Each figure is the best of --repeat.

    python3 bench/ckpt_io.py [--mib 128] [--repeat 3] [--dir DIR] [--no-large]

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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rkckpt-bench-", dir=args.dir))
    try:
        run(args, work)
        if not args.no_large:
            large(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    p, v = wave_fields(args.mib)
    nbytes = p.nbytes + v.nbytes
    gb = nbytes / 1e9
    ck = Checkpoint(Metadata("bench", "wave_3d", 1), created_at=1)
    ck.add_region("pressure", p)
    ck.add_region("velocity", v)
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
