"""The time-limit race on the real cluster (issue 21), forced rather than hoped for.

The step does all its work, writes its output and its ``end`` event (rc 0),
and then is still alive -- lingering until the time-limit signal lands, so
the signal always arrives after the step finished. The signal kills the
linger, the job step fails, the inner Snakemake removes the outputs "since
they might be corrupted" and Slurm records FAILED 1:0: exactly the race of
the issue, every run. rkslurm must continue the step (the resubmission
restores the final checkpoint and finishes at once), not fail the workflow.
"""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from fixtures_slurm import STEP_SCRIPT, SlurmWorkflow

pytestmark = pytest.mark.slurm

STEPS = 12


def _write(w: SlurmWorkflow) -> None:
    w.step_script.write_text(STEP_SCRIPT)
    # the first attempt lingers after finishing until the limit's signal kills it; later ones just exit
    linger = "if [ ! -e lingered ]; then touch lingered; sleep 600; fi"
    (w.root / "Snakefile").write_text(
        f"""
rule all:
    input: "result.json"

rule sim:
    output: "result.json"
    params: steps={STEPS}
    resources: slurm_partition="short", mem_mb=100, runtime=1
    shell: "{shlex.quote(sys.executable)} step.py --steps {{params.steps}} --delay 0.1 --trace trace.jsonl --out {{output}} && {linger}"
"""
    )


def test_step_finished_when_the_limit_signal_lands_is_continued(slurm_workflow: SlurmWorkflow) -> None:
    w = slurm_workflow
    _write(w)
    ref = w.reference(STEPS)
    rc, out = w.run("--rkslurm-signal-lead-time", "60", "--rkslurm-max-timeouts", "2", timeout=300, poll=1.0)
    assert rc == 0, out[-6000:]
    done = w.events("done")
    assert len(done) == 2 and done[0]["job"] != done[1]["job"], w.trace()  # finished, failed by the signal, continued
    assert w.events("start")[1]["step"] == STEPS  # the continuation restored the final checkpoint: no work redone
    assert json.loads((w.root / "result.json").read_text()) == ref
    assert "time limit reached after progress" in out
    # the lead of 60 s on a 1-minute limit is capped at 20 s, and the user is told once
    assert out.count("is not well below its time limit of 60 s") == 1 and "using 20 s" in out
