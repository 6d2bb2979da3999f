"""The FDTD kernel: OpenCL (and CUDA when present) equal the NumPy reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from rkkernel.control import Command
from rkkernel.ftz import FTZ_LIMIT
from rkkernel.runtime import PersistentKernel
from rkkernel.wavesim import WaveParams, current_field, make_spec


def run_field(backend: str, params: WaveParams, steps: int, batch: int = 37) -> np.ndarray:
    k = PersistentKernel(make_spec(params), backend)
    done = 0
    while done < steps:
        n = min(batch, steps - done)
        k.run(n)
        done += n
    assert k.step == steps
    return current_field({n: k.region(n) for n in ("pressure_a", "pressure_b")}, steps)


PARAMS = WaveParams(26, 22, 30)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return run_field("numpy", PARAMS, 240)


def test_reference_is_a_wave(reference: np.ndarray) -> None:
    assert np.isfinite(reference).all()
    assert 0.01 < float(np.abs(reference).max()) < 100.0
    nz = np.abs(reference[reference != 0])
    assert nz.min() >= FTZ_LIMIT
    # rigid walls stay zero
    for face in (reference[0], reference[-1], reference[:, 0], reference[:, -1], reference[:, :, 0], reference[:, :, -1]):
        assert not face.any()


def test_opencl_equals_numpy(opencl_backend: str, reference: np.ndarray) -> None:
    got = run_field(opencl_backend, PARAMS, 240, batch=50)
    assert got.tobytes() == reference.tobytes()


def test_batching_does_not_change_bits(reference: np.ndarray) -> None:
    assert run_field("numpy", PARAMS, 240, batch=240).tobytes() == reference.tobytes()


def test_flush_to_zero_region_matches(opencl_backend: str) -> None:
    """At step 40 the wave front's tail is at the flush threshold: the hardest case for identical bits."""
    ref = run_field("numpy", PARAMS, 40)
    tiny = np.abs(ref[ref != 0])
    assert tiny.min() >= FTZ_LIMIT and tiny.min() < 1e-36
    assert run_field(opencl_backend, PARAMS, 40).tobytes() == ref.tobytes()


@pytest.mark.parametrize(
    ("params", "steps"),
    [
        (WaveParams(17, 9, 12, src=(8, 4, 1)), 60),  # source on the first interior plane: no lower bulk
        (WaveParams(16, 9, 13, src=(1, 4, 11)), 60),  # ... on the last, next to an x wall, odd lower bulk
        (WaveParams(1024, 8, 130), 12),  # 4 MiB fields: huge-page backed buffers on a CPU device
    ],
)
def test_opencl_equals_numpy_other_geometries(opencl_backend: str, params: WaveParams, steps: int) -> None:
    ref = run_field("numpy", params, steps)
    assert np.abs(ref).max() > 0
    assert run_field(opencl_backend, params, steps, batch=5).tobytes() == ref.tobytes()


def test_opencl_launches_cover_each_plane_once() -> None:
    """The split around the source plane: every interior plane exactly once, whole rows, even bulk parts."""
    from rkkernel.backends.opencl_backend import _cpu_local_size

    for params in (PARAMS, WaveParams(16, 9, 13, src=(1, 4, 11)), WaveParams(20, 10, 40, src=(5, 5, 1)), WaveParams(256, 256, 256)):
        launches = make_spec(params).launches_for("opencl")
        planes = []
        for launch in launches:
            nx, rows, n = launch.global_size
            z0 = int(launch.args[-2])
            assert (nx, rows) == (params.nx, params.ny - 2)
            assert launch.args[-1] == "x_interior_mask"
            planes += range(z0, z0 + n)
            assert (launch.function == "fdtd_step") == (z0 == params.source[2])
            assert n == 1 or n % 2 == 0
            if n % 2 == 0 and 2 * nx <= 512:
                assert _cpu_local_size(launch.global_size, 4096) == (nx, 1, 2)
        assert planes == list(range(1, params.nz - 1))


def test_huge_page_array_is_aligned_and_zeroed() -> None:
    from rkkernel.backends.hostmem import HUGE_PAGE, huge_page_array

    a = huge_page_array((3, 1000, 1000), "<f4")
    assert a.shape == (3, 1000, 1000) and a.dtype == np.dtype("<f4")
    assert a.ctypes.data % HUGE_PAGE == 0
    assert not a.any()
    a[...] = 1.5
    assert float(a.sum(dtype=np.float64)) == 1.5 * a.size


