"""Σx² of a 3-D float32 field in one fixed order: the reference for every back end's device reduction.

Why a fixed order: a float sum depends on the order of its additions, and
the wave kernel's energy series must have the same bits on NumPy, OpenCL
and CUDA, whether or not a run was interrupted, and (a later issue) when
the grid is split over several processes in slabs along z. So the order is
part of the definition, and it is one that any z-slab split reproduces:

1. **columns**: for each plane z and column x, ``col[z, x]`` is the sum over
   y = 0, 1, ..., ny-1, in that order, of ``float64(f[z, y, x]) ** 2``,
   starting from +0.0 (each work item of ``rk_sumsq_columns`` owns one
   column; neighbouring work items read neighbouring x, so a CPU vectorises
   across them and a GPU coalesces);
2. **planes**: ``plane[z]`` is the sum over x = 0, 1, ..., nx-1, in that
   order, of ``col[z, x]``, starting from +0.0 (``rk_sumsq_planes``); the
   device keeps one row of ``nz`` plane sums per sample;
3. **total**: the host adds the plane sums in plane order z = 0, 1, ...,
   nz-1, starting from +0.0 (:func:`combine_planes`). A process that owns
   planes z0..z1 computes exactly their plane sums; gathering them in plane
   order gives the same total.

Every step is float64. A float32 value squared in float64 is exact (24-bit
significand, doubled, fits in 53 bits, and the exponent range fits), so a
device that contracts ``acc + v * v`` into a fused multiply-add gets the same
bits as one that does not; only the order of the additions matters, and it
is fixed above. The kernels are built without fast-math (and CUDA with
``--fmad=false``) all the same.
"""

from __future__ import annotations

import numpy as np


def plane_sumsq(field: np.ndarray) -> np.ndarray:
    """Per-z-plane Σx² of a (nz, ny, nx) float32 field, in the documented order: float64[nz].

    NumPy's elementwise ``+=`` over a plane of columns at a time keeps each
    column's additions in y order (no pairwise or BLAS reordering).
    """
    f = np.asarray(field)
    if f.ndim != 3:
        raise ValueError(f"plane_sumsq needs a 3-D (nz, ny, nx) field, got shape {f.shape}")
    nz, ny, nx = f.shape
    col = np.zeros((nz, nx), dtype=np.float64)
    for y in range(ny):
        v = f[:, y, :].astype(np.float64)
        np.multiply(v, v, out=v)
        col += v
    plane = np.zeros(nz, dtype=np.float64)
    for x in range(nx):
        plane += col[:, x]
    return plane


def combine_planes(planes: np.ndarray) -> float:
    """The total of per-plane sums, added in plane order from +0.0 (step 3 of the order)."""
    total = 0.0
    for v in np.asarray(planes, dtype=np.float64).reshape(-1).tolist():
        total += v
    return total


def sumsq(field: np.ndarray) -> float:
    """Σx² of a 3-D float32 field in the documented order (what the device reductions give)."""
    return combine_planes(plane_sumsq(field))
