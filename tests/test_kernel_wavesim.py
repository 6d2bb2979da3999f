"""The FDTD kernel: OpenCL (and CUDA when present) equal the NumPy reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.mark.gpu
def test_cuda_equals_numpy(cuda_backend: str, reference: np.ndarray) -> None:
    got = run_field(cuda_backend, PARAMS, 240, batch=50)
    assert got.tobytes() == reference.tobytes()


def test_params_validated() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        WaveParams(2, 10, 10)
    with pytest.raises(ValueError, match="interior"):
        make_spec(WaveParams(10, 10, 10, src=(0, 5, 5)))
