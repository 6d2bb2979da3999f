"""The rkslurm executor on the real local cluster (``slurm/up``).

Each test runs ``snakemake --executor rkslurm`` on a one-step workflow whose
step is a deterministic checkpointing script (see fixtures_slurm.STEP_SCRIPT)
and interferes with it through Slurm itself: `urgent` jobs that preempt it,
a 1-minute partition, a slurmctld restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixtures_slurm import BASE, SlurmWorkflow, submit_urgent, wait_until

pytestmark = pytest.mark.slurm


def _assert_continuous(w: SlurmWorkflow, stops: int) -> int:
    """Every restart resumed exactly where the previous run stopped (grace period → 0 steps lost).

    At least `stops` interruptions: on a shared cluster other users' urgent
    jobs may preempt the step more often; returns the number seen.
    """
    tr = w.trace()
    starts = [e for e in tr if e["event"] == "start"]
    stop_ev = [e for e in tr if e["event"] == "stop"]
    assert len(stop_ev) >= stops, tr
    assert len(starts) == len(stop_ev) + 1, tr
    assert starts[0]["step"] == 0
    for before, after in zip(stop_ev, starts[1:], strict=True):
        assert after["step"] == before["step"], f"restart at {after['step']} but stopped at {before['step']}"
        assert before["step"] > 0
    return len(stop_ev)


def _submitted_ids(out: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", out)


def test_cancel_mode_preempted_twice_completes_bit_identical(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    w.write(steps=40, delay=0.25, partition="scavenger", gate=8)
    ref = w.reference(40)
    t0 = time.monotonic()
    p = w.start()
    w.preempt_when_running(p, 1)
    w.preempt_when_running(p, 2)
    w.open_gate()
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-5000:]
    assert json.loads((w.root / "result.json").read_text()) == ref
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    n = _assert_continuous(w, stops=2)
    # n+1 Slurm jobs, but Snakemake saw one job that simply finished: no error, no retry
    ids = _submitted_ids(out)
    assert len(set(ids)) == n + 1, out[-5000:]
    assert len({e["job"] for e in w.events("start")}) == n + 1
    assert out.count("Finished jobid: 1 ") == 1, out[-5000:]
    assert "Error in rule" not in out and "attempt" not in out.lower()
    # a rule without slurm_account: no stock account guess and none of its error-looking lines
    assert "trying to guess" not in out and "invalid option" not in out and "Unable to guess" not in out, out[-5000:]
    assert f"preemption {n}/10" in out
    # the checkpoint folder is gone after success, the timeline stays
    assert not (w.root / ".snakemake/rkslurm/sim/_").exists()
    assert not (w.root / ".snakemake/rkslurm/events.jsonl").exists()  # the step's own events are the record (issue 20)
    # the partition's interruption history (M for --checkpoint-every auto) counted them, with the time run before each
    hist = json.loads((w.root / ".snakemake/rkslurm/interruptions.json").read_text())["partitions"]["scavenger"]
    assert hist["interruptions"] == n and hist["exposed_seconds"] > 0, hist
    print(f"cancel-mode test: {time.monotonic() - t0:.1f} s")


def test_requeue_mode_no_duplicate_submission(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    w.write(steps=40, delay=0.25, partition="requeue", gate=8)
    ref = w.reference(40)
    p = w.start()
    w.preempt_when_running(p, 1)
    w.preempt_when_running(p, 2)
    w.open_gate()
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    assert json.loads((w.root / "result.json").read_text()) == ref
    _assert_continuous(w, stops=2)
    ids = _submitted_ids(out)
    assert len(ids) == 1, f"duplicate submission: {ids}"
    assert {e["job"] for e in w.events("start")} == {ids[0]}, "Slurm requeued the same job id"
    assert out.count("Finished jobid: 1 ") == 1
    assert "Error in rule" not in out


def test_cap_exceeded_fails_cleanly_listing_slurm_ids(slurm_workflow: SlurmWorkflow) -> None:
    """Regression test for the stock executor's endless poll after PreemptMode=CANCEL."""
    w = slurm_workflow
    w.write(steps=400, delay=0.25, partition="scavenger")
    t0 = time.monotonic()
    p = w.start("--rkslurm-max-preemptions", "1")
    w.preempt_when_running(p, 1)
    w.preempt_when_running(p, 2)
    out, _ = p.communicate(timeout=90)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 180
    ids = sorted(set(_submitted_ids(out)))
    assert len(ids) == 2, out[-5000:]
    m = re.search(r"Slurm job ids of this step: ([0-9, ]+)", out)
    assert m, out[-5000:]
    assert sorted(x.strip() for x in m.group(1).split(",")) == ids
    assert "preemption cap reached" in out
    assert not [j for j in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split() if j in ids]
    # checkpoints are kept for a later rerun
    assert (w.root / ".snakemake/rkslurm/sim/_/rkslurm.progress.json").exists()


