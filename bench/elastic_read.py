"""Bytes and requests one rank reads to restore a 4-rank set on 2 ranks: by byte range versus whole parts.

The global state is two float32 fields of ``nz x n x n`` (default 64 x 128 x
128: 4 MiB each, smooth so zstd has something to do) split into 4 slabs
along z (one halo plane on each inner side), written as a full and then
``--deltas`` deltas (one row changes per step, so each delta is a small block
patch), with raw chunks or zstd-compressed ones (4 KiB frames). Rank 0 of 2
then restores planes [0, nz/2) plus 4 halo planes:

* ``range``: ``read_planes_of`` both fields and ``part_head`` of part 0 (what
  ``rkkernel.rankstate.read_set_state`` does on a new layout);
* ``whole``: part 0 materialised whole (for its control block, as before)
  and every part it overlaps materialised whole: what the earlier code did
  for parts that are delta chains (a full part with raw chunks was already
  read plane by plane; a compressed one region by region).

Every object read goes through a memory storage that counts bytes and
requests; a request is one ranged read (``read_range``) or one whole load.

Usage: PYTHONPATH=plugin:tests python bench/elastic_read.py [--n 128] [--nz 64] [--deltas 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from rkckpt import ckptset
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint, Chunk, ChunkType, Metadata
from rkckpt.storage import MemoryStorage
from rkkernel.decomp import plan

KID = "bench"
HALO = 4


class Counting(MemoryStorage):
    """Memory storage counting what is read: bytes and requests."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = self.requests = 0

    def load(self, name: str) -> bytes:
        data = super().load(name)
        self.bytes += len(data)
        self.requests += 1
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.bytes += length
        self.requests += 1
        return self._objects[name][offset : offset + length]

    def size(self, name: str) -> int:
        return len(self._objects[name])


def split(nz: int, ranks: int) -> list[tuple[int, int]]:
    """Each rank's owned planes [z0, z1), as rkrun splits the grid (``rkkernel.decomp.plan``)."""
    return [(s.z0, s.z1) for s in plan(nz, ranks, 1)]


def field(nz: int, n: int, step: int, phase: float) -> np.ndarray:
    z, y, x = np.meshgrid(np.arange(nz), np.arange(n), np.arange(n), indexing="ij", sparse=True)
    f = np.round(np.sin(phase + 0.1 * z + 0.05 * y + 0.02 * x), 3).astype(np.float32)
    f[step % nz, step % n, :] += step
    return f


def write(storage: Counting, nz: int, n: int, steps: list[int], compressed: bool) -> ckptset.CheckpointSet:
    policy = CheckpointPolicy(every_steps=1, keep_chains=None, full_every=64, delta_try_fraction=1.0)
    mgrs = [CheckpointManager(storage, policy, ckptset.part_kernel_id(KID, r, 4)) for r in range(4)]
    for m in mgrs:
        m.options = dataclasses.replace(m.options, adaptive="size", block_size=4096, compress=compressed)
    s = None
    for step in steps:
        g = {"p": field(nz, n, step, 0.0), "q": field(nz, n, step, 1.0)}
        parts = []
        for r, (z0, z1) in enumerate(split(nz, 4)):
            lo, hi = max(0, z0 - 1), min(nz, z1 + 1)
            ck = Checkpoint(Metadata(ckptset.part_kernel_id(KID, r, 4), "bench", step))
            ck.chunks.append(Chunk(int(ChunkType.CONTROL_BLOCK), 0, step.to_bytes(8, "little") * 16))
            for name in ("p", "q"):
                ck.add_region(name, g[name][lo:hi])
            mgrs[r].final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
            parts.append(ckptset.written_part(storage, KID, r, 4, step, z0, z1, z0 - lo))
        s = ckptset.CheckpointSet(KID, step, "bench", 4, nz, ("p", "q"), tuple(parts))
        s = dataclasses.replace(s, name=ckptset.commit_set(storage, s))
    assert s is not None
    return s


def restore(storage: Counting, s: ckptset.CheckpointSet, how: str) -> tuple[int, int, float]:
    z0, z1 = split(s.nz, 2)[0]
    a, b = max(0, z0 - HALO), min(s.nz, z1 + HALO)
    storage.bytes = storage.requests = 0
    t0 = time.perf_counter()
    if how == "range":
        ckptset.part_head(storage, s, 0)
        ckptset.read_planes_of(storage, s, ["p", "q"], a, b)
    else:
        ckptset.part_checkpoint(storage, s, 0)
        for p in ckptset.overlapping(s, a, b):
            ckptset.part_checkpoint(storage, s, p.rank)
    return storage.bytes, storage.requests, time.perf_counter() - t0


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--nz", type=int, default=64)
    ap.add_argument("--deltas", type=int, default=3)
    args = ap.parse_args(argv)
    plane = args.n * args.n * 4
    z0, z1 = split(args.nz, 2)[0]
    owned = (min(args.nz, z1 + HALO) - max(0, z0 - HALO)) * plane * 2
    print(f"4 -> 2 ranks, rank 0: planes [0, {z1}) + {HALO} halo of two {args.nz}x{args.n}x{args.n} float32 fields")
    print(f"  the planes themselves: {owned / 2**20:.2f} MiB")
    print(f"  {'parts':<12} {'path':<6} {'MiB read':>9} {'requests':>9} {'seconds':>8}")
    for compressed in (False, True):
        for deltas in (0, args.deltas):
            storage = Counting()
            s = write(storage, args.nz, args.n, list(range(10, 11 + deltas)), compressed)
            label = f"{'zstd' if compressed else 'raw'}+{deltas}d"
            for how in ("range", "whole"):
                nbytes, reqs, secs = restore(storage, s, how)
                print(f"  {label:<12} {how:<6} {nbytes / 2**20:>9.2f} {reqs:>9} {secs:>8.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
