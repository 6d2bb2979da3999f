"""Fixtures for tests on the real local Slurm cluster started by ``slurm/up``.

``slurm_env`` sources ``$RKSLURM_SLURM_BASE/slurm.env`` into os.environ and
skips (with the reason) when the cluster is not up. ``SlurmWorkflow`` runs
``snakemake --executor rkslurm`` as a subprocess in a tmp dir, with a tiny
self-contained checkpointing step script (``STEP_SCRIPT``) that behaves like
``rkrun``: atomic progress file per checkpoint, resume from it, final
checkpoint + ``rkrun.stopped.json`` + exit 75 on SIGTERM/SIGUSR1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BASE = Path(os.environ.get("RKSLURM_SLURM_BASE", "/tmp/rkslurm-cluster"))

STEP_SCRIPT = r'''
"""Deterministic checkpointing test step (stands in for rkrun)."""
import argparse, hashlib, json, os, signal, sys, tempfile, time

def atomic_write(path, text):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        f.write(text); f.flush(); os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY); os.fsync(dfd); os.close(dfd)

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--delay", type=float, default=0.1)
ap.add_argument("--checkpoint-every", type=int, default=1)
ap.add_argument("--checkpoint-dir", default=os.environ.get("RKSLURM_CHECKPOINT_DIR"))
ap.add_argument("--seed", default="rkslurm")
ap.add_argument("--trace")
ap.add_argument("--out", required=True)
ap.add_argument("--fail-at", type=int, default=None)
a = ap.parse_args()
if not a.checkpoint_dir:
    sys.exit("no checkpoint dir (RKSLURM_CHECKPOINT_DIR unset)")
os.makedirs(a.checkpoint_dir, exist_ok=True)
prog = os.path.join(a.checkpoint_dir, "rkslurm.progress.json")
step, h = 0, hashlib.sha256(a.seed.encode()).hexdigest()
if os.path.exists(prog):
    st = json.load(open(prog)); step, h = st["step"], st["h"]
def trace(ev, s):
    print(f"step-script: {ev} at step {s}", file=sys.stderr, flush=True)
    if a.trace:
        with open(a.trace, "a") as f:
            f.write(json.dumps({"event": ev, "step": s, "job": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid(), "t": time.time()}) + "\n")
try:  # the step protocol's attempt events, as rkrun writes them
    from rkstep.events import EventWriter
    ev = EventWriter.for_folder(a.checkpoint_dir)
except ImportError:
    ev = None
trace("start", step)
if ev:
    ev.start(step)
stop = []
def on_sig(signum, frame):
    stop.append(signal.Signals(signum).name)
signal.signal(signal.SIGTERM, on_sig)
signal.signal(signal.SIGUSR1, on_sig)
def checkpoint():
    atomic_write(prog, json.dumps({"step": step, "h": h}))
    if ev:
        ev.checkpoint(step)
while step < a.steps:
    if stop:
        checkpoint()
        atomic_write(os.path.join(a.checkpoint_dir, "rkrun.stopped.json"), json.dumps({"step": step, "signal": stop[0]}))
        trace("stop", step)
        if ev:
            ev.stop(step, stop[0]); ev.end(75, step)
        sys.exit(75)
    if a.fail_at is not None and step == a.fail_at:
        trace("error", step)
        if ev:
            ev.end(1, step)
        sys.exit(1)
    time.sleep(a.delay)
    h = hashlib.sha256(f"{h}:{step}".encode()).hexdigest()
    step += 1
    if step % a.checkpoint_every == 0:
        checkpoint()
        if a.trace:
            trace("ckpt", step)
atomic_write(a.out, json.dumps({"steps": step, "h": h}) + "\n")
trace("done", step)
if ev:
    ev.end(0, step)
'''


def _source_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export ") :].split("=", 1)
            env[k] = v.strip("'\"")
    return env


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    envf = BASE / "slurm.env"
    if not envf.exists():
        pytest.skip(f"local Slurm cluster not up: {envf} missing (run `bash slurm/up`)")
    env = _source_env(envf)
    os.environ.update(env)
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    if p.returncode != 0 or "UP" not in p.stdout:
        pytest.skip(f"local Slurm cluster not answering `scontrol ping`: {p.stdout.strip()} {p.stderr.strip()}")
    if os.path.realpath("/etc/slurm/slurm.conf") != os.path.realpath(env.get("SLURM_CONF", "")):
        pytest.skip(
            "/etc/slurm/slurm.conf does not lead to the test cluster's slurm.conf: the jobstep's inner srun drops SLURM_CONF (slurm/up links it)"
        )
    return env


def submit_urgent(seconds: float = 3.0) -> str:
    """An `urgent` job needing every CPU of the node: preempts whatever runs on scavenger/requeue."""
    cpus = os.cpu_count() or 1
    p = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-c", str(cpus), "-o", "/dev/null", "--wrap", f"sleep {seconds}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return p.stdout.strip().split(";")[0]


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class SlurmWorkflow:
    """A tmp workflow dir with the step script and a one-step Snakefile."""

    root: Path

    @property
    def step_script(self) -> Path:
        return self.root / "step.py"

    @property
    def trace_path(self) -> Path:
        return self.root / "trace.jsonl"

    def write(
        self,
        steps: int = 40,
        delay: float = 0.25,
        partition: str = "scavenger",
        checkpoint_every: int = 1,
        extra_resources: str = "",
        seed: str = "rkslurm",
        step_args: str = "",
    ) -> None:
        self.step_script.write_text(STEP_SCRIPT)
        res = f'slurm_partition="{partition}", mem_mb=200'
        if extra_resources:
            res += ", " + extra_resources
        (self.root / "Snakefile").write_text(
            f"""
