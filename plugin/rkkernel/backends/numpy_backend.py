"""NumPy reference back end: the spec's ``numpy_step`` plus the Python control logic.

It is the definition of correct bits: the OpenCL and CUDA back ends must give
exactly what this gives.
"""

from __future__ import annotations

import numpy as np

from ..control import advance
from ..spec import KernelSpec
from .base import Backend, check_out


class NumpyBackend(Backend):
    name = "numpy"
    description = "NumPy reference (CPU, single thread)"

    def load(self, spec, regions, control, h2k, k2h) -> None:  # type: ignore[override]
        self.spec: KernelSpec = spec
        self.regions = {k: np.array(v, copy=True) for k, v in regions.items()}
        self.control = control.copy()
        self.h2k = h2k.copy()
        self.k2h = k2h.copy()

    def enqueue_steps(self, first_step: int, count: int, stops: frozenset[int] = frozenset()) -> None:
        advance(self.control, self.h2k, self.k2h, step_done=False)
        for _ in range(count):
            if self.control[0]["is_active"] == 0:
                break
            self.spec.numpy_step(self.regions, int(self.control[0]["current_step"]))
            advance(self.control, self.h2k, self.k2h, step_done=True)

    def read_control(self) -> np.ndarray:
        return self.control.copy()

    def write_control(self, field: str, value: int) -> None:
        self.control[0][field] = value

    def write_control_block(self, control: np.ndarray) -> None:
        self.control[...] = control

    def write_message(self, slot: int, message: np.ndarray) -> None:
        self.h2k[slot] = message

    def read_queue(self, which: str) -> np.ndarray:
        return (self.h2k if which == "h2k" else self.k2h).copy()

    def write_queue(self, which: str, array: np.ndarray) -> None:
        (self.h2k if which == "h2k" else self.k2h)[...] = array

    def read_region(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        src = self.regions[name]
        if out is None:
            return src.copy()
        check_out(out, src.dtype, src.shape, name)[...] = src
        return out

    def write_region(self, name: str, array: np.ndarray) -> None:
        self.regions[name][...] = array

    def read_planes(self, name: str, z0: int, z1: int) -> np.ndarray:
        return self.regions[name][z0:z1].copy()

    def write_planes(self, name: str, z0: int, planes: np.ndarray) -> None:
        self.regions[name][z0 : z0 + len(planes)] = planes
