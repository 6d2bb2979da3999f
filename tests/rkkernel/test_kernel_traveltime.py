"""The traveltime kernel: first arrivals, identical bits on every back end, sparse deltas, crash-safe runs."""

from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures_kernel import rkrun_env
from helpers import REPO, wait_until
from rkckpt.chain import NAME_RE
from rkkernel.runtime import PersistentKernel
from rkkernel.traveltime import current_time, make_spec
from rkkernel.wavesim import WaveParams

PARAMS = WaveParams(22, 18, 26)
#: rkrun runs: big enough that a field spans more than 64 delta blocks, so the manager's
#: sampled change estimate sees a front, not "every chunk changed".
GRID = ("44", "40", "48")
COMMON = ("--grid", *GRID, "--steps", "200", "--checkpoint-every", "2", "--batch", "2")


def converged_field(backend: str, params: WaveParams = PARAMS, batch: int = 7) -> tuple[np.ndarray, int]:
    k = PersistentKernel(make_spec(params), backend)
    while True:
        k.run(batch)
        last = int(k.region("last_change")[0])
        if k.step > last:
            return current_time({n: k.region(n) for n in ("time_a", "time_b")}, k.step), last


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, int]:
    return converged_field("numpy")


def test_traveltimes_are_first_arrivals(reference: tuple[np.ndarray, int]) -> None:
    t, last = reference
    sx, sy, sz = PARAMS.source
    assert t[sz, sy, sx] == 0.0 and 0 < last < 60
    inner = t[1:-1, 1:-1, 1:-1]
    assert np.isfinite(inner).all() and np.isinf(t[0]).all() and np.isinf(t[:, :, -1]).all()
    # along x in the top layer: straight ray at v_top, exact on the grid axis
    for d in (1, 5, 9):
        assert t[sz, sy, sx + d] == pytest.approx(d * PARAMS.dx / PARAMS.v_top, rel=1e-6)
    # a diagonal: within the 26-neighbour graph's few per cent of the straight ray
    d = 3
    assert t[sz + d, sy + d, sx + d] == pytest.approx(math.sqrt(3) * d * PARAMS.dx / PARAMS.v_top, rel=1e-5)
    # monotone away from the source along every axis
    assert (np.diff(t[sz, sy, sx:-1]) > 0).all() and (np.diff(t[sz:-1, sy, sx]) > 0).all()


def test_opencl_equals_numpy_bit_for_bit(opencl_backend: str, reference: tuple[np.ndarray, int]) -> None:
    t, last = converged_field(opencl_backend, batch=5)
    assert last == reference[1]
    assert t.tobytes() == reference[0].tobytes()


def test_opencl_every_batch_equals_numpy(opencl_backend: str) -> None:
    """Both buffers and last_change after every batch, on a grid that exercises every path of the CPU sweep:
    x rows that are not whole 16-cell vectors, an odd number of interior rows (pairs and a single row),
    several slabs, fused sweeps starting at either step parity, and the single steps in between."""
    params = WaveParams(37, 23, 29)
    ref, dev = PersistentKernel(make_spec(params), "numpy"), PersistentKernel(make_spec(params), opencl_backend)
    for batch in (5, 4, 7, 4, 3, 8, 5):
        ref.run(batch)
        dev.run(batch)
        assert dev.step == ref.step
        for name in ("time_a", "time_b", "last_change"):
            assert dev.region(name).tobytes() == ref.region(name).tobytes(), (name, ref.step)
    assert 0 < int(ref.region("last_change")[0]) < ref.step  # converged on the way: both phases compared


def test_cuda_equals_numpy_bit_for_bit(cuda_backend: str, reference: tuple[np.ndarray, int]) -> None:
    t, last = converged_field(cuda_backend, batch=5)
    assert last == reference[1] and t.tobytes() == reference[0].tobytes()


def test_cuda_source_compiles_and_matches_the_spec() -> None:
    """NVRTC (no GPU needed) compiles kernels/traveltime.cu; its entry takes exactly the spec's arguments."""
    cc = pytest.importorskip("test_cuda_compile")
    from rkkernel.backends.cuda_backend import cuda_program

    nv = cc._load_nvrtc()  # noqa: SLF001 - the same loader the CUDA compile test uses
    if isinstance(nv, str):
        pytest.skip(nv)
    spec = make_spec(PARAMS)
    source, options = cuda_program(spec)
    rc, log, ptx = nv.compile(source, (*options, "--gpu-architecture=compute_80"))
    assert rc == 0, log
    entries = cc.ptx_entries(ptx)
    assert [p for launch in spec.launches for p in cc.signature_problems(entries, launch)] == []


# ---------------------------------------------------------------- rkrun
def result(path: Path) -> tuple[bytes, int, int]:
    with h5py.File(path) as f:
        assert f["traveltime"].shape == (48, 40, 44) and f["traveltime"].dtype == np.float32
        return f["traveltime"][()].tobytes(), int(f.attrs["step"]), int(f.attrs["converged_step"])


