"""The cluster tests' stand-in step (``fixtures_slurm.STEP_SCRIPT``) waits at its gate and stops there on SIGTERM.

The cluster tests rely on it to force a preemption window (the step cannot
finish before Slurm's preemption lands), so the gate itself is checked here,
without Slurm: held at step 3, a SIGTERM stops the step at exactly step 3; a
second run with the gate moved resumes there, and once the gate is open it
ends with the uninterrupted run's result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from fixtures_slurm import SlurmWorkflow
from helpers import wait_until


def _run(w: SlurmWorkflow, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(w.step_script), "--steps", "12", "--delay", "0", "--trace", str(w.trace_path)]
    cmd += ["--checkpoint-dir", str(w.root / "ck"), "--out", str(w.root / "out.json"), *extra]
    env = {k: v for k, v in os.environ.items() if k != "RKSLURM_CHECKPOINT_DIR"}
    return subprocess.Popen(cmd, cwd=w.root, env=env, stderr=subprocess.PIPE, text=True)


def test_a_gated_step_waits_stops_at_its_gate_and_finishes_once_open(tmp_path: Path) -> None:
    w = SlurmWorkflow(tmp_path)
    w.write(steps=12, gate=3)
    ref = w.reference(12)
    p = _run(w, "--gate", "gate")
    wait_until(lambda: any(e["event"] == "ckpt" and e["step"] == 3 for e in w.trace()), 60, "the step to reach its gate")
    assert p.poll() is None  # held: twelve steps of no delay would have ended it
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 75, p.stderr.read() if p.stderr else ""
    assert [e["step"] for e in w.events("stop")] == [3]
    w.hold_at(7)
    p = _run(w, "--gate", "gate")
    wait_until(lambda: w.progressed(2, 4), 60, "the second run to reach the moved gate")
    assert p.poll() is None and max(e["step"] for e in w.events("ckpt")) == 7
    w.open_gate()
    assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    assert json.loads((w.root / "out.json").read_text()) == ref
    assert [e["step"] for e in w.events("start")] == [0, 3]
