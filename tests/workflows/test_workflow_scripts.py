"""The wavesim workflow's scripts on tiny real inputs, and the workflow itself under the local executor."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import REPO

WF = REPO / "workflows" / "wavesim"
SCRIPTS = WF / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_model  # noqa: E402
import plot  # noqa: E402
import qc  # noqa: E402

from rkstep.events import attempts, parse_events, read_events, summarise  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=120)


def rkrun_wavesim(options: str, ckdir: Path, out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    """``rkrun wavesim`` on the NumPy back end with ``options`` (words without spaces) and ``more``."""
    cmd = ["rkrun", "wavesim", *options.split(), "--backend", "numpy", "--checkpoint-dir", str(ckdir), *more, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real rkrun result on a tiny grid (NumPy back end: no device needed, exact reference)."""
    d = tmp_path_factory.mktemp("rkrun")
    out = d / "result.h5"
    proc = rkrun_wavesim("--grid 12 10 9 --steps 40 --checkpoint-every 20 --energy-every 5", d / "ck", out)
    assert proc.returncode == 0, proc.stderr
    return out


# ---------------------------------------------------------------- make_model


def test_make_model_matches_rkrun_model_and_cli_writes_npy(tmp_path: Path, tiny_result: Path) -> None:
    out = tmp_path / "sub" / "v.npy"
    proc = run_script("make_model.py", "--grid", "12", "10", "9", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = np.load(out, allow_pickle=False)
    assert m.dtype == np.float32 and m.shape[0] == 9 and m.shape[-1] == 12  # (nz, [ny,] nx)
    assert set(np.unique(m).tolist()) == {1500.0, 2500.0}
    assert m[0].min() == 1500.0 and m[-1].max() == 2500.0  # slow on top, fast below
    with h5py.File(tiny_result) as f:
        assert np.array_equal(f["velocity"][()], m)  # the model rkrun ran in
    assert plot.velocity_3d(m, (9, 10, 12)).shape == (9, 10, 12)
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # ordinary file, not mkstemp's 0600
    assert not list(out.parent.glob(".*tmp*"))  # no temp left behind


def test_make_model_lens_and_rkrun_runs_in_it(tmp_path: Path) -> None:
    out = tmp_path / "v.npy"
    proc = run_script("make_model.py", "--grid", "24", "6", "16", "--lens-velocity", "2200", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    m = np.load(out)
    assert m.shape == (16, 24) and np.count_nonzero(m == 2200.0) >= 4
    res = tmp_path / "r.h5"
    run = rkrun_wavesim("--grid 24 6 16 --steps 5", tmp_path / "ck", res, "--velocity", str(out))
    assert run.returncode == 0, run.stderr
    with h5py.File(res) as f:
        assert np.array_equal(f["velocity"][()], m)


def test_make_model_rejects_tiny_grid(tmp_path: Path) -> None:
    proc = run_script("make_model.py", "--grid", "2", "10", "10", "--out", str(tmp_path / "v.npy"))
    assert proc.returncode == 2
    assert "at least 3" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "v.npy").exists()


# ---------------------------------------------------------------- analyse


def test_analyse_real_result(tmp_path: Path, tiny_result: Path) -> None:
    model = tmp_path / "v.npy"
    make_model.save_model(model, make_model.make_model(12, 10, 9))
    c, j = tmp_path / "energy.csv", tmp_path / "summary.json"
    proc = run_script("analyse.py", str(tiny_result), "--model", str(model), "--csv", str(c), "--json", str(j))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(c.open()))
    assert [int(r["step"]) for r in rows] == list(range(0, 41, 5))
    with h5py.File(tiny_result) as f:
        energy = f["energy"][()]
        dt = float(f.attrs["dt"])
        p = f["pressure"][()].astype(np.float64)
    assert [float(r["energy"]) for r in rows] == energy[:, 1].tolist()  # exact round trip (repr)
    assert float(rows[-1]["time_s"]) == pytest.approx(40 * dt)
    assert float(rows[0]["energy"]) == 0.0 and float(rows[-1]["energy"]) > 0.0  # source injected energy
    s = json.loads(j.read_text())
    assert s["final_step"] == 40 and s["samples"] == 9 and s["sample_interval"] == 5
    assert s["velocity_matches_model"] is True
    assert s["final_field_energy"] == pytest.approx(float(np.dot(p.ravel(), p.ravel())))
    assert s["energy_final"] == pytest.approx(s["final_field_energy"])