def chain_files(ck: Path) -> list[tuple[int, str]]:
    return sorted((int(m["step"]), m["kind"]) for p in ck.glob("*") if (m := NAME_RE.match(p.name))) if ck.is_dir() else []


def run_numpy(ck: Path, out: Path) -> None:
    """An uninterrupted ``rkrun traveltime`` run on NumPy."""
    cmd = [
        sys.executable,
        "-m",
        "rkkernel.cli",
        "traveltime",
        *COMMON,
        "--backend",
        "numpy",
        "--checkpoint-dir",
        str(ck),
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, env=rkrun_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def rkrun_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int, int]:
    d = tmp_path_factory.mktemp("ttref")
    run_numpy(d / "ck", d / "r.h5")
    return result(d / "r.h5")


def test_rkrun_result_and_deltas_in_ls(rkrun_reference: tuple[bytes, int, int], tmp_path: Path) -> None:
    field, step, conv = rkrun_reference
    ref, last = converged_field("numpy", WaveParams(*(int(g) for g in GRID)), batch=9)
    assert field == ref.tobytes() and conv == last and step == conv + 1
    ck = tmp_path / "ck"
    run_numpy(ck, tmp_path / "r.h5")
    ls = subprocess.run(
        [sys.executable, "-c", "from rkckpt.cli import main; main()", "ls", str(ck), "--json"],
        env=rkrun_env(),
        capture_output=True,
        text=True,
    )
    assert ls.returncode == 0, ls.stderr
    rows = json.loads(ls.stdout)
    rows = rows if isinstance(rows, list) else rows.get("checkpoints", rows.get("rows", []))
    kinds = [r.get("kind") for r in rows]
    assert "delta" in kinds and "full" in kinds, ls.stdout


def test_restore_from_full_plus_three_deltas(rkrun, rkrun_reference: tuple[bytes, int, int], tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    part = ("traveltime", *COMMON[:4], "--steps", "31", *COMMON[6:], "--backend", "numpy", "--checkpoint-dir", str(ck))
    first = rkrun(*part, "--out", str(tmp_path / "part.h5"))
    assert first.wait(120) == 0, first.log()
    assert [k for _, k in chain_files(ck)][-4:] == ["delta"] * 4, chain_files(ck)
    p = rkrun("traveltime", *COMMON, "--backend", "numpy", "--checkpoint-dir", str(ck), "--out", str(out))
    assert p.wait(120) == 0, p.log()
    m = re.search(r"restored from step 31 \(chain: [^)]*\) = full step \d+ \+ (\d+) delta\(s\)", p.log())
    assert m and int(m.group(1)) >= 3, p.log()
    assert result(out) == rkrun_reference


@pytest.mark.parametrize("backend", ["numpy", "opencl"])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(
    rkrun, backend: str, rkrun_reference: tuple[bytes, int, int], tmp_path: Path
) -> None:
    """Killed three times at random moments, resumed each time: the NumPy reference's bits (OpenCL too)."""
    if backend == "opencl":
        from fixtures_kernel import _probe

        ok, why = _probe("opencl")
        if not ok:
            pytest.skip(why)
    rng = random.Random(f"tt-kill-{backend}")
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    args = ("traveltime", *COMMON, "--backend", backend, "--checkpoint-dir", str(ck), "--out", str(out))
    seen = 0
    for _ in range(3):
        p = rkrun(*args, "--throttle-ms", "30")
        wait_until(
            lambda p=p, s=seen: max((st for st, _ in chain_files(ck)), default=0) > s or p.proc.poll() is not None, 120, "a new checkpoint"
        )
        time.sleep(rng.uniform(0.0, 0.2))
        p.proc.send_signal(signal.SIGKILL)
        p.wait(60)
        seen = max((st for st, _ in chain_files(ck)), default=0)
    p = rkrun(*args)
    assert p.wait(180) == 0, p.log()
    assert "restored from step" in p.log()
    assert result(out) == rkrun_reference


def test_sigterm_right_after_a_periodic_delta_keeps_the_chain(rkrun, rkrun_reference: tuple[bytes, int, int], tmp_path: Path) -> None:
    """A stop at a step that was just checkpointed must not write that step again (a delta against itself
    would replace the file and orphan the chain): the resume restores the delta chain up to the stop."""
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    args = ("traveltime", *COMMON, "--backend", "numpy", "--checkpoint-dir", str(ck), "--out", str(out))
    p = rkrun(*args, "--throttle-ms", "150")
    wait_until(lambda: max((st for st, _ in chain_files(ck)), default=0) >= 26 or p.proc.poll() is not None, 120, "checkpoint 26")
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(60) == 75, p.log()
    stopped = json.loads((ck / "rkrun.stopped.json").read_text())["step"]
    assert (stopped, "delta") in chain_files(ck)
    p = rkrun(*args)
    assert p.wait(180) == 0, p.log()
    m = re.search(rf"restored from step {stopped} \(chain: [^)]*\) = full step \d+ \+ (\d+) delta\(s\)", p.log())
    assert m and int(m.group(1)) >= 1 and "skipped" not in p.log(), p.log()
    assert result(out) == rkrun_reference