rule all:
    input: "result.json"

rule sim:
    output: "result.json"
    params: steps={steps}, seed="{seed}"
    resources: {res}
    shell: "exec {shlex.quote(sys.executable)} step.py --steps {{params.steps}} --seed {{params.seed}} --delay {delay} --checkpoint-every {checkpoint_every} --trace trace.jsonl --out {{output}}{" " + step_args if step_args else ""}"
"""
        )

    def trace(self) -> list[dict]:
        if not self.trace_path.exists():
            return []
        return [json.loads(line) for line in self.trace_path.read_text().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.trace() if e["event"] == name]

    def start(self, *args: str, poll: float = 1.0, env: dict[str, str] | None = None) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "snakemake",
            "--executor",
            "rkslurm",
            "--jobs",
            "1",
            "--rkslurm-poll-interval",
            str(poll),
            "--rkslurm-slow-poll-interval",
            str(poll),
            "--rkslurm-signal-lead-time",
            "25",
            "--latency-wait",
            "5",
            *args,
        ]
        return subprocess.Popen(cmd, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def run(self, *args: str, timeout: float = 240, poll: float = 1.0) -> tuple[int, str]:
        p = self.start(*args, poll=poll)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"snakemake did not finish within {timeout}s:\n{out[-6000:]}") from None
        return p.returncode, out

    def reference(self, steps: int, seed: str = "rkslurm") -> dict:
        """The uninterrupted run's result, computed locally without Slurm."""
        d = self.root / "ref"
        d.mkdir(exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                str(self.step_script),
                "--steps",
                str(steps),
                "--seed",
                seed,
                "--delay",
                "0",
                "--checkpoint-dir",
                str(d / "ck"),
                "--out",
                str(d / "out.json"),
            ],
            check=True,
            timeout=120,
        )
        return json.loads((d / "out.json").read_text())


@pytest.fixture
def slurm_workflow(slurm_env: dict[str, str], tmp_path: Path) -> SlurmWorkflow:
    return SlurmWorkflow(tmp_path)
