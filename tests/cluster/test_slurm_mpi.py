"""Multi-rank steps under the rkslurm executor on the real multi-node cluster (issue 23, the executor's part).

A rule with ``resources: nodes=2, tasks=4`` launches its ranks itself (``srun
--mpi=pmi2 …`` or ``mpiexec -n $SLURM_NTASKS …``). The step here is a small
mpi4py program (``MPI_STEP_SCRIPT``), not rkrun, so the executor's behaviour is
tested on its own: each rank advances its share of a set of hash chains, rank 0
writes all ranks' state as one atomic checkpoint every step, a signal is
agreed on by an ``allreduce`` so every rank stops at the same step and exits
75, and a restart scatters the checkpoint over whatever rank count it has.
The result therefore does not depend on the rank count, and every test
compares it byte for byte with a one-process run.

Node failures are real (:func:`fixtures_slurm.fail_node`) and every such test
restores the node in a ``finally``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from fixtures_slurm import (
    ATOMIC_WRITE,
    STEP_ARGS,
    SlurmWorkflow,
    fail_node,
    multinode,
    restore_node,
    run_until_done,
    submit_urgent,
    wait_until,
)

pytestmark = pytest.mark.slurm

MPI_STEP_SCRIPT = (
    r'''
"""Deterministic multi-rank checkpointing test step (stands in for a multi-rank rkrun).

Each of CELLS hash chains advances once per step; the cells are split over the
ranks in contiguous blocks, so any rank count computes the same chains. Rank 0
gathers every rank's cells and writes them atomically as one checkpoint each
``--checkpoint-every`` steps; a restart scatters them again over however many
ranks it now has. SIGTERM/SIGUSR1 only set a flag; at each step boundary the
ranks allreduce it, so all stop at the same step, write a final checkpoint and
exit 75 (a rank that missed the signal stops too).
"""
import argparse, hashlib, json, os, signal, socket, sys, tempfile, time
from mpi4py import MPI
'''
    + ATOMIC_WRITE
    + STEP_ARGS
    + r"""ap.add_argument("--cells", type=int, default=12)
ap.add_argument("--gate")  # a file holding a step number: the ranks wait there (tests force a window)
a = ap.parse_args()
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
if not a.checkpoint_dir:
    sys.exit("no checkpoint dir (RKSLURM_CHECKPOINT_DIR unset)")
if size > a.cells:
    sys.exit(f"{size} ranks for {a.cells} cells: too many ranks")
lo, hi = rank * a.cells // size, (rank + 1) * a.cells // size
prog = os.path.join(a.checkpoint_dir, "rkslurm.progress.json")
state = None
if rank == 0:
    os.makedirs(a.checkpoint_dir, exist_ok=True)
    if os.path.exists(prog):
        state = json.load(open(prog))
    else:
        state = {"step": 0, "cells": [hashlib.sha256(f"{a.seed}:{i}".encode()).hexdigest() for i in range(a.cells)]}
state = comm.bcast(state, root=0)
step, mine = state["step"], state["cells"][lo:hi]
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(signal.Signals(s).name))
signal.signal(signal.SIGUSR1, lambda s, f: stop.append(signal.Signals(s).name))
ev = None
if rank == 0:
    try:  # the step protocol's attempt events, as rkrun writes them
        from rkstep.events import EventWriter
        ev = EventWriter.for_folder(a.checkpoint_dir)
    except ImportError:
        ev = None
hosts = comm.gather(os.environ.get("SLURMD_NODENAME") or socket.gethostname(), root=0)

def trace(event, s, **kw):
    if rank == 0:
        if event != "ckpt":
            print(f"mpi-step: {event} at step {s} on {size} ranks", file=sys.stderr, flush=True)
        if a.trace:
            rec = {"event": event, "step": s, "ranks": size, "job": os.environ.get("SLURM_JOB_ID"), "t": time.time(), **kw}
            with open(a.trace, "a") as f:
                f.write(json.dumps(rec) + "\n")

def checkpoint():
    cells = comm.gather(mine, root=0)
    if rank == 0:
        atomic_write(prog, json.dumps({"step": step, "cells": [c for part in cells for c in part]}))
        if ev:
            ev.checkpoint(step)

def held():
    if rank != 0:
        return None
    try:
        with open(a.gate) as f:
            return step >= int(f.read())
    except (TypeError, OSError, ValueError):  # no gate, or the gate is open
        return False

