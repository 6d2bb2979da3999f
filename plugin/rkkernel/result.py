"""Final fields as a plain HDF5 file, written atomically (temp, fsync, rename, fsync dir)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np


def _file_mode() -> int:
    """0666 minus the umask: what a plain open() would create (mkstemp uses 0600)."""
    old = os.umask(0)
    os.umask(old)
    return 0o666 & ~old


def write_result(path: str | os.PathLike[str], datasets: Mapping[str, np.ndarray], attrs: Mapping[str, object]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name, arr in datasets.items():
                f.create_dataset(name, data=arr)
            for k, v in attrs.items():
                f.attrs[k] = v
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return out
