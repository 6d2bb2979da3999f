"""Control block and message-queue layouts shared by every back end.

The control block is the 128-byte ``ControlBlock`` of the reference runtime
(ringkernel-core), so a checkpoint's ControlBlock chunk means the same thing
to both. This project uses part of the reference's 32 reserved bytes for the
step counter and the queue capacities; the rest stays zero.

The same layout is declared in C once, in ``kernels/rk_runtime_cl.h`` (which CUDA
builds too, after ``kernels/rk_runtime_cuda.h``); ``test_kernel_runtime`` checks the offsets.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

#: Byte layout of the control block (little-endian, 128 bytes, packed: every field sits at the
#: offset the reference gives it, with no padding between fields).
CONTROL_BLOCK_DTYPE = np.dtype(
    [
        ("is_active", "<u4"), ("should_terminate", "<u4"), ("has_terminated", "<u4"), ("_pad1", "<u4"),
        ("messages_processed", "<u8"), ("messages_in_flight", "<u8"),
        ("input_head", "<u8"), ("input_tail", "<u8"), ("output_head", "<u8"), ("output_tail", "<u8"),
        ("input_mask", "<u4"), ("output_mask", "<u4"),
        ("hlc_physical", "<u8"), ("hlc_logical", "<u8"),
        ("last_error", "<u4"), ("error_count", "<u4"),
        # --- reference: 32 reserved bytes; this project's extension:
        ("current_step", "<u8"), ("input_capacity", "<u4"), ("output_capacity", "<u4"), ("_reserved", "u1", (16,)),
    ]
)  # fmt: skip
assert CONTROL_BLOCK_DTYPE.itemsize == 128

#: One queue message (32 bytes); the same record travels both ways.
MESSAGE_DTYPE = np.dtype(
    {
        "names": ["kind", "arg", "step", "a", "b"],
        "formats": ["<u4", "<u4", "<u8", "<u8", "<u8"],
        "offsets": [0, 4, 8, 16, 24],
        "itemsize": 32,
    }
)

#: HlcState chunk: physical µs, logical counter, node id.
HLC_DTYPE = np.dtype([("physical", "<u8"), ("logical", "<u8"), ("node_id", "<u8")])


class Command(IntEnum):
    """Host→kernel message kinds. Each takes effect when the device step counter reaches ``step``."""

    SNAPSHOT = 1  # pause at the step boundary so the host can read a consistent state
    TERMINATE = 2  # stop for good
    INJECT = 3  # pause; host adds ``b`` (float32 bits) to region slot ``arg`` at cell ``a``


class Reply(IntEnum):
    """Kernel→host message kinds."""

    SNAPSHOT_READY = 1
    TERMINATED = 2
    INJECT_READY = 3


class ErrorCode(IntEnum):
    NONE = 0
    K2H_FULL = 1
    UNKNOWN_COMMAND = 2


DEFAULT_QUEUE_CAPACITY = 64


def new_control_block(queue_capacity: int = DEFAULT_QUEUE_CAPACITY) -> np.ndarray:
    if queue_capacity <= 0 or queue_capacity & (queue_capacity - 1):
        raise ValueError(f"queue capacity must be a power of two, got {queue_capacity}")
    cb = np.zeros(1, dtype=CONTROL_BLOCK_DTYPE)
    cb["is_active"] = 1
    cb["input_mask"] = queue_capacity - 1
    cb["output_mask"] = queue_capacity - 1
    cb["input_capacity"] = queue_capacity
    cb["output_capacity"] = queue_capacity
    return cb


def new_queue(capacity: int = DEFAULT_QUEUE_CAPACITY) -> np.ndarray:
    return np.zeros(capacity, dtype=MESSAGE_DTYPE)


def advance(cb: np.ndarray, h2k: np.ndarray, k2h: np.ndarray, step_done: bool) -> None:
    """Reference implementation of the device's ``rk_advance`` kernel.

    Runs at every step boundary: bumps the step counter when a step was just
    computed, then executes queued commands that are due. Commands that need
    the host (snapshot, inject) pause the kernel (``is_active = 0``) so the
    remaining launches of the batch do nothing until the host resumes it.
    """
    c = cb[0]
    if c["is_active"] == 0:
        return
    if step_done:
        c["current_step"] += 1
    step = int(c["current_step"])
    while c["input_head"] != c["input_tail"]:
        msg = h2k[int(c["input_head"]) & int(c["input_mask"])]
        if int(msg["step"]) > step:
            break
        c["input_head"] += 1
        c["messages_processed"] += 1
        c["hlc_logical"] += 1
        kind = int(msg["kind"])
        if kind == Command.TERMINATE:
            c["should_terminate"] = 1
            c["has_terminated"] = 1
            c["is_active"] = 0
            _reply(c, k2h, Reply.TERMINATED, msg, step)
        elif kind == Command.SNAPSHOT:
            c["is_active"] = 0
            _reply(c, k2h, Reply.SNAPSHOT_READY, msg, step)
        elif kind == Command.INJECT:
            c["is_active"] = 0
            _reply(c, k2h, Reply.INJECT_READY, msg, step)
        else:
            c["last_error"] = ErrorCode.UNKNOWN_COMMAND
            c["error_count"] += 1
        if c["is_active"] == 0:
            break


def _reply(c: np.void, k2h: np.ndarray, kind: int, msg: np.void, step: int) -> None:
    if int(c["output_tail"]) - int(c["output_head"]) >= int(c["output_mask"]) + 1:
        c["last_error"] = ErrorCode.K2H_FULL
        c["error_count"] += 1
        return
    slot = k2h[int(c["output_tail"]) & int(c["output_mask"])]
    slot["kind"] = kind
    slot["arg"] = msg["arg"]
    slot["step"] = step
    slot["a"] = msg["a"]
    slot["b"] = msg["b"]
    c["output_tail"] += 1
