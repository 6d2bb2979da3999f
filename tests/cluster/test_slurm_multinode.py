"""The rkslurm executor on a multi-node cluster (``slurm/up --nodes 2``).

Nodes fail for real here: :func:`fixtures_slurm.fail_node` SIGKILLs a node's
slurmd, its slurmstepds and their job processes, slurmctld marks the node
``down*`` and ends its jobs NODE_FAIL, and the executor resubmits the step
with the failed node excluded. Every test brings the node back in a
``finally`` so later tests still have all nodes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fixtures_slurm import STEP_SCRIPT, SlurmWorkflow, fail_node, job_node, multinode, restore_node, submit_urgent, wait_until

pytestmark = pytest.mark.slurm


@pytest.fixture
def nodes(slurm_env: dict[str, str]) -> list[str]:
    return multinode(mpi=False)


def _submitted_ids(out: str) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", out)


def _said(out: str, *words: str) -> list[str]:
    """The executor's lines in Snakemake's output that carry any of ``words``."""
    return [line for line in out.splitlines() if "rkslurm: rule" in line and any(w in line for w in words)]


def _fail_the_steps_node(w: SlurmWorkflow, p: subprocess.Popen, nodes: list[str], restore_at_once: bool = False) -> tuple[dict, int, str]:
    """Once the step has checkpointed, fail the node it runs on and wait for Snakemake to end.

    Returns the step's first start event, the newest checkpoint it wrote before
    its node died, and Snakemake's output. The node is restored in any case.
    """
    with _failing_nodes(p) as dead:
        wait_until(lambda: any(e["step"] >= 5 for e in w.events("ckpt")) or p.poll() is not None, 120, "the step to checkpoint")
        assert p.poll() is None, "snakemake ended before the node could fail"
        first = w.events("start")[0]
        first = {**first, "node": job_node(first["job"])}
        assert first["node"] in nodes, first
        fail_node(first["node"])
        dead.append(first["node"])
        killed_at = max(e["step"] for e in w.events("ckpt"))
        if restore_at_once:
            restore_node(dead.pop())
        out, _ = p.communicate(timeout=300)
    return first, killed_at, out


@contextmanager
def _failing_nodes(p: subprocess.Popen) -> Iterator[list[str]]:
    """Yields a list for the nodes the test fails; afterwards, whatever happened, Snakemake
    is stopped and each of them is restored, so later tests have every node again."""
    dead: list[str] = []
    try:
        yield dead
    finally:
        if p.poll() is None:
            p.kill()
        for node in dead:
            restore_node(node)


def test_every_partition_spans_every_node(nodes: list[str]) -> None:
    for part in ("main", "urgent", "scavenger", "requeue", "short"):
        out = subprocess.run(["sinfo", "-h", "-N", "-p", part, "-o", "%N"], capture_output=True, text=True, timeout=20, check=True).stdout
        assert sorted(set(out.split())) == nodes, part
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20, check=True).stdout
    assert re.search(r"^SlurmdTimeout\s*=\s*10 sec", conf, re.M), "slurm/up sets SlurmdTimeout=10 so a dead node is noticed quickly"


def test_node_failure_resubmits_excluding_the_node_and_restores_bit_identical(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """NODE_FAIL: a new Slurm job with the dead node excluded restores from the checkpoint folder."""
    w = slurm_workflow
    w.write(steps=60, delay=0.25, partition="main")
    ref = w.reference(60)
    # --no-requeue: Slurm ends the job NODE_FAIL instead of requeueing it, so the policy's
    # NODE_FAIL path (resubmit, exclude the node) is what brings the step back
    p = w.start("--rkslurm-no-requeue")
    first, killed_at, out = _fail_the_steps_node(w, p, nodes)
    failed = first["node"]
    assert p.returncode == 0, out[-5000:]
    # bit-identical to the uninterrupted run
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    assert json.loads((w.root / "result.json").read_text()) == ref
    starts = w.events("start")
    assert len(starts) == 2, w.trace()
    second = starts[1]
    assert second["job"] != first["job"] and job_node(second["job"]) not in (failed, None)
    # restored from the last checkpoint the dead run wrote (SIGKILL: at most the step in flight is lost;
    # +1: it may have died between writing a checkpoint and tracing it)
    assert killed_at <= second["step"] <= killed_at + 1, (second, killed_at)
    assert [e["job"] for e in w.events("done")] == [second["job"]]
    # the executor saw NODE_FAIL, excluded the node, and Snakemake saw one job that finished
    assert f"node failure (1/3), excluding node {failed}" in out, out[-5000:]
    ids = _submitted_ids(out)
    assert len(set(ids)) == 2 and [first["job"], second["job"]] == ids, out[-5000:]
    assert len(_said(out, "node failure (")) == 1 and "node failure (2/3)" not in out
    exc = subprocess.run(["scontrol", "show", "job", second["job"]], capture_output=True, text=True, timeout=20).stdout
    assert f"ExcNodeList={failed}" in exc, exc
    assert out.count("Finished jobid: 1 ") == 1 and "Error in rule" not in out


def test_node_failure_with_slurm_requeue_restarts_the_same_job_elsewhere(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """Default settings (sbatch --requeue): Slurm itself requeues the job of a failed node;
    rkslurm submits nothing new and the step restores on another node."""
    w = slurm_workflow
    w.write(steps=60, delay=0.25, partition="main")
    w.reference(60)
    p = w.start()
    # the node comes back at once: the requeued job may go anywhere, and must still restore
    first, killed_at, out = _fail_the_steps_node(w, p, nodes, restore_at_once=True)
    assert p.returncode == 0, out[-5000:]
    assert (w.root / "result.json").read_bytes() == (w.root / "ref" / "out.json").read_bytes()
    starts = w.events("start")
    assert len(starts) == 2 and starts[1]["job"] == first["job"], w.trace()
    assert killed_at <= starts[1]["step"] <= killed_at + 1
    assert len(set(_submitted_ids(out))) == 1, out[-5000:]
    assert "after Slurm requeued it" in out, out[-5000:]


TWO_STEP_SNAKEFILE = """
rule all:
    input: "a.json", "b.json"

