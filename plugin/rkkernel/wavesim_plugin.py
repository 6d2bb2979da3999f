"""``rkrun wavesim``: the 3D acoustic wave kernel as a plugin of the step runner.

The model options (``--velocity``, ``--dx``, ``--v-top``, ``--v-bottom``) are
shared with every kernel that runs through the same velocity model
(``traveltime``). NumPy and the kernel module load only when a run is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from .plugin import FiniteFloat, KernelPlugin, KernelRun, Option, Series, StrictInt

if TYPE_CHECKING:
    import numpy as np

    from .runtime import PersistentKernel
    from .wavesim import WaveParams

MODEL_OPTIONS = (
    Option("velocity", click.Path(dir_okay=False), None, "Velocity model .npy, shape (NZ, NX), m/s."),
    Option("dx", FiniteFloat(min=0, min_open=True, dtype="float32"), 10.0, "Cell size in metres."),
    Option("v_top", FiniteFloat(min=0, min_open=True, dtype="float32"), 1500.0, "Built-in model: upper layer (m/s)."),
    Option("v_bottom", FiniteFloat(min=0, min_open=True, dtype="float32"), 2500.0, "Built-in model: lower layer (m/s)."),
)


def model_params(values: Mapping[str, Any]) -> tuple[WaveParams, np.ndarray | None]:
    """The wave parameters and the user's velocity model (or None: built-in) from the model options.

    Raises ValueError naming the file or the value that is wrong.
    """
    from .wavesim import WaveParams, load_velocity

    nx, ny, nz = values["grid"]
    model, extra = None, {}
    if values.get("velocity"):
        model, digest = load_velocity(str(values["velocity"]), nx, nz)
        extra = {"model_sha256": digest, "model_vmax": float(model.max())}
    params = WaveParams(nx, ny, nz, dx=values["dx"], v_top=values["v_top"], v_bottom=values["v_bottom"], **extra)
    if model is not None:
        check_float32_range(params, float(model.min()), float(model.max()))
    else:
        check_float32_range(params, min(params.v_top, params.v_bottom), max(params.v_top, params.v_bottom))
    return params, model


def check_float32_range(params: WaveParams, vmin: float, vmax: float) -> None:
    """The float32 numbers the kernels compute from the model options must be normal float32 numbers.

    Each option may be a fine float32 on its own while what the kernels
    derive from it is not: ``(v*v)*(dt/dx)^2`` (wavesim) or the slowness and
    the traveltimes (traveltime) overflow to inf or flush to zero, and the run
    ends with rc 0 and NaN or empty fields. Raises ValueError naming the
    quantity, computed here in float64.
    """
    import math

    from .plugin import FLOAT32_MAX, FLOAT32_TINY

    r2 = (params.dt / params.dx) ** 2
    diag = params.dx * math.sqrt(3.0)
    quantities = (
        ("(dt/dx)^2", r2),
        ("v_min^2", vmin * vmin),
        ("v_max^2", vmax * vmax),
        ("v_min^2 (dt/dx)^2", vmin * vmin * r2),
        ("the slowness 1/v_min", 1.0 / vmin),
        ("the slowness 1/v_max", 1.0 / vmax),
        ("dx*sqrt(3)", diag),
        ("dx/v_max", params.dx / vmax),
        ("the longest traveltime (nx+ny+nz)*dx*sqrt(3)/v_min", (params.nx + params.ny + params.nz) * diag / vmin),
    )
    for name, x in quantities:
        if not FLOAT32_TINY <= x <= FLOAT32_MAX:
            raise ValueError(
                f"{name} = {x:.3g} is outside float32's normal range ({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}) the kernels "
                f"compute in (velocities {vmin:g} to {vmax:g} m/s, dx {params.dx:g} m): check --v-top/--v-bottom/--dx or the velocity model"
            )


def _energy_region(step: int) -> str:
    """The pressure field that holds ``step`` (see ``wavesim.current_field``)."""
    return "pressure_a" if step % 2 == 0 else "pressure_b"


def _energy(kernel: PersistentKernel, step: int) -> tuple[float]:
    """Σp² of the current pressure field, float64, in the fixed order of ``rkkernel.reduce``.

    The reference of the device reduction the runner uses (``Series.sumsq``):
    per-z-plane sums combined in plane order, so the series has the same bits
    on every back end, interrupted or not, and for a z-slab split.
    """
    from .reduce import sumsq

    return (sumsq(kernel.region(_energy_region(step))),)


def receiver_cells(params: WaveParams, count: int) -> list[tuple[int, int, int]]:
    """``count`` receivers on a line along x through the source (its y and depth), walls excluded: (x, y, z)."""
    import numpy as np

    _, sy, sz = params.source
    xs = np.unique(np.linspace(1, params.nx - 2, count).round().astype(int)) if count else []
    return [(int(x), sy, sz) for x in xs]


def build(values: Mapping[str, Any]) -> KernelRun:
    import numpy as np

    from .decomp import slab_run
    from .wavesim import SWEEP_LEVELS, current_field, make_spec

    params, model = model_params(values)
    # one rank of a multi-rank run (the rank count comes from MPI): a z slab, SWEEP_LEVELS halo planes
    decomp = slab_run(params.nz, SWEEP_LEVELS, ("pressure_a", "pressure_b"))
    spec = make_spec(params, velocity=model, decomp=decomp)
    receivers = receiver_cells(params, int(values.get("receivers") or 0))
    flat = np.array([x + params.nx * (y + params.ny * z) for x, y, z in receivers], dtype=np.int64)

    def traces(kernel: PersistentKernel, step: int) -> tuple[float, ...]:
        field = current_field({n: kernel.region(n) for n in ("pressure_a", "pressure_b")}, step)
        if decomp is not None:  # each receiver read by the rank that owns its plane
            return tuple(decomp.gather_values(receivers, lambda x, y, z: float(field[z, y, x])))
        return tuple(float(v) for v in field.reshape(-1)[flat])

    def result(kernel: PersistentKernel, step: int) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        regions = {n: kernel.region(n) for n in ("pressure_a", "pressure_b")}
        prev = regions["pressure_b"] if step % 2 == 0 else regions["pressure_a"]
        datasets = {"pressure": current_field(regions, step), "pressure_prev": prev, "velocity": kernel.region("velocity")}
        if decomp is not None:  # the global arrays, on rank 0 (a collective: every rank calls it)
            datasets = {k: decomp.gather_field(v) for k, v in datasets.items()}
        attrs = {"dt": params.dt, "dx": params.dx, "source": np.array(params.source, dtype=np.int64)}
        if receivers:
            datasets["receiver_cells"] = np.array(receivers, dtype=np.int64).reshape(-1, 3)
        return datasets, attrs

    series = [Series("energy", 1, int(values["energy_every"]), _energy, sumsq=_energy_region)]
    if receivers:  # pressure at each receiver, sampled like the energy: seismograms for arrival picking
        series.append(Series("traces", len(receivers), int(values["energy_every"]), traces))
    return KernelRun(
        spec,
        result,
        series=tuple(series),
        decomp=decomp,
        global_fingerprint=None if decomp is None else make_spec(params, velocity=model).fingerprint(),
    )


PLUGIN = KernelPlugin(
    name="wavesim",
    help="3D acoustic wave FDTD.",
    build=build,
    options=(
        *MODEL_OPTIONS,
        Option("energy_every", StrictInt(min=0), 10, "Record energy (and receiver traces) every M steps (0: off)."),
        Option("receivers", StrictInt(min=0, max=4096), 0, "Record pressure at N receivers on a line along x through the source."),
    ),
)
