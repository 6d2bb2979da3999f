"""3D acoustic wave FDTD — the first kernel built on the ``spec`` API.

Leapfrog over two pressure fields (``pressure_a``/``pressure_b``: on even
steps a is current and b previous; the new field overwrites the previous),
a static velocity model and a Ricker source wavelet sampled on the host in
float64 and stored as float32, so no transcendental function runs on a
device (their last bits differ between vendors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from .ftz import ftz
from .spec import (
    CONTROL,
    H2K,
    K2H,
    SAMPLE_LEVELS,
    SAMPLE_ROW,
    STEPS,
    SUM_SCRATCH,
    SUMS,
    SYNC,
    FusedSteps,
    KernelSpec,
    Launch,
    RegionSpec,
    Swap,
)

if TYPE_CHECKING:
    from .decomp import SlabRun

KERNEL_TYPE = "fdtd_3d"
F32 = np.float32
#: Steps per sweep of the CPU OpenCL kernel (fdtd_sweep). 256^3 on pocl, 2 cores, interleaved
#: runs: 1 step 3.5 Gcells/s, 2 steps 3.9, 3 steps 4.0, 4 steps 4.66, 6 steps 4.67.
SWEEP_LEVELS = 4
#: Shallowest sweep worth running instead of single steps (see ``FusedSteps.min_steps``).
SWEEP_MIN_LEVELS = 2
#: A longer source wavelet means physics values far off (``--v-top 1e-6``: a TiB of samples).
MAX_WAVELET_SAMPLES = 1_000_000


@dataclass(frozen=True)
class WaveParams:
    nx: int
    ny: int
    nz: int
    dx: float = 10.0  # metres
    v_top: float = 1500.0
    v_bottom: float = 2500.0
    courant: float = 0.5  # fraction of the 3D stability limit 1/sqrt(3)
    f0: float | None = None  # source peak frequency; default: ~12 cells per wavelength
    src: tuple[int, int, int] | None = None  # (x, y, z); default: centre, upper quarter
    version: int = 3  # bump when the kernel's arithmetic changes
    model_sha256: str | None = None  # digest of a user-supplied velocity model (--velocity)
    model_vmax: float | None = None  # its largest velocity (sets the stable time step)

    def __post_init__(self) -> None:
        if min(self.nx, self.ny, self.nz) < 3:
            raise ValueError(f"grid must be at least 3 in each axis, got {self.nx}x{self.ny}x{self.nz}")
        if self.nx * self.ny * self.nz >= 2**31:
            raise ValueError("grid too large for 32-bit indexing (2^31 cells)")
        for name in ("dx", "v_top", "v_bottom", "courant", "f0", "model_vmax"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite positive number, got {v}")
        n = self.wavelet_samples
        if n > MAX_WAVELET_SAMPLES:
            vmax = self.model_vmax if self.model_vmax is not None else max(self.v_top, self.v_bottom)
            raise ValueError(
                f"the source wavelet would have {n:.3g} samples (peak frequency {self.peak_frequency:.3g} Hz from v_top "
                f"{self.v_top:g} m/s, time step {self.dt:.3g} s from the largest velocity {vmax:g} m/s); at most "
                f"{MAX_WAVELET_SAMPLES} are allowed: check --v-top/--v-bottom/--dx or the velocity model"
            )

    @property
    def dt(self) -> float:
        vmax = self.model_vmax if self.model_vmax is not None else max(self.v_top, self.v_bottom)
        return self.courant * self.dx / (vmax * math.sqrt(3.0))

    @property
    def source(self) -> tuple[int, int, int]:
        if self.src is not None:
            return self.src
        return (self.nx // 2, self.ny // 2, max(1, self.nz // 4))

    @property
    def peak_frequency(self) -> float:
        return self.f0 if self.f0 is not None else self.v_top / (12.0 * self.dx)

    @property
    def wavelet_samples(self) -> float:
        """Length of the Ricker wavelet ``ricker`` samples (a float: it may be astronomically large)."""
        x = 2 * (1.2 / self.peak_frequency) / self.dt
        return math.ceil(x) + 1.0 if math.isfinite(x) else math.inf


def velocity_model(p: WaveParams) -> np.ndarray:
    """Two layers with a gently dipping interface, shape (nz, nx), constant along y.

    A 2-D model keeps the update at 12 bytes of memory traffic per cell (it
    stays in cache), which is what the stencil's roofline assumes.
    """
    z = np.arange(p.nz, dtype=np.float64)[:, None]
    x = np.arange(p.nx, dtype=np.float64)[None, :]
    interface = p.nz * 0.55 + 0.1 * (x - p.nx / 2)
    v = np.where(z < interface, p.v_top, p.v_bottom)
    return np.ascontiguousarray(v, dtype=F32)


def load_velocity(path: str, nx: int, nz: int) -> tuple[np.ndarray, str]:
    """A user velocity model: .npy, shape (nz, nx), finite and positive; returns it and its SHA-256.

    Raises ValueError naming the file and the problem.
    """
    import hashlib

    from .inputs import read_npy

    raw = read_npy(path, (nz, nx), "velocity model", "(nz, nx)")  # no FIFO, no pickle, size checked first
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf: refused just below
        v = np.ascontiguousarray(raw, dtype=F32)
    if not np.isfinite(v).all() or float(v.min()) < np.finfo(F32).tiny:  # the kernels flush subnormals to zero
        raise ValueError(
            f"{path}: velocities must be finite and positive (as float32: {np.finfo(F32).tiny:.3g} to {np.finfo(F32).max:.3g})"
        )
    return v, hashlib.sha256(v.tobytes()).hexdigest()


def ricker(p: WaveParams) -> np.ndarray:
    f0 = p.peak_frequency
    t0 = 1.2 / f0
    n = max(1, int(p.wavelet_samples))
    t = np.arange(n, dtype=np.float64) * p.dt - t0
    a = (math.pi * f0 * t) ** 2
    w = ((1.0 - 2.0 * a) * np.exp(-a)).astype(F32)
    return ftz(w)


def r2(p: WaveParams) -> np.float32:
    return F32((p.dt / p.dx) ** 2)


def numpy_step(
    regions: Mapping[str, np.ndarray], step: int, *, params: WaveParams, source: tuple[int, int, int] | None | tuple[()] = ()
) -> None:
    """Exactly the arithmetic of ``fdtd_rows`` in kernels/fdtd3d.cl, in the same order.

    Plain IEEE float32 operations (NumPy never fuses them), the source added
    before the single flush of the stored value, like the kernel does.
    ``source``: the source cell in the arrays' own coordinates (a slab of a
    decomposed run: local z; None: not in this slab); default ``params.source``.
    """
    src = params.source if source == () else source
    if step % 2 == 0:
        cur, nxt = regions["pressure_a"], regions["pressure_b"]
    else:
        cur, nxt = regions["pressure_b"], regions["pressure_a"]
    vel = regions["velocity"]
    wavelet = regions["wavelet"]
    c = cur
    ii = (slice(1, -1), slice(1, -1), slice(1, -1))
    p = c[ii]
    s = c[1:-1, 1:-1, :-2] + c[1:-1, 1:-1, 2:]
    s += c[1:-1, :-2, 1:-1]
    s += c[1:-1, 2:, 1:-1]
    s += c[:-2, 1:-1, 1:-1]
    s += c[2:, 1:-1, 1:-1]
    lap = np.subtract(s, F32(6.0) * p, out=s)
    v = vel[1:-1, None, 1:-1]
    coef = (v * v) * r2(params)
    acc = np.multiply(coef, lap, out=lap)
    base = F32(2.0) * p - nxt[ii]
    out = np.add(base, acc, out=base)
    if step < len(wavelet) and src is not None:
        x, y, z = src
        out[z - 1, y - 1, x - 1] += wavelet[step]
    nxt[ii] = ftz(out)


def make_spec(
    params: WaveParams,
    *,
    velocity: np.ndarray | None = None,
    local_size: tuple[int, int, int] | None = None,
    decomp: SlabRun | None = None,
) -> KernelSpec:
    """The wave kernel's spec; ``velocity`` (from ``load_velocity``) replaces the built-in model.

    ``params.model_sha256``/``model_vmax`` must describe ``velocity`` so the
    fingerprint and the time step follow the model. With ``decomp`` it is the
    spec of one rank's z slab: the same kernel on the local planes, the source
    only in its owner's slab, halo planes exchanged by the runtime.
    """
    nx, ny = params.nx, params.ny
    if (velocity is None) != (params.model_sha256 is None):
        raise ValueError("pass the velocity model together with its digest (see load_velocity)")
    _source_index(params)  # the global source cell must be interior
    nz, src = _local_geometry(params, decomp)
    shape = (nz, ny, nx)
    wavelet = ricker(params)
    # no source in this slab: an index that matches no cell (and decodes to plane nz, outside it)
    src_index = nz * nx * ny if src is None else src[0] + src[1] * nx + src[2] * nx * ny
    args = _step_args(params, src_index, len(wavelet))
    launch = Launch("fdtd_step", (nx - 2, ny - 2, nz - 2), args, local_size)
    opencl_launches = _opencl_launches(params, args, local_size, nz, None if src is None else src[2])
    fused = _opencl_fused(nz, args)
    persistent = _cuda_persistent(params, nz, src_index, len(wavelet))

    def initial() -> dict[str, np.ndarray]:
        v = velocity_model(params) if velocity is None else velocity
        return {
            "pressure_a": np.zeros(shape, F32),
            "pressure_b": np.zeros(shape, F32),
            "velocity": v if decomp is None else decomp.slab.take(v),
            "wavelet": wavelet,
            "x_interior_mask": x_interior_mask(nx),
        }

    def step(regions: Mapping[str, np.ndarray], s: int) -> None:
        numpy_step(regions, s, params=params, source=src)

    return KernelSpec(
        kernel_type=KERNEL_TYPE,
        grid=(nx, ny, nz),
        regions=_regions(params, nz, wavelet.shape),
        launches=[launch],
        sources={"opencl": "fdtd3d.cl", "cuda": "fdtd3d.cu"},
        numpy_step=step,
        initial=initial,
        params={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()},
        persistent={"cuda": persistent},
        backend_launches={"opencl": opencl_launches},
        fused={"opencl": fused},
        halo_steps=decomp.halo if decomp is not None else 0,
        halo_exchange=decomp.exchange if decomp is not None else None,
    )


def _local_geometry(params: WaveParams, decomp: SlabRun | None) -> tuple[int, tuple[int, int, int] | None]:
    """Planes of this process's grid along z, and the source cell in it (None: not among its computed planes).

    Every rank that computes the source's plane adds the source, its owner and
    the ranks holding that plane as a halo plane alike: a halo plane must
    evolve exactly as on its owner for the steps between two exchanges.
    """
    if decomp is None:
        return params.nz, params.source
    sx, sy, sz = params.source
    nz = decomp.slab.local_nz
    lz = sz - decomp.slab.g0
    return nz, ((sx, sy, lz) if 0 < lz < nz - 1 else None)


def _source_index(params: WaveParams) -> int:
    """Flat index of the source cell, which must be interior."""
    nx, ny, nz = params.nx, params.ny, params.nz
    sx, sy, sz = params.source
    if not (0 < sx < nx - 1 and 0 < sy < ny - 1 and 0 < sz < nz - 1):
        raise ValueError(f"source {params.source} must be an interior cell of the {nx}x{ny}x{nz} grid")
    return sx + sy * nx + sz * nx * ny


def _regions(params: WaveParams, nz: int, wavelet_shape: tuple[int, ...]) -> list[RegionSpec]:
    nx, ny = params.nx, params.ny
    shape = (nz, ny, nx)
    return [
        RegionSpec("pressure_a", "<f4", shape, "field"),
        RegionSpec("pressure_b", "<f4", shape, "field"),
        RegionSpec("velocity", "<f4", (nz, nx), "static"),
        RegionSpec("wavelet", "<f4", wavelet_shape, "static"),
        RegionSpec("x_interior_mask", "<u4", (nx,), "static"),
    ]


def _step_args(params: WaveParams, src_index: int, n_wavelet: int) -> tuple:
    """Arguments of one ``fdtd_step`` (the fused and split launches append to them)."""
    nx, ny = params.nx, params.ny
    return (
        CONTROL,
        Swap("pressure_a", "pressure_b"),  # cur
        Swap("pressure_b", "pressure_a"),  # prev -> next
        "velocity",
        "wavelet",
        r2(params),
        np.int32(nx),
        np.int32(nx * ny),
        np.int32(src_index),
        np.int32(n_wavelet),
    )


def _opencl_fused(nz: int, args: tuple) -> FusedSteps:
    """SWEEP_LEVELS steps per sweep on CPU devices, one work item per slab (see fdtd_sweep)."""
    slabs = max(1, (nz - 2) // (2 * SWEEP_LEVELS))
    sweep_args = (*args, np.int32(nz), "x_interior_mask", SYNC, np.int32(SWEEP_LEVELS))
    # Any depth 1..SWEEP_LEVELS (the last argument): checkpoints, samples and batch ends
    # that are not a multiple of SWEEP_LEVELS away end a sweep early, still fused.
    # fdtd_sweep_sampled: the same sweep that also sums p² of sampled levels (the energy series)
    sampled_args = (*sweep_args, SUMS, SUM_SCRATCH, SAMPLE_LEVELS, SAMPLE_ROW)
    return FusedSteps(
        SWEEP_LEVELS,
        (Launch("fdtd_sweep", (slabs,), sweep_args, (1,)),),
        sync_words=slabs,
        depth_arg=len(sweep_args) - 1,
        min_steps=SWEEP_MIN_LEVELS,
        sampled=(Launch("fdtd_sweep_sampled", (slabs,), sampled_args, (1,)),),
        level_outputs=(Swap("pressure_b", "pressure_a"), Swap("pressure_a", "pressure_b")),  # prev_next, cur
    )


def _cuda_persistent(params: WaveParams, nz: int, src_index: int, n_wavelet: int) -> Launch:
    """The CUDA back end's persistent launch (``fdtd_persistent``)."""
    return Launch(
        "fdtd_persistent",
        (0,),
        (
            CONTROL,
            H2K,
            K2H,
            "pressure_a",
            "pressure_b",
            "velocity",
            "wavelet",
            r2(params),
            np.int32(params.nx),
            np.int32(params.ny),
            np.int32(nz),
            np.int32(src_index),
            np.int32(n_wavelet),
            STEPS,
        ),
    )


