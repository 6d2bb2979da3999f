"""The ``.rk.h5`` wrapper's schema: dataset and attribute names, the /index and /regions tables, limits.

Shared by the writer (``h5write``) and the reader (``h5read``); see
``rkckpt.hdf5`` for the layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

WRAPPER = "rkckpt.h5"
WRAPPER_VERSION = 1
STREAM = "rkckpt"
INDEX = "index"
REGIONS = "regions"
CHAIN_BASE_KEY = "rkckpt.chain_base"
MAX_REGIONS = 1 << 20
PAGE = 4096


def index_dtype() -> np.dtype:
    import h5py

    return np.dtype(
        [
            ("type", "<u4"),
            ("id", "<u8"),
            ("name", h5py.string_dtype("utf-8")),
            ("offset", "<u8"),
            ("stored_size", "<u8"),
            ("uncompressed_size", "<u8"),
            ("flags", "<u4"),
            ("crc32", "<u4"),
        ]
    )


def regions_dtype() -> np.dtype:
    import h5py

    return np.dtype(
        [
            ("name", h5py.string_dtype("utf-8")),
            ("dtype", h5py.string_dtype("utf-8")),
            ("shape", h5py.vlen_dtype(np.dtype("<i8"))),
            ("chunk_id", "<u8"),
        ]
    )


@dataclass(frozen=True)
class IndexEntry:
    chunk_type: int
    chunk_id: int
    name: str
    offset: int
    stored_size: int
    uncompressed_size: int
    flags: int
    crc32: int


def scratch_folder() -> str | None:
    """Where the writer lays out structures and the reader copies one: tmpfs when there is one (else the default)."""
    shm = "/dev/shm"  # tmpfs: the scratch file never reaches a disk
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
