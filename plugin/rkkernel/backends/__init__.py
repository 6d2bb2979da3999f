"""Back ends behind one interface; ``select_backend`` implements ``--backend auto``."""

from __future__ import annotations

import logging

from .base import Backend, BackendUnavailable

log = logging.getLogger("rkkernel")

ORDER = ("cuda", "opencl", "numpy")


def available(name: str) -> tuple[bool, str]:
    if name == "numpy":
        return True, "always available"
    if name == "opencl":
        from .opencl_backend import probe

        return probe()
    if name == "cuda":
        from .cuda_backend import probe

        return probe()
    return False, f"unknown back end {name!r}"


def select_backend(name: str = "auto") -> str:
    """Resolve ``auto`` to the best back end present and log the choice and why."""
    if name != "auto":
        ok, why = available(name)
        if not ok:
            raise BackendUnavailable(f"back end {name!r} is not available: {why}")
        return name
    reasons = []
    for cand in ORDER:
        ok, why = available(cand)
        if ok:
            log.info("backend auto: using %s (%s)%s", cand, why, "; skipped " + "; ".join(reasons) if reasons else "")
            return cand
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailable("no back end available")  # pragma: no cover - numpy always is


def make_backend(name: str) -> Backend:
    if name == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if name == "opencl":
        from .opencl_backend import OpenCLBackend

        return OpenCLBackend()
    if name == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend()
    raise BackendUnavailable(f"unknown back end {name!r}")


__all__ = ["Backend", "BackendUnavailable", "available", "make_backend", "select_backend"]
