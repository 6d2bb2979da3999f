"""The generic step loop: a kernel from outside the package, and the runner's input handling."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures_kernel import rkrun_env
from helpers import REPO, tmpfs, wait_until
from rkstep.protocol import EVENTS_FILE

DATA = REPO / "tests" / "data"
EXT = ("--grid", "64", "3", "3", "--steps", "120", "--checkpoint-every", "10", "--backend", "numpy", "--batch", "4")


def ext_env(extra: Path | None = None) -> dict[str, str]:
    env = rkrun_env()
    paths = [str(DATA), *([str(extra)] if extra else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = ":".join(p for p in paths if p)
    return env


def ext_result(path: Path) -> tuple[bytes, bytes, int]:
    with h5py.File(path) as f:
        return f["u"][()].tobytes(), f["mass"][()].tobytes(), int(f.attrs["step"])


def run_rc(rkrun, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    p = rkrun(*args, env=env)
    return p.wait(timeout), p.log()


def test_outside_kernel_runs_stops_and_resumes(rkrun, tmp_path: Path) -> None:
    """``--kernel module:OBJECT``: own options, own series, same loop (SIGTERM -> 75 -> resume, identical)."""
    env = ext_env()
    rc, log = run_rc(
        rkrun, "--kernel", "rk_ext_kernel:PLUGIN", *EXT, "--checkpoint-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a.h5"), env=env
    )
    assert rc == 0, log
    u, mass, step = ext_result(tmp_path / "a.h5")
    assert step == 120 and np.frombuffer(mass, "<f8").reshape(-1, 2)[:, 0].tolist() == list(range(0, 121, 5))
    ck, out = tmp_path / "b", tmp_path / "b.h5"
    args = ("--kernel", "rk_ext_kernel:PLUGIN", *EXT, "--checkpoint-dir", str(ck), "--out", str(out))
    p = rkrun(*args, "--throttle-ms", "20", env=env)
    wait_until(lambda: any(n.name.startswith("diffusion-") for n in ck.glob("*")) or p.proc.poll() is not None, 60, "a checkpoint")
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(60) == 75, p.log()
    marker = json.loads((ck / "rkrun.stopped.json").read_text())
    assert marker["kernel"] == "diffusion" and 0 < marker["step"] < 120
    rc, log = run_rc(rkrun, *args, env=env)
    assert rc == 0 and f"restored from step {marker['step']}" in log, log
    assert ext_result(out) == (u, mass, step)


def test_outside_kernel_registered_by_entry_point(rkrun, tmp_path: Path) -> None:
    """A distribution declaring ``[project.entry-points."rkkernel.kernels"]`` makes ``rkrun NAME`` work."""
    site = tmp_path / "site"
    dist = site / "rk_ext_kernel-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rk-ext-kernel\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rkkernel.kernels]\ndiffusion = rk_ext_kernel:PLUGIN\n")
    env = ext_env(site)
    out = tmp_path / "r.h5"
    rc, log = run_rc(rkrun, "diffusion", *EXT, "--k", "0.2", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out), env=env)
    assert rc == 0, log
    with h5py.File(out) as f:
        assert f.attrs["k"] == pytest.approx(0.2) and f.attrs["kernel"] == "diffusion"
    help_text = subprocess.run(["python3", "-m", "rkkernel.cli", "--help"], env=env, capture_output=True, text=True, cwd=REPO).stdout
    assert "diffusion" in help_text and "traveltime" in help_text and "wavesim" in help_text
    rc, log = run_rc(rkrun, "diffusion", *EXT, "--k", "0.9", "--checkpoint-dir", str(tmp_path / "c2"), "--out", str(out), env=env)
    assert rc == 2 and "0.9 must be <= 0.5" in log, log


def test_unknown_kernel_and_bad_reference(rkrun, tmp_path: Path) -> None:
    rc, log = run_rc(rkrun, "--kernel", "no_such_module_xyz:K", "--grid", "8", "8", "8")
    assert rc == 2 and "cannot import 'no_such_module_xyz'" in log and "Traceback" not in log
    rc, log = run_rc(rkrun, "--kernel", "json:dumps", "--grid", "8", "8", "8")
    assert rc == 2 and "json:dumps is a function, not a rkkernel.plugin.KernelPlugin" in log and "Traceback" not in log, log


WAVE = ("wavesim", "--grid", "12", "10", "14", "--steps", "20", "--backend", "numpy")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"checkpoint_every": -5}, "checkpoint_every: -5 is not in the range x>=1"),
        ({"steps": "abc"}, "steps: 'abc' is not a valid integer"),
        ({"batch": 2.5}, "batch: 2.5 is not an integer"),
        ({"v_top": "nan"}, "v_top: 'nan' is not a finite number"),
        ({"dx": float("inf")}, "dx: inf is not a finite number"),
        ({"kernel_id": "a/b"}, "kernel_id: 'a/b': a kernel id is"),
        ({"checkpoint_dir": ""}, "checkpoint_dir: '': must be a non-empty string"),
        ({"bogus": 1}, "unknown keys ['bogus']"),
    ],
)
def test_config_file_goes_through_option_validation(rkrun, tmp_path: Path, doc: dict, message: str) -> None:
    cfg = {"kernel": "wavesim", "grid": [12, 10, 14], "steps": 20, "checkpoint_dir": str(tmp_path / "ck"), "out": str(tmp_path / "r.h5")}
    cfg.update(doc)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    rc, log = run_rc(rkrun, "--config", str(path))
    assert rc == 2 and message in log and "Traceback" not in log, log
    assert not (tmp_path / "r.h5").exists()


def test_subcommand_config_and_command_line_override(rkrun, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"grid: [12, 10, 14]\nsteps: 400\ncheckpoint_dir: {tmp_path / 'ck'}\nout: {tmp_path / 'r.h5'}\nbackend: numpy\n")
    rc, log = run_rc(rkrun, "wavesim", "--config", str(path), "--steps", "12")
    assert rc == 0, log
    with h5py.File(tmp_path / "r.h5") as f:
        assert f.attrs["step"] == 12


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--v-top", "1e-6"), "the source wavelet would have"),
        (("--v-top", "inf"), "is not a finite number"),
        (("--v-bottom", "nan"), "is not a finite number"),
        (("--dx", "-inf"), "is not a finite number"),
        (("--kernel-id", "../x"), "a kernel id is"),
        (("--kernel-id", "a\nb"), "a kernel id is"),
        (("--kernel-id", "k" * 190), "a kernel id is"),
        (("--checkpoint-dir", ""), "must be a non-empty string"),
    ],
)
def test_bad_values_refused_up_front(rkrun, tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    args = [*WAVE, "--out", str(tmp_path / "r.h5")]
    if "--checkpoint-dir" not in extra:
        args += ["--checkpoint-dir", str(tmp_path / "ck")]
    rc, log = run_rc(rkrun, *args, *extra, timeout=60)
    assert rc == 2 and message in log and "Traceback" not in log, log
    # nothing computed or written: at most the step's attempt events (start, end with exit 2)
    left = sorted(p.name for p in (tmp_path / "ck").iterdir()) if (tmp_path / "ck").exists() else []
    assert left in ([], [EVENTS_FILE]) and not (tmp_path / "r.h5").exists(), left


def test_grid_that_does_not_fit_is_refused_with_its_size(tmp_path: Path) -> None:
    """1200^3 under a 3 GB address-space limit: refused before any allocation, with the size it needs."""
    cmd = (
        "ulimit -v 3000000; exec python3 -m rkkernel.cli traveltime --grid 1200 1200 1200 --steps 10 --backend numpy "
        f"--checkpoint-dir {tmp_path / 'ck'} --out {tmp_path / 'r.h5'}"
    )
    p = subprocess.run(["bash", "-c", cmd], env=rkrun_env(), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "grid 1200x1200x1200 does not fit: its state is 12.88 GiB" in p.stderr and "ulimit -v" in p.stderr, p.stderr
    assert "MemoryError" not in p.stderr and "Traceback" not in p.stderr


@pytest.fixture
def tiny_fs(tmp_path: Path):
    with tmpfs(tmp_path / "tiny", "160k") as mnt:
        yield mnt


def test_full_checkpoint_disk_still_writes_the_result(rkrun, tmp_path: Path, tiny_fs: Path) -> None:
    """Checkpoints on a full file system: the run completes, writes its result and says loudly that checkpoints failed."""
    out = tmp_path / "r.h5"
    args = ("wavesim", "--grid", "40", "36", "40", "--steps", "60", "--checkpoint-every", "10", "--backend", "numpy")
    rc, log = run_rc(rkrun, *args, "--checkpoint-dir", str(tiny_fs / "ck"), "--out", str(out))
    assert rc == 0, log
    assert "CHECKPOINTS FAILED" in log and "result" in log and "Traceback" not in log, log
    rc, ref_log = run_rc(rkrun, *args, "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "ref.h5"))
    assert rc == 0 and "CHECKPOINTS FAILED" not in ref_log
    with h5py.File(out) as a, h5py.File(tmp_path / "ref.h5") as b:
        assert a["pressure"][()].tobytes() == b["pressure"][()].tobytes()
        assert "checkpoints_failed" in a.attrs and "checkpoints_failed" not in b.attrs
