"""Snakemake's local executor: a killed step resumes from its checkpoint folder on rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from fixtures_slurm import STEP_SCRIPT, wait_until

SNAKEFILE = """
from snakemake_executor_plugin_rkslurm import rkslurm_checkpoint_dir

rule sim:
    output: "result.json"
    params: rkslurm_checkpoint_dir=rkslurm_checkpoint_dir("sim")
    shell: "exec {py} step.py --steps 40 --delay 0.1 --checkpoint-dir {{params.rkslurm_checkpoint_dir}} --trace trace.jsonl --out {{output}}"
"""


def _trace(root: Path) -> list[dict]:
    p = root / "trace.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_local_rerun_resumes_from_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step.py").write_text(STEP_SCRIPT)
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(py=sys.executable))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: any(e["event"] == "ckpt" and e["step"] >= 5 for e in _trace(tmp_path)), 120, "the step to checkpoint")
    pid = _trace(tmp_path)[0]["pid"]
    os.kill(pid, signal.SIGTERM)  # what a preempted/killed batch job delivers to the step
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    stop = [e for e in _trace(tmp_path) if e["event"] == "stop"][0]["step"]
    ck = tmp_path / ".snakemake/rkslurm/sim/_"
    assert json.loads((ck / "rkrun.stopped.json").read_text())["step"] == stop
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    starts = [e for e in _trace(tmp_path) if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, stop]
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "step.py", "--steps", "40", "--delay", "0", "--checkpoint-dir", str(ref), "--out", "ref.json"],
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    assert (tmp_path / "result.json").read_bytes() == (tmp_path / "ref.json").read_bytes()
