"""Where compiled kernels are cached: under the project's cache folder, never ``~``.

pocl reads ``POCL_CACHE_DIR`` when its platform is first loaded, and pyopencl
(and its helper pytools) use ``XDG_CACHE_HOME``, so this runs before pyopencl
is imported. Values already set in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("RKSLURM_CACHE_DIR")
    if env:
        return Path(env)
    here = Path.cwd()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "plugin" / "rkkernel").is_dir():
            return p / ".cache" / "rkslurm"
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "rkslurm"
    return here / ".cache" / "rkslurm"


def setup_opencl_cache() -> Path:
    root = cache_root()
    pocl = root / "pocl"
    pyopencl = root / "pyopencl"
    pocl.mkdir(parents=True, exist_ok=True)
    pyopencl.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("POCL_CACHE_DIR", str(pocl))
    os.environ.setdefault("XDG_CACHE_HOME", str(root / "xdg"))
    return pyopencl