trace("start", step, hosts=hosts)
if ev:
    ev.start(step)
while step < a.steps:
    got = comm.gather(len(stop), root=0)
    if comm.allreduce(1 if stop else 0, op=MPI.SUM):
        checkpoint()
        if rank == 0:
            atomic_write(os.path.join(a.checkpoint_dir, "rkrun.stopped.json"), json.dumps({"step": step, "signal": "SIGTERM"}))
        trace("stop", step, signalled=[1 if g else 0 for g in got] if rank == 0 else None)
        if ev:
            ev.stop(step, "SIGTERM"); ev.end(75, step)
        sys.exit(75)
    if comm.bcast(held(), root=0):  # rank 0 decides for all: every rank makes the same collective calls
        time.sleep(a.delay)  # a step's pace: every rank's signal lands before the next agreement, as when running
        continue
    time.sleep(a.delay)
    mine = [hashlib.sha256(f"{h}:{step}".encode()).hexdigest() for h in mine]
    step += 1
    if step % a.checkpoint_every == 0:
        checkpoint()
        trace("ckpt", step)
cells = comm.gather(mine, root=0)
if rank == 0:
    h = hashlib.sha256(":".join(c for part in cells for c in part).encode()).hexdigest()
    atomic_write(a.out, json.dumps({"steps": step, "h": h}) + "\n")
    trace("done", step)
    if ev:
        ev.end(0, step)
"""
)

SNAKEFILE = """
rule all:
    input: "result.json"

rule sim:
    output: "result.json"
    resources: slurm_partition="{partition}", mem_mb=200, nodes=2, tasks=4{extra}
    shell: "{launcher} {py} mpi_step.py --steps {steps} --delay {delay} --trace trace.jsonl --out {{output}}{gate}"
