"""Series sampled on the device (issue 19 item 1), fused sweeps of any depth (item 3), ``--energy-every 0``.

The energy series is Σp² in the fixed order documented in ``rkkernel.reduce``;
every back end must give its bits, inside a batch or not, with commands
pending or not. Small grids with odd sizes (rows that are not whole vectors,
planes that do not fill a work-group) keep this fast.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from rkkernel.backends.opencl_backend import OpenCLBackend
from rkkernel.control import Command
from rkkernel.reduce import combine_planes, plane_sumsq, sumsq
from rkkernel.runtime import PersistentKernel
from rkkernel.traveltime import make_spec as tt_spec
from rkkernel.wavesim import WaveParams, make_spec

PARAMS = WaveParams(21, 13, 19)


def _hostile_field(shape: tuple[int, int, int], seed: int = 7) -> np.ndarray:
    """Values over ~60 decades: every reordering of the additions shows in the last bits."""
    rng = np.random.default_rng(seed)
    mant = rng.standard_normal(shape)
    expo = rng.integers(-30, 30, size=shape)
    return (mant * 10.0**expo).astype(np.float32)


def test_reference_order_is_the_documented_one() -> None:
    """Columns over y, planes over x, planes combined in z order, all float64 from +0.0."""
    f = _hostile_field((3, 4, 5))
    expect_planes = []
    for z in range(3):
        cols = []
        for x in range(5):
            acc = 0.0
            for y in range(4):
                v = float(f[z, y, x])
                acc += v * v
            cols.append(acc)
        acc = 0.0
        for c in cols:
            acc += c
        expect_planes.append(acc)
    assert plane_sumsq(f).tolist() == expect_planes
    total = 0.0
    for p in expect_planes:
        total += p
    assert sumsq(f) == total
    # a z-slab split reproduces the total: each slab's planes, gathered in plane order
    slabs = [plane_sumsq(f[:1]), plane_sumsq(f[1:])]
    assert combine_planes(np.concatenate(slabs)) == total
    # the order matters for such values (so the test above can fail)
    assert float(np.add.reduce(f.astype(np.float64).ravel() ** 2)) != total or float(np.sum(f.astype(np.float64) ** 2)) != total


def test_device_sums_equal_the_reference(kernel_backend: str) -> None:
    k = PersistentKernel(make_spec(PARAMS), kernel_backend)
    f = _hostile_field((PARAMS.nz, PARAMS.ny, PARAMS.nx))
    k.backend.write_region("pressure_b", f)
    got = k.sumsq_now("pressure_b")
    assert got.dtype == np.float64 and got.shape == (PARAMS.nz,)
    assert got.tobytes() == plane_sumsq(f).tobytes()
    if isinstance(k.backend, OpenCLBackend):
        assert k.backend._reducer() is not None  # noqa: SLF001 - reduced on the device, not the host fallback
    k.backend.close()


def _stepwise_reference(params: WaveParams, steps: list[int], end: int) -> list[bytes]:
    ref = PersistentKernel(make_spec(params), "numpy")
    out = []
    for t in steps:
        ref.run(t - ref.step)
        field = ref.region("pressure_a" if t % 2 == 0 else "pressure_b")
        out.append(plane_sumsq(field).tobytes())
    ref.run(end - ref.step)
    return out


def test_samples_inside_a_batch_equal_stepwise_samples(kernel_backend: str) -> None:
    """One 23-step batch (fused sweeps across the sample steps 0, 3, 10, 11, 23) gives the sums of stopping at each."""
    steps = [0, 3, 10, 11, 23]
    expect = _stepwise_reference(PARAMS, steps, 23)
    k = PersistentKernel(make_spec(PARAMS), kernel_backend)
    _, sums = k.run_sampled(23, [(t, "pressure_a" if t % 2 == 0 else "pressure_b") for t in steps])
    assert k.step == 23
    assert [s.tobytes() for s in sums] == expect
    ref = PersistentKernel(make_spec(PARAMS), "numpy")
    ref.run(23)
    assert k.region("pressure_b").tobytes() == ref.region("pressure_b").tobytes()


def test_samples_with_a_command_pending_take_the_stepwise_path(kernel_backend: str) -> None:
    """A snapshot command inside the batch pauses the device there; the samples still come from their steps."""
    steps = [4, 9]
    expect = _stepwise_reference(PARAMS, steps, 12)
    k = PersistentKernel(make_spec(PARAMS), kernel_backend)
    seen = []
    k.on_event = lambda ev, kern: seen.append(kern.step)
    k.send(Command.SNAPSHOT, 6)
    _, sums = k.run_sampled(12, [(4, "pressure_a"), (9, "pressure_b")])
    assert seen == [6] and k.step == 12
    assert [s.tobytes() for s in sums] == expect


def test_sample_steps_out_of_the_batch_are_refused() -> None:
    k = PersistentKernel(make_spec(PARAMS), "numpy")
    with pytest.raises(ValueError, match="ascending"):
        k.run_sampled(5, [(6, "pressure_a")])
    with pytest.raises(ValueError, match="ascending"):
        k.run_sampled(5, [(4, "pressure_a"), (2, "pressure_a")])


def test_sums_of_a_region_that_is_not_a_3d_float32_field_are_refused() -> None:
    k = PersistentKernel(make_spec(PARAMS), "numpy")
    with pytest.raises(ValueError, match="velocity"):
        k.sumsq_now("velocity")


def test_sweep_depth_follows_the_stops(opencl_backend: str) -> None:
    """Commands 2 steps apart end each sweep at their step with a 2-deep sweep, not single steps."""
    k = PersistentKernel(tt_spec(PARAMS), opencl_backend)
    f = k.backend.fused
    if f is None:
        pytest.skip(f"{k.description}: no fused sweeps on this device")
    assert sorted(f.by_depth) == [1, 2, 3, 4]
    assert [f.depth(n) for n in (0, 1, 2, 3, 4, 9)] == [0, 1, 2, 3, 4, 4]
    w = PersistentKernel(make_spec(PARAMS), opencl_backend).backend.fused
    assert w is not None and sorted(w.by_depth) == [2, 3, 4] and w.depth(1) == 0  # wavesim: 1 step runs fdtd_bulk
    assert sorted(w.sampled) == [2, 3, 4]  # fdtd_sweep_sampled: samples inside a sweep (pocl and Intel have float64)


def test_samples_of_a_fresh_kernel_inside_sweeps_only(kernel_backend: str) -> None:
    """The first reduction a kernel ever does is inside a sweep (a restored run's first batch)."""
    expect = _stepwise_reference(PARAMS, [8, 13], 16)
    k = PersistentKernel(make_spec(PARAMS), kernel_backend)
    _, sums = k.run_sampled(16, [(8, "pressure_a"), (13, "pressure_b")])
    assert [x.tobytes() for x in sums] == expect and all(x.shape == (PARAMS.nz,) for x in sums)


def test_samples_of_the_field_a_sweep_does_not_write_end_the_sweep(opencl_backend: str) -> None:
    """A sample of the *previous* field (not what the sweep level writes) still gets that field's bits."""
    ref = PersistentKernel(make_spec(PARAMS), "numpy")
    expect = []
    for t in (5, 9):
        ref.run(t - ref.step)
        expect.append(plane_sumsq(ref.region("pressure_a" if t % 2 else "pressure_b")).tobytes())  # the other field
    k = PersistentKernel(make_spec(PARAMS), opencl_backend)
    _, sums = k.run_sampled(16, [(5, "pressure_a"), (9, "pressure_a")])
    assert k.step == 16 and [x.tobytes() for x in sums] == expect


def test_traveltime_two_step_batches_equal_numpy(opencl_backend: str) -> None:
    """``--checkpoint-every 2``'s batches (2-deep sweeps, either parity) give the reference bits."""
    params = WaveParams(37, 23, 29)
    ref, dev = PersistentKernel(tt_spec(params), "numpy"), PersistentKernel(tt_spec(params), opencl_backend)
    for _ in range(9):
        ref.run(2)
        dev.run(2)
    dev.run(3)
    ref.run(3)
    for name in ("time_a", "time_b", "last_change"):
        assert dev.region(name).tobytes() == ref.region(name).tobytes(), name


# ---------------------------------------------------------------- rkrun
def _rkrun_ok(rkrun, *args: str) -> None:
    p = rkrun(*args)
    assert p.wait(120) == 0, p.log()


def test_energy_every_0_checkpoints_resumes_and_writes_an_empty_series(rkrun, tmp_path: Path) -> None:
    common = ("wavesim", "--grid", "12", "10", "14", "--checkpoint-every", "5", "--backend", "numpy", "--energy-every", "0")
    ck, out = str(tmp_path / "ck"), str(tmp_path / "r.h5")
    _rkrun_ok(rkrun, *common, "--steps", "12", "--checkpoint-dir", ck, "--out", out)
    _rkrun_ok(rkrun, *common, "--steps", "20", "--checkpoint-dir", ck, "--out", out)
    with h5py.File(out, "r") as f:
        assert f.attrs["step"] == 20 and f["energy"].shape == (0, 2)


def test_rkrun_energy_is_the_reference_sum_at_every_sample(rkrun, tmp_path: Path, kernel_backend: str) -> None:
    """Samples every 3 steps inside 32-step batches; the last sample is the result field's sum."""
    out = tmp_path / "r.h5"
    args = ("--grid", "21", "13", "19", "--steps", "40", "--energy-every", "3", "--backend", kernel_backend)
    _rkrun_ok(rkrun, "wavesim", *args, "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    with h5py.File(out, "r") as f:
        e, p = f["energy"][()], f["pressure"][()]
    assert e[:, 0].tolist() == [*range(0, 40, 3), 40]
    assert e[-1, 1] == sumsq(p) and e[0, 1] == 0.0 and (e[1:, 1] > 0).all()


def test_device_series_do_not_cut_batches() -> None:
    """Only checkpoints, host series and ``--batch`` end a batch; a device series' steps fall inside it."""
    from rkkernel.plugin import KernelRun, Series
    from rkkernel.runner import RunConfig, StepLoop

    loop = StepLoop.__new__(StepLoop)
    loop.step = 0
    loop.cfg = RunConfig(grid=(21, 13, 19), steps=100, checkpoint_dir="-", checkpoint_every=None, out="-", batch=32)
    device = Series("energy", 1, 10, lambda k, s: (0.0,), sumsq=lambda s: "pressure_a")
    loop.krun = KernelRun(make_spec(PARAMS), lambda k, s: ({}, {}), series=(device,))
    assert loop._next_stop() == 32  # noqa: SLF001
    assert [t for t, _, _ in loop._device_samples(32)] == [10, 20, 30]  # noqa: SLF001
    loop.cfg.steps = 30
    assert loop._next_stop() == 30 and [t for t, _, _ in loop._device_samples(30)] == [10, 20, 30]  # noqa: SLF001
    loop.krun = KernelRun(make_spec(PARAMS), lambda k, s: ({}, {}), series=(Series("traces", 1, 10, lambda k, s: (0.0,)),))
    loop.cfg.steps = 100
    assert loop._next_stop() == 10  # noqa: SLF001 - a host series still ends its batches


def test_cuda_reduction_kernels_compile_and_take_the_backend_arguments() -> None:
    """NVRTC (no GPU needed) compiles kernels/rk_reduce.cu into the CUDA program, with the arguments
    ``CudaBackend.enqueue_sumsq`` passes: (f, cols, nx, ny, nz) and (cols, sums, nx, nz, offset)."""
    cc = pytest.importorskip("test_cuda_compile")
    from rkkernel.backends.cuda_backend import cuda_program
    from rkkernel.spec import Launch

    nv = cc._load_nvrtc()  # noqa: SLF001 - the same loader the CUDA compile test uses
    if isinstance(nv, str):
        pytest.skip(nv)
    source, options = cuda_program(make_spec(PARAMS))
    rc, log, ptx = nv.compile(source, (*options, "--gpu-architecture=compute_80"))
    assert rc == 0, log
    entries = cc.ptx_entries(ptx)
    i32 = np.int32(0)
    for launch in (
        Launch("rk_sumsq_columns", (1,), ("pressure_a", "pressure_b", i32, i32, i32)),
        Launch("rk_sumsq_planes", (1,), ("pressure_a", "pressure_b", i32, i32, i32)),
    ):
        assert cc.signature_problems(entries, launch) == []
