"""Issue 23's Done-when on the real multi-node cluster, with the real multi-rank ``rkrun``.

tests/cluster/test_slurm_mpi.py drives the executor with a small mpi4py stand-in.
Here the rule's command is the multi-rank rkrun itself (``srun --mpi=pmi2
python -m rkkernel.cli wavesim …``, ``resources: nodes=2, tasks=4``): its
coordinated checkpoint sets, its agreed stop, its lost-rank exit and its
elastic restore all meet real Slurm. Every result is compared byte for byte
with a single-process ``rkrun wavesim`` of the same options, run in the test.

Windows are forced with hooks, not timing: a preemption waits until a set is
committed, a rank is SIGKILLed at ``part-written@r1`` (``rkkernel.ranks``), a
node is failed with :func:`fixtures_slurm.fail_node` and restored in a ``finally``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest

from fixtures_kernel import rkrun_env
from fixtures_slurm import SlurmWorkflow, fail_node, multinode, restore_node, run_until_done, submit_urgent, wait_until
from helpers import REPO

pytestmark = pytest.mark.slurm

ARGS = "wavesim --grid 32 24 20 --steps {steps} --checkpoint-every 8 --backend numpy --batch 4"
#: the jobs import this checkout's code (no $PYTHONPATH: Snakemake's shell runs with set -u)
RKRUN = f"export PYTHONPATH={REPO / 'plugin'}; srun --mpi=pmi2 {sys.executable} -m rkkernel.cli"

SNAKEFILE = """
rule all:
    input: "result.h5"

rule sim:
    output: "result.h5"
    resources: slurm_partition="{partition}", mem_mb=300, nodes=2, tasks=4
    shell: {cmd!r}
"""

CK = ".snakemake/rkslurm/sim/_"


@pytest.fixture
def nodes(slurm_env: dict[str, str]) -> list[str]:
    return multinode(mpi=True)


def _workflow(w: SlurmWorkflow, partition: str, args: str, throttle_ms: int, prefix: str = "") -> None:
    cmd = f"{prefix}{RKRUN} {args} --throttle-ms {throttle_ms} --out {{output}}"
    (w.root / "Snakefile").write_text(SNAKEFILE.format(partition=partition, cmd=cmd))


def _reference(w: SlurmWorkflow, args: str) -> Path:
    """A single-process rkrun of the same options (no throttle), run here, not under Slurm."""
    env = rkrun_env()
    env["PYTHONPATH"] = str(REPO / "plugin")
    env.pop("RKSLURM_TEST_SIGNAL", None)
    out = w.root / "ref.h5"
    cmd = [sys.executable, "-m", "rkkernel.cli", *args.split(), "--checkpoint-dir", str(w.root / "refck"), "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=w.root)
    assert p.returncode == 0, p.stderr
    return out


def _assert_identical(result: Path, ref: Path) -> None:
    with h5py.File(result) as a, h5py.File(ref) as b:
        assert sorted(a) == sorted(b)
        for k in b:
            assert a[k][()].tobytes() == b[k][()].tobytes(), k
        assert int(a.attrs["step"]) == int(b.attrs["step"])


def _progress(w: SlurmWorkflow) -> int:
    from rkstep.folder import StepFolder

    return StepFolder(w.root / CK).progress() or 0


def _wait_progress(w: SlurmWorkflow, p: subprocess.Popen, steps: int) -> None:
    wait_until(lambda: _progress(w) >= steps or p.poll() is not None, 150, f"a committed set at step {steps}")
    if p.poll() is not None:
        raise AssertionError(f"snakemake ended too early:\n{p.communicate()[0][-5000:]}")


def _finish(p: subprocess.Popen, w: SlurmWorkflow, timeout: float, disrupt: Callable[[], object] | None = None) -> str:
    """Snakemake's output after ``disrupt`` (:func:`run_until_done`: cleaned up whatever happens); it must succeed."""
    undo: list[Callable[[], object]] = []
    out = run_until_done(w, p, timeout, None if disrupt is None else lambda: disrupt(undo), undo)
    assert p.returncode == 0, out[-6000:] + "\n" + _logs(w)[-6000:]
    return out


def _logs(w: SlurmWorkflow) -> str:
    """Every job's log, oldest first (kept by --rkslurm-keep-successful-logs)."""
    logs = sorted((w.root / ".snakemake/slurm_logs/rule_sim").glob("*.log"), key=lambda f: int(f.stem) if f.stem.isdigit() else 0)
    return "\n".join(f.read_text(errors="replace") for f in logs)


def _restores(logs: str) -> list[tuple[int, int, int]]:
    """(step, ranks written, ranks now) of each restore the ranks logged (rank 0's line)."""
    found = re.findall(r"restored step (\d+) from \S+ \((\d+) rank\(s\)\) on (\d+) rank\(s\)", logs)
    return [(int(s), int(n), int(m)) for s, n, m in found]


