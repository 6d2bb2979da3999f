"""What a back end does: keep regions, control block and queues resident, and run batches.

The runtime (``runtime.PersistentKernel``) owns the host-side protocol; a back
end only moves bytes and enqueues launches. Everything except ``sync`` and
the ``read_*`` calls is asynchronous and ordered (one in-order device queue).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..backend_names import BackendUnavailable as BackendUnavailable  # re-exported: the back ends raise it
from ..spec import KernelSpec, Swap


def resolve_arg(a: object, parity: int, bufs: Mapping[str, object], placeholders: Sequence[tuple[object, object]]) -> object:
    """A ``Launch`` argument as the device object to pass: a placeholder the back end
    provides (control block, queues, ...), a region (``Swap`` picks by step parity)
    or a NumPy scalar. One rule for every back end, so a spec means the same on each."""
    for key, value in placeholders:
        if a is key:
            return value
    if isinstance(a, Swap):
        return bufs[a.pick(parity)]
    if isinstance(a, str):
        return bufs[a]
    if isinstance(a, np.generic):
        return a
    raise TypeError(f"unsupported kernel argument {a!r}")


def check_out(out: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``out`` if a region ``name`` of ``dtype``/``shape`` can be copied into it, else ValueError."""
    if out.dtype != dtype or out.shape != tuple(shape) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"region {name!r}: cannot read {dtype}{list(shape)} into a {out.dtype}{list(out.shape)} array")
    return out


def _copied() -> None:
    """``wait()`` of a copy that was made synchronously."""


class Backend(ABC):
    name: str = "?"
    description: str = ""

    @abstractmethod
    def load(self, spec: KernelSpec, regions: dict[str, np.ndarray], control: np.ndarray, h2k: np.ndarray, k2h: np.ndarray) -> None:
        """Allocate device memory, upload the initial state, build kernels once."""

    @abstractmethod
    def enqueue_steps(self, first_step: int, count: int, stops: frozenset[int] = frozenset()) -> None:
        """Enqueue a step-boundary poll and ``count`` steps, without waiting.

        ``stops``: steps at which a command is due. A back end that fuses
        several steps into one launch (``KernelSpec.fused``) must end a fused
        launch at each of them, so the command takes effect at its step.
        """

    @abstractmethod
    def read_control(self) -> np.ndarray:
        """Wait for queued work and return a copy of the control block."""

    @abstractmethod
    def write_control(self, field: str, value: int) -> None:
        """Write one control-block field (ordered after queued work)."""

    @abstractmethod
    def write_message(self, slot: int, message: np.ndarray) -> None:
        """Write one H2K queue slot (ordered after queued work)."""

    @abstractmethod
    def read_queue(self, which: str) -> np.ndarray:
        """Copy of the ``h2k`` or ``k2h`` ring buffer."""

    @abstractmethod
    def read_region(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Host copy of a region (waits for queued work), into ``out`` when given.

        ``out`` (the region's dtype and shape, C-contiguous, writable; see
        ``check_out``) lets a caller reuse host memory snapshot after
        snapshot instead of allocating and page-faulting the whole state.
        """

    @abstractmethod
    def write_region(self, name: str, array: np.ndarray) -> None: ...

    # -------------------------------------------------------- halo planes
    # A decomposed kernel (``rkkernel.decomp``) exchanges a few z planes of its
    # fields between batches: axis 0 of the region, planes [z0, z1). These
    # defaults copy the whole region; back ends override them to move only
    # the planes (one contiguous byte range: z is the slowest axis).
    def read_planes(self, name: str, z0: int, z1: int) -> np.ndarray:
        """Host copy of planes [z0, z1) of region ``name`` (waits for queued work)."""
        return np.ascontiguousarray(self.read_region(name)[z0:z1])

    def write_planes(self, name: str, z0: int, planes: np.ndarray) -> None:
        """Overwrite planes [z0, z0 + len(planes)) of region ``name``."""
        arr = self.read_region(name)
        arr[z0 : z0 + len(planes)] = planes
        self.write_region(name, arr)

    def read_region_async(self, name: str, out: np.ndarray | None = None) -> tuple[np.ndarray, Callable[[], None]]:
        """Start a host copy of a region; return the array and a ``wait()`` for the copy.

        The copy is ordered like any other command: after the work queued so
        far and before work queued later, so once ``wait()`` returns the
        array holds the region exactly as of this call's place in the queue,
        whatever the device did since (a checkpoint stays the state of its
        step while the kernel runs on). Until then the caller must not read
        the array. Back ends that cannot copy asynchronously copy now.
        """
        return self.read_region(name, out), _copied

    # -------------------------------------------------------- series reductions
    # Σx² of a float32 (nz, ny, nx) region per z plane, in the order of
    # ``rkkernel.reduce`` (which documents it), into sample slot ``slot``:
    # the runtime enqueues one per sample step between a batch's steps, then
    # ``start_read_sums`` right after the batch (asynchronous where the back
    # end can: the read completes with the batch's own synchronisation) and
    # ``finish_read_sums`` after it. This default computes on the host from a
    # copy of the region: correct everywhere, fast nowhere; the OpenCL and
    # CUDA back ends reduce on the device and move only ``nz`` doubles.
    def enqueue_sumsq(self, region: str, slot: int) -> None:
        from ..reduce import plane_sumsq

        self._sumsq_shape(region)
        sums = getattr(self, "_host_sums", None)
        if sums is None or slot == 0:
            sums = self._host_sums = {}
        sums[slot] = plane_sumsq(self.read_region(region))

    def enqueue_steps_sampled(self, first_step: int, count: int, samples: Sequence[tuple[int, str, int]]) -> None:
        """``enqueue_steps`` with ``enqueue_sumsq(region, slot)`` at each ``(step, region, slot)`` of
        ``samples`` (ascending steps in ``[first_step, first_step + count]``), without waiting.

        This default ends the steps at each sample step; a back end whose fused
        launches can sample (``FusedSteps.sampled``) overrides it.
        """
        s = first_step
        for t, name, slot in samples:
            if t > s:
                self.enqueue_steps(s, t - s)
                s = t
            self.enqueue_sumsq(name, slot)
        if s < first_step + count:
            self.enqueue_steps(s, first_step + count - s)

    def reserve_sums(self, slots: int, region: str) -> None:  # noqa: B027 - optional hook
        """Room for ``slots`` samples of ``region``, before a batch is enqueued."""
        return None

    def start_read_sums(self, count: int) -> None:
        sums = getattr(self, "_host_sums", {})
        self._host_read = np.stack([sums[i] for i in range(count)]) if count else np.zeros((0, 0))

    def finish_read_sums(self) -> np.ndarray:
        """float64[count, nz]: the plane sums of slots 0 .. count-1 (see ``enqueue_sumsq``)."""
        return self._host_read

    def _sumsq_shape(self, region: str) -> tuple[int, int, int]:
        """The (nz, ny, nx) of a float32 3-D region, or ValueError naming it."""
        r = self.spec.region(region)  # type: ignore[attr-defined]
        if np.dtype(r.dtype) != np.dtype("<f4") or len(r.shape) != 3:
            raise ValueError(f"region {region!r}: Σx² needs a float32 (nz, ny, nx) region, it is {r.dtype}{list(r.shape)}")
        return int(r.shape[0]), int(r.shape[1]), int(r.shape[2])

    def write_control_block(self, control: np.ndarray) -> None:
        for f in control.dtype.names or ():
            if not f.startswith("_"):
                self.write_control(f, int(control[0][f]))

    def write_queue(self, which: str, array: np.ndarray) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional hook
        return None
