"""A kernel plugin defined outside the rkkernel package (tests): 1-D diffusion, NumPy back end.

``rkrun --kernel rk_ext_kernel:PLUGIN --grid N 3 3 ...`` with this folder on
the Python path, or ``rkrun diffusion ...`` once registered in the
``rkkernel.kernels`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rkkernel.plugin import FiniteFloat, KernelPlugin, KernelRun, Option, Series, StrictInt


def build(values: Mapping[str, Any]) -> KernelRun:
    import numpy as np

    from rkkernel.spec import KernelSpec, RegionSpec

    n = int(values["grid"][0])
    k = np.float32(values["k"])

    def step(r: Mapping[str, np.ndarray], s: int) -> None:
        u, out = (r["a"], r["b"]) if s % 2 == 0 else (r["b"], r["a"])
        out[1:-1] = u[1:-1] + k * ((u[:-2] + u[2:]) - np.float32(2) * u[1:-1])

    def initial() -> dict[str, np.ndarray]:
        a = np.zeros(n, "<f4")
        a[n // 2] = 1.0
        return {"a": a, "b": a.copy()}

    spec = KernelSpec(
        kernel_type="diffusion_1d",
        grid=tuple(values["grid"]),
        regions=[RegionSpec("a", "<f4", (n,)), RegionSpec("b", "<f4", (n,))],
        launches=[],
        sources={},
        numpy_step=step,
        initial=initial,
        params={"k": float(k)},
    )

    def field(kernel: Any, s: int) -> np.ndarray:
        return kernel.region("a" if s % 2 == 0 else "b")

    def result(kernel: Any, s: int) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        return {"u": field(kernel, s)}, {"k": float(k)}

    def mass(kernel: Any, s: int) -> tuple[float]:
        return (float(np.add.reduce(field(kernel, s).astype(np.float64))),)

    return KernelRun(spec, result, series=(Series("mass", 1, int(values["mass_every"]), mass),))


PLUGIN = KernelPlugin(
    name="diffusion",
    help="1-D diffusion (test kernel from outside the package).",
    build=build,
    options=(
        Option("k", FiniteFloat(min=0, max=0.5), 0.1, "Diffusion number."),
        Option("mass_every", StrictInt(min=0), 5, "Record the total every M steps."),
    ),
)