def x_interior_mask(nx: int) -> np.ndarray:
    """All ones for the interior columns, zero for the two walls: lets the OpenCL kernel
    cover whole rows and still store +0.0 on the walls (see kernels/fdtd3d.cl)."""
    m = np.full(nx, 0xFFFFFFFF, dtype=np.uint32)
    m[0] = m[-1] = 0
    return m


def _opencl_launches(params: WaveParams, args: tuple, local_size: tuple[int, int, int] | None, nz: int, sz: int | None) -> list[Launch]:
    """One step for OpenCL: z planes split so that only the source's plane tests for the source.

    The per-cell source test costs pocl's vectorised loop about a quarter of
    its speed (see kernels/fdtd3d.cl); the other planes run ``fdtd_bulk``,
    which adds the constant +0.0f source term instead. An odd run of bulk
    planes is split into an even part and one plane, so that CPU back ends
    can give every big launch two-plane work-groups (the fastest shape on
    pocl). Launches of one step touch disjoint planes and run in queue
    order, so the result is the same as one launch over all planes. Each
    launch gets its first plane ``z0`` and the wall mask as extra arguments.
    ``nz``/``sz``: this grid's planes and source plane (None: a slab without the source).
    """
    nx, ny = params.nx, params.ny
    if sz is None:
        pieces = [("fdtd_bulk", 1, nz - 2)]
    else:
        pieces = [("fdtd_bulk", 1, sz - 1), ("fdtd_step", sz, 1), ("fdtd_bulk", sz + 1, nz - 2 - sz)]
    parts = []
    for fn, z0, planes in pieces:
        if planes > 1 and planes % 2:
            parts += [(fn, z0, planes - 1), (fn, z0 + planes - 1, 1)]
        elif planes > 0:
            parts.append((fn, z0, planes))
    return [
        Launch(fn, (nx, ny - 2, planes), (*args, np.int32(z0), "x_interior_mask"), _local(local_size, planes)) for fn, z0, planes in parts
    ]


def _local(local_size: tuple[int, int, int] | None, planes: int) -> tuple[int, int, int] | None:
    if local_size is None:
        return None  # the back end picks (CPU: whole rows, two planes)
    lz = local_size[2] if planes % local_size[2] == 0 else 1
    return (local_size[0], local_size[1], lz)


def current_field(regions: Mapping[str, np.ndarray], step: int) -> np.ndarray:
    """The pressure at ``step`` (after ``step`` updates)."""
    return regions["pressure_a"] if step % 2 == 0 else regions["pressure_b"]
