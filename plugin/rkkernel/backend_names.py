"""Back-end names (``numpy``, ``cuda``, ``opencl``, ``opencl:SELECTOR``), parsed without importing numpy.

rkrun validates ``--backend`` while parsing its options, before its stop
signals are held (see ``signals.StopFlag.held``); importing the back ends
there would start numpy's BLAS threads unmasked, and a SIGUSR1 could land on
one of them while LLVM's handler is installed, and be lost.
"""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """No device of the requested back end can run the kernel (exit 2 in rkrun)."""


#: ``auto`` tries these in order.
ORDER = ("cuda", "opencl", "numpy")
FAMILIES = frozenset(ORDER)


def split_name(name: str) -> tuple[str, str | None]:
    """``"opencl:intel"`` -> ``("opencl", "intel")``; BackendUnavailable for an unknown family."""
    family, _, selector = name.strip().partition(":")
    if family not in FAMILIES:
        raise BackendUnavailable(f"unknown back end {name!r} (choose auto, {', '.join(ORDER)}, or opencl:DEVICE)")
    if selector and family != "opencl":
        raise BackendUnavailable(f"back end {name!r}: only opencl takes a device selector")
    return family, selector or None
