"""Decomposed kernels over MPI ranks (issue 23, part 1): the comm, the slab plan, and results
bit-identical to one process for any rank count, on NumPy and OpenCL.

Real MPI (``mpiexec`` of the mpich wheel, every launch under ``timeout``), real
pocl, real result files. The multi-rank runs use small grids and few steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from fixtures_kernel import rkrun_env
from rkkernel.comm import SingleComm, launched_size, world
from rkkernel.decomp import plan

HELPER = Path(__file__).resolve().parent / "mpi_kernels_helper.py"
PLUGIN = Path(__file__).resolve().parent.parent / "plugin"
GRID = ["24", "20", "17"]  # 17 planes: 2 ranks own 9 + 8, 3 ranks 6 + 6 + 5 (uneven splits)

needs_mpi = pytest.mark.skipif(
    shutil.which("mpiexec") is None or shutil.which("rkrun") is None, reason="mpiexec (mpich wheel) or rkrun not installed"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in rkrun_env().items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL", "SLURM_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN), env.get("PYTHONPATH", "")])
    env.setdefault("RKSLURM_RANK_TIMEOUT", "30")
    env.update(extra)
    return env


def _mpiexec(n: int, args: list[str], *, limit: int = 120, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = ["timeout", str(limit), "mpiexec", "-n", str(n), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), check=False)


def _helper(n: int, mode: str, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return _mpiexec(n, [sys.executable, str(HELPER), mode, str(out)], limit=60, **env)


def _reports(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))}


# ---------------------------------------------------------------- plan
def test_plan_even_and_uneven_splits_cover_the_grid() -> None:
    for nz, ranks, halo in [(18, 3, 4), (17, 3, 4), (18, 2, 1), (19, 4, 2), (10, 1, 4)]:
        slabs = plan(nz, ranks, halo)
        assert [s.rank for s in slabs] == list(range(ranks))
        assert slabs[0].z0 == 0 and slabs[-1].z1 == nz
        assert all(a.z1 == b.z0 for a, b in zip(slabs, slabs[1:], strict=False))
        sizes = [s.owned for s in slabs]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # the first nz % ranks get one more
        assert slabs[0].lo == 0 and slabs[-1].hi == 0
        assert all(s.lo == halo for s in slabs[1:]) and all(s.hi == halo for s in slabs[:-1])
        for s in slabs:
            assert s.local_nz == s.lo + s.owned + s.hi and s.g0 == s.z0 - s.lo
            assert s.local(s.z0) == s.lo and s.local(s.z1) is None
    grid = np.arange(17 * 2).reshape(17, 2)
    s = plan(17, 3, 4)[1]
    assert s.take(grid).tolist() == grid[s.z0 - 4 : s.z1 + 4].tolist()


@pytest.mark.parametrize(("nz", "ranks", "halo"), [(12, 4, 4), (5, 3, 1), (7, 4, 2)])
def test_plan_refuses_a_rank_count_that_does_not_fit(nz: int, ranks: int, halo: int) -> None:
    with pytest.raises(ValueError, match=rf"{ranks} ranks do not fit a grid of {nz} planes.*use at most \d+ ranks"):
        plan(nz, ranks, halo)


def test_plan_refuses_nonsense() -> None:
    for args in [(18, 0, 1), (18, 2, 0), (2, 1, 1)]:
        with pytest.raises(ValueError):
            plan(*args)


# ---------------------------------------------------------------- comm
def test_single_process_gets_single_comm_without_importing_mpi() -> None:
    code = (
        "import sys; from rkkernel.comm import world, SingleComm, launched_size; c = world(); "
        "print(type(c).__name__, c.rank, c.size, launched_size(), 'mpi4py' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True, timeout=60)
    assert r.stdout.split() == ["SingleComm", "0", "1", "0", "False"]


def test_single_comm_operations_are_local() -> None:
    c = SingleComm()
    assert c.exchange_planes(np.zeros(2), np.zeros(2)) == (None, None)
    assert c.allreduce_int(5, "max") == 5
    assert [a.tolist() for a in c.gather_arrays(np.arange(3)) or []] == [[0, 1, 2]]
    assert c.gather_json({"a": 1}) == [{"a": 1}] and c.bcast_json([1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="op must be one of"):
        c.allreduce_int(1, "prod")
    assert isinstance(world(), SingleComm) or launched_size() > 1


def test_rank_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rkkernel.comm import rank_timeout

    monkeypatch.setenv("RKSLURM_RANK_TIMEOUT", "2.5")
    assert rank_timeout() == 2.5 and rank_timeout(7) == 7.0
    monkeypatch.setenv("RKSLURM_RANK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="RKSLURM_RANK_TIMEOUT"):
        rank_timeout()


@needs_mpi
def test_mpi_comm_operations(tmp_path: Path) -> None:
    r = _helper(3, "comm", tmp_path)
    assert r.returncode == 0, r.stderr
    rep = _reports(tmp_path)
    assert sorted(rep) == [0, 1, 2] and {d["kind"] for d in rep.values()} == {"MPIComm"}
    assert [(rep[i]["from_below"], rep[i]["from_above"]) for i in range(3)] == [(None, 1.0), (100.0, 2.0), (101.0, None)]
    assert {(d["sum"], d["max"], d["min"]) for d in rep.values()} == {(6, 14, -5)}
    assert rep[0]["arrays"] == [["<i2", [0]], ["<i2", [0, 1]], ["<i2", [0, 1, 2]]] and rep[1]["arrays"] is None
    assert rep[0]["docs"] == [{"rank": i, "x": [i, 0.1]} for i in range(3)] and rep[2]["docs"] is None
    assert all(d["bcast"] == {"from": 0, "v": 1.5} for d in rep.values())


@needs_mpi
@pytest.mark.parametrize("how", ["exit", "stop"])
def test_a_lost_rank_makes_the_others_raise_rank_lost(tmp_path: Path, how: str) -> None:
    """Rank 1 leaves (or hangs, SIGSTOP): the survivors' next collective ends in RankLost at the deadline."""
    r = _helper(3, f"lost-{how}", tmp_path)
    assert r.returncode not in (0, 124), r.stderr  # ended, not by the test's timeout
    rep = _reports(tmp_path)
    assert rep and set(rep) <= {0, 2}  # at least the first survivor reported before the launcher cleaned up
    for d in rep.values():
        assert "did not complete within 2 s" in d["lost"] and "allreduce(sum)" in d["lost"]
        assert d["waited"] < 20