def test_requeue_cap_cancels_the_requeued_job(slurm_workflow: SlurmWorkflow) -> None:
    """REQUEUE mode: Slurm restarts the same id; past the cap we scancel it and fail."""
    w = slurm_workflow
    w.write(steps=400, delay=0.25, partition="requeue")
    p = w.start("--rkslurm-max-preemptions", "1")
    w.preempt_when_running(p, 1)
    w.preempt_when_running(p, 2)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    ids = set(_submitted_ids(out))
    assert len(ids) == 1, out[-5000:]
    assert "preemption cap reached" in out and f"Slurm job ids of this step: {ids.pop()}" in out
    wait_until(
        lambda: (
            not [
                j
                for j in subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.splitlines()
                if j.split()[0] in _submitted_ids(out)
            ]
        ),
        30,
        "the requeued job to be cancelled",
    )


def test_time_limit_without_progress_fails(slurm_workflow: SlurmWorkflow) -> None:
    """A step that never checkpoints is not continued forever."""
    w = slurm_workflow
    (w.root / "Snakefile").write_text(
        'rule sim:\n    output: "result.json"\n    resources: slurm_partition="short", mem_mb=100\n    shell: "sleep 300"\n'
    )
    rc, out = w.run("--rkslurm-signal-lead-time", "0", timeout=300, poll=2.0)
    assert rc != 0
    assert "without checkpoint progress" in out


def _slurmctld_pid() -> int:
    pid = int((BASE / "run/slurmctld.pid").read_text().strip())
    assert os.path.realpath(f"/proc/{pid}/exe").endswith(("slurmctld", "slurmctld-wlm"))
    return pid


def test_slurmctld_restart_mid_run_still_completes(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    w.write(steps=60, delay=0.25, partition="scavenger")
    ref = w.reference(60)
    p = w.start()
    wait_until(lambda: w.progressed(1, 3) or p.poll() is not None, 120, "the step to run")
    pid = _slurmctld_pid()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "slurmctld to stop")
    time.sleep(6)  # several polls with slurmctld gone
    subprocess.run(["slurmctld"], check=True, timeout=30)
    wait_until(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0, 30, "slurmctld back")
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    assert json.loads((w.root / "result.json").read_text()) == ref
    assert len(set(_submitted_ids(out))) == 1


