"""Make OpenCL runtimes that pip installed visible to the ICD loader, before pyopencl loads it.

pyopencl's wheel brings its own ICD loader (ocl-icd), which finds pocl next to
itself, plus whatever ``/etc/OpenCL/vendors`` (or ``$OCL_ICD_VENDORS``) names.
Intel's CPU runtime from the package index (``intel-opencl-rt``) installs
``libintelocl.so`` under the environment's ``lib/`` but ships an ``.icd`` file
naming a build machine's path, so the loader never finds it. That runtime is
what makes OpenCL work on CPUs newer than the LLVM inside the pocl wheel
(Zen 5, Granite Rapids: pocl fails with "unknown target CPU"), so we register
it ourselves: a folder under the project cache holding one ``.icd`` per
runtime found (plus links to the system's own ``.icd`` files, which pointing
``OCL_ICD_VENDORS`` elsewhere would otherwise hide), named by
``OCL_ICD_VENDORS``. A user's own ``OCL_ICD_VENDORS`` always wins.
"""

from __future__ import annotations

import hashlib
import logging
import os
from importlib import metadata
from pathlib import Path

from rkckpt.atomic import atomic_open

from ..cache import cache_root

log = logging.getLogger("rkkernel")

#: (distribution, library file name) of ICDs that pip installs without a usable .icd file.
PIP_RUNTIMES: tuple[tuple[str, str], ...] = (("intel-opencl-rt", "libintelocl.so"),)
SYSTEM_VENDORS = Path("/etc/OpenCL/vendors")


def pip_runtime_libraries() -> list[Path]:
    """Absolute paths of the OpenCL runtimes in ``PIP_RUNTIMES`` that are installed here."""
    found = []
    for dist_name, lib in PIP_RUNTIMES:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or ():
            if f.name == lib:
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    found.append(path)
                    break
    return found


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    with atomic_open(path, mkdir=True) as fh:
        fh.write(text.encode())


def register_pip_runtimes(folder: Path | None = None) -> Path | None:
    """Point ``OCL_ICD_VENDORS`` at a folder listing pip-installed runtimes; the folder, or None.

    Does nothing when the user set ``OCL_ICD_VENDORS`` (their choice wins) or
    when no such runtime is installed. Must run before pyopencl is imported:
    the loader reads the variable once.
    """
    if os.environ.get("OCL_ICD_VENDORS"):
        return None
    libs = pip_runtime_libraries()
    if not libs:
        return None
    folder = folder or cache_root() / "icd"
    folder.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, str] = {}
    for lib in libs:
        wanted[f"rkslurm-{lib.stem}-{hashlib.sha256(str(lib).encode()).hexdigest()[:8]}.icd"] = f"{lib}\n"
    if SYSTEM_VENDORS.is_dir():
        for icd in sorted(SYSTEM_VENDORS.glob("*.icd")):
            try:
                wanted.setdefault(f"system-{icd.name}", icd.read_text())
            except OSError as exc:
                log.debug("cannot read %s: %s", icd, exc)
    for name, text in wanted.items():
        _write_if_changed(folder / name, text)
    for stale in folder.glob("*.icd"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)
    os.environ["OCL_ICD_VENDORS"] = str(folder)
    log.debug("OpenCL: registered %s with the ICD loader (OCL_ICD_VENDORS=%s)", ", ".join(map(str, libs)), folder)
    return folder
