"""Persistent, checkpointable OpenCL/CUDA/NumPy kernels as workflow steps.

``spec`` declares a kernel (regions, sources, launches, NumPy reference),
``runtime.PersistentKernel`` runs it with its state resident on a device and
maps that state to RKCKPT checkpoints, ``wavesim`` is the first kernel and
``cli`` is the ``rkrun`` command.
"""

from __future__ import annotations

from .control import CONTROL_BLOCK_DTYPE, MESSAGE_DTYPE, Command, Reply
from .runtime import KernelEvent, PersistentKernel, RestoreMismatch
from .spec import CONTROL, H2K, K2H, STEPS, KernelSpec, Launch, RegionSpec, Swap

__all__ = [
    "CONTROL",
    "CONTROL_BLOCK_DTYPE",
    "H2K",
    "K2H",
    "MESSAGE_DTYPE",
    "STEPS",
    "Command",
    "KernelEvent",
    "KernelSpec",
    "Launch",
    "PersistentKernel",
    "RegionSpec",
    "Reply",
    "RestoreMismatch",
    "Swap",
]