rule sim_a:
    output: "a.json"
    resources: slurm_partition="scavenger", mem_mb=200, slurm_extra="--nodelist={node_a}"
    shell: "exec {py} step.py --steps {steps} --seed A --delay 0.25 --trace trace_a.jsonl --checkpoint-dir ck_a --out {{output}} --gate gate"

rule sim_b:
    output: "b.json"
    resources: slurm_partition="scavenger", mem_mb=200, slurm_extra="--nodelist={node_b}"
    shell: "exec {py} step.py --steps {steps} --seed B --delay 0.25 --trace trace_b.jsonl --checkpoint-dir ck_b --out {{output}}"
"""


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_preempting_one_of_two_steps_on_different_nodes_leaves_the_other_alone(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    w = slurm_workflow
    steps = 40
    w.step_script.write_text(STEP_SCRIPT)
    (w.root / "Snakefile").write_text(
        TWO_STEP_SNAKEFILE.format(node_a=nodes[0], node_b=nodes[1], steps=steps, py=shlex.quote(sys.executable))
    )
    ref_a = w.reference(steps, seed="A")
    shutil.rmtree(w.root / "ref")  # its checkpoint folder would resume seed A's run
    ref_b = w.reference(steps, seed="B")
    assert ref_a != ref_b
    ta, tb = w.root / "trace_a.jsonl", w.root / "trace_b.jsonl"

    def ckpts(t: Path) -> int:
        return max((e["step"] for e in _trace(t) if e["event"] == "ckpt"), default=0)

    w.hold_at(8)  # step A waits at step 8 until its preemption stopped it: Slurm's latency never races its end
    p = w.start("--jobs", "2")
    with _failing_nodes(p):
        wait_until(lambda: (ckpts(ta) >= 4 and ckpts(tb) >= 4) or p.poll() is not None, 180, "both steps to run")
        assert p.poll() is None
        submit_urgent(3, node=nodes[0])
        wait_until(lambda: any(e["event"] == "stop" for e in _trace(ta)) or p.poll() is not None, 60, "the preemption to stop step A")
        w.open_gate()
        out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-5000:]
    a, b = _trace(ta), _trace(tb)
    assert [job_node(e["job"]) for e in a if e["event"] == "start"] == [nodes[0], nodes[0]], a
    # the step on the other node: one Slurm job, never stopped, never restarted
    assert [e["event"] for e in b if e["event"] in ("start", "stop", "done")] == ["start", "done"], b
    assert {job_node(e["job"]) for e in b if e["event"] == "start"} == {nodes[1]}
    stop = next(e for e in a if e["event"] == "stop")
    assert [e["step"] for e in a if e["event"] == "start"] == [0, stop["step"]]
    assert json.loads((w.root / "a.json").read_text()) == ref_a
    assert json.loads((w.root / "b.json").read_text()) == ref_b
    assert len(set(_submitted_ids(out))) == 3, out[-5000:]
    assert "preemption 1/10" in out, out[-5000:]
    said = _said(out, "preemption", "node failure", "requeue")
    assert said and all("rkslurm: rule sim_a:" in line for line in said), said


# ---------------------------------------------------------------- two-level storage (node-local + S3)

RKRUN_TWOLEVEL_SNAKEFILE = """
rule all:
    input: "result.h5"