def test_changed_params_start_fresh_unchanged_resume(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    w.write(steps=30, delay=0.25, partition="scavenger", seed="A", gate=8)
    p = w.start("--rkslurm-max-preemptions", "0")
    w.preempt_when_running(p, 1)
    out, _ = p.communicate(timeout=90)
    assert p.returncode != 0
    stopped_at = w.events("stop")[0]["step"]
    assert stopped_at > 0
    w.open_gate()
    # same rule again: resumes from the checkpoint
    rc, out = w.run()
    assert rc == 0, out[-5000:]
    assert w.events("start")[1]["step"] == stopped_at
    assert "will restore from its checkpoint folder" in out
    # now change a param after another interruption: the old checkpoint must not be used
    (w.root / "result.json").unlink()
    w.trace_path.unlink()
    w.hold_at(8)
    p = w.start("--rkslurm-max-preemptions", "0")
    w.preempt_when_running(p, 1)
    p.communicate(timeout=90)
    w.open_gate()
    assert w.events("stop")[0]["step"] > 0
    w.write(steps=30, delay=0.25, partition="scavenger", seed="B")
    ref_b = w.reference(30, seed="B")
    rc, out = w.run()
    assert rc == 0, out[-5000:]
    assert "starting rule sim fresh" in out
    assert w.events("start")[-1]["step"] == 0
    assert json.loads((w.root / "result.json").read_text()) == ref_b


def _time_limit_run(w: SlurmWorkflow, steps: int, delay: float, min_jobs: int) -> None:
    w.write(steps=steps, delay=delay, partition="short", checkpoint_every=4)
    ref = w.reference(steps)
    t0 = time.monotonic()
    rc, out = w.run("--rkslurm-max-timeouts", "10", "--rkslurm-signal-lead-time", "10", timeout=600, poll=2.0)
    assert rc == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    assert json.loads((w.root / "result.json").read_text()) == ref
    starts = w.events("start")
    assert len(starts) >= min_jobs, w.trace()
    assert [s["step"] for s in starts] == sorted(s["step"] for s in starts)
    assert starts[-1]["step"] > 0
    assert "time limit reached after progress" in out
    assert out.count("Finished jobid: 1 ") == 1
    print(f"time-limit test: {time.monotonic() - t0:.1f} s, {len(starts)} Slurm jobs")


def test_time_limit_continuation(slurm_workflow: SlurmWorkflow) -> None:
    """Partition `short` has MaxTime=1 min; the step needs ~1.1 min of work."""
    _time_limit_run(slurm_workflow, steps=130, delay=0.5, min_jobs=2)


def test_time_limit_continuation_three_times_max_time(slurm_workflow: SlurmWorkflow) -> None:
    """The step needs 3 min of work on a 1-min partition."""
    _time_limit_run(slurm_workflow, steps=360, delay=0.5, min_jobs=3)


# --throttle-ms bounds the speed (<= 400 steps/s): on an idle machine 48^3 runs 5000 steps
# in ~5 s, faster than the test can preempt it twice.
RKRUN_SNAKEFILE = """
rule all:
    input: "result.h5"

rule sim:
    output: "result.h5"
    params: grid="48 48 48", steps={steps}
    resources: slurm_partition="scavenger", mem_mb=500
    shell: "rkrun wavesim --grid {{params.grid}} --steps {{params.steps}} --checkpoint-every 100 --backend numpy --batch 8 --throttle-ms 20 --out {{output}}"
"""


def test_rkrun_step_preempted_twice_restores_and_matches(slurm_workflow: SlurmWorkflow) -> None:
    """The real step command: rkrun reads RKSLURM_CHECKPOINT_DIR, stops on SIGTERM with a marker, restores."""
    import shutil

    h5py = pytest.importorskip("h5py")
    import numpy as np

    if shutil.which("rkrun") is None:
        pytest.skip("rkrun not installed")
    from rkstep.folder import StepFolder

    w = slurm_workflow
    steps = 5000
    (w.root / "Snakefile").write_text(RKRUN_SNAKEFILE.format(steps=steps))
    ref = w.root / "ref.h5"
    subprocess.run(
        [
            "rkrun",
            "wavesim",
            "--grid",
            "48",
            "48",
            "48",
            "--steps",
            str(steps),
            "--checkpoint-every",
            "100",
            "--backend",
            "numpy",
            "--batch",
            "8",
            "--checkpoint-dir",
            str(w.root / "refck"),
            "--out",
            str(ref),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    ck = w.root / ".snakemake/rkslurm/sim/_"
    log_dir = w.root / ".snakemake/slurm_logs/rule_sim"

    def logged_stops() -> list[int]:
        # the job logs, not the marker: the next job may already have restored and
        # finished (removing the folder) before a poll sees a marker
        found = []
        for f in sorted(log_dir.glob("*.log"), key=lambda f: int(f.stem) if f.stem.isdigit() else 0):
            m = re.search(r"stopped at step (\d+)", f.read_text(errors="replace"))
            if m:
                found.append(int(m.group(1)))
        return found

    p = w.start("--rkslurm-keep-successful-logs")
    stops: list[int] = []
    for i in range(2):
        base = max(stops, default=0)
        wait_until(lambda b=base: (StepFolder(ck).progress() or 0) >= b + 300 or p.poll() is not None, 180, "rkrun to make progress")
        assert p.poll() is None, "workflow ended before the preemption"
        submit_urgent(3)
        wait_until(lambda n=i + 1: len(logged_stops()) >= n, 120, "rkrun to stop on the preemption")
        stops = logged_stops()
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-5000:]
    ids = sorted(set(_submitted_ids(out)), key=int)
    assert len(ids) >= 3  # more if other users' urgent jobs preempted it too
    logs = [(w.root / f".snakemake/slurm_logs/rule_sim/{i}.log").read_text() for i in ids]
    # each continuation restored from the exact step the previous job stopped at (grace period: 0 steps lost)
    seen = []
    for before, after in zip(logs, logs[1:], strict=False):
        m = re.search(r"stopped at step (\d+)", before)
        assert m, before[-2000:]
        seen.append(int(m.group(1)))
        assert f"restored from step {m.group(1)} " in after, after[-2000:]
    assert set(stops) <= set(seen)
    with h5py.File(w.root / "result.h5") as a, h5py.File(ref) as b:
        assert a.attrs["step"] == b.attrs["step"] == steps
        for name in ("pressure", "pressure_prev", "energy"):
            assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
    assert not ck.exists()
