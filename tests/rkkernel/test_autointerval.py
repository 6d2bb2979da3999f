"""--checkpoint-every/--checkpoint-seconds auto: the Young-Daly interval, M from the environment and the executor's history."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from fixtures_kernel import rkrun_env
from rkkernel.autointerval import Tuner, choose, young_daly_seconds
from rkstep.events import read_events
from rkstep.mtbi import DEFAULT_MTBI_SECONDS, ENV_MTBI_SECONDS, read_mtbi
from snakemake_executor_plugin_rkslurm.interruptions import InterruptionHistory, job_env

CKPT_RE = re.compile(r"-(\d{12})-(full|delta)\.(rkcp|rk\.h5)$")


# ---------------------------------------------------------------- the rule
def test_young_daly_formula_on_synthetic_cost_and_rate() -> None:
    # C = 0.05 s stall + 0.15 s writer, M = 1 h, 500 steps/s of compute
    tuner = Tuner(True, 3600.0, "test", probes=1)
    assert not tuner.probe_due()  # no batch yet: nothing to measure a rate from
    tuner.batch(32, 1.0)  # the first batch (a compile at the first launch): left out of the rate
    tuner.batch(1000, 2.0)
    tuner.batch(500, 1.0)
    assert tuner.probe_due()
    tuner.probed(step=1532, stall_seconds=0.05, failed_before=0)
    assert not tuner.probe_due()
    assert tuner.poll(None, 0) is None  # the probe's write has not landed
    assert tuner.poll((1000, 9.0), 0) is None  # another step's write says nothing about the probe
    got = tuner.poll((1532, 0.15), 0)
    assert got is not None
    t = math.sqrt(2 * 0.2 * 3600)
    assert got.seconds == pytest.approx(t)
    assert got.steps == round(t * 500)  # 18974
    assert got.cost_seconds == pytest.approx(0.2)
    assert "Young-Daly" in got.describe() and str(got.steps) in got.describe()
    assert tuner.poll((1532, 0.15), 0) is None  # picked once


def test_failed_probe_is_taken_again_and_seconds_mode() -> None:
    tuner = Tuner(False, 100.0, "test", probes=1)
    tuner.batch(10, 1.0)
    tuner.probed(10, 0.5, failed_before=0)
    assert tuner.poll(None, 1) is None and tuner.probe_due()  # the write failed: probe again
    tuner.probed(20, 0.5, failed_before=1)
    got = tuner.poll((20, 1.5), 1)
    assert got is not None and got.steps is None
    assert got.seconds == pytest.approx(math.sqrt(2 * 2.0 * 100.0)) == 20.0


def test_first_probe_cost_is_left_out() -> None:
    """The first checkpoint of a process pays one-off costs (imports, the first file): C is the later probes' mean."""
    tuner = Tuner(True, 50.0, "test")  # the default: two probes
    tuner.batch(100, 1.0)
    tuner.probed(100, 0.01, 0)
    assert tuner.poll((100, 0.49), 0) is None and tuner.probe_due()
    tuner.batch(100, 1.0)
    tuner.probed(200, 0.02, 0)
    got = tuner.poll((200, 0.07), 0)
    assert got is not None and got.cost_seconds == pytest.approx(0.09)
    assert got.seconds == pytest.approx(math.sqrt(2 * 0.09 * 50.0)) == pytest.approx(3.0)
    assert got.steps == 300


