"""First-arrival traveltimes through the wave model: a kernel whose state changes sparsely.

Shortest-path relaxation on the grid graph (26 neighbours, edge length
dx, dx*sqrt 2, dx*sqrt 3, weighted by the receiving cell's slowness), in
Jacobi order: step s reads only the field after s-1 steps (ping-pong
between ``time_a`` and ``time_b``), so every step's bits are fixed and the
same on NumPy, OpenCL and CUDA (see kernels/traveltime.cl). The source cell
starts at 0 s, everything else at +inf; each step the front moves one cell
and cells behind it settle, so between two checkpoints only a shell around
the front changes: block deltas stay small. Once a step changes nothing the
field is the final answer; ``last_change`` holds the last step count that
changed a cell, and the run stops there.

Wall cells (the outermost layer) are not computed and stay +inf, like the
wave kernel's rigid walls.

On a CPU OpenCL device, ``SWEEP_LEVELS`` steps run in one sweep over z
(``tt_sweep``, temporal blocking as wavesim's ``fdtd_sweep``, 16-cell
vectors, two rows at a time); elsewhere one ``tt_step`` launch per step.
Both only regroup exact minima, so the bits are the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .spec import CONTROL, SYNC, FusedSteps, KernelSpec, Launch, RegionSpec, Swap
from .wavesim import SWEEP_LEVELS, WaveParams, velocity_model

if TYPE_CHECKING:
    from .decomp import SlabRun

KERNEL_TYPE = "traveltime_3d"
F32 = np.float32
VERSION = 1  # bump when the arithmetic changes


@dataclass(frozen=True)
class Weights:
    """Edge lengths in metres for the three neighbour distances, as float32."""

    h1: np.float32
    h2: np.float32
    h3: np.float32

    @classmethod
    def for_dx(cls, dx: float) -> Weights:
        return cls(F32(dx), F32(dx * math.sqrt(2.0)), F32(dx * math.sqrt(3.0)))


def slowness(velocity: np.ndarray) -> np.ndarray:
    """1/v in float64, stored as float32 (the host computes it once: no division on a device)."""
    return np.ascontiguousarray(1.0 / velocity.astype(np.float64), dtype=F32)


def current_time(regions: Mapping[str, np.ndarray], step: int) -> np.ndarray:
    """The traveltime field after ``step`` steps."""
    return regions["time_a"] if step % 2 == 0 else regions["time_b"]


def numpy_step(regions: Mapping[str, np.ndarray], step: int, *, w: Weights, counted: tuple[int, int] | None = None) -> None:
    """Exactly the arithmetic of ``tt_step`` in kernels/traveltime.cl.

    ``counted``: the planes [z0, z1) whose changes set ``last_change`` (a slab
    of a decomposed run: its owned planes); default all.
    """
    c, nxt = (regions["time_a"], regions["time_b"]) if step % 2 == 0 else (regions["time_b"], regions["time_a"])
    s = regions["slowness"][1:-1, None, 1:-1]

    def at(dz: int, dy: int, dx: int) -> np.ndarray:
        nz, ny, nx = c.shape
        return c[1 + dz : nz - 1 + dz, 1 + dy : ny - 1 + dy, 1 + dx : nx - 1 + dx]

    mn = np.minimum
    m1 = mn(mn(at(0, 0, -1), at(0, 0, 1)), mn(mn(at(0, -1, 0), at(0, 1, 0)), mn(at(-1, 0, 0), at(1, 0, 0))))
    m2 = mn(
        mn(mn(at(0, -1, -1), at(0, -1, 1)), mn(at(0, 1, -1), at(0, 1, 1))),
        mn(mn(at(-1, 0, -1), at(-1, 0, 1)), mn(at(1, 0, -1), at(1, 0, 1))),
    )
    m2 = mn(m2, mn(mn(at(-1, -1, 0), at(-1, 1, 0)), mn(at(1, -1, 0), at(1, 1, 0))))
    m3 = mn(
        mn(mn(at(-1, -1, -1), at(-1, -1, 1)), mn(at(-1, 1, -1), at(-1, 1, 1))),
        mn(mn(at(1, -1, -1), at(1, -1, 1)), mn(at(1, 1, -1), at(1, 1, 1))),
    )
    old = at(0, 0, 0)
    t = mn(old, m1 + w.h1 * s)
    t = mn(t, m2 + w.h2 * s)
    t = mn(t, m3 + w.h3 * s)
    changed = t < old
    if counted is not None:
        changed = changed[max(0, counted[0] - 1) : max(0, counted[1] - 1)]
    if changed.any():
        regions["last_change"][0] = step + 1
    nxt[1:-1, 1:-1, 1:-1] = t


def make_spec(params: WaveParams, *, velocity: np.ndarray | None = None, decomp: SlabRun | None = None) -> KernelSpec:
    """The traveltime kernel's spec for the wave model ``params`` (and a user ``velocity``, as for wavesim).

    With ``decomp``: one rank's z slab (the same kernel on its local planes,
    ``decomp.halo`` steps between exchanges). Only its owned planes count for
    ``last_change``: the halo planes drift from the truth between exchanges
    (a stale neighbour plane can make one decrease late), the owned ones do
    not, so the maximum over the ranks is the single process's
    (``decomp.max_int``).
    """
    nx, ny, nz = params.nx, params.ny, params.nz
    if (velocity is None) != (params.model_sha256 is None):
        raise ValueError("pass the velocity model together with its digest (see load_velocity)")
    sx, sy, sz = params.source
    if not (0 < sx < nx - 1 and 0 < sy < ny - 1 and 0 < sz < nz - 1):
        raise ValueError(f"source {params.source} must be an interior cell of the {nx}x{ny}x{nz} grid")
    w = Weights.for_dx(params.dx)
    g0, counted = 0, (1, nz - 1)
    if decomp is not None:
        nz, g0 = decomp.slab.local_nz, decomp.slab.g0
        counted = (decomp.slab.lo, decomp.slab.lo + decomp.slab.owned)
    cz = (np.int32(counted[0]), np.int32(counted[1]))
    shape = (nz, ny, nx)
    regions = [
        RegionSpec("time_a", "<f4", shape, "field"),
        RegionSpec("time_b", "<f4", shape, "field"),
        RegionSpec("slowness", "<f4", (nz, nx), "static"),
        RegionSpec("last_change", "<u4", (1,), "field"),
    ]
    common = (CONTROL, Swap("time_a", "time_b"), Swap("time_b", "time_a"), "slowness", "last_change", w.h1, w.h2, w.h3)
    launch = Launch("tt_step", (nx - 2, ny - 2, nz - 2), (*common, np.int32(nx), np.int32(nx * ny), *cz))
    # SWEEP_LEVELS steps per sweep on CPU devices, one work item per slab (see tt_sweep)
    slabs = max(1, (nz - 2) // (2 * SWEEP_LEVELS))
    sweep_args = (*common, np.int32(nx), np.int32(nx * ny), np.int32(ny), np.int32(nz), *cz, SYNC, np.int32(SWEEP_LEVELS))
    # Any depth 1..SWEEP_LEVELS: even a 1-level tt_sweep is ~10x faster than tt_step on a CPU,
    # so --checkpoint-every 2 (the demo's) runs 2-level sweeps instead of single steps.
    fused = FusedSteps(
        SWEEP_LEVELS, (Launch("tt_sweep", (slabs,), sweep_args, (1,)),), sync_words=slabs, depth_arg=len(sweep_args) - 1, min_steps=1
    )

    def initial() -> dict[str, np.ndarray]:
        t = np.full(shape, np.inf, dtype=F32)
        if 0 <= sz - g0 < nz:
            t[sz - g0, sy, sx] = 0.0
        v = velocity_model(params) if velocity is None else velocity
        return {
            "time_a": t,
            "time_b": t.copy(),
            "slowness": slowness(v) if decomp is None else decomp.slab.take(slowness(v)),
            "last_change": np.zeros(1, dtype="<u4"),
        }

    def step(regions: Mapping[str, np.ndarray], s: int) -> None:
        numpy_step(regions, s, w=w, counted=None if decomp is None else counted)

    p = {k: getattr(params, k) for k in ("nx", "ny", "nz", "dx", "v_top", "v_bottom", "model_sha256")}
    return KernelSpec(
        kernel_type=KERNEL_TYPE,
        grid=(nx, ny, nz),
        regions=regions,
        launches=[launch],
        sources={"opencl": "traveltime.cl", "cuda": "traveltime.cu"},
        numpy_step=step,
        initial=initial,
        params={**p, "source": list(params.source), "version": VERSION},
        fused={"opencl": fused},
        halo_steps=decomp.halo if decomp is not None else 0,
        halo_exchange=decomp.exchange if decomp is not None else None,
    )


def converged_at(last_change: int, step: int) -> int | None:
    """The step count at which the run is known complete (a step changed nothing), or None."""
    return last_change + 1 if step > last_change else None
