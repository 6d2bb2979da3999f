"""Fixtures for the rkkernel tests: back-end availability and an ``rkrun`` launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO


def _probe(name: str) -> tuple[bool, str]:
    from rkkernel.backends import available

    return available(name)


def opencl_platforms() -> list[str]:
    """``opencl:<platform>`` for every OpenCL platform whose best device builds the wave program.

    The OpenCL tests run once per working platform (pocl and Intel's CPU
    runtime where both work), so bit-identity holds on each, not just on the
    one ``auto`` picks.
    """
    try:
        from rkkernel.backends.opencl_backend import verdicts
        from rkkernel.wavesim import WaveParams, make_spec

        vs = verdicts(make_spec(WaveParams(8, 8, 8)))
    except Exception:  # noqa: BLE001 - no pyopencl, no loader: no OpenCL parameters
        return []
    names: list[str] = []
    for v in vs:
        if v.ok and f"opencl:{v.candidate.alias}" not in names:
            names.append(f"opencl:{v.candidate.alias}")
    return names


OPENCL_PARAMS = opencl_platforms() or ["opencl"]


def _require(name: str) -> str:
    ok, why = _probe(name)
    if not ok:
        pytest.skip(f"{name} not available: {why}")
    return name


@pytest.fixture(scope="session", params=OPENCL_PARAMS)
def opencl_backend(request: pytest.FixtureRequest) -> str:
    return _require(request.param)


@pytest.fixture(scope="session")
def cuda_backend() -> str:
    return _require("cuda")


@pytest.fixture(params=["numpy", *OPENCL_PARAMS])
def kernel_backend(request: pytest.FixtureRequest) -> str:
    return request.param if request.param == "numpy" else _require(request.param)


def rkrun_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RKSLURM_CACHE_DIR", str(REPO / ".cache" / "rkslurm"))
    env.pop("RKSLURM_CHECKPOINT_DIR", None)
    return env


@dataclass
class RkrunProc:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def rkrun(tmp_path: Path) -> Callable[..., RkrunProc]:
    """Start ``python -m rkkernel.cli ARGS`` with stderr to a log file; killed at teardown if still running."""
    procs: list[RkrunProc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RkrunProc:
        log_path = tmp_path / f"rkrun-{len(procs)}.log"
        fh = open(log_path, "wb")  # noqa: SIM115 - closed by the child's exit
        p = subprocess.Popen(
            [sys.executable, "-m", "rkkernel.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env or rkrun_env(), cwd=REPO
        )
        fh.close()
        r = RkrunProc(p, log_path)
        procs.append(r)
        return r

    yield start
    for r in procs:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