"""


@pytest.fixture
def nodes(slurm_env: dict[str, str]) -> list[str]:
    return multinode(mpi=True)


def _write(
    w: SlurmWorkflow, launcher: str, partition: str, steps: int, delay: float = 0.25, extra: str = "", gate: int | None = None
) -> bytes:
    """The workflow, and the bytes a one-process run of the same step writes (the reference).

    ``gate``: the ranks wait at that step until the test moves the gate (``w.hold_at``) or opens it.
    """
    (w.root / "mpi_step.py").write_text(MPI_STEP_SCRIPT)
    if gate is not None:
        w.hold_at(gate)
    (w.root / "Snakefile").write_text(
        SNAKEFILE.format(
            partition=partition,
            extra=extra,
            launcher=launcher,
            py=shlex.quote(sys.executable),
            steps=steps,
            delay=delay,
            gate="" if gate is None else " --gate gate",
        )
    )
    ref = w.root / "ref"
    cmd = [sys.executable, "mpi_step.py", "--steps", str(steps), "--delay", "0", "--checkpoint-dir", str(ref / "ck")]
    subprocess.run([*cmd, "--out", str(ref / "out.json")], cwd=w.root, check=True, timeout=120, capture_output=True)
    return (ref / "out.json").read_bytes()


def _submitted_ids(out: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", out)


def _job_field(job_id: str, key: str) -> str | None:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20).stdout
    m = re.search(rf"\b{key}=(\S+)", out)
    return m.group(1) if m else None


def _preempt_at_step_5(
    w: SlurmWorkflow, p: subprocess.Popen, node: str | None = None, seconds: float = 3, then_hold: int | None = None
) -> Callable[[], str]:
    """A disruption for :func:`run_until_done`: once the 4 ranks checkpointed step 5, an urgent job
    (on ``node`` only, for ``seconds``) preempts the step; returns the urgent job's id.

    A gated step (``_write(gate=...)``) waits at its gate, so the preemption never races its end;
    once it stopped, the gate opens, or moves ``then_hold`` steps past the stop for the next run.
    """

    def preempt() -> str:
        wait_until(lambda: any(e["step"] >= 5 for e in w.events("ckpt")) or p.poll() is not None, 150, "the 4 ranks to checkpoint")
        assert p.poll() is None, "snakemake ended before the preemption"
        before = len(w.events("stop"))
        urgent = submit_urgent(seconds, node=node)
        if w.gate_path.exists():
            wait_until(lambda: len(w.events("stop")) > before or p.poll() is not None, 120, "the preemption to stop the ranks")
            stops = w.events("stop")
            if then_hold is not None and stops:
                w.hold_at(stops[-1]["step"] + then_hold)
            else:
                w.open_gate()
        return urgent

    return preempt


def test_two_node_four_rank_step_preempted_resubmitted_and_restored_bit_identical(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """srun --mpi=pmi2 on scavenger (CANCEL, GraceTime): every rank gets SIGTERM, all stop at one step,
    the step is resubmitted as a new job of the same shape and restores from its checkpoint."""
    w = slurm_workflow
    ref = _write(w, "srun --mpi=pmi2", "scavenger", steps=40, gate=8)
    p = w.start()
    out = run_until_done(w, p, 240, _preempt_at_step_5(w, p))
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == ref
    starts, stops = w.events("start"), w.events("stop")
    # each run: one MPI job of 4 ranks over both nodes, 2 per node (not 4 singletons, not one task per node)
    assert [s["ranks"] for s in starts] == [4, 4], starts
    assert all(sorted(s["hosts"]) == sorted(nodes * 2) for s in starts), starts
    # every rank got the signal; all stopped at one step; the new job started there
    assert len(stops) == 1 and stops[0]["signalled"] == [1, 1, 1, 1], stops
    assert starts[1]["step"] == stops[0]["step"] > 0 and starts[1]["job"] != starts[0]["job"]
    assert "preemption 1/10" in out, out[-5000:]
    ids = _submitted_ids(out)
    assert len(set(ids)) == 2, out[-5000:]
    assert (_job_field(ids[1], "NumNodes"), _job_field(ids[1], "NumTasks")) == ("2", "4")
    print(f"2x4 step preempted at step {stops[0]['step']} (job {ids[0]}), restored by job {ids[1]}; bit-identical")


def _fail_second_node(w: SlurmWorkflow, p: subprocess.Popen, nodes: list[str]) -> tuple[str, int, str]:
    """Once the step checkpointed, fail a node of its job that is NOT the batch host (the node
    rkslurm must find by asking Slurm which one is down); returns (failed node, newest checkpoint
    step before, Snakemake's output). The node is restored whatever happens."""
    undo: list[Callable[[], object]] = []
    failed: list[tuple[str, int]] = []  # (node, newest checkpoint step when it failed)

    def fail() -> None:
        wait_until(lambda: any(e["step"] >= 5 for e in w.events("ckpt")) or p.poll() is not None, 150, "the 4 ranks to checkpoint")
        assert p.poll() is None, "snakemake ended before the node could fail"
        start = w.events("start")[0]
        batch = _job_field(start["job"], "BatchHost")
        other = next(n for n in sorted(set(start["hosts"])) if n != batch)
        assert batch in nodes and other in nodes, (batch, start)
        fail_node(other)
        undo.append(lambda: restore_node(other))
        failed.append((other, max(e["step"] for e in w.events("ckpt"))))

    out = run_until_done(w, p, 300, fail, undo)
    ((node, step),) = failed
    return node, step, out


def test_node_failure_under_a_two_node_step_resubmits_on_one_node_with_fewer_ranks(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """mpiexec launcher; a node of the 2-node job dies; with --rkslurm-min-nodes 1 the step is
    resubmitted without it on 1 node x 2 tasks and restores its 4-rank checkpoint on 2 ranks."""
    w = slurm_workflow
    ref = _write(w, "mpiexec -n $SLURM_NTASKS", "main", steps=60)
    p = w.start("--rkslurm-min-nodes", "1")
    t0 = time.monotonic()
    failed, killed_at, out = _fail_second_node(w, p, nodes)
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == ref
    starts = w.events("start")
    assert [s["ranks"] for s in starts] == [4, 2], starts
    assert sorted(starts[0]["hosts"]) == sorted(nodes * 2)
    assert set(starts[1]["hosts"]) == {n for n in nodes if n != failed}, starts[1]
    # SIGKILL: at most the step in flight is lost (+1: killed between a checkpoint and its trace line)
    assert killed_at <= starts[1]["step"] <= killed_at + 1, (starts, killed_at)
    assert f"node failure (1/3), excluding node {failed}" in out, out[-5000:]
    assert "resubmitting on 1 node(s) x 2 task(s) instead of 2 node(s) x 4 task(s)" in out, out[-5000:]
    ids = _submitted_ids(out)
    assert len(set(ids)) == 2, out[-5000:]
    assert _job_field(ids[1], "ExcNodeList") == failed
    assert (_job_field(ids[1], "NumNodes"), _job_field(ids[1], "NumTasks")) == ("1", "2")
    print(
        f"node {failed} failed under a 2x4 step at checkpoint {killed_at}; resumed on 1x2 at {starts[1]['step']}, "
        f"bit-identical; {time.monotonic() - t0:.0f} s in all"
    )


def test_preempted_two_node_step_whose_resubmission_cannot_start_shrinks_to_the_free_node_and_grows_back(
    slurm_workflow: SlurmWorkflow, nodes: list[str]
) -> None:
    """An urgent job takes one node of a 2x4 step on scavenger and keeps it: the full-size
    resubmission waits (Resources); after --rkslurm-shrink-after it is cancelled and resubmitted on
    the free node as 1x2, which restores the 4-rank checkpoint on 2 ranks. Then the first node is
    given back and the 1x2 job is preempted in turn: its resubmission asks for 2x4 again (the rule's
    size, not the shrunk one). The result is bit-identical."""
    w = slurm_workflow
    ref = _write(w, "srun --mpi=pmi2", "scavenger", steps=80, gate=8)
    p = w.start("--rkslurm-min-nodes", "1", "--rkslurm-shrink-after", "6")
    undo: list[Callable[[], object]] = []
    # the urgent job holds the node until the test cancels it; the shrunk run waits 6 steps past the stop
    preempt = _preempt_at_step_5(w, p, node=nodes[0], seconds=300, then_hold=6)

    def hold_one_node_then_preempt_the_shrunk_job() -> None:
        urgent = preempt()
        undo.append(lambda: subprocess.run(["scancel", urgent], capture_output=True, timeout=20))
        wait_until(lambda: len(w.events("start")) >= 2 or p.poll() is not None, 150, "the shrunk job to start")
        shrunk = w.events("start")[1]
        ran = lambda: [e for e in w.events("ckpt") if e["job"] == shrunk["job"] and e["step"] >= shrunk["step"] + 3]  # noqa: E731
        wait_until(lambda: ran() or p.poll() is not None, 150, "the shrunk job to checkpoint")
        assert p.poll() is None, "snakemake ended before the shrunk job could be preempted"
        subprocess.run(["scancel", urgent], capture_output=True, timeout=20, check=True)  # the first node is free again
        wait_until(lambda: _job_field(urgent, "JobState") != "RUNNING", 60, "the urgent job to end")
        submit_urgent(1, node=shrunk["hosts"][0])
        wait_until(lambda: len(w.events("stop")) >= 2 or p.poll() is not None, 120, "the preemption to stop the shrunk job")
        w.open_gate()

    out = run_until_done(w, p, 300, hold_one_node_then_preempt_the_shrunk_job, undo)
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == ref
    starts, stops = w.events("start"), w.events("stop")
    assert [s["ranks"] for s in starts[:2]] == [4, 2] and len(starts) >= 3, starts
    assert set(starts[1]["hosts"]) == {n for n in nodes if n != nodes[0]}, starts[1]
    assert len(stops) == 2 and starts[1]["step"] == stops[0]["step"] > 0 and starts[2]["step"] == stops[1]["step"], (starts, stops)
    assert "(reason Resources) for 2 node(s) x 4 task(s)" in out and "resubmitting on 1 node(s) x 2 task(s)" in out, out[-5000:]
    assert "resubmitting on 2 node(s) x 4 task(s) instead of 1 node(s) x 2 task(s) again" in out, out[-5000:]
    ids = _submitted_ids(out)
    # the first run, the full-size resubmission (cancelled, never ran), the 1x2 one, the full-size one after its preemption
    assert len(set(ids)) >= 4, out[-5000:]
    assert _job_field(ids[1], "JobState") == "CANCELLED" and _job_field(ids[1], "RunTime") == "00:00:00"
    assert (_job_field(ids[2], "NumNodes"), _job_field(ids[2], "NumTasks")) == ("1", "2")
    assert (_job_field(ids[3], "NumNodes"), _job_field(ids[3], "NumTasks")) == ("2", "4")
    print(
        f"2x4 step preempted at step {stops[0]['step']} ({ids[0]}); full-size resubmission {ids[1]} waited, cancelled; "
        f"1x2 {ids[2]} preempted at step {stops[1]['step']}; resubmitted as 2x4 ({ids[3]}); ranks per run {[s['ranks'] for s in starts]}"
    )
