"""Parts written by real MPI ranks (mpiexec from the mpich wheel), each with its own storage handle and manager.

Rank 0 holds the folder's writer lock; the other ranks write without it, as
multi-rank steps do. Each rank reports its part (name, digest, planes) to
rank 0, which commits the set only after every part is durable. The set is
then read back on a different rank count, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TESTS
from rkckpt import ckptset
from rkckpt.storage import FileStorage
from set_helpers import KID, assert_reads_back

RANK_SCRIPT = """
import sys, json
sys.path.insert(0, {tests!r})
from mpi4py import MPI
from set_helpers import KID, NZ, global_state, local_state, split
from rkckpt import ckptset
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.storage import FileStorage

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
storage = FileStorage({folder!r})
policy = CheckpointPolicy(every_steps=1, keep_chains=None, delta_try_fraction=1.0)
# Rank 0 takes the folder's writer lock (which removes leftover temporary files) before any other
# rank writes a byte: taken later, it would delete another rank's part while that is being written.
if rank == 0:
    mgr = CheckpointManager(storage, policy, ckptset.part_kernel_id(KID, rank, size))
comm.Barrier()
if rank:
    storage.acquire_lock = lambda: None  # rank 0 holds the lock for the whole step
    mgr = CheckpointManager(storage, policy, ckptset.part_kernel_id(KID, rank, size))
for step in (10, 11):
    ck, offset = local_state(global_state(step), step, rank, size)
    mgr.final(SnapshotResponse(SnapshotRequest(step, "final"), ck))
    z0, z1 = split(NZ, size)[rank]
    part = ckptset.written_part(storage, KID, rank, size, step, z0, z1, offset)
    parts = comm.gather(json.dumps(part.__dict__), root=0)
    if rank == 0:
        ps = tuple(ckptset.Part(**json.loads(p)) for p in parts)
        s = ckptset.CheckpointSet(KID, step, "mpi-run", size, NZ, ("p", "q"), ps)
        print("committed", ckptset.commit_set(storage, s), flush=True)
    comm.Barrier()
"""


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (mpich wheel) is not installed")
def test_parts_written_by_mpi_ranks_restore_on_another_rank_count(tmp_path: Path) -> None:
    folder = tmp_path / "mpi"
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(tests=str(TESTS), folder=str(folder)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(["mpiexec", "-n", "3", sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("committed") == 2
    storage = FileStorage(folder)
    s = ckptset.latest_set(storage, KID, run_id="mpi-run")
    assert s is not None and (s.step, s.ranks) == (11, 3)
    assert_reads_back(storage, s, 11, 2)
    assert_reads_back(storage, s, 11, 4)
