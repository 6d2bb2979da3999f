"""Back-end choice that never crashes: probing, exclusion, selection by name, ICD registration.

Everything here runs the real OpenCL stack of the machine (pocl, and Intel's
CPU runtime where installed); ``RKKERNEL_OPENCL_EXCLUDE`` takes platforms out
of the probe, which is how the fallback paths are exercised on a machine
where every platform works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures_kernel import OPENCL_PARAMS, opencl_platforms, rkrun_env
from helpers import REPO
from rkkernel.backends import BackendUnavailable, select_backend, split_name
from rkkernel.backends.clprobe import Candidate
from rkkernel.spec import CONTROL, KernelSpec, Launch, RegionSpec

ARGS = ("wavesim", "--grid", "12", "10", "14", "--steps", "20", "--checkpoint-every", "10", "--batch", "5")


def _rkrun(tmp: Path, *extra: str, env: dict[str, str] | None = None, backend: str = "auto") -> subprocess.CompletedProcess:
    e = rkrun_env()
    e.update(env or {})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rkkernel.cli",
            *ARGS,
            "--backend",
            backend,
            "--checkpoint-dir",
            str(tmp / "ck"),
            "--out",
            str(tmp / "r.h5"),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=e,
        cwd=REPO,
        timeout=300,
    )


def _broken_spec(tmp: Path) -> KernelSpec:
    src = tmp / "broken.cl"
    src.write_text("__kernel void step(__global const rk_control *ctl, __global float *u) { RK_BEGIN(ctl); u[0] = this_is_not_c; }\n")
    return KernelSpec(
        kernel_type="broken",
        grid=(4, 1, 1),
        regions=[RegionSpec("u", "<f4", (4,))],
        launches=[Launch("step", (4,), (CONTROL, "u"))],
        sources={"opencl": str(src)},
        numpy_step=lambda r, step: None,
        initial=lambda: {"u": np.zeros(4, "<f4")},
    )


def test_no_opencl_at_all_falls_back_to_numpy_with_a_warning(tmp_path: Path) -> None:
    r = _rkrun(tmp_path, env={"RKKERNEL_OPENCL_EXCLUDE": "all"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "NO GPU OR OPENCL DEVICE WORKS" in r.stderr and "NumPy reference" in r.stderr
    for name in OPENCL_PARAMS:  # each platform's rejection is logged with its reason
        if name != "opencl":
            assert "excluded by RKKERNEL_OPENCL_EXCLUDE=all" in r.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert f.attrs["backend"] == "numpy" and int(f.attrs["step"]) == 20


def test_explicit_opencl_without_a_usable_device_exits_2_naming_each_platform(tmp_path: Path) -> None:
    r = _rkrun(tmp_path, env={"RKKERNEL_OPENCL_EXCLUDE": "*"}, backend="opencl")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "back end 'opencl' is not available" in r.stderr
    for name in opencl_platforms():
        alias = name.split(":", 1)[1]
        assert f"({alias}, " in r.stderr, f"platform {alias} not named in: {r.stderr}"
    assert not (tmp_path / "r.h5").exists()


def test_excluding_the_first_choice_uses_the_next_platform(tmp_path: Path) -> None:
    names = opencl_platforms()
    if len(names) < 2:
        pytest.skip(f"needs two working OpenCL platforms, have {names}")
    first, second = (n.split(":", 1)[1] for n in names[:2])
    r = _rkrun(tmp_path, env={"RKKERNEL_OPENCL_EXCLUDE": first})
    assert r.returncode == 0, r.stderr
    assert "backend auto: using opencl" in r.stderr and f"({second}, " in r.stderr
    assert "rejected OpenCL" in r.stderr and f"excluded by RKKERNEL_OPENCL_EXCLUDE={first}" in r.stderr


def test_a_pocl_that_cannot_compile_for_this_cpu_is_skipped(tmp_path: Path) -> None:
    """What a Zen 5 machine meets: pocl lists its CPU device, and every build fails.

    ``POCL_EXTRA_BUILD_FLAGS`` with a CPU its LLVM does not accept makes pocl's
    real build fail here too. rkrun must log pocl's build error and run on the
    next platform (Intel's runtime where installed), bit-identical to NumPy,
    or on NumPy with the warning where nothing else is left.
    """
    if "opencl:pocl" not in opencl_platforms():
        pytest.skip("pocl does not work here to begin with")
    ref = _rkrun(tmp_path / "ref", backend="numpy")
    assert ref.returncode == 0, ref.stderr
    env = {"POCL_EXTRA_BUILD_FLAGS": "-mcpu=znver5", "RKSLURM_CACHE_DIR": str(tmp_path / "cache")}
    r = _rkrun(tmp_path / "run", env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "rejected OpenCL Portable Computing Language" in r.stderr and "program build failed" in r.stderr
    others = [n for n in opencl_platforms() if n != "opencl:pocl"]
    with h5py.File(tmp_path / "ref" / "r.h5") as a, h5py.File(tmp_path / "run" / "r.h5") as b:
        assert a["pressure"][()].tobytes() == b["pressure"][()].tobytes()
        assert b.attrs["backend"] == ("opencl" if others else "numpy")
    if others:
        assert f"({others[0].split(':', 1)[1]}, " in r.stderr.split("backend auto: using opencl", 1)[1].splitlines()[0]
    else:
        assert "NO GPU OR OPENCL DEVICE WORKS" in r.stderr


@pytest.mark.parametrize("name", OPENCL_PARAMS)
def test_device_chosen_by_name_runs_and_equals_numpy(tmp_path: Path, name: str) -> None:
    if name == "opencl":
        pytest.skip("no working OpenCL platform")
    ref = _rkrun(tmp_path / "ref", backend="numpy")
    assert ref.returncode == 0, ref.stderr
    alias = name.split(":", 1)[1]
    r = _rkrun(tmp_path / "dev", env={"RKKERNEL_OPENCL_DEVICE": alias}, backend="opencl")
    assert r.returncode == 0, r.stderr
    assert f"({alias}, " in r.stderr
    with h5py.File(tmp_path / "ref" / "r.h5") as a, h5py.File(tmp_path / "dev" / "r.h5") as b:
        assert a["pressure"][()].tobytes() == b["pressure"][()].tobytes()
        assert b.attrs["backend"] == "opencl"


def test_a_program_that_fails_to_build_is_a_verdict_not_a_crash(tmp_path: Path) -> None:
    spec = _broken_spec(tmp_path)
    if not opencl_platforms():
        pytest.skip("no working OpenCL platform")
    with pytest.raises(BackendUnavailable) as err:
        select_backend("opencl", spec)
    msg = str(err.value)
    for name in opencl_platforms():
        assert f"({name.split(':', 1)[1]}, " in msg
    assert "program build failed" in msg and "this_is_not_c" in msg
    assert select_backend("auto", spec) in ("numpy", "cuda")


def test_probe_verdicts_are_cached_on_disk(tmp_path: Path) -> None:
    if not opencl_platforms():
        pytest.skip("no working OpenCL platform")
    env = {"RKSLURM_CACHE_DIR": str(tmp_path / "cache")}
    code = "from rkkernel.backends import available; print(available('opencl'))"
    run = lambda: subprocess.run([sys.executable, "-c", code], env={**rkrun_env(), **env}, capture_output=True, text=True, timeout=300)  # noqa: E731
    first = run()
    assert first.returncode == 0 and "True" in first.stdout, first.stderr
    files = sorted((tmp_path / "cache" / "probe").glob("opencl-*.json"))
    assert files, "no probe verdict cached"
    stamps = [f.stat().st_mtime_ns for f in files]
    verdicts = [json.loads(f.read_text()) for f in files]
    assert all(isinstance(v["ok"], bool) and v["reason"] for v in verdicts)
    second = run()
    assert second.stdout == first.stdout
    assert [f.stat().st_mtime_ns for f in files] == stamps, "the second start probed again instead of reading the cache"


def test_a_corrupt_probe_cache_is_probed_again(tmp_path: Path) -> None:
    if not opencl_platforms():
        pytest.skip("no working OpenCL platform")
    env = {**rkrun_env(), "RKSLURM_CACHE_DIR": str(tmp_path / "cache")}
    code = "from rkkernel.backends import available; print(available('opencl')[0])"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    for f in (tmp_path / "cache" / "probe").glob("opencl-*.json"):
        f.write_text('{"ok": "yes"' + "[" * 10000)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("intel", {"intel"}),
        ("pocl", {"pocl"}),
        ("0:0", {"intel"}),
        ("1", {"pocl"}),
        ("pocl:pthread", {"pocl"}),
        ("pocl:xeon", {"pocl"}),
        ("intel:pthread", set()),
        ("portable", {"pocl"}),
        ("nvidia", set()),
    ],
)
def test_selectors_match_platform_and_device_names(selector: str, expected: set[str]) -> None:
    intel = Candidate(
        0, 0, "Intel(R) OpenCL", "Intel(R) Corporation", "OpenCL 3.0 LINUX", "Intel(R) Xeon(R) Processor", "2026.22", False, True
    )
    pocl = Candidate(
        1,
        0,
        "Portable Computing Language",
        "The pocl project",
        "OpenCL 3.0 PoCL 3.0-rc2 Linux",
        "pthread-Intel(R) Xeon(R) Processor",
        "3.0",
        False,
        True,
    )
    assert (intel.alias, pocl.alias) == ("intel", "pocl")
    assert {c.alias for c in (intel, pocl) if c.matches(selector)} == expected


def test_backend_names() -> None:
    assert split_name("opencl:intel") == ("opencl", "intel")
    assert split_name("numpy") == ("numpy", None)
    with pytest.raises(BackendUnavailable, match="unknown back end"):
        split_name("vulkan")
    with pytest.raises(BackendUnavailable, match="only opencl"):
        split_name("cuda:0")


def test_rkrun_rejects_an_unknown_backend_name(tmp_path: Path) -> None:
    r = _rkrun(tmp_path, backend="vulkan")
    assert r.returncode == 2 and "unknown back end 'vulkan'" in r.stderr and "Traceback" not in r.stderr


def test_pip_installed_intel_runtime_is_registered_without_any_setup(tmp_path: Path) -> None:
    from rkkernel.backends.icd import pip_runtime_libraries

    libs = pip_runtime_libraries()
    if not libs:
        pytest.skip("intel-opencl-rt is not installed")
    env = {k: v for k, v in rkrun_env().items() if not k.startswith(("OCL_", "OPENCL_"))}
    env["RKSLURM_CACHE_DIR"] = str(tmp_path / "cache")
    code = (
        "import os; from rkkernel.backends.opencl_backend import _cl; cl = _cl(); "
        "print(os.environ['OCL_ICD_VENDORS']); print([p.name for p in cl.get_platforms()])"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    folder, platforms = r.stdout.strip().splitlines()
    assert Path(folder) == tmp_path / "cache" / "icd"
    assert any(str(libs[0]) == p.read_text().strip() for p in Path(folder).glob("*.icd"))
    assert "Intel(R) OpenCL" in platforms


def test_a_users_own_icd_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rkkernel.backends.icd import register_pip_runtimes

    monkeypatch.setenv("OCL_ICD_VENDORS", str(tmp_path / "mine"))
    assert register_pip_runtimes(tmp_path / "ours") is None
    assert os.environ["OCL_ICD_VENDORS"] == str(tmp_path / "mine") and not (tmp_path / "ours").exists()


def test_checking_the_backend_option_does_not_import_numpy() -> None:
    """rkrun parses --backend before its stop signals are held: numpy's BLAS threads must not start then."""
    code = (
        "import sys; from rkkernel.cli import main; from rkkernel.plugin import BackendName; "
        "BackendName().convert('opencl:pocl', None, None); print('numpy' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


_WITHOUT_EXTRAS = """
import importlib.abc, sys
EXTRAS = {"pyopencl", "cupy", "s3fs", "botocore", "aiobotocore", "snakemake", "snakemake_interface_executor_plugins",
          "snakemake_executor_plugin_slurm", "matplotlib"}  # isal, siphash24 and pyyaml are core dependencies
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ImportError(f"{name} is not part of the core install")
sys.meta_path.insert(0, Block())
tool, *sys.argv[1:] = sys.argv[1:]
from importlib import import_module
sys.exit(import_module(tool).main())
"""


def test_the_core_install_works_without_any_extra(tmp_path: Path, vectors_dir: Path) -> None:
    """`pip install rkslurm` (no extras): checkpoints are read and checked, kernels run on NumPy."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _WITHOUT_EXTRAS, *args], capture_output=True, text=True, env=rkrun_env(), cwd=REPO, timeout=300
        )

    v = run("rkckpt.cli", "verify", *map(str, sorted(vectors_dir.glob("*_step*.rkcp"))))
    assert v.returncode == 0, v.stdout + v.stderr
    r = run("rkkernel.cli", *ARGS, "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"))
    assert r.returncode == 0, r.stderr
    assert "NO GPU OR OPENCL DEVICE WORKS" in r.stderr and "pyopencl" in r.stderr and "Traceback" not in r.stderr
    with h5py.File(tmp_path / "r.h5") as f:
        assert f.attrs["backend"] == "numpy" and int(f.attrs["step"]) == 20
