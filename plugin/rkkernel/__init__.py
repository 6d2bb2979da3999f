"""Persistent, checkpointable OpenCL/CUDA/NumPy kernels as workflow steps.

``spec`` declares a kernel (regions, sources, launches, NumPy reference),
``runtime.PersistentKernel`` runs it with its state resident on a device and
maps that state to RKCKPT checkpoints, ``plugin`` makes a kernel runnable
by ``rkrun`` (``runner.StepLoop``, the one step loop; ``cli``, the command),
``wavesim`` and ``traveltime`` are the built-in kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Exports load on first use, not at ``import rkkernel``: rkrun must block its
# stop signals before numpy (OpenBLAS threads) or pocl (LLVM's handlers)
# start any thread, or a SIGUSR1 sent during start-up can land on such a
# thread, under LLVM's do-nothing handler, and be lost (see signals.StopFlag.held).
_EXPORTS = {
    "CONTROL_BLOCK_DTYPE": "control",
    "MESSAGE_DTYPE": "control",
    "Command": "control",
    "Reply": "control",
    "KernelEvent": "runtime",
    "PersistentKernel": "runtime",
    "RestoreMismatch": "runtime",
    "RestoreInvalid": "runtime",
    "KernelPlugin": "plugin",
    "KernelRun": "plugin",
    "Option": "plugin",
    "Series": "plugin",
    "CONTROL": "spec",
    "H2K": "spec",
    "K2H": "spec",
    "STEPS": "spec",
    "SYNC": "spec",
    "FusedSteps": "spec",
    "KernelSpec": "spec",
    "Launch": "spec",
    "RegionSpec": "spec",
    "Swap": "spec",
}

__all__ = [
    "CONTROL",
    "CONTROL_BLOCK_DTYPE",
    "Command",
    "FusedSteps",
    "H2K",
    "K2H",
    "KernelEvent",
    "KernelPlugin",
    "KernelRun",
    "KernelSpec",
    "Launch",
    "MESSAGE_DTYPE",
    "Option",
    "PersistentKernel",
    "RegionSpec",
    "Reply",
    "RestoreInvalid",
    "RestoreMismatch",
    "STEPS",
    "SYNC",
    "Series",
    "Swap",
]

if TYPE_CHECKING:
    from .control import CONTROL_BLOCK_DTYPE, MESSAGE_DTYPE, Command, Reply
    from .plugin import KernelPlugin, KernelRun, Option, Series
    from .runtime import KernelEvent, PersistentKernel, RestoreInvalid, RestoreMismatch
    from .spec import CONTROL, H2K, K2H, STEPS, SYNC, FusedSteps, KernelSpec, Launch, RegionSpec, Swap


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rkkernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