def _fake_result(path: Path, energy: np.ndarray, step: int, with_pressure: bool = True) -> Path:
    with h5py.File(path, "w") as f:
        if with_pressure:
            f["pressure"] = np.zeros((4, 4, 4), np.float32)
        f["energy"] = energy
        f.attrs["step"] = step
        f.attrs["dt"] = 0.5
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_hdf5", "not a readable HDF5 file"),
        ("no_pressure", "missing dataset /pressure"),
        ("bad_shape", "must be an (n, 2) array"),
        ("not_increasing", "not strictly increasing"),
        ("nan", "non-finite"),
        ("short", "last energy sample is at step 10"),
    ],
)
def test_analyse_bad_input_is_one_clear_error(tmp_path: Path, kind: str, message: str) -> None:
    r = tmp_path / "r.h5"
    good = np.array([[0, 0.0], [10, 1.0], [20, 2.0]])
    if kind == "not_hdf5":
        r.write_bytes(b"this is not hdf5")
    elif kind == "no_pressure":
        _fake_result(r, good, 20, with_pressure=False)
    elif kind == "bad_shape":
        _fake_result(r, np.arange(6.0), 20)
    elif kind == "not_increasing":
        _fake_result(r, np.array([[0, 0.0], [10, 1.0], [10, 1.0], [20, 2.0]]), 20)
    elif kind == "nan":
        _fake_result(r, np.array([[0, 0.0], [10, np.nan], [20, 2.0]]), 20)
    elif kind == "short":
        _fake_result(r, good[:2], 20)
    proc = run_script("analyse.py", str(r), "--csv", str(tmp_path / "e.csv"), "--json", str(tmp_path / "s.json"))
    assert proc.returncode == 2
    assert message in proc.stderr and str(r) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "e.csv").exists()


def test_analyse_detects_a_different_model(tmp_path: Path, tiny_result: Path) -> None:
    model = tmp_path / "v.npy"
    make_model.save_model(model, make_model.make_model(12, 10, 9, v_top=1400.0))
    proc = run_script(
        "analyse.py", str(tiny_result), "--model", str(model), "--csv", str(tmp_path / "e.csv"), "--json", str(tmp_path / "s.json")
    )
    assert proc.returncode == 2 and "different velocity model" in proc.stderr


# ---------------------------------------------------------------- events (rkstep.events.jsonl → timeline)


def _ev(event: str, job: str, pid: int, t: float, **kw: object) -> str:
    return json.dumps({"event": event, "job": job, "restart": 0, "pid": pid, "t": t, **kw})


RUN_EVENTS = (
    "\n".join(
        [
            _ev("start", "11", 1, 1000.0, step=None),
            _ev("checkpoint", "11", 1, 1002.0, step=100),
            _ev("stop", "11", 1, 1003.0, step=120, signal="SIGTERM"),
            _ev("end", "11", 1, 1003.0, rc=75, step=120),
            _ev("start", "12", 2, 1010.0),
            _ev("restore", "12", 2, 1010.5, step=120, chain=["wavesim-000000000120-full.rkcp"]),
            _ev("checkpoint", "12", 2, 1012.0, step=200),  # then SIGKILLed: no end
            _ev("start", "13", 3, 1014.0),
            _ev(
                "restore",
                "13",
                3,
                1014.5,
                step=200,
                chain=["wavesim-000000000160-full.rkcp", "wavesim-000000000180-delta.rkcp", "wavesim-000000000200-delta.rkcp"],
            ),
            _ev("end", "13", 3, 1020.0, rc=0, step=400),
        ]
    )
    + "\n"
)


