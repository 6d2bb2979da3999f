"""Fixtures for tests on the real local Slurm cluster started by ``slurm/up``.

``slurm_env`` sources ``$RKSLURM_SLURM_BASE/slurm.env`` into os.environ and
skips (with the reason) when the cluster is not up. ``SlurmWorkflow`` runs
``snakemake --executor rkslurm`` as a subprocess in a tmp dir, with a tiny
self-contained checkpointing step script (``STEP_SCRIPT``) that behaves like
``rkrun``: atomic progress file per checkpoint, resume from it, final
checkpoint + ``rkrun.stopped.json`` + exit 75 on SIGTERM/SIGUSR1.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import helpers

BASE = Path(os.environ.get("RKSLURM_SLURM_BASE", "/tmp/rkslurm-cluster"))

#: what every test step script starts with: an atomic, durable write (tmp, fsync, rename, fsync dir)
ATOMIC_WRITE = r"""
def atomic_write(path, text):
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        f.write(text); f.flush(); os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(d, os.O_RDONLY); os.fsync(dfd); os.close(dfd)
"""

#: the options every stand-in step script takes (``ap``; each adds its own, then parses)
STEP_ARGS = r"""
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, required=True)
ap.add_argument("--delay", type=float, default=0.1)
ap.add_argument("--checkpoint-every", type=int, default=1)
ap.add_argument("--checkpoint-dir", default=os.environ.get("RKSLURM_CHECKPOINT_DIR"))
ap.add_argument("--seed", default="rkslurm")
ap.add_argument("--trace")
ap.add_argument("--out", required=True)
"""

STEP_SCRIPT = (
    r'''
"""Deterministic checkpointing test step (stands in for rkrun)."""
import argparse, hashlib, json, os, signal, sys, tempfile, time
'''
    + ATOMIC_WRITE
    + STEP_ARGS
    + r"""ap.add_argument("--fail-at", type=int, default=None)
ap.add_argument("--gate")  # a file holding a step number: this run waits there (tests force a window)
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
def held():
    try:
        with open(a.gate) as f:
            return step >= int(f.read())
    except (TypeError, OSError, ValueError):  # no gate, or the gate is open
        return False
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
    if held():
        time.sleep(0.05)
        continue
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
"""
)


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
    # a private second cluster (slurm/up with SLURM_CI_LINK_ETC=0) leaves /etc/slurm to the first one; its jobs
    # still reach it (slurmd hands its own SLURM_CONF to the job steps)
    if os.environ.get("SLURM_CI_LINK_ETC", "1") != "0" and os.path.realpath("/etc/slurm/slurm.conf") != os.path.realpath(
        env.get("SLURM_CONF", "")
    ):
        pytest.skip(
            "/etc/slurm/slurm.conf does not lead to the test cluster's slurm.conf: the jobstep's inner srun drops SLURM_CONF (slurm/up links it)"
        )
    return env


def submit_urgent(seconds: float = 3.0, node: str | None = None) -> str:
    """An `urgent` job needing every CPU of every node (or of ``node`` only):
    preempts whatever runs there on scavenger/requeue."""
    nodes = [node] if node else slurm_nodes()
    cpus = node_cpus(nodes[0]) if nodes else (os.cpu_count() or 1)
    where = ["-w", node] if node else []
    p = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-N", str(max(1, len(nodes))), "--ntasks-per-node", "1", "-c", str(cpus), *where]
        + ["-o", "/dev/null", "--wrap", f"sleep {seconds}"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return p.stdout.strip().split(";")[0]


def slurm_nodes() -> list[str]:
    """The cluster's node names (n1..nN after ``slurm/up --nodes N``)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=20, check=True).stdout
    return sorted(set(out.split()))


def multinode(mpi: bool = False) -> list[str]:
    """The cluster's nodes, or skip: a test that spreads a step over nodes needs two at least
    (``mpi``: and mpi4py, for a multi-rank step)."""
    if mpi:
        pytest.importorskip("mpi4py")
    names = slurm_nodes()
    if len(names) < 2:
        pytest.skip(f"needs a multi-node cluster (`slurm/up --nodes 2`); this one has {names}")
    return names


