"""Final fields as a plain HDF5 file, written atomically (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from rkckpt.atomic import atomic_path, plain_file_mode


def write_result(path: str | os.PathLike[str], datasets: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> Path:
    out = Path(path)
    # results are ordinary workflow outputs, not private checkpoints: umask-based mode
    with atomic_path(out, mode=plain_file_mode(), mkdir=True) as tmp, h5py.File(tmp, "w") as f:
        for name, arr in datasets.items():
            f.create_dataset(name, data=arr)
        for k, v in attrs.items():
            f.attrs[k] = v
    return out
