"""Back ends behind one interface; ``select_backend`` implements ``--backend auto``.

A back-end name is a family, optionally with a device selector: ``numpy``,
``cuda``, ``opencl``, ``opencl:intel``, ``opencl:pocl``, ``opencl:0:1``
(see ``clprobe`` for selectors). ``auto`` tries CUDA, then OpenCL, by building
the real program on every device, and falls back to NumPy (loudly) only when
nothing else works: a start-up never fails because one driver is broken.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..backend_names import ORDER, split_name
from .base import Backend, BackendUnavailable

if TYPE_CHECKING:
    from ..spec import KernelSpec

log = logging.getLogger("rkkernel")


def available(name: str, spec: KernelSpec | None = None) -> tuple[bool, str]:
    """(usable, why) for one back-end name, building ``spec``'s program where that applies."""
    try:
        family, selector = split_name(name)
    except BackendUnavailable as exc:
        return False, str(exc)
    if family == "numpy":
        return True, "always available"
    if family == "opencl":
        from .opencl_backend import probe

        return probe(spec, selector)
    from .cuda_backend import probe as cuda_probe

    return cuda_probe(spec)


def _log_opencl_rejections(spec: KernelSpec | None, selector: str | None) -> None:
    from .opencl_backend import verdicts

    try:
        vs = verdicts(spec, selector)
    except BackendUnavailable:
        return
    for v in vs:
        if not v.ok:
            quiet = v.reason.startswith(("excluded by", "not selected by"))
            log.log(logging.INFO if quiet else logging.WARNING, "backend: rejected OpenCL %s: %s", v.candidate.label, v.reason)


def select_backend(name: str = "auto", spec: KernelSpec | None = None) -> str:
    """Resolve ``name`` to a back end that works for ``spec``, logging every rejected candidate.

    An explicit family that cannot run raises ``BackendUnavailable`` naming each
    device and why; ``auto`` never does (NumPy always works).
    """
    if name != "auto":
        family, selector = split_name(name)
        ok, why = available(name, spec)
        if family == "opencl":
            _log_opencl_rejections(spec, selector)
        if not ok:
            raise BackendUnavailable(f"back end {name!r} is not available: {why}")
        log.info("backend %s: %s", name, why)
        return name
    reasons = []
    for cand in ORDER:
        ok, why = available(cand, spec)
        if cand == "opencl":
            _log_opencl_rejections(spec, None)
        if ok:
            if cand == "numpy":
                log.warning(
                    "backend auto: NO GPU OR OPENCL DEVICE WORKS, running on the NumPy reference back end "
                    "(correct, but tens of times slower). Rejected: %s",
                    "; ".join(reasons),
                )
            else:
                log.info("backend auto: using %s (%s)%s", cand, why, "; skipped " + "; ".join(reasons) if reasons else "")
            return cand
        reasons.append(f"{cand}: {why}")
    raise BackendUnavailable("no back end available")  # pragma: no cover - numpy always is


def make_backend(name: str) -> Backend:
    family, selector = split_name(name)
    if family == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if family == "opencl":
        from .opencl_backend import OpenCLBackend

        return OpenCLBackend(selector)
    from .cuda_backend import CudaBackend

    return CudaBackend()


__all__ = ["Backend", "BackendUnavailable", "available", "make_backend", "select_backend", "split_name"]