def cancel_jobs_in(root: Path) -> None:
    """Cancel the live Slurm jobs of a test workflow that was killed (found by their working directory)."""
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%i %Z"], capture_output=True, text=True, timeout=20).stdout
    ids = [f[0] for f in (line.split(None, 1) for line in out.splitlines()) if len(f) == 2 and Path(f[1].strip()) == root]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=20)


def node_cpus(node: str) -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%c"], capture_output=True, text=True, timeout=20, check=True).stdout
    return int(out.split()[0])


def node_state(node: str) -> str:
    """sinfo's short state, e.g. ``idle``, ``mix``, ``down*`` (``*``: not responding)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True, timeout=20).stdout
    return out.split()[0] if out.split() else "unknown"


def run_until_done(
    w: SlurmWorkflow,
    p: subprocess.Popen,
    timeout: float,
    disrupt: Callable[[], object] | None = None,
    undo: list[Callable[[], object]] | None = None,
) -> str:
    """Snakemake's output once it ended by itself, after ``disrupt`` (a preemption, a failed node) while it runs.

    Whatever happens (``disrupt`` raising, or no end within ``timeout`` s: an
    AssertionError with the output's tail), a Snakemake left running is killed
    and the workflow's jobs are cancelled; then each of ``undo`` runs (restore a
    node, cancel an urgent job), including those ``disrupt`` appended. The exit
    code is left to the caller (``p.returncode``).
    """
    ended = False
    try:
        if disrupt is not None:
            disrupt()
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"snakemake did not finish within {timeout}s:\n{out[-6000:]}") from None
        ended = True
        return out
    finally:
        if not ended:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
            cancel_jobs_in(w.root)
        for f in undo or ():
            f()


#: Slurm conditions are polled with subprocesses (squeue, sinfo): four times a second is enough.
wait_until = functools.partial(helpers.wait_until, interval=0.25)


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
        gate: int | None = None,
    ) -> None:
        """``gate``: the first run waits at that step until ``hold_at`` moves it or ``open_gate`` removes it."""
        self.step_script.write_text(STEP_SCRIPT)
        if gate is not None:
            self.hold_at(gate)
            step_args = f"{step_args} --gate gate".strip()
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

    @property
    def gate_path(self) -> Path:
        return self.root / "gate"

    def hold_at(self, step: int) -> None:
        """The running step (and any later run) waits once it reaches ``step``; written atomically."""
        tmp = self.gate_path.with_suffix(".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, self.gate_path)

    def open_gate(self) -> None:
        self.gate_path.unlink(missing_ok=True)

    def progressed(self, run_no: int, min_steps: int) -> bool:
        """The ``run_no``-th run of the step is running and has checkpointed ``min_steps`` beyond its start."""
        tr = self.trace()
        starts = [i for i, e in enumerate(tr) if e["event"] == "start"]
        if len(starts) < run_no:
            return False
        begin = tr[starts[run_no - 1]]["step"]
        return any(e["event"] == "ckpt" and e["step"] >= begin + min_steps for e in tr[starts[run_no - 1] :])

    def wait_running(self, p: subprocess.Popen, run_no: int = 1, min_steps: int = 4) -> dict:
        """The ``run_no``-th start event, once that run has made ``min_steps`` of progress; snakemake must still run."""
        wait_until(lambda: self.progressed(run_no, min_steps) or p.poll() is not None, 120, f"run {run_no} of the step to make progress")
        if p.poll() is not None:
            out = p.stdout.read() if p.stdout else ""
            raise AssertionError(f"snakemake ended (rc {p.returncode}) before run {run_no} made progress:\n{out[-6000:]}")
        return self.events("start")[run_no - 1]

    def preempt_when_running(self, p: subprocess.Popen, run_no: int, hold: int = 8) -> int:
        """Preempt the ``run_no``-th run once it made progress; the step it stopped at.

        With a gate (``write(gate=...)``) the run waits at the gate, so Slurm's
        preemption latency never races the step's end; after the stop the gate
        moves ``hold`` steps on for the next run (``open_gate`` lets it finish).
        """
        self.wait_running(p, run_no)
        submit_urgent(3)
        wait_until(lambda: len(self.events("stop")) >= run_no or p.poll() is not None, 60, f"preemption {run_no} to stop the step")
        stops = self.events("stop")
        if len(stops) < run_no:
            out = p.stdout.read() if p.stdout else ""
            raise AssertionError(f"snakemake ended (rc {p.returncode}) before preemption {run_no} stopped the step:\n{out[-6000:]}")
        at = stops[run_no - 1]["step"]
        if self.gate_path.exists():
            self.hold_at(at + hold)
        return at

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
        out = run_until_done(self, p, timeout)  # no end in time: its jobs are cancelled too
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


# ---------------------------------------------------------------- node failure (slurm/up --nodes N)


def job_node(job_id: str) -> str | None:
    """The node a job ran (or runs) on: scontrol's BatchHost while slurmctld knows the job, else sacct."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=20).stdout
    for tok in out.split():
        if tok.startswith("BatchHost=") and tok != "BatchHost=(null)":
            return tok.split("=", 1)[1]
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "NodeList"], capture_output=True, text=True, timeout=20
    ).stdout
    return out.split()[0] if out.split() and out.split()[0] != "None" else None