def _running_job(root: Path) -> tuple[str, list[str], str]:
    """The step's running job: (id, its nodes, its batch host)."""
    out = subprocess.run(["squeue", "--me", "-h", "-t", "R", "-o", "%i|%Z|%N"], capture_output=True, text=True, timeout=20).stdout
    rows = [r.split("|") for r in out.splitlines() if r.count("|") == 2 and Path(r.split("|")[1]) == root]
    assert len(rows) == 1, out
    job, _, nodelist = rows[0]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20).stdout.split()
    info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20).stdout
    batch = re.search(r"\bBatchHost=(\S+)", info)
    assert batch, info
    return job, hosts, batch.group(1)


def test_real_rkrun_two_node_four_rank_step_preempted_and_restored_bit_identical(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """scavenger (CANCEL + GraceTime): every rank gets SIGTERM, they agree on one stop step, commit the final
    set and exit 75; the resubmitted 2x4 job restores that set on 4 ranks."""
    w = slurm_workflow
    args = ARGS.format(steps=400)  # 94 batches of 150 ms after step 24: some 14 s for the preemption to land
    _workflow(w, "scavenger", args, throttle_ms=150)
    ref = _reference(w, args)
    p = w.start("--rkslurm-keep-successful-logs")

    def preempt(undo: list[Callable[[], object]]) -> None:
        _wait_progress(w, p, 24)
        submit_urgent(3)

    out = _finish(p, w, 240, preempt)
    _assert_identical(w.root / "result.h5", ref)
    logs = _logs(w)
    stop = re.search(r"stopped at step (\d+)", logs)
    assert stop and int(stop.group(1)) >= 24, logs[-5000:]
    assert (int(stop.group(1)), 4, 4) in _restores(logs), logs[-5000:]
    assert "preemption 1/10" in out, out[-5000:]


def test_real_rkrun_rank_killed_mid_checkpoint_restores_the_previous_set(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """Rank 1 is SIGKILLed once its part of the 2nd set (step 16) is durable, before rank 0 can commit it:
    the job fails, the executor resubmits it (a kill after a newer checkpoint) and the step restores
    set 8, the newest committed one. Only the first attempt has the hook (a marker file)."""
    w = slurm_workflow
    args = ARGS.format(steps=120)
    once = "export RKSLURM_RANK_TIMEOUT=5; if [ ! -e kill.once ]; then touch kill.once; export RKSLURM_TEST_SIGNAL=part-written@r1:SIGKILL:2; fi; "
    _workflow(w, "main", args, throttle_ms=50, prefix=once)
    ref = _reference(w, args)
    # no node failed: hold the failed job 5 s (not 60) for Slurm to name a dead node before it counts as a kill
    p = w.start("--rkslurm-keep-successful-logs", "--rkslurm-node-failure-wait", "5")
    out = _finish(p, w, 240)
    _assert_identical(w.root / "result.h5", ref)
    logs = _logs(w)
    assert set(_restores(logs)) == {(8, 4, 4)}, logs[-5000:]  # one line per rank
    assert "step killed by a signal it could not catch after checkpoint progress (checkpoint now step 8" in out, out[-5000:]
    assert "kill 1/3" in out, out[-5000:]


def test_real_rkrun_node_failure_resubmits_on_one_node_with_fewer_ranks(slurm_workflow: SlurmWorkflow, nodes: list[str]) -> None:
    """A node of the 2x4 job (not the batch host) dies; with --rkslurm-min-nodes 1 the step is resubmitted
    without it as 1x2 and restores the 4-rank set on 2 ranks, bit-identical."""
    w = slurm_workflow
    args = ARGS.format(steps=320)
    _workflow(w, "main", args, throttle_ms=150)
    ref = _reference(w, args)
    p = w.start("--rkslurm-keep-successful-logs", "--rkslurm-min-nodes", "1")
    dead: list[str] = []

    def fail_a_node_not_the_batch_host(undo: list[Callable[[], object]]) -> None:
        _wait_progress(w, p, 24)
        _, hosts, batch = _running_job(w.root)
        dead.append(next(n for n in sorted(set(hosts)) if n != batch))
        fail_node(dead[0])
        undo.append(lambda: restore_node(dead[0]))

    out = _finish(p, w, 300, fail_a_node_not_the_batch_host)
    other = dead[0]
    _assert_identical(w.root / "result.h5", ref)
    logs = _logs(w)
    assert f"excluding node {other}" in out, out[-5000:]
    assert "resubmitting on 1 node(s) x 2 task(s) instead of 2 node(s) x 4 task(s)" in out, out[-5000:]
    restores = _restores(logs)
    assert restores and restores[-1][1:] == (4, 2) and restores[-1][0] >= 24, logs[-5000:]