def test_events_attempts_and_summary_for_the_plots() -> None:
    """The workflow reads rkstep's events (no log text): the plot's and the demo's numbers."""
    runs = attempts(parse_events(RUN_EVENTS.encode()))
    assert [a.job for a in runs] == ["11", "12", "13"]
    a, b, c = runs
    assert (a.reached, a.stopped, a.stop_signal, a.end_rc, a.interrupted) == (120, True, "SIGTERM", 75, True)
    assert b.restored and b.start_step == 120 and b.killed and b.interrupted and b.reached == 200
    assert c.restored and c.start_step == 200 and c.done and not c.interrupted and c.reached == 400
    assert b.chain_shape == (120, 0) and c.chain_shape == (160, 2)  # which chain was restored: its full step and its deltas
    assert (
        a.points == [(1002.0, 100)]
        and a.end_time is not None
        and a.start_time is not None
        and a.end_time - a.start_time == pytest.approx(3.0)
    )
    assert summarise(runs) == {
        "attempts": 3,
        "interruptions": 2,
        "stops_on_signal": 1,
        "restores": 2,
        "restored_from": [120, 200],
        "restored_chains": [[120, 0], [160, 2]],
        "stopped_at": [120],
        "completed": True,
        "jobs": ["11", "12", "13"],
    }


# ---------------------------------------------------------------- plot


def test_plot_writes_real_pngs(tmp_path: Path, tiny_result: Path) -> None:
    log = tmp_path / "simulate.events.jsonl"
    log.write_text(RUN_EVENTS)
    fields, timeline = tmp_path / "f.png", tmp_path / "t.png"
    model = tmp_path / "v.npy"
    make_model.save_model(model, make_model.make_model(12, 10, 9))
    proc = run_script(
        "plot.py", str(tiny_result), "--model", str(model), "--log", str(log), "--fields", str(fields), "--timeline", str(timeline)
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 preemptions" in proc.stdout and "[120, 200]" in proc.stdout
    for png in (fields, timeline):
        w, h = png_size(png)
        assert w >= 600 and h >= 300
        assert png.stat().st_size > 10_000
        img = __import__("matplotlib.image", fromlist=["imread"]).imread(png)
        assert float(img[..., :3].std()) > 0.05  # not a blank canvas
    # the timeline draws red preemption markers: some strongly red pixels exist
    img = __import__("matplotlib.image", fromlist=["imread"]).imread(timeline)
    red = (img[..., 0] > 0.7) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)
    assert red.sum() > 50


def test_plot_model_shape_mismatch_is_clear(tmp_path: Path, tiny_result: Path) -> None:
    model = tmp_path / "v.npy"
    make_model.save_model(model, make_model.make_model(5, 5, 5))
    proc = run_script(
        "plot.py", str(tiny_result), "--model", str(model), "--fields", str(tmp_path / "f.png"), "--timeline", str(tmp_path / "t.png")
    )
    assert proc.returncode == 2 and "does not match" in proc.stderr and "Traceback" not in proc.stderr


def test_plot_timeline_without_times(tmp_path: Path) -> None:
    runs = attempts(
        [
            {"event": "start", "job": None, "pid": 1, "step": 0},
            {"event": "stop", "job": None, "pid": 1, "step": 5, "signal": "SIGTERM"},
            {"event": "end", "job": None, "pid": 1, "rc": 75, "step": 5},
            {"event": "start", "job": None, "pid": 2},
            {"event": "restore", "job": None, "pid": 2, "step": 5, "chain": ["a"]},
            {"event": "end", "job": None, "pid": 2, "rc": 0, "step": 9},
        ]
    )
    assert [a.restored for a in runs] == [False, True]
    out = tmp_path / "t.png"
    plot.plot_timeline(runs, out, total_steps=9)
    assert png_size(out)[0] > 0


# ---------------------------------------------------------------- QC: arrival picks vs traveltimes