@needs_mpi
def test_a_killed_rank_ends_the_launch_promptly(tmp_path: Path) -> None:
    r = _helper(3, "lost-kill", tmp_path)
    assert r.returncode not in (0, 124), r.stderr
    assert not _reports(tmp_path)  # nobody got past the collective


# ---------------------------------------------------------------- slabs, in process against the whole grid
@needs_mpi
@pytest.mark.parametrize("kernel", ["wavesim", "traveltime"])
def test_slab_kernels_match_the_whole_grid_every_batch(tmp_path: Path, kernel: str) -> None:
    r = _helper(3, f"slabs-{kernel}", tmp_path)
    assert r.returncode == 0, r.stderr
    rep = _reports(tmp_path)
    halo = 4  # SWEEP_LEVELS: the CPU sweep's steps between two exchanges
    assert [rep[r]["slab"] for r in range(3)] == [[0, 6, 0, halo], [6, 12, halo, halo], [12, 17, halo, 0]]
    for d in rep.values():
        assert d["bad"] == []
        if kernel == "wavesim":
            assert d["sums_equal"] == [True, True, True] and d["values_equal"] is True
        else:
            assert d["last_change_equal"] is True


# ---------------------------------------------------------------- rkrun under mpiexec
def _rkrun(n: int, kernel: str, backend: str, out: Path, extra: list[str]) -> subprocess.CompletedProcess[str]:
    args = ["rkrun", kernel, "--grid", *GRID, "--backend", backend, "--checkpoint-every", "1000"]
    args += ["--checkpoint-dir", str(out / "ck"), "--out", str(out / "out.h5"), *extra]
    if n == 1:  # the reference: a plain single process, no launcher
        return subprocess.run(["timeout", "120", *args], capture_output=True, text=True, env=_env(), check=False)
    return _mpiexec(n, args)


def _contents(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    with h5py.File(path, "r") as f:
        data = {k: f[k][()].tobytes() + str(f[k].shape).encode() for k in f}
        attrs = {k: str(v) for k, v in f.attrs.items()}
    return data, attrs


RUNS = {
    "wavesim": ["--steps", "30", "--energy-every", "5", "--receivers", "5"],
    "traveltime": ["--steps", "200"],
}


def _check_bit_identical(tmp_path: Path, kernel: str, backend: str, ranks: tuple[int, ...]) -> None:
    ref = _rkrun(1, kernel, backend, tmp_path / "ref", RUNS[kernel])
    assert ref.returncode == 0, ref.stderr
    want_data, want_attrs = _contents(tmp_path / "ref" / "out.h5")
    assert ("energy" in want_data) == (kernel == "wavesim")
    for n in ranks:
        out = tmp_path / f"n{n}"
        r = _rkrun(n, kernel, backend, out, RUNS[kernel])
        assert r.returncode == 0, r.stderr
        got_data, got_attrs = _contents(out / "out.h5")
        assert got_data == want_data, f"{n} ranks: datasets differ: {[k for k in want_data if got_data.get(k) != want_data[k]]}"
        assert got_attrs == want_attrs
        assert r.stderr.count(f"wrote {out / 'out.h5'}") == 1  # only rank 0 writes the result


@needs_mpi
@pytest.mark.parametrize(("kernel", "ranks"), [("wavesim", (2, 3)), ("traveltime", (3,))])
def test_rkrun_on_k_ranks_is_bit_identical_to_one_process_numpy(tmp_path: Path, kernel: str, ranks: tuple[int, ...]) -> None:
    _check_bit_identical(tmp_path, kernel, "numpy", ranks)


@needs_mpi
@pytest.mark.parametrize(("kernel", "ranks"), [("wavesim", (3,)), ("traveltime", (2,))])
def test_rkrun_on_k_ranks_is_bit_identical_to_one_process_opencl(
    tmp_path: Path, kernel: str, ranks: tuple[int, ...], opencl_backend: str
) -> None:
    """The fused CPU sweep (4 steps between exchanges) on each OpenCL platform."""
    _check_bit_identical(tmp_path, kernel, opencl_backend, ranks)


@needs_mpi
def test_rkrun_refuses_a_rank_count_that_does_not_fit(tmp_path: Path) -> None:
    r = _mpiexec(
        4,
        [
            "rkrun",
            "wavesim",
            "--grid",
            "24",
            "20",
            "12",
            "--steps",
            "4",
            "--backend",
            "numpy",
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--out",
            str(tmp_path / "out.h5"),
        ],
    )
    assert r.returncode == 2, r.stderr
    assert "4 ranks do not fit a grid of 12 planes along z" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.h5").exists()