rule sim:
    output: "result.h5"
    resources: slurm_partition="main", mem_mb=500, rkslurm_checkpoint_dir="{url}"
    shell: "export RKCKPT_LOCAL_DIR={local}/$SLURMD_NODENAME; exec rkrun wavesim {args} --out {{output}}"
"""
RKRUN_ARGS = "--grid 32 32 32 --steps {steps} --checkpoint-every {every} --backend numpy --batch 8 --throttle-ms {throttle}"


@pytest.mark.s3
def test_two_level_node_failure_restores_from_the_flushed_chain(
    slurm_workflow: SlurmWorkflow, nodes: list[str], s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints go to a node-local folder per node and are flushed to S3; the node dies;
    the step restores on the other node from the chain in S3, losing at most what was not flushed."""
    h5py = pytest.importorskip("h5py")
    import numpy as np

    from rkckpt.chain import newest_named_step
    from rkckpt.storage import open_storage

    if shutil.which("rkrun") is None:
        pytest.skip("rkrun not installed")
    w = slurm_workflow
    steps, every = 3000, 100
    url = f"s3://{s3_server.bucket()}/sim"
    local = w.root / "node-local"
    for var, value in (("RKCKPT_S3_ENDPOINT", s3_server.endpoint), ("AWS_ACCESS_KEY_ID", s3_server.key)):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)  # sbatch exports the environment to the job
    args = RKRUN_ARGS.format(steps=steps, every=every, throttle=20)
    (w.root / "Snakefile").write_text(RKRUN_TWOLEVEL_SNAKEFILE.format(url=url, local=local, args=args))
    ref = w.root / "ref.h5"
    subprocess.run(
        ["rkrun", "wavesim", *RKRUN_ARGS.format(steps=steps, every=every, throttle=0).split(), "--checkpoint-dir", str(w.root / "refck")]
        + ["--out", str(ref)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    shared = open_storage(url, local=False, **s3_server.options())

    def local_step(node: str) -> int:
        d = local / node
        return (newest_named_step(p.name for p in d.rglob("*")) or 0) if d.is_dir() else 0  # scoped subfolders (rkckpt.storage)

    p = w.start("--rkslurm-no-requeue", "--rkslurm-keep-successful-logs")
    with _failing_nodes(p) as dead:
        wait_until(lambda: any(local_step(n) >= 3 * every for n in nodes) or p.poll() is not None, 180, "rkrun to checkpoint")
        assert p.poll() is None, "workflow ended before the node failure"
        failed = next(n for n in nodes if local_step(n) > 0)
        fail_node(failed)
        dead.append(failed)
        reached = local_step(failed)  # what the dead node had saved (node-local: gone with the node on a real cluster)
        durable = newest_named_step(shared.list()) or 0  # what had reached the shared store
        out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-5000:]
    assert f"node failure (1/3), excluding node {failed}" in out, out[-5000:]
    ids = _submitted_ids(out)
    assert len(ids) == 2, out[-5000:]
    logs = [(w.root / f".snakemake/slurm_logs/rule_sim/{i}.log").read_text(errors="replace") for i in ids]
    m = re.search(r"restored from step (\d+) \(chain: ([^)]*)\)", logs[1])
    assert m, logs[1][-3000:]
    restored = int(m.group(1))
    # restored from the newest checkpoint that had been flushed before the node died
    assert restored == durable > 0, (restored, durable, reached)
    # lost: only the checkpoints the dead node had not flushed yet (and the steps after its last one)
    lost = reached - restored
    assert 0 <= lost <= every, (reached, restored)
    # the continuation's log states the loss: the dead node's newest local save against the store
    m = re.search(r"the previous run \(node (\w+)\) saved (?:up to )?checkpoint step (\d+)", logs[1])
    assert m and m.group(1) == failed, logs[1][-3000:]
    noted = int(m.group(2))
    assert restored <= noted <= reached
    if noted == restored:
        assert "none of its checkpoints is lost" in logs[1]
    else:
        assert f"so {noted - restored} steps are lost and computed again" in logs[1]
    said = next(line for line in logs[1].splitlines() if "the previous run" in line)
    print(
        f"two-level node failure: node {failed} had saved step {reached} locally, {durable} durable in S3; lost {lost} steps; log: {said}"
    )
    assert local_step(next(n for n in nodes if n != failed)) == steps  # the other node ran the rest
    with h5py.File(w.root / "result.h5") as a, h5py.File(ref) as b:
        assert a.attrs["step"] == b.attrs["step"] == steps
        for name in ("pressure", "pressure_prev", "energy"):
            assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
