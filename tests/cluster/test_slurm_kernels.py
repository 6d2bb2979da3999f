"""Kernel plugins under the rkslurm executor on the real local cluster: preempted, restored, identical.

A kernel from outside the package (tests/data/rk_ext_kernel.py, ``rkrun
--kernel module:OBJECT``) and the traveltime kernel, whose restore after the
preemption comes from a delta chain.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from fixtures_kernel import rkrun_env
from fixtures_slurm import SlurmWorkflow, submit_urgent, wait_until
from helpers import REPO

pytestmark = pytest.mark.slurm

DATA = REPO / "tests" / "data"
RKRUN = f"PYTHONPATH={DATA}:{REPO / 'plugin'} {sys.executable} -m rkkernel.cli"  # no $PYTHONPATH: Snakemake's shell runs with set -u

SNAKEFILE = """
rule all:
    input: "result.h5"

rule sim:
    output: "result.h5"
    resources: slurm_partition="scavenger", mem_mb=500
    shell: "{rkrun} {args} --out {{output}}"
"""


def _local(args: str, out: Path, ck: Path) -> None:
    env = rkrun_env()
    env["PYTHONPATH"] = f"{DATA}:{REPO / 'plugin'}:{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "rkkernel.cli", *args.split(), "--checkpoint-dir", str(ck), "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr


def _preempted_once(w: SlurmWorkflow, args: str, min_progress: int) -> str:
    """Run the one-step workflow, preempt it once past ``min_progress``; the logs of every job, in order."""
    from rkstep.folder import StepFolder

    (w.root / "Snakefile").write_text(SNAKEFILE.format(rkrun=RKRUN, args=args))
    ck = w.root / ".snakemake/rkslurm/sim/_"
    log_dir = w.root / ".snakemake/slurm_logs/rule_sim"
    p = w.start("--rkslurm-keep-successful-logs")
    wait_until(lambda: (StepFolder(ck).progress() or 0) >= min_progress or p.poll() is not None, 180, "the step to make progress")
    if p.poll() is not None:
        raise AssertionError(f"workflow ended before the preemption:\n{p.communicate()[0][-4000:]}")
    submit_urgent(3)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-5000:]
    logs = sorted(log_dir.glob("*.log"), key=lambda f: int(f.stem) if f.stem.isdigit() else 0)
    return "\n".join(f.read_text(errors="replace") for f in logs)


def test_outside_kernel_preempted_under_the_executor(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    # 375 batches of 40 ms: after step 300, some 13 s for Slurm's preemption to land (10 ms left 3 s: a race)
    args = "--kernel rk_ext_kernel:PLUGIN --grid 4000 3 3 --steps 3000 --checkpoint-every 100 --backend numpy --batch 8 --throttle-ms 40"
    logs = _preempted_once(w, args, 300)
    stop = re.search(r"stopped at step (\d+)", logs)
    assert stop and f"restored from step {stop.group(1)} " in logs, logs[-4000:]
    _local(args.replace(" --throttle-ms 40", ""), w.root / "ref.h5", w.root / "refck")
    with h5py.File(w.root / "result.h5") as a, h5py.File(w.root / "ref.h5") as b:
        assert a["u"][()].tobytes() == b["u"][()].tobytes() and a["mass"][()].tobytes() == b["mass"][()].tobytes()


def test_traveltime_restores_a_delta_chain_under_the_executor(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    # ~0.5 s a step: deltas start near step 22 and it converges near 36, so the preemption lands in between
    args = "traveltime --grid 44 40 48 --steps 200 --checkpoint-every 2 --backend numpy --batch 2 --throttle-ms 1000"
    logs = _preempted_once(w, args, 24)
    # other tests' urgent jobs may preempt it too (earlier, from a full): one of the restores used deltas
    deltas = [int(n) for n in re.findall(r"restored from step \d+ \(chain: [^)]*\) = full step \d+ \+ (\d+) delta\(s\)", logs)]
    assert deltas and max(deltas) >= 1, logs[-4000:]
    _local(args.replace(" --throttle-ms 1000", ""), w.root / "ref.h5", w.root / "refck")
    with h5py.File(w.root / "result.h5") as a, h5py.File(w.root / "ref.h5") as b:
        assert a["traveltime"][()].tobytes() == b["traveltime"][()].tobytes()
        assert a.attrs["converged_step"] == b.attrs["converged_step"]
