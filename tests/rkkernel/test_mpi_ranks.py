"""Multi-rank steps end to end (``rkkernel.ranks``): real ``mpiexec`` ranks, real files, real kernels.

Every window is forced with the test signal points (``RKSLURM_TEST_SIGNAL``;
``point@rN`` signals rank N only): ``batch`` (a batch boundary, before the
ranks agree whether to stop), ``part-written`` (this rank's part of a set is
durable, not yet reported), ``before-commit`` (rank 0: every part is
durable, the commit record not yet written) and ``committed`` (rank 0: the
commit record is durable), ``handed-K`` (a periodic part handed over,
leaving K sets pending; ``RKSLURM_TEST_HOLD_SETS=2`` keeps one pending until
the next is handed over, so two are). On two-level storage the shared level
is wrapped (``set_helpers.HeldStore``) to hold or fail uploads. Each run is compared with one
uninterrupted single-process ``rkrun`` of the same options, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures_kernel import _require, rkrun_env
from helpers import REPO, wait_until

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")

GRID = ("10", "9", "24")
STEPS = 40
COMMON = ("--grid", *GRID, "--steps", str(STEPS), "--checkpoint-every", "10", "--energy-every", "5", "--batch", "5")
EX_TEMPFAIL = 75


def run(
    ranks: int, *args: str, env: dict[str, str] | None = None, timeout: float = 90, rank_logs: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``rkrun ARGS`` as ``ranks`` MPI ranks (1: a plain process, no launcher), output captured.

    ``rank_logs``: the launcher does not kill the other ranks when one dies
    (``-disable-auto-cleanup``), so they must notice on their own, and each
    rank's stderr goes to ``rank_logs/rank.N.log`` (the launcher stops
    forwarding output once a rank died).
    """
    cmd = [sys.executable, "-m", "rkkernel.cli", *args]
    if rank_logs is not None:
        cmd = ["sh", "-c", f'exec "$@" 2>"{rank_logs}/rank.$PMI_RANK.log"', "sh", *cmd]
    if ranks > 1:
        cmd = [str(MPIEXEC), *(["-disable-auto-cleanup"] if rank_logs else []), "-n", str(ranks), *cmd]
    e = {**rkrun_env(), "RKSLURM_RANK_TIMEOUT": "20", **(env or {})}
    return subprocess.run(cmd, env=e, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def wave(backend: str, ck: Path | str, out: Path, *extra: str) -> tuple[str, ...]:
    return ("wavesim", *COMMON, "--backend", backend, "--checkpoint-dir", str(ck), "--out", str(out), *extra)


def result(path: Path) -> dict[str, bytes | int]:
    with h5py.File(path, "r") as f:
        out: dict[str, bytes | int] = {k: f[k][()].tobytes() for k in ("pressure", "pressure_prev", "energy", "velocity")}
        out["step"] = int(f.attrs["step"])
        e = f["energy"][()]
        assert list(e[:, 0]) == list(range(0, STEPS + 1, 5))
        assert np.isfinite(e).all() and e[-1, 1] > 0
    return out


_REFS: dict[str, dict[str, bytes | int]] = {}


def reference(backend: str, tmp: Path) -> dict[str, bytes | int]:
    """One uninterrupted single-process run per back end (OpenCL must equal NumPy too)."""
    if "numpy" not in _REFS:
        d = tmp / "ref"
        p = run(1, *wave("numpy", d / "ck", d / "r.h5"))
        assert p.returncode == 0, p.stderr
        _REFS["numpy"] = result(d / "r.h5")
    return _REFS["numpy"]


def manifests(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if p.name.endswith(".rkset.json"))


def latest_step(ck: Path) -> int | None:
    from rkckpt.ckptset import latest_set
    from rkckpt.storage import open_storage

    s = latest_set(open_storage(str(ck)), "wavesim")
    return None if s is None else s.step


def backend_of(name: str) -> str:
    return name if name == "numpy" else _require(name)


# ---------------------------------------------------------------- stop together
def test_signal_on_one_rank_stops_every_rank_with_one_set(tmp_path: Path) -> None:
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(2, *wave("numpy", ck, out), env={"RKSLURM_TEST_SIGNAL": "batch@r1:SIGTERM:4"})
    assert p.returncode == EX_TEMPFAIL, p.stderr
    assert "rank 0: another rank got a stop signal; stopping with it at step 15" in p.stderr, p.stderr
    assert p.stderr.count("stopped at step 15") == 2, p.stderr
    marker = json.loads((ck / "rkrun.stopped.json").read_text())
    assert marker["step"] == 15 and marker["ranks"] == 2
    assert manifests(ck)[-1] == "wavesim-000000000015-set2.rkset.json"
    assert not out.exists()
    p = run(2, *wave("numpy", ck, out))
    assert p.returncode == 0, p.stderr
    assert "restored step 15 from wavesim-000000000015-set2.rkset.json (2 rank(s)) on 2 rank(s)" in p.stderr
    assert result(out) == ref


# ---------------------------------------------------------------- elastic restore
@pytest.mark.parametrize("backend", ["numpy", "opencl"])
def test_sets_restore_on_other_rank_counts_1_4_2_3_bit_identical(tmp_path: Path, backend: str) -> None:
    """One run stopped three times and resumed on another rank count each time: 1 -> 4 -> 2 -> 3.

    Each stop is forced at a batch boundary of rank 0 (the third after the
    restore: 10 steps later); N -> 1 is test_rank_killed_after_its_part_others_leave_naming_it.
    """
    backend = backend_of(backend)
    ref = reference(backend, tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(1, *wave(backend, ck, out), env={"RKSLURM_TEST_SIGNAL": "batch@r0:SIGTERM:4"})  # the plain chain, stopped at 15
    assert p.returncode == EX_TEMPFAIL, p.stderr
    for n, m, step in ((1, 4, 15), (4, 2, 25), (2, 3, 35)):
        assert json.loads((ck / "rkrun.stopped.json").read_text())["step"] == step
        stop = {"RKSLURM_TEST_SIGNAL": "batch@r0:SIGTERM:3"} if m != 3 else {}
        p = run(m, *wave(backend, ck, out), env=stop)
        assert p.returncode == (0 if m == 3 else EX_TEMPFAIL), p.stderr
        source = "the single-process chain" if n == 1 else f"wavesim-{step:012d}-set{n}.rkset.json"
        assert f"restored step {step} from {source} ({n} rank(s)) on {m} rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


# ---------------------------------------------------------------- kills
def test_kill_before_commit_leaves_the_previous_set(tmp_path: Path) -> None:
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(2, *wave("numpy", ck, out), env={"RKSLURM_TEST_SIGNAL": "before-commit@r0:SIGKILL:2", "RKSLURM_RANK_TIMEOUT": "2"})
    assert p.returncode != 0, p.stderr
    assert manifests(ck) == ["wavesim-000000000010-set2.rkset.json"]
    assert (ck / "wavesim.r0of2-000000000020-full.rk.h5").exists() or any(ck.glob("wavesim.r0of2-000000000020-*"))
    assert latest_step(ck) == 10
    p = run(2, *wave("numpy", ck, out))  # the same rank count: its uncommitted parts are written anew
    assert p.returncode == 0, p.stderr
    assert "restored step 10 from wavesim-000000000010-set2.rkset.json (2 rank(s)) on 2 rank(s)" in p.stderr, p.stderr
    assert "not committed" not in p.stderr and manifests(ck)[-2:] == [f"wavesim-0000000000{s}-set2.rkset.json" for s in (30, 40)]
    assert result(out) == ref


def test_rank_killed_after_its_part_the_run_ends_promptly(tmp_path: Path) -> None:
    """SIGKILL of rank 1 once its part of step 20 is durable: the others end (by their deadline, or the
    launcher ends them first), the set of step 10 stays the restore point, and plain rkrun goes on from it."""
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    env = {"RKSLURM_TEST_SIGNAL": "part-written@r1:SIGKILL:2", "RKSLURM_RANK_TIMEOUT": "2"}
    p = run(3, *wave("numpy", ck, out), env=env, timeout=60, rank_logs=tmp_path)
    assert p.returncode != 0, p.stderr
    for r in (0, 2):
        log = (tmp_path / f"rank.{r}.log").read_text()
        assert "lost" not in log or f"rank {r} of 3: lost rank(s) 1 (process gone): rank {r} of 3: " in log, log
    assert latest_step(ck) == 10
    p = run(1, *wave("numpy", ck, out))  # N -> 1: plain rkrun goes on from the 3-rank set
    assert p.returncode == 0, p.stderr
    assert "restored step 10 from wavesim-000000000010-set3.rkset.json (3 ranks) as one process" in p.stderr, p.stderr
    assert result(out) == ref


def test_hung_rank_the_others_leave_at_the_deadline_naming_it(tmp_path: Path) -> None:
    """Rank 1 stops (SIGSTOP: hung, or its node gone) after its part: the others' next collective misses
    its deadline and each says which rank it lost, then leaves (no hang); rank 1 is killed by the test."""
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    env = {**rkrun_env(), "RKSLURM_RANK_TIMEOUT": "2", "RKSLURM_TEST_SIGNAL": "part-written@r1:SIGSTOP:2"}
    cmd = [str(MPIEXEC), "-disable-auto-cleanup", "-n", "3", "sh", "-c", f'exec "$@" 2>"{tmp_path}/rank.$PMI_RANK.log"', "sh"]
    proc = subprocess.Popen([*cmd, sys.executable, "-m", "rkkernel.cli", *wave("numpy", ck, out)], env=env, cwd=REPO)
    try:
        logs = [tmp_path / f"rank.{r}.log" for r in (0, 2)]
        wait_until(lambda: all(q.exists() and "not responding" in q.read_text() for q in logs), 60, "the survivors' messages")
        for r, q in zip((0, 2), logs, strict=True):
            text = q.read_text()
            m = re.search(rf"rank {r} of 3: lost rank\(s\) 1 \(pid (\d+)\): stopped, not responding: rank {r} of 3: .* within 2 s", text)
            assert m, text
        os.kill(int(m.group(1)), signal.SIGKILL)
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert latest_step(ck) == 10
    from rkstep.events import attempts, read_events

    # rank 0 ended (rc 1) but says it lost a rank: the attempt counts as killed, so the executor resumes it
    (run,) = attempts(read_events(ck / "rkstep.events.jsonl"))
    assert run.ended and run.end_rc == 1 and run.rank_lost and run.killed and run.ranks == 3, run


def test_done_when_two_ranks_killed_after_a_set_resume_on_three(tmp_path: Path) -> None:
    """The issue's check: ``mpiexec -n 2 rkrun wavesim`` SIGKILLed after a coordinated checkpoint, resumed with -n 3."""
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(2, *wave("numpy", ck, out), env={"RKSLURM_TEST_SIGNAL": "committed@r0:SIGKILL:2", "RKSLURM_RANK_TIMEOUT": "2"}, timeout=60)
    assert p.returncode != 0 and not out.exists(), p.stderr
    assert manifests(ck) == ["wavesim-000000000010-set2.rkset.json", "wavesim-000000000020-set2.rkset.json"]
    p = run(3, *wave("numpy", ck, out))
    assert p.returncode == 0, p.stderr
    assert "restored step 20 from wavesim-000000000020-set2.rkset.json (2 rank(s)) on 3 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


# ---------------------------------------------------------------- bad input
def test_rank_count_that_does_not_fit_the_grid_exits_2_writing_nothing(tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    args = ("wavesim", "--grid", "8", "8", "6", "--steps", "10", "--checkpoint-every", "5", "--backend", "numpy")
    p = run(4, *args, "--checkpoint-dir", str(ck), "--out", str(out))
    assert p.returncode == 2, p.stderr
    assert "ranks do not fit a grid of 6 planes" in p.stderr, p.stderr
    written = [q.name for q in ck.iterdir()] if ck.exists() else []
    assert not [n for n in written if n.endswith((".rk.h5", ".rkcp", ".rkset.json"))], written
    assert not out.exists()


def test_set_of_another_simulation_is_refused(tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(2, *wave("numpy", ck, out), env={"RKSLURM_TEST_SIGNAL": "batch@r0:SIGTERM:3"})
    assert p.returncode == EX_TEMPFAIL, p.stderr
    before = sorted(q.name for q in ck.iterdir())
    p = run(2, *wave("numpy", ck, out, "--v-top", "1600"))
    assert p.returncode == 2, p.stderr
    assert "refusing to restore" in p.stderr and "another simulation" in p.stderr, p.stderr
    assert sorted(q.name for q in ck.iterdir()) == before
    assert not out.exists()


# ---------------------------------------------------------------- in one process (no launcher)
def _loop_values(ck: Path, out: Path, steps: int = STEPS) -> dict:
    from rkkernel.plugin import find_plugin, finish_values, parse_values

    doc = {"grid": [int(g) for g in GRID], "steps": steps, "checkpoint_dir": str(ck), "checkpoint_every": 10, "out": str(out)}
    doc.update(backend="numpy", energy_every=5, batch=5)
    return finish_values(parse_values(find_plugin("wavesim"), doc, "test"), "test")


def test_one_rank_set_resumes_as_a_plain_process_bit_identical(tmp_path: Path) -> None:
    """A set committed by a rank loop of one rank (the commit path without a launcher), resumed by plain rkrun."""
    from rkkernel.comm import SingleComm
    from rkkernel.plugin import find_plugin
    from rkkernel.ranks import RankLoop, SoloLoop
    from rkkernel.signals import StopFlag

    ref = reference("numpy", tmp_path)
    plugin, ck, out = find_plugin("wavesim"), tmp_path / "ck", tmp_path / "r.h5"
    stop = StopFlag()
    loop = RankLoop(plugin, _loop_values(ck, out), stop, None, SingleComm())
    stop.signal_name = "SIGTERM"  # as the handler records it: the loop stops at its first boundary, step 0
    assert loop.run() == EX_TEMPFAIL
    assert manifests(ck) == ["wavesim-000000000000-set1.rkset.json"] and loop.committed == 0
    loop = RankLoop(plugin, _loop_values(ck, out, 25), StopFlag(), None, SingleComm())
    assert loop.run() == 0 and loop.committed == 25
    assert manifests(ck) == ["wavesim-000000000020-set1.rkset.json", "wavesim-000000000025-set1.rkset.json"]  # gc kept 2
    assert SoloLoop(plugin, _loop_values(ck, out), StopFlag(), None).run() == 0
    assert result(out) == ref


def test_part_managers_leave_the_shared_index_alone(tmp_path: Path) -> None:
    """Ranks' managers must not each write ``rkckpt-index.json`` (``ranks.PartManager`` overrides the hook)."""
    from rkckpt.manager import CheckpointManager
    from rkckpt.storage import MemoryStorage
    from rkkernel.rankstate import PartManager, retention_off

    assert "_save_index" in vars(CheckpointManager)  # the hook PartManager overrides still exists
    m = PartManager(MemoryStorage(), retention_off(CheckpointManager(MemoryStorage()).policy), "wavesim.r0of2")
    m._save_index()
    assert m.storage.list() == []


def test_traveltime_restores_on_more_ranks_with_the_same_convergence_step(tmp_path: Path) -> None:
    """``last_change`` is a per-rank field combined by max: a set restored on another rank count ends at the same step."""
    args = ("traveltime", "--grid", "12", "10", "24", "--steps", "60", "--checkpoint-every", "10", "--backend", "numpy", "--batch", "5")
    p = run(1, *args, "--checkpoint-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.h5"))
    assert p.returncode == 0, p.stderr
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(2, *args, "--checkpoint-dir", str(ck), "--out", str(out), env={"RKSLURM_TEST_SIGNAL": "batch@r0:SIGTERM:3"})
    assert p.returncode == EX_TEMPFAIL, p.stderr
    p = run(3, *args, "--checkpoint-dir", str(ck), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert "restored step 10 from traveltime-000000000010-set2.rkset.json (2 rank(s)) on 3 rank(s)" in p.stderr, p.stderr
    p = run(1, *args, "--checkpoint-dir", str(ck), "--out", str(out))  # a rerun after completion, as one process
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "ref.h5") as a, h5py.File(out) as b:
        assert 0 < int(a.attrs["step"]) < 60 and int(b.attrs["step"]) == int(a.attrs["step"])
        assert a["traveltime"][()].tobytes() == b["traveltime"][()].tobytes()


@pytest.mark.s3
@pytest.mark.parametrize("two_level", [False, True], ids=["s3", "s3+local"])
def test_sets_on_s3_and_two_level_storage(s3_server, tmp_path: Path, two_level: bool) -> None:
    """Parts, commit records and the restore on S3 (SeaweedFS on loopback), directly or staged in a node-local folder."""
    from rkckpt.storage import open_storage

    ref = reference("numpy", tmp_path)
    url, out = f"s3://{s3_server.bucket()}/ck", tmp_path / "r.h5"
    env = {"RKCKPT_S3_ENDPOINT": s3_server.endpoint, "AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    if two_level:
        env["RKCKPT_LOCAL_DIR"] = str(tmp_path / "local")
    p = run(2, *wave("numpy", url, out), env={**env, "RKSLURM_TEST_SIGNAL": "batch@r1:SIGTERM:4"})
    assert p.returncode == EX_TEMPFAIL, p.stderr
    names = open_storage(url, local=False, **s3_server.options()).list()
    assert "wavesim-000000000015-set2.rkset.json" in names, names
    p = run(3, *wave("numpy", url, out), env=env)
    assert p.returncode == 0, p.stderr
    assert "restored step 15 from wavesim-000000000015-set2.rkset.json (2 rank(s)) on 3 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


def test_a_corrupt_part_checked_by_another_rank_passes_the_set_over_on_every_rank(tmp_path: Path) -> None:
    """4 ranks stop after two sets; a payload bit of the newer set's part 3 is flipped (headers perfect, so rank 0's header
    check passes it). Restoring on 2 ranks, rank 1 checks parts 1 and 3 (``verify_parts``, part p by rank p % 2):
    every rank passes the set over together, rank 0 names the part, and the run resumes from the older set bit-identical."""
    from hostile_inputs import flip_stream_payload
    from rkckpt.ckptset import read_manifest
    from rkckpt.storage import FileStorage

    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    p = run(4, *wave("numpy", ck, out), env={"RKSLURM_TEST_SIGNAL": "batch@r0:SIGTERM:5"})
    assert p.returncode == EX_TEMPFAIL, p.stderr
    *_, older, newest = manifests(ck)
    assert newest.endswith("-set4.rkset.json") and older.endswith("-set4.rkset.json"), manifests(ck)
    part3 = read_manifest(FileStorage(ck), newest).parts[3].name
    flip_stream_payload(ck / part3)
    p = run(2, *wave("numpy", ck, out))
    assert p.returncode == 0, p.stderr
    assert f"skipping checkpoint set {newest}" in p.stderr and part3 in p.stderr, p.stderr
    assert f"restored step {int(older.split('-')[1])} from {older} (4 rank(s)) on 2 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


# ---------------------------------------------------------------- a queue of two: several sets pending
def test_two_sets_pending_when_the_stop_arrives_all_are_committed_in_order(tmp_path: Path) -> None:
    """``RKSLURM_TEST_HOLD_SETS=2`` keeps a set pending until the next is handed over; the stop lands at the
    second hand-over that leaves two pending (steps 20 and 30): both are committed, oldest first, at the stop."""
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    env = {"RKSLURM_TEST_HOLD_SETS": "2", "RKSLURM_TEST_SIGNAL": "handed-2@r1:SIGTERM:2"}
    p = run(2, *wave("numpy", ck, out), env=env)
    assert p.returncode == EX_TEMPFAIL, p.stderr
    assert p.stderr.count("stopped at step 30") == 2 and "not committed" not in p.stderr, p.stderr
    assert "already checkpointed" in p.stderr, p.stderr  # the pending set of step 30 is the stop's checkpoint
    assert manifests(ck) == [f"wavesim-0000000000{s}-set2.rkset.json" for s in (20, 30)]  # gc keeps 2 of 10, 20, 30
    p = run(3, *wave("numpy", ck, out))
    assert p.returncode == 0, p.stderr
    assert "restored step 30 from wavesim-000000000030-set2.rkset.json (2 rank(s)) on 3 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


def test_rank_killed_with_two_sets_pending_restores_the_newest_committed(tmp_path: Path) -> None:
    """SIGKILL of rank 1 when its hand-over of step 30 leaves two sets pending (20, 30; 10 committed):
    the newest committed set (10) is the restore point, bit-identical."""
    ref = reference("numpy", tmp_path)
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    env = {"RKSLURM_TEST_HOLD_SETS": "2", "RKSLURM_TEST_SIGNAL": "handed-2@r1:SIGKILL:2", "RKSLURM_RANK_TIMEOUT": "2"}
    p = run(2, *wave("numpy", ck, out), env=env, timeout=60, rank_logs=tmp_path)
    assert p.returncode != 0
    assert manifests(ck) == ["wavesim-000000000010-set2.rkset.json"]
    assert any(ck.glob("wavesim.r1of2-000000000020-*"))  # written, never committed (30's may have been cut mid-write)
    assert latest_step(ck) == 10
    p = run(2, *wave("numpy", ck, out))
    assert p.returncode == 0, p.stderr
    assert "restored step 10 from wavesim-000000000010-set2.rkset.json (2 rank(s)) on 2 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


def _held_loop(tmp_path: Path, held: object, steps: int = STEPS) -> tuple[object, object, list[int]]:
    """A rank loop (one rank, no launcher) on two-level storage whose shared level is ``held``; its commits."""
    from rkckpt.storage import FileStorage, TwoLevelStorage
    from rkkernel.comm import SingleComm
    from rkkernel.plugin import find_plugin
    from rkkernel.ranks import RankLoop
    from rkkernel.signals import StopFlag

    commits: list[int] = []

    class Loop(RankLoop):
        def _open_storage(self):  # noqa: ANN202
            return TwoLevelStorage(FileStorage(tmp_path / "node"), held)  # type: ignore[arg-type]

        def _commit(self, step: int, docs: list | None) -> bool:
            ok = super()._commit(step, docs)
            commits.append(step)
            return ok

    stop = StopFlag()
    loop = Loop(find_plugin("wavesim"), _loop_values(tmp_path / "shared", tmp_path / "r.h5", steps), stop, None, SingleComm())
    return loop, stop, commits


def test_two_level_stop_with_two_sets_held_uploads_commits_them_in_order(tmp_path: Path) -> None:
    """Uploads of steps 20 and 30 held back: their sets stay pending (durable means in the shared store);
    the stop arrives with both pending, its flush releases them, and the sets are committed 20, then 30."""
    from rkckpt.storage import FileStorage
    from rkkernel.ranks import SoloLoop
    from rkkernel.signals import StopFlag
    from set_helpers import HeldStore

    ref = reference("numpy", tmp_path)
    shared = FileStorage(tmp_path / "shared")
    held = HeldStore(shared, lambda n: "-000000000020-" in n or "-000000000030-" in n)
    held.gate.clear()
    loop, stop, commits = _held_loop(tmp_path, held)
    seen: list[list[int]] = []
    boundary, flush = loop._boundary, loop._flush

    def at_boundary() -> None:
        if loop.step == 10:  # the set of step 10 written and uploaded before its first commit round
            loop.mgr.wait()
            loop.mgr.storage.flush()
        boundary()
        pending = [s for s, _ in loop.pending]
        if 30 in pending and not seen:
            seen.append(pending)
            stop.signal_name = "SIGTERM"  # as the handler records it

    def release_then_flush(what: str) -> bool:
        assert not held.gate.is_set() or seen  # nothing of 20 or 30 reached the shared store before the stop
        held.gate.set()
        return flush(what)

    loop._boundary, loop._flush = at_boundary, release_then_flush
    assert loop.run() == EX_TEMPFAIL
    assert seen == [[20, 30]] and commits == [10, 20, 30], (seen, commits)  # the stop at step 30: already in a set
    assert latest_step(tmp_path / "shared") == 30
    assert SoloLoop(loop.plugin, _loop_values(tmp_path / "shared", tmp_path / "r.h5"), StopFlag(), None).run() == 0
    assert result(tmp_path / "r.h5") == ref


def test_two_level_stop_whose_upload_fails_keeps_the_previous_set(tmp_path: Path) -> None:
    """The stop checkpoint's upload fails: a clear error, exit 1, and the shared store's newest set is the last committed."""
    from rkckpt.storage import FileStorage
    from set_helpers import HeldStore

    shared = FileStorage(tmp_path / "shared")
    held = HeldStore(shared, lambda n: "-000000000025-" in n)
    held.fail = True
    loop, stop, commits = _held_loop(tmp_path, held)
    boundary = loop._boundary

    def at_boundary() -> None:
        boundary()
        if loop.step == 25:
            stop.signal_name = "SIGTERM"

    loop._boundary = at_boundary
    assert loop.run() == 1
    assert commits == [10, 20] and latest_step(tmp_path / "shared") == 20
    assert manifests(tmp_path / "shared") == [f"wavesim-0000000000{s}-set1.rkset.json" for s in (10, 20)]


@pytest.mark.s3
def test_two_level_rank_killed_with_two_pending_then_node_lost_restores_from_s3(s3_server, tmp_path: Path) -> None:
    """On S3 staged node-locally: rank 1 SIGKILLed with two sets pending; the shared store's newest set is the
    last committed one, and after the node-local folder is lost 3 ranks restore it from S3, bit-identical."""
    from rkckpt.ckptset import latest_set
    from rkckpt.storage import open_storage

    ref = reference("numpy", tmp_path)
    url, out = f"s3://{s3_server.bucket()}/ck", tmp_path / "r.h5"
    env = {"RKCKPT_S3_ENDPOINT": s3_server.endpoint, "AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret}
    kill = {"RKSLURM_TEST_HOLD_SETS": "2", "RKSLURM_TEST_SIGNAL": "handed-2@r1:SIGKILL:2", "RKSLURM_RANK_TIMEOUT": "2"}
    p = run(2, *wave("numpy", url, out), env={**env, **kill, "RKCKPT_LOCAL_DIR": str(tmp_path / "node")}, timeout=90, rank_logs=tmp_path)
    assert p.returncode != 0
    shared = open_storage(url, local=False, **s3_server.options())
    assert [n for n in shared.list() if n.endswith(".rkset.json")] == ["wavesim-000000000010-set2.rkset.json"]
    assert latest_set(shared, "wavesim").step == 10
    shutil.rmtree(tmp_path / "node")
    p = run(3, *wave("numpy", url, out), env={**env, "RKCKPT_LOCAL_DIR": str(tmp_path / "other-node")})
    assert p.returncode == 0, p.stderr
    assert "restored step 10 from wavesim-000000000010-set2.rkset.json (2 rank(s)) on 3 rank(s)" in p.stderr, p.stderr
    assert result(out) == ref


def test_sets_pending_beyond_the_limit_drop_the_oldest(tmp_path: Path) -> None:
    """Uploads held from step 20 on: at most ``MAX_SETS_PENDING`` (4) sets wait, the oldest are dropped (a newer
    set's chain covers them), and at the stop the ones left are committed oldest first."""
    from rkckpt.storage import FileStorage
    from rkkernel.ranks import MAX_SETS_PENDING
    from set_helpers import HeldStore

    held = HeldStore(FileStorage(tmp_path / "shared"), lambda n: "-00000000001" not in n and n.startswith("wavesim.r0of1-"))
    held.gate.clear()
    loop, stop, commits = _held_loop(tmp_path, held, steps=80)
    most: list[int] = []
    boundary, flush = loop._boundary, loop._flush

    def at_boundary() -> None:
        if loop.step == 10:
            loop.mgr.wait()
            loop.mgr.storage.flush()
        boundary()
        most.append(len(loop.pending))
        if loop.step == 70:
            stop.signal_name = "SIGTERM"

    def release_then_flush(what: str) -> bool:
        held.gate.set()
        return flush(what)

    loop._boundary, loop._flush = at_boundary, release_then_flush
    assert loop.run() == EX_TEMPFAIL
    assert max(most) == MAX_SETS_PENDING and commits == [10, 40, 50, 60, 70], (most, commits)
    assert latest_step(tmp_path / "shared") == 70