def test_interval_is_at_least_one_step_and_inputs_are_checked() -> None:
    assert choose(1e-3, 1e-6, "x", 10.0, True).steps == 1
    for c, m in ((0.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="Young-Daly"):
            young_daly_seconds(c, m)


@pytest.mark.parametrize(
    ("raw", "seconds", "default"),
    [
        (None, DEFAULT_MTBI_SECONDS, True),
        ("7200", 7200.0, False),
        ("", DEFAULT_MTBI_SECONDS, True),
        ("abc", DEFAULT_MTBI_SECONDS, True),
        ("-5", DEFAULT_MTBI_SECONDS, True),
        ("nan", DEFAULT_MTBI_SECONDS, True),
        ("inf", DEFAULT_MTBI_SECONDS, True),
    ],
)
def test_mtbi_from_environment(raw: str | None, seconds: float, default: bool) -> None:
    m = read_mtbi({} if raw is None else {ENV_MTBI_SECONDS: raw})
    assert m.seconds == seconds
    assert m.source.startswith("default") == default


# ---------------------------------------------------------------- end to end
def _run_auto(rkrun, tmp_path: Path, mtbi: str, *flags: str) -> tuple[str, list[int]]:
    env = rkrun_env()
    env[ENV_MTBI_SECONDS] = mtbi
    ck = tmp_path / "ck"
    p = rkrun(
        "wavesim", "--grid", "16", "14", "12", "--steps", "40", "--batch", "4", "--energy-every", "10", "--full-every", "2",
        "--backend", "numpy", "--checkpoint-dir", str(ck), "--out", str(tmp_path / "r.h5"), *flags, env=env,
    )  # fmt: skip
    assert p.wait(120) == 0, p.log()
    return p.log(), sorted(int(m.group(1)) for f in ck.iterdir() if (m := CKPT_RE.search(f.name)))


def test_rkrun_auto_tiny_mtbi_checkpoints_every_step(rkrun, tmp_path: Path) -> None:
    log, steps = _run_auto(rkrun, tmp_path, "1e-15", "--checkpoint-every", "auto")
    m = re.search(
        r"checkpoint interval every (\d+) steps \(Young-Daly sqrt\(2\*C\*M\) = sqrt\(2 \* ([0-9.e+-]+) s \* ([0-9.e+-]+) s\)", log
    )
    assert m, log
    assert int(m[1]) == 1 and float(m[3]) == 1e-15 and float(m[2]) > 0
    assert "M from $RKSLURM_MTBI_SECONDS" in log
    # the probes after the first two batches (steps 4, 8), then every step; retention keeps the newest 2 chains
    assert steps[-1] == 40 and steps == list(range(steps[0], 41)), steps


def test_rkrun_auto_huge_mtbi_writes_only_probe_and_final(rkrun, tmp_path: Path) -> None:
    log, steps = _run_auto(rkrun, tmp_path, "1e12", "--checkpoint-seconds", "auto")
    assert re.search(r"checkpoint interval every [0-9.e+]+ s \(Young-Daly", log), log
    assert steps == [8, 40], steps  # retention keeps the newest 2 chains
    written = [e["step"] for e in read_events(tmp_path / "ck" / "rkstep.events.jsonl") if e["event"] == "checkpoint"]
    assert written == [4, 8, 40], written  # the two probes, then only the final checkpoint


def test_auto_is_refused_when_misspelt(rkrun, tmp_path: Path) -> None:
    p = rkrun("wavesim", "--grid", "8", "8", "8", "--steps", "4", "--checkpoint-every", "automatic", "--backend", "numpy",
              "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"))  # fmt: skip
    assert p.wait(60) == 2, p.log()
    assert "automatic" in p.log()


# ---------------------------------------------------------------- the executor's history
def test_interruption_history_per_partition(tmp_path: Path) -> None:
    path = tmp_path / ".snakemake" / "rkslurm" / "interruptions.json"
    h = InterruptionHistory(path)
    assert h.env_for("preempt") == {}  # nothing seen: the step uses its default
    # a step on "preempt": submitted at 0, preempted at 100, resubmitted at 110, requeued at 400, succeeded at 1000
    for event, t in (
        ("submitted", 0),
        ("preemption", 100),
        ("submitted", 110),
        ("checkpoint", 200),
        ("requeued", 400),
        ("succeeded", 1000),
    ):
        h.observe("preempt", "/ck/a", event, float(t))
    # another step on "long": ran 5000 s and succeeded, never interrupted
    h.observe("long", "/ck/b", "submitted", 0.0)
    h.observe("long", "/ck/b", "succeeded", 5000.0)
    again = InterruptionHistory(path)  # a new executor process reads what the last one wrote
    hist = again.load()
    assert hist["preempt"].interruptions == 2
    assert hist["preempt"].exposed_seconds == pytest.approx(100 + 290 + 600)
    assert again.mtbi_seconds("preempt") == pytest.approx(990 / 2)
    assert again.env_for("preempt") == {ENV_MTBI_SECONDS: "495"}
    assert hist["long"].interruptions == 0 and again.env_for("long") == {}
    assert read_mtbi(again.env_for("preempt")).seconds == 495.0
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left behind
    # what the submitter puts in the job's environment: M of the job's partition; a value set by hand wins
    assert job_env({"RKSLURM_CHECKPOINT_DIR": "/ck/a"}, "preempt", again) == {"RKSLURM_CHECKPOINT_DIR": "/ck/a", ENV_MTBI_SECONDS: "495"}
    assert job_env({ENV_MTBI_SECONDS: "60"}, "preempt", again) == {ENV_MTBI_SECONDS: "60"}
    assert job_env({}, "long", again) == {} and job_env({}, None, again) == {}


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"[" * 100000, json.dumps({"version": 2, "partitions": {}}).encode(),
     json.dumps({"version": 1, "partitions": {"p": {"exposed_seconds": "x", "interruptions": 1}, "q": {"exposed_seconds": 10.0, "interruptions": True}}}).encode(),
     b" " * (2 << 20)],
)  # fmt: skip
def test_interruption_history_damaged_reads_as_empty_and_is_rewritten(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "interruptions.json"
    path.write_bytes(content)
    h = InterruptionHistory(path)
    assert h.load() == {} and h.env_for("p") == {}
    h.record("p", 30.0, True, now=1.0)
    assert h.mtbi_seconds("p") == 30.0


def test_interruption_history_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "interruptions.json"
    os.mkfifo(path)
    assert InterruptionHistory(path).load() == {}
