"""``rkrun traveltime``: first-arrival traveltimes as a plugin of the step runner.

Same grid and model options as ``wavesim`` (same velocity model, same source
cell), so the two results line up cell for cell. The run ends early at the
step where the field stops changing; the result holds ``/traveltime``
(seconds, +inf on the walls and where the front has not arrived),
``/slowness`` and the attributes ``converged_step`` (-1 if ``--steps`` ran out
first), ``dx`` and ``source``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .plugin import KernelPlugin, KernelRun
from .wavesim_plugin import MODEL_OPTIONS, model_params

if TYPE_CHECKING:
    import numpy as np

    from .runtime import PersistentKernel


def build(values: Mapping[str, Any]) -> KernelRun:
    import numpy as np

    from .decomp import slab_run
    from .traveltime import converged_at, current_time, make_spec
    from .wavesim import SWEEP_LEVELS

    params, model = model_params(values)
    # one rank of a multi-rank run: a z slab, SWEEP_LEVELS halo planes (the CPU sweep's depth)
    decomp = slab_run(params.nz, SWEEP_LEVELS, ("time_a", "time_b"))
    spec = make_spec(params, velocity=model, decomp=decomp)

    def last_change(kernel: PersistentKernel) -> int:
        """The last step that changed a cell, over all ranks (an integer max: the same on every rank)."""
        last = int(kernel.region("last_change")[0])
        return last if decomp is None else decomp.max_int(last)

    def done_at(kernel: PersistentKernel) -> int | None:
        return converged_at(last_change(kernel), kernel.step)

    def result(kernel: PersistentKernel, step: int) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        # After convergence both buffers hold the same field, so the parity of
        # the step the device stopped at does not matter.
        field = current_time({n: kernel.region(n) for n in ("time_a", "time_b")}, kernel.step)
        last = last_change(kernel)
        done = converged_at(last, kernel.step)
        attrs = {
            "converged_step": last if done is not None else -1,
            "dx": params.dx,
            "source": np.array(params.source, dtype=np.int64),
        }
        datasets = {"traveltime": field, "slowness": kernel.region("slowness")}
        if decomp is not None:  # the global arrays, on rank 0 (a collective: every rank calls it)
            datasets = {k: decomp.gather_field(v) for k, v in datasets.items()}
        return datasets, attrs

    return KernelRun(
        spec,
        result,
        done_at=done_at,
        decomp=decomp,
        global_fingerprint=None if decomp is None else make_spec(params, velocity=model).fingerprint(),
    )


PLUGIN = KernelPlugin(
    name="traveltime",
    help="First-arrival traveltimes (shortest-path relaxation) through the wave model; stops when converged.",
    build=build,
    options=MODEL_OPTIONS,
)
