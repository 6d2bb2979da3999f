"""The user-facing description of a persistent kernel ("bring your own kernel").

A kernel is declared, not subclassed: its regions (device arrays), its source
per back end, the launches that make one step (with their arguments) and a
NumPy reference of the same step. The runtime does the rest: device
residency, control block and queues, batching, checkpoint/restore. The wave
simulation in ``wavesim.py`` is written against this API like any user's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"

Role = Literal["field", "static", "halo"]


@dataclass(frozen=True)
class RegionSpec:
    """A named device array.

    ``field``: evolving state (DeviceMemory chunk); ``static``: set once
    (material models, source wavelets; still checkpointed so a restore needs
    nothing else, and unchanged bytes cost nothing in a delta); ``halo``:
    exchange buffers, stored together in the HaloBuffers chunk.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: Role = "field"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Swap:
    """Argument that names region ``even`` on even steps and ``odd`` on odd steps (leapfrog)."""

    even: str
    odd: str

    def pick(self, step: int) -> str:
        return self.even if step % 2 == 0 else self.odd


class _Placeholder:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Argument placeholders the runtime fills in: the control-block pointer (first
#: argument of every step kernel), the two queues, (persistent kernels only)
#: the number of steps of the batch, and (fused steps only) a zeroed uint32
#: work-ordering buffer of ``FusedSteps.sync_words`` words.
CONTROL = _Placeholder("CONTROL")
H2K = _Placeholder("H2K")
K2H = _Placeholder("K2H")
STEPS = _Placeholder("STEPS")
SYNC = _Placeholder("SYNC")
#: Sampled fused launches only (``FusedSteps.sampled``): the float64 buffer of
#: sample rows (``nz`` plane sums a row), per-work-item float64 scratch of ``nx``
#: words, the int32 bit mask of the levels to sample and the int32 first row.
SUMS = _Placeholder("SUMS")
SUM_SCRATCH = _Placeholder("SUM_SCRATCH")
SAMPLE_LEVELS = _Placeholder("SAMPLE_LEVELS")
SAMPLE_ROW = _Placeholder("SAMPLE_ROW")

Arg = str | Swap | np.generic | _Placeholder


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a step. ``global_size`` is in work items (x fastest)."""

    function: str
    global_size: tuple[int, ...]
    args: tuple[Arg, ...]
    local_size: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FusedSteps:
    """Launches that advance ``steps`` steps at once (temporal blocking), for CPU devices.

    A stencil whose fields do not fit in cache is limited by memory traffic;
    doing several steps in one sweep (each trailing the one before by a
    plane, while its input is still in cache) moves each byte once per
    ``steps`` steps. The launches must give exactly the bits of ``steps`` single
    steps, starting at any step parity (``Swap`` arguments resolve by the
    parity of the first step); the step counter is advanced by the runtime
    afterwards, ``steps`` times, so commands still see every step. The
    runtime never fuses across a step at which a command is due.

    The launches' first global dimension is an upper bound: a back end
    runs one work item per compute unit (core), up to it, so each core can
    sweep its own slab. ``SYNC`` (``sync_words`` uint32, zeroed before every
    launch) lets work items order what the slabs share. Only devices in
    ``device_types`` use the fused launches; elsewhere the single-step
    launches run.
    """

    steps: int
    launches: tuple[Launch, ...]
    sync_words: int = 0
    device_types: tuple[str, ...] = ("cpu",)
    #: Index of the launches' argument that sets the sweep depth (an ``np.int32``
    #: equal to ``steps``), or None. With it a back end may also run shallower
    #: sweeps, ``min_steps`` .. ``steps`` deep (the same bits: depth only
    #: regroups steps), so a batch end, a checkpoint or a command that is not a
    #: multiple of ``steps`` away ends a sweep early instead of falling back to
    #: single steps (``--checkpoint-every 2`` with 4-step sweeps).
    depth_arg: int | None = None
    min_steps: int = 1
    #: Optional: the same launches that also record Σx² (the order of
    #: ``rkkernel.reduce``) of the field level j makes, for each bit j of
    #: ``SAMPLE_LEVELS``, into row ``SAMPLE_ROW`` + (rank of j) of ``SUMS``, each
    #: plane summed while it is in cache: a sample inside a batch then costs
    #: no pass over memory and does not end the sweep. ``level_outputs`` names
    #: the region level j writes (even j, odd j; ``Swap`` by the first step's
    #: parity): the runtime uses a sampled sweep only for those regions.
    sampled: tuple[Launch, ...] = ()
    level_outputs: tuple[Swap, Swap] | None = None


NumpyStep = Callable[[Mapping[str, np.ndarray], int], None]


@dataclass
class KernelSpec:
    """Everything the runtime needs to run, checkpoint and restore a kernel.

    ``numpy_step(regions, step)`` must update the arrays in place exactly as
    the device launches do (same operation order, same flush-to-zero) — it is
    both the CPU fallback and the bit-identity reference.
    """

    kernel_type: str
    grid: tuple[int, int, int]
    regions: list[RegionSpec]
    launches: list[Launch]
    sources: dict[str, str]
    numpy_step: NumpyStep
    initial: Callable[[], dict[str, np.ndarray]]
    params: dict[str, Any] = field(default_factory=dict)
    build_options: dict[str, list[str]] = field(default_factory=dict)
    tile_size: tuple[int, int, int] = (0, 0, 0)
    #: Optional per-back-end persistent kernel: one launch runs a whole batch
    #: (it must loop over STEPS steps and run rk_advance_dev between them).
    #: ``global_size``/``local_size`` are ignored; the back end sizes the grid.
    persistent: dict[str, Launch] = field(default_factory=dict)
    #: Optional per-back-end replacement for ``launches`` (same arithmetic,
    #: different split of the grid), e.g. a geometry one compiler vectorises
    #: better. Back ends read :meth:`launches_for`.
    backend_launches: dict[str, list[Launch]] = field(default_factory=dict)
    #: Optional per-back-end multi-step launches (see :class:`FusedSteps`).
    fused: dict[str, FusedSteps] = field(default_factory=dict)
    #: A decomposed kernel (one z slab of a multi-rank run, see ``rkkernel.decomp``):
    #: the runtime runs at most ``halo_steps`` steps between two calls of
    #: ``halo_exchange(kernel)``, which refreshes the halo planes from the
    #: neighbours (a collective: every rank calls it at the same steps).
    halo_steps: int = 0
    halo_exchange: Callable[[Any], None] | None = None

    def launches_for(self, backend: str) -> list[Launch]:
        return self.backend_launches.get(backend, self.launches)

    def region(self, name: str) -> RegionSpec:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"kernel {self.kernel_type!r} has no region {name!r}")

    def fingerprint(self) -> str:
        """Stable digest of what makes two runs the same simulation.

        Restoring a checkpoint whose fingerprint differs would silently
        continue a different simulation, so the runtime refuses it.
        """
        doc = {
            "kernel_type": self.kernel_type,
            "grid": list(self.grid),
            "regions": [[r.name, np.dtype(r.dtype).str, list(r.shape), r.role] for r in self.regions],
            "params": self.params,
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def source_text(self, backend: str) -> str:
        name = self.sources.get(backend)
        if name is None:
            raise KeyError(f"kernel {self.kernel_type!r} has no {backend} source")
        path = Path(name)
        if not path.is_absolute():
            path = KERNELS_DIR / path
        return path.read_text()

    def validate(self) -> None:
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate region names in {names}")
        fused = [x for f in self.fused.values() for x in f.launches]
        for launch in [*self.launches, *(x for ls in self.backend_launches.values() for x in ls), *fused]:
            for a in launch.args:
                for n in _arg_regions(a):
                    self.region(n)


def _arg_regions(a: Arg) -> list[str]:
    if isinstance(a, str):
        return [a]
    if isinstance(a, Swap):
        return [a.even, a.odd]
    return []
