"""Run by tests/test_mpi_kernels.py under ``mpiexec -n K python tests/mpi_kernels_helper.py MODE OUTDIR``.

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw; the test asserts on
those files (a rank that hangs is caught by the test's ``timeout``).

Modes:
- ``comm``: every Comm operation once, with values that show the order.
- ``lost-exit``: rank 1 leaves without a word; the others must raise RankLost.
- ``lost-stop``: rank 1 stops (SIGSTOP, a hung rank); the others must raise RankLost.
- ``lost-kill``: rank 1 is SIGKILLed; the launcher or RankLost must end the others.
- ``slabs-wavesim`` / ``slabs-traveltime``: a decomposed kernel on NumPy against the
  whole grid in the same process, step by step and through sampled batches.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from rkkernel.comm import RankLost, world


def _comm(out: dict) -> None:
    c = world()
    low = np.full((2, 3, 4), c.rank, np.float32) if c.rank > 0 else None
    high = np.full((2, 3, 4), 100 + c.rank, np.float32) if c.rank < c.size - 1 else None
    got_low, got_high = c.exchange_planes(low, high)
    out["from_below"] = None if got_low is None else float(got_low.mean())
    out["from_above"] = None if got_high is None else float(got_high.mean())
    out["sum"] = c.allreduce_int(c.rank + 1, "sum")
    out["max"] = c.allreduce_int(c.rank * 7, "max")
    out["min"] = c.allreduce_int(c.rank - 5, "min")
    arrays = c.gather_arrays(np.arange(c.rank + 1, dtype=np.int16))
    out["arrays"] = None if arrays is None else [[a.dtype.str, a.tolist()] for a in arrays]
    out["docs"] = c.gather_json({"rank": c.rank, "x": [c.rank, 0.1]})
    out["bcast"] = c.bcast_json({"from": c.rank, "v": 1.5} if c.rank == 0 else None)
    c.barrier()
    out["size"], out["kind"] = c.size, type(c).__name__


def _lost(out: dict, how: str, path: Path) -> None:
    c = world(timeout=2.0)
    c.barrier()
    if c.rank == 1:
        if how in ("kill", "stop"):  # dies, or hangs (a stopped process: its peers must not wait forever)
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        sys.exit(0)  # leaves early (MPI finalized): the others' next collective cannot complete
    t0 = time.monotonic()
    try:
        c.allreduce_int(1, "sum")
        c.barrier()
        out["lost"] = None
    except RankLost as exc:
        out["lost"] = str(exc)
    out["waited"] = time.monotonic() - t0
    path.write_text(json.dumps(out))
    os._exit(3)  # each survivor reports, then leaves without MPI_Finalize (which would wait for the lost rank)


def _slabs(out: dict, kernel: str) -> None:
    from rkkernel.decomp import slab_run
    from rkkernel.runtime import PersistentKernel
    from rkkernel.wavesim import SWEEP_LEVELS, WaveParams

    p = WaveParams(20, 12, 17)
    if kernel == "wavesim":
        from rkkernel.wavesim import make_spec

        fields, halo = ("pressure_a", "pressure_b"), SWEEP_LEVELS
    else:
        from rkkernel.traveltime import make_spec  # type: ignore[assignment]

        fields, halo = ("time_a", "time_b"), SWEEP_LEVELS
    d = slab_run(p.nz, halo, fields)
    assert d is not None
    whole = PersistentKernel(make_spec(p), "numpy")
    part = PersistentKernel(make_spec(p, decomp=d), "numpy")
    bad = []
    for n in (1, 2, 1, 3, 5, 1, 4):  # batches that do and do not line up with the halo depth
        whole.run(n)
        part.run(n)
        for f in fields:
            if whole.region(f)[d.slab.z0 : d.slab.z1].tobytes() != part.region(f)[d.slab.owned_slice()].tobytes():
                bad.append([whole.step, f])
    if kernel == "wavesim":  # sampled batches: plane sums of the owned planes, totalled over the ranks
        s0 = whole.step
        samples = [(s0 + 2, "pressure_a"), (s0 + 5, "pressure_b"), (s0 + 9, "pressure_b")]
        _, ws = whole.run_sampled(9, samples)
        _, ps = part.run_sampled(9, samples)
        out["sums_equal"] = [_total(w) == d.total(q) for w, q in zip(ws, ps, strict=True)]
        # cells in every rank's slab, each read by its owner and gathered in order
        cells = [(x, 5, z) for x, z in ((3, 0), (4, 16), (5, 7), (6, 12), (7, 2), (8, 6))]
        field = part.region("pressure_a")
        got = d.gather_values(cells, lambda x, y, z: float(field[z, y, x]))
        ref = whole.region("pressure_a")
        out["values_equal"] = got == [float(ref[z, y, x]) for x, y, z in cells]
    else:
        last = d.max_int(int(part.region("last_change")[0]))
        out["last_change_equal"] = last == int(whole.region("last_change")[0])
    out["bad"] = bad
    out["slab"] = [d.slab.z0, d.slab.z1, d.slab.lo, d.slab.hi]


def _total(planes: np.ndarray) -> float:
    from rkkernel.reduce import combine_planes

    return combine_planes(planes)


def main() -> None:
    mode, outdir = sys.argv[1], Path(sys.argv[2])
    c = world()
    path = outdir / f"rank{c.rank}.json"
    out: dict = {"rank": c.rank}
    if mode == "comm":
        _comm(out)
    elif mode.startswith("lost-"):
        _lost(out, mode[5:], path)
        return
    else:
        _slabs(out, mode.split("-", 1)[1])
    path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
