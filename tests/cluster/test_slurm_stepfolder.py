"""Issue 20 on the real local cluster: adoption that is safe (defects 1 and 8), a folder that is
not rkstep's (defect 2) and hostile events (defect 4), each through a real ``snakemake --executor rkslurm``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from asuser import run_as_nobody
from fixtures_slurm import STEP_SCRIPT, SlurmWorkflow, wait_until
from rkstep.fingerprint import declared_fingerprint
from rkstep.protocol import fingerprint_tag

pytestmark = pytest.mark.slurm


def _snakefile(w: SlurmWorkflow, body: str) -> None:
    w.step_script.write_text(STEP_SCRIPT)
    (w.root / "Snakefile").write_text(body)


def _sim_rule(steps: int, seed: str, delay: float, prefix: str = "") -> str:
    py = shlex.quote(sys.executable)
    return f"""
rule sim:
    output: "result.json"
    params: steps={steps}, seed="{seed}", fingerprint="seed={seed} steps={steps}"
    resources: slurm_partition="main", mem_mb=200
    shell: "{prefix}exec {py} step.py --steps {{params.steps}} --seed {{params.seed}} --delay {delay} --trace trace.jsonl --out {{output}}"
"""


def _comment(job_id: str) -> str:
    """The job's ``--comment`` (its words up to the next ``Key=``)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%k"], capture_output=True, text=True, timeout=20).stdout
    return out.strip()


def _state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.strip()
    return out or "GONE"


def test_rerun_with_other_params_cancels_the_old_job_and_never_adopts_a_foreign_one(slurm_workflow: SlurmWorkflow) -> None:
    """The head dies, the user changes a param and reruns with a wrong $USER while the old job still runs,
    and another user has submitted a job carrying the step's tag and the *new* fingerprint."""
    w = slurm_workflow
    _snakefile(w, 'rule all:\n    input: "result.json"\n' + _sim_rule(400, "A", 0.25))
    p = w.start()
    forged = None
    old = None
    try:
        wait_until(lambda: any(e["event"] == "ckpt" for e in w.trace()) or p.poll() is not None, 120, "the step to checkpoint")
        assert p.poll() is None
        p.kill()  # the head dies; its Slurm job runs on
        p.communicate(timeout=30)
        old = str(w.events("start")[0]["job"])
        tag = next(x for x in _comment(old).split() if x.startswith("rkslurm:"))
        new_fp = fingerprint_tag(declared_fingerprint("seed=B steps=20"))
        comment = f"rule_sim {tag} {new_fp}"

        def submit() -> str:
            r = subprocess.run(
                [
                    "sbatch",
                    "--parsable",
                    "--hold",
                    "-p",
                    "main",
                    "-D",
                    "/tmp",
                    "-o",
                    "/dev/null",
                    "--comment",
                    comment,
                    "--wrap",
                    "sleep 300",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            return r.stdout.strip().split(";")[0]

        forged = run_as_nobody(submit)
        _snakefile(w, 'rule all:\n    input: "result.json"\n' + _sim_rule(20, "B", 0.05))
        assert subprocess.run([sys.executable, "-m", "snakemake", "--unlock"], cwd=w.root, capture_output=True, timeout=120).returncode == 0
        q = w.start(env={**os.environ, "USER": "nobody", "LOGNAME": "nobody"})
        out, _ = q.communicate(timeout=240)
        assert q.returncode == 0, out[-5000:]
        assert f"cancelling its live Slurm job {old}" in out and "fingerprint differs" in out, out[-5000:]
        # squeue --me never lists the other user's job (whatever $USER says): not adopted, not cancelled
        assert f"adopting its running Slurm job {forged}" not in out and f"live Slurm job {forged}" not in out
        assert "instead of submitting a duplicate" not in out
        assert "starting rule sim fresh" in out
        assert _state(forged) == "PENDING"  # the other user's (held) job was left alone
        starts = w.events("start")
        assert starts[-1]["step"] == 0 and str(starts[-1]["job"]) not in (old, forged)
        assert json.loads((w.root / "result.json").read_text()) == w.reference(20, seed="B")
    finally:
        if p.poll() is None:
            p.kill()
        for j in (forged, old):
            if j:
                subprocess.run(["scancel", j], capture_output=True, timeout=20)


HOSTILE = r"""
import json, os, sys
p = os.path.join(os.environ["RKSLURM_CHECKPOINT_DIR"], "rkstep.events.jsonl")
job = os.environ.get("SLURM_JOB_ID")
with open(p, "a") as f:
    f.write("[" * 100000 + "\n")
    f.write(json.dumps({"event": "start", "job": job, "restart": "1a"}) + "\n")
    f.write('{"event": "checkpoint", "job": "%s", "restart": 0, "step": NaN}\n' % job)
    f.write(json.dumps([{"event": "end"}]) + "\n")
"""


def test_foreign_folder_is_refused_before_submission_and_hostile_events_do_not_stop_the_loop(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    results = w.root / "results"
    (results / "old").mkdir(parents=True)
    (results / "energy.csv").write_text("1,2\n")
    (results / "old" / "plot.png").write_bytes(b"png")
    before = sorted((str(q.relative_to(results)), q.read_bytes() if q.is_file() else b"") for q in results.rglob("*"))
    (w.root / "hostile.py").write_text(HOSTILE)
    py = shlex.quote(sys.executable)
    _snakefile(
        w,
        'rule all:\n    input: "result.json", "other.json"\n'
        + _sim_rule(12, "C", 0.3, prefix=f"{py} hostile.py && ")
        + """
rule other:
    output: "other.json"
    resources: slurm_partition="main", mem_mb=100, rkslurm_checkpoint_dir="results"
    shell: "echo {{}} > {output}"
""",
    )
    rc, out = w.run("--keep-going")
    assert rc != 0
    assert "cannot submit rule other" in out and "holds files rkstep did not create" in out, out[-5000:]
    assert out.count("submitted with SLURM jobid") == 1  # only sim reached sbatch
    after = sorted((str(q.relative_to(results)), q.read_bytes() if q.is_file() else b"") for q in results.rglob("*"))
    assert after == before
    assert json.loads((w.root / "result.json").read_text()) == w.reference(12, seed="C")
    assert "skipped" in out and "not well-formed attempt events" in out  # said, not crashed