@pytest.mark.gpu
def test_cuda_equals_numpy(cuda_backend: str, reference: np.ndarray) -> None:
    got = run_field(cuda_backend, PARAMS, 240, batch=50)
    assert got.tobytes() == reference.tobytes()


def test_params_validated() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        WaveParams(2, 10, 10)
    with pytest.raises(ValueError, match="interior"):
        make_spec(WaveParams(10, 10, 10, src=(0, 5, 5)))


@pytest.mark.parametrize("levels", [1, 2, 3, 4])
@pytest.mark.parametrize("slabs", [1, 2, 3, 5])
def test_multi_step_sweep_equals_single_steps(opencl_backend: str, levels: int, slabs: int) -> None:
    """fdtd_sweep with any number of slabs (threads) and levels gives the bits of single steps.

    The back end runs one slab per core (two here); this launches the kernel
    directly to cover the boundaries between three to five slabs too, the
    source's plane on a slab boundary, and a start at an odd step.
    """
    params = WaveParams(18, 10, 2 * levels * slabs + 2 + 3, src=(7, 4, 2 * levels + 1))
    ref = PersistentKernel(make_spec(params), "numpy")
    ref.run(3)
    k = PersistentKernel(make_spec(params), opencl_backend)
    k.run(3)  # odd start: the Swap arguments resolve by the first step's parity
    be = k.backend
    cl = be.cl
    fused = make_spec(params).fused["opencl"]
    (launch,) = fused.launches
    args = list(launch.args[:-1]) + [np.int32(levels)]
    sync = cl.Buffer(be.ctx, cl.mem_flags.READ_WRITE, 4 * slabs)
    from rkkernel.backends.base import resolve_arg
    from rkkernel.spec import CONTROL, SYNC

    kern = cl.Kernel(be.program, launch.function)
    for i, a in enumerate(args):
        kern.set_arg(i, resolve_arg(a, 3 % 2, be.bufs, ((CONTROL, be.ctl), (SYNC, sync))))
    step = 3
    for _ in range(2):
        cl.enqueue_fill_buffer(be.queue, sync, np.uint32(0), 0, 4 * slabs)
        cl.enqueue_nd_range_kernel(be.queue, kern, (slabs,), (1,))
        be.write_control("current_step", step + levels)  # ordered after the launch
        ref.run(levels)
        step += levels
        want = current_field({n: ref.region(n) for n in ("pressure_a", "pressure_b")}, step)
        got = current_field({n: k.region(n) for n in ("pressure_a", "pressure_b")}, step)
        assert got.tobytes() == want.tobytes(), f"differs after step {step}"
        if levels % 2:  # the kernel's fields swap roles with the parity of the first step
            break
    assert np.abs(want).max() > 0


def test_fused_launches_end_at_every_command_step(opencl_backend: str) -> None:
    """Snapshots at steps inside a would-be multi-step sweep still pause at their exact step."""
    from rkkernel.wavesim import SWEEP_LEVELS

    params = WaveParams(20, 12, 2 * SWEEP_LEVELS * 2 + 2)
    k = PersistentKernel(make_spec(params), opencl_backend)
    assert k.backend.fused is not None and k.backend.fused.steps == SWEEP_LEVELS
    ref = PersistentKernel(make_spec(params), "numpy")
    seen = []

    def fields(kern: PersistentKernel) -> bytes:
        return current_field({n: kern.region(n) for n in ("pressure_a", "pressure_b")}, kern.step).tobytes()

    k.on_event = lambda ev, kern: seen.append((ev.step, kern.step, fields(kern)))
    stops = [1, SWEEP_LEVELS + 2, 2 * SWEEP_LEVELS + 3]
    for s in stops:
        k.send(Command.SNAPSHOT, s)
    k.run(3 * SWEEP_LEVELS + 1)
    assert [(a, b) for a, b, _ in seen] == [(s, s) for s in stops]
    for s, _, got in seen:
        ref.run(s - ref.step)
        assert got == fields(ref), f"state at the pause of step {s}"
    ref.run(k.step - ref.step)
    assert fields(k) == fields(ref)
