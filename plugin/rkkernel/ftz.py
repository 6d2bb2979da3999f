"""NumPy emulation of the kernels' flush-to-zero of stored values (``rk_ftz``)."""

from __future__ import annotations

import numpy as np

#: FLT_MIN: anything smaller in magnitude (subnormals, -0.0) is stored as +0.0.
FTZ_LIMIT = np.float32(np.finfo(np.float32).tiny)


def ftz(x: np.ndarray) -> np.ndarray:
    """Zero (as +0.0) every element with |x| < FLT_MIN, in place; returns ``x``."""
    np.copyto(x, np.float32(0.0), where=np.abs(x) < FTZ_LIMIT)
    return x