def _conf_value(key: str) -> str | None:
    conf = Path(os.environ.get("SLURM_CONF", BASE / "etc/slurm.conf"))
    for line in conf.read_text().splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1].split()[0]
    return None


def _exe_is(pid: int, *names: str) -> bool:
    try:
        return os.path.basename(os.path.realpath(f"/proc/{pid}/exe")).startswith(names)
    except OSError:
        return False


def slurmd_pid(node: str) -> int | None:
    """The pid of ``node``'s slurmd from its pid file, if it is alive and is a slurmd."""
    pattern = _conf_value("SlurmdPidFile") or str(BASE / "run/slurmd.%n.pid")
    try:
        pid = int(Path(pattern.replace("%n", node)).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _exe_is(pid, "slurmd") else None


def _stepd_pids(node: str) -> list[int]:
    """slurmstepds serving ``node``: each listens on a unix socket in that node's spool dir
    (``<SlurmdSpoolDir>/<node>_<job>.<step>``), which is how steps of one job id on two
    nodes of the same machine are told apart."""
    spool = (_conf_value("SlurmdSpoolDir") or str(BASE / "spool/d/%n")).replace("%n", node).rstrip("/") + "/"
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7].startswith(spool):
            inodes.add(f"socket:[{f[6]}]")
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or not _exe_is(int(d.name), "slurmstepd"):
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (d / "fd").iterdir()):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _descendants(roots: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out and c not in roots:
                out.append(c)
                todo.append(c)
    return out


def fail_node(node: str) -> list[int]:
    """Fail ``node`` for real: SIGKILL its slurmd, then its slurmstepds, then every process
    of their jobs (by pid, never by name). Nothing on the other nodes is touched.

    slurmctld then sees the node stop answering (``down*`` within ~40 s with
    SlurmdTimeout=10) and ends its jobs NODE_FAIL (or requeues them). Returns the
    pids killed. Bring the node back with :func:`restore_node`.
    """
    pid = slurmd_pid(node)
    if pid is None:
        raise AssertionError(f"no live slurmd for node {node}")
    stepds = _stepd_pids(node)
    victims = [pid, *stepds, *_descendants(stepds)]
    # slurmd first (no more reports to slurmctld), then the stepds (no step completion
    # reported), then the job processes
    for p in victims:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() and _not_zombie(p) for p in victims), 20, f"node {node}'s processes to die")
    return victims


def _not_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def restore_node(node: str, timeout: float = 90) -> None:
    """Restart ``node``'s slurmd (if dead) and resume it, so later tests see every node up again."""
    if slurmd_pid(node) is None:
        subprocess.run(["slurmd", "-N", node], check=True, timeout=30)
        wait_until(lambda: slurmd_pid(node) is not None, 20, f"slurmd {node} to start")

    def up() -> bool:
        st = node_state(node)
        if st.startswith(("down", "drain", "fail")):
            # ReturnToService=2 usually clears it on registration; `resume` when not
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, timeout=20)
            return False
        return st in ("idle", "mix", "alloc")

    wait_until(up, timeout, f"node {node} to be up again", interval=1.0)