@pytest.fixture(scope="module")
def wave_and_traveltime(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("qc")
    common = ["--grid", "40", "30", "40", "--backend", "numpy"]
    for kernel, extra in (
        ("wavesim", ["--steps", "300", "--checkpoint-every", "100", "--receivers", "12"]),
        ("traveltime", ["--steps", "500"]),
    ):
        cmd = [
            sys.executable,
            "-m",
            "rkkernel.cli",
            kernel,
            *common,
            *extra,
            "--checkpoint-dir",
            str(d / kernel),
            "--out",
            str(d / f"{kernel}.h5"),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return d / "wavesim.h5", d / "traveltime.h5"


def test_qc_picks_agree_with_traveltimes(wave_and_traveltime: tuple[Path, Path], tmp_path: Path) -> None:
    wave, tt = wave_and_traveltime
    report = qc.qc(wave, tt)
    assert report["pass"] is True and report["checked"] >= 8 and report["failed_receivers"] == []
    assert 0 < report["lag_s"] < 0.2 and report["max_abs_residual_s"] <= report["tolerance_s"]
    assert qc.main([str(wave), str(tt), "--json", str(tmp_path / "qc.json")]) == 0
    assert json.loads((tmp_path / "qc.json").read_text())["pass"] is True


def test_qc_fails_when_traveltimes_are_wrong(wave_and_traveltime: tuple[Path, Path], tmp_path: Path) -> None:
    """Traveltimes of a model twice as fast: the near and far receivers' picks no longer fit, named in the report."""
    wave, tt = wave_and_traveltime
    bad = tmp_path / "fast.h5"
    with h5py.File(tt) as f, h5py.File(bad, "w") as g:
        g["traveltime"] = f["traveltime"][()] / np.float32(2)
    report = qc.qc(wave, bad)
    assert report["pass"] is False and report["failed_receivers"]
    assert qc.main([str(wave), str(bad), "--json", str(tmp_path / "qc.json")]) == 1


def test_qc_bad_input_is_one_clear_error(
    wave_and_traveltime: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wave, tt = wave_and_traveltime
    assert qc.main([str(tt), str(tt), "--json", str(tmp_path / "q.json")]) == 2
    assert "missing dataset(s) /traces, /receiver_cells" in capsys.readouterr().err
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    assert qc.main([str(wave), str(junk), "--json", str(tmp_path / "q.json")]) == 2
    assert "junk.h5: not a readable HDF5 file" in capsys.readouterr().err


# ---------------------------------------------------------------- the workflow, local executor


def _snakemake(workdir: Path, *extra: str, **popen: object) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(WF / "Snakefile"), "-d", str(workdir), "-c1", "--quiet", "all", *extra]


def _config(grid: str, steps: int, every: int) -> list[str]:
    return ["--config", f"grid=[{grid}]", f"steps={steps}", f"checkpoint_every={every}", "backend=numpy" if steps < 100 else "backend=auto"]


def test_workflow_dry_run_and_tiny_run(tmp_path: Path) -> None:
    proc = subprocess.run(_snakemake(tmp_path, "-n", *_config("12,10,9", 30, 10)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = subprocess.run(_snakemake(tmp_path, *_config("12,10,9", 30, 10)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    res = tmp_path / "results" / "demo"
    for name in (
        "velocity.npy",
        "result.h5",
        "energy.csv",
        "summary.json",
        "fields.png",
        "timeline.png",
        "simulate.runlog",
        "simulate.events.jsonl",
        "traveltime.h5",
        "traveltime.runlog",
        "traveltime.events.jsonl",
        "qc.json",
    ):
        assert (res / name).stat().st_size > 0, name
    assert json.loads((res / "summary.json").read_text())["final_step"] == 30
    runlog = (res / "simulate.runlog").read_text()
    assert "done: step 30" in runlog and "rkslurm attempt" not in runlog  # rkrun's own output, no text markers
    (run,) = attempts(read_events(res / "simulate.events.jsonl"))
    assert run.job is None and run.done and run.end_rc == 0
    # checkpoints live outside the declared outputs, in the executor's per-rule folder
    ck = tmp_path / ".snakemake" / "rkslurm" / "simulate" / "name=demo"
    assert sorted(p.name for p in ck.glob("*.rk.h5"))


def test_workflow_killed_then_rerun_resumes_bit_identical(tmp_path: Path) -> None:
    """Local executor: SIGTERM mid-simulation, rerun, the step restores and the result equals an uninterrupted run."""
    grid, steps, every = "24,24,24", 12000, 500
    ck = tmp_path / ".snakemake" / "rkslurm" / "simulate" / "name=demo"
    p = subprocess.Popen(
        _snakemake(tmp_path, *_config(grid, steps, every)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(ck.glob("*.rk.h5")) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert p.poll() is None, "the simulation finished before it could be interrupted; raise steps"
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    marker = json.loads((ck / "rkrun.stopped.json").read_text())
    assert 0 < marker["step"] < steps
    proc = subprocess.run(_snakemake(tmp_path, *_config(grid, steps, every)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = attempts(read_events(tmp_path / "results" / "demo" / "simulate.events.jsonl"))
    assert len(runs) == 2 and runs[0].stopped and runs[1].restored and runs[1].done
    assert runs[1].start_step == marker["step"]  # resumed exactly where it stopped: nothing lost
    ref = tmp_path / "ref.h5"
    env = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")  # unlike the job's threads=1: must not matter
    subprocess.run(
        [
            "rkrun",
            "wavesim",
            "--grid",
            *grid.split(","),
            "--steps",
            str(steps),
            "--checkpoint-dir",
            str(tmp_path / "refck"),
            "--checkpoint-every",
            str(every),
            "--velocity",
            str(tmp_path / "results" / "demo" / "velocity.npy"),
            "--receivers",
            "24",
            "--out",
            str(ref),
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    with h5py.File(tmp_path / "results" / "demo" / "result.h5") as a, h5py.File(ref) as b:
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name][()].tobytes() == b[name][()].tobytes(), name


# ---------------------------------------------------------------- the demo's preemptor

PREEMPTOR = REPO / "scripts" / "preemptor.py"


def _preemptor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PREEMPTOR), *args], capture_output=True, text=True, timeout=timeout)


def test_preemptor_reads_checkpoint_steps_and_stop_marker(tmp_path: Path) -> None:
    sys.path.insert(0, str(PREEMPTOR.parent))
    import preemptor

    assert preemptor.newest_checkpoint(tmp_path) is None
    d = tmp_path / "simulate" / "name=demo"
    d.mkdir(parents=True)
    for name in (
        "wavesim-000000000100-full.rkcp",
        "wavesim-000000000300-delta.rkcp",
        "wavesim-000000000200-full.rk.h5",
        "notes-000000009999-full.txt",
        ".wavesim-000000000900-full.rkcp.tmp",
    ):
        (d / name).write_bytes(b"x")
    assert preemptor.newest_checkpoint(tmp_path) == 300
    assert preemptor.stopped_step(tmp_path) is None
    (d / "rkrun.stopped.json").write_text('{"step": 340, "signal": "SIGTERM"}')
    assert preemptor.stopped_step(tmp_path) == 340
    (d / "rkrun.stopped.json").write_text("{broken")
    assert preemptor.stopped_step(tmp_path) is None


def test_preemptor_gives_up_when_the_simulation_finished_first(tmp_path: Path) -> None:
    done = tmp_path / "result.h5"
    done.write_bytes(b"")
    report = tmp_path / "r.json"
    proc = _preemptor("--watch", str(tmp_path), "--at-steps", "10,20", "--done-file", str(done), "--report", str(report))
    assert proc.returncode == 1 and "finished after 0 of 2 preemptions" in proc.stderr
    doc = json.loads(report.read_text())
    assert doc["ok"] is False and doc["thresholds"] == [10, 20] and doc["preemptions"] == []


def test_preemptor_bad_thresholds(tmp_path: Path) -> None:
    proc = _preemptor("--watch", str(tmp_path), "--at-steps", "ten")
    assert proc.returncode == 2 and "--at-steps must be integers" in proc.stderr


@pytest.mark.slurm
def test_preemptor_preempts_a_scavenger_job_on_the_real_cluster(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """A scavenger job that 'checkpoints' (writes checkpoint-named files) is preempted by the urgent job the preemptor submits."""
    ck = tmp_path / "ck"
    ck.mkdir()
    script = f"for i in $(seq 1 240); do printf x > {ck}/t-$(printf %012d $((i*10)))-full.rkcp; sleep 0.5; done"
    victim = (
        subprocess.run(
            ["sbatch", "--parsable", "-p", "scavenger", "-J", "rkslurm-test-victim", "-o", "/dev/null", "--wrap", script],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        report = tmp_path / "r.json"
        proc = _preemptor(
            "--watch",
            str(ck),
            "--at-steps",
            "30",
            "--match",
            "rkslurm-test-victim",
            "--sleep",
            "2",
            "--timeout",
            "90",
            "--report",
            str(report),
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr + proc.stdout
        doc = json.loads(report.read_text())
        assert doc["ok"] and len(doc["preemptions"]) == 1
        p = doc["preemptions"][0]
        assert p["victim"] == victim and p["checkpoint_step"] >= 30
        assert p["victim_state_after"] != "RUNNING"
        state = subprocess.run(["scontrol", "show", "job", victim], capture_output=True, text=True, timeout=20).stdout
        assert "JobState=PREEMPTED" in state, state
    finally:
        subprocess.run(["scancel", victim], capture_output=True, timeout=20)


@pytest.mark.slurm
def test_demo_on_the_running_cluster_is_bit_identical(slurm_env: dict[str, str], tmp_path: Path) -> None:
    """scripts/demo end to end with early preemption points, against the cluster that is already up (no slurm/up or down)."""
    env = dict(
        os.environ,
        RKSLURM_DEMO_EXTERNAL_CLUSTER="1",
        RKSLURM_DEMO_DIR=str(tmp_path / "demo"),
        RKSLURM_DEMO_GRID="128 128 128",
        RKSLURM_DEMO_STEPS="8000",
        RKSLURM_DEMO_CHECKPOINT_EVERY="200",
        RKSLURM_DEMO_PREEMPT_AT="600,1400",
    )
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo")], capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "BIT-IDENTICAL" in out and "preempted 2 times by the demo" in out
    report = json.loads((tmp_path / "demo" / "preemptions.json").read_text())
    assert report["ok"] and len(report["preemptions"]) == 2
    runs = attempts(read_events(tmp_path / "demo" / "results" / "demo" / "simulate.events.jsonl"))
    assert sum(a.restored for a in runs) >= 2 and runs[-1].done
    for a, b in zip(runs, runs[1:], strict=False):
        assert b.start_step == a.stopped_step  # the GraceTime let every stop write its final checkpoint: nothing lost
    for png in ("fields.png", "timeline.png"):
        assert png_size(tmp_path / "demo" / "results" / "demo" / png)[0] > 0
    # the traveltime step was preempted too and restored from a delta chain, bit-identical (compare.py said so twice)
    assert out.count("compare: BIT-IDENTICAL") == 3 and "restored from a delta chain" in out  # simulate, traveltime, compare_mpi
    # 7/7: the 2-node, 4-rank step was preempted once and restored on 1 node with 2 ranks
    assert "ranks before/after the preemption: 4 -> 2" in out and "resubmitting on 1 node(s) x 2 task(s)" in out, out[-4000:]
    mpi_res = tmp_path / "demo" / "mpi" / "results" / "demo"
    assert json.loads((mpi_res / "compare_mpi.json").read_text())["identical"] and png_size(mpi_res / "timeline_mpi.png")[0] > 0
    tt = summarise(attempts(read_events(tmp_path / "demo" / "results" / "demo" / "traveltime.events.jsonl")))
    assert tt["completed"] and any(deltas >= 1 for _full, deltas in tt["restored_chains"]), tt


# ---------------------------------------------------------------- the multi-rank step (issue 23): ranks in the timeline


def test_rank_counts_per_attempt_are_read_and_drawn(tmp_path: Path) -> None:
    """Each attempt of the multi-rank step is labelled with its ranks (from its own ``start`` event) and each
    restore with the ranks that wrote the set (from its part names); a start without ranks says so, and a
    start whose rank count is not one a launcher gives is not an attempt of ours."""
    runs = attempts(
        [
            {"event": "start", "job": "11", "pid": 1, "step": None, "t": 0.0, "ranks": 4},
            {"event": "checkpoint", "job": "11", "pid": 1, "step": 100, "t": 1.0},
            {"event": "stop", "job": "11", "pid": 1, "step": 120, "signal": "SIGTERM", "t": 2.0},
            {"event": "end", "job": "11", "pid": 1, "rc": 75, "step": 120, "t": 2.0},
            {"event": "start", "job": "12", "pid": 2, "t": 5.0, "ranks": 2},
            {
                "event": "restore",
                "job": "12",
                "pid": 2,
                "step": 120,
                "chain": [f"wavesim.r{r}of4-000000000120-full.rk.h5" for r in range(4)],
            },
            {"event": "end", "job": "12", "pid": 2, "rc": 0, "step": 300, "t": 9.0},
            *({"event": "start", "job": "13", "pid": 3, "t": 10.0, "ranks": bad} for bad in (0, True, "2", 2.0, 1 << 40)),
            {"event": "start", "job": "14", "pid": 4, "t": 11.0},
        ]
    )
    assert [(a.job, a.ranks) for a in runs] == [("11", 4), ("12", 2), ("14", None)]
    assert plot._labels(runs[2], 2, True) == ("job 14: ranks unknown", "")
    runs = runs[:2]
    assert [plot.written_by(a) for a in runs] == [None, 4]
    assert plot._labels(runs[1], 1, True) == ("job 12: 2 ranks", " from a set of 4 ranks")
    assert plot._labels(runs[0], 0, True) == ("job 11: 4 ranks", "")
    assert plot._labels(runs[0], 0, False) == ("job 11", "")
    out = tmp_path / "t.png"
    plot.plot_timeline(runs[:1], out, total_steps=300, more=[("multi-rank simulation (MPI)", runs, 300, True)])
    w, h = png_size(out)
    assert w >= 600 and h >= 600  # two panels


def test_compare_writes_its_verdict_as_json(tmp_path: Path, tiny_result: Path) -> None:
    out = tmp_path / "verdict.json"
    proc = run_script("compare.py", str(tiny_result), str(tiny_result), "--json", str(out))
    assert proc.returncode == 0 and "BIT-IDENTICAL" in proc.stdout, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["identical"] is True and doc["differences"] == [] and "pressure" in doc["sha256"]


def test_workflow_multi_rank_step_matches_the_single_process_result(tmp_path: Path) -> None:
    """``mpi_step: true`` under the local executor: simulate_mpi runs as ``mpiexec -n 3`` (an uneven
    split), its start event records its 3 ranks, and compare_mpi finds it bit-identical to simulate; off by default."""
    cfg = _config("12,10,14", 30, 10)  # 14 planes along z: 5 + 5 + 4 (each rank needs its halo's 4)
    proc = subprocess.run(_snakemake(tmp_path, "-n", *cfg), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "simulate_mpi" not in proc.stdout + proc.stderr, proc.stdout
    target = "results/demo/compare_mpi.json"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        target,
        "-s",
        str(WF / "Snakefile"),
        "-d",
        str(tmp_path),
        "-c1",
        *cfg,
        "mpi_step=true",
        "mpi_tasks=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    res = tmp_path / "results" / "demo"
    assert json.loads((res / "compare_mpi.json").read_text())["identical"] is True
    assert not (res / "simulate_mpi.ranks.jsonl").exists()  # no side file: the ranks are rkrun's own record
    (run,) = attempts(read_events(res / "simulate_mpi.events.jsonl"))
    assert run.done and run.reached == 30 and run.ranks == 3
    assert [a.ranks for a in attempts(read_events(res / "simulate.events.jsonl"))] == [1]  # rkrun alone: one rank
