""".rk.h5 files that hang or crash libhdf5, or are mutated at random: every reader ends, within a bound,
skipping or refusing the file with a message naming it, never a traceback (issue 18 item 3)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_helpers import sample_checkpoint
from fixtures_kernel import rkrun_env
from helpers import DATA, TESTS
from hostile_inputs import mutate, try_reader
from rkckpt import CheckpointError, codec, container, hdf5
from rkckpt.chain import latest_restorable
from rkckpt.storage import FileStorage

#: libhdf5 spins on both; on the first the stream cannot be located without libhdf5 either
HANG_STRUCTURE = DATA / "h5-hang-structure.rk.h5"
HANG_EXTRAS = DATA / "h5-hang-extras.rk.h5"  # sample_checkpoint(n=256): kernel sample-0, step 7, stream intact
PROBE_TIMEOUT = "2"
RKCKPT = shutil.which("rkckpt")
SEED = 18


def env(**extra: str) -> dict[str, str]:
    return dict(os.environ, RKCKPT_H5_PROBE_TIMEOUT=PROBE_TIMEOUT, OPENBLAS_NUM_THREADS="1", **extra)


def cli(*args: object, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    assert RKCKPT is not None
    return subprocess.run([RKCKPT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env())


def test_samples_still_hang_libhdf5():
    """Guards the data: libhdf5 itself does not finish on either sample (so the tests below test something)."""
    for path in (HANG_STRUCTURE, HANG_EXTRAS):
        assert "did not finish" in (hdf5._probe_child(str(path), 1.0) or ""), path


def test_in_process_readers_skip_or_refuse_the_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("RKCKPT_H5_PROBE_TIMEOUT", PROBE_TIMEOUT)
    hang = tmp_path / "hang.rk.h5"
    shutil.copy(HANG_STRUCTURE, hang)
    for read in (container.read, hdf5.check_h5, hdf5.read_index, hdf5.attributes, lambda p: hdf5.read_region(p, "pressure")):
        with pytest.raises(CheckpointError, match="did not finish") as exc:
            read(hang)
        assert exc.value.source == str(hang)
    extras = tmp_path / "extras.rk.h5"
    shutil.copy(HANG_EXTRAS, extras)
    # the stream is intact and located without libhdf5: restore reads it ...
    assert container.read(extras).checkpoint.content_digest() == sample_checkpoint(n=256).content_digest()
    # ... while the HDF5 extras are refused after the probe's bounded wait
    with pytest.raises(CheckpointError, match="did not finish") as exc:
        hdf5.check_h5(extras)
    assert exc.value.source == str(extras)


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Path:
    """A chain folder: a good full at step 1, HANG_EXTRAS as step 7, HANG_STRUCTURE as the newest (step 8)."""
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    container.write(d / "sample-0-000000000001-full.rk.h5", sample_checkpoint(step=1), codec.COMPAT)
    shutil.copy(HANG_EXTRAS, d / "sample-0-000000000007-full.rk.h5")
    shutil.copy(HANG_STRUCTURE, d / "sample-0-000000000008-full.rk.h5")
    return d


def test_restore_skips_the_hanging_newest_file(hostile_dir, monkeypatch):
    monkeypatch.setenv("RKCKPT_H5_PROBE_TIMEOUT", PROBE_TIMEOUT)
    rp = latest_restorable(FileStorage(hostile_dir), "sample-0")
    assert rp is not None and rp.step == 7
    assert [n for n, _ in rp.skipped] == ["sample-0-000000000008-full.rk.h5"]
    assert "did not finish" in rp.skipped[0][1]


@pytest.mark.skipif(RKCKPT is None, reason="rkckpt command not installed")
def test_cli_readers_finish_on_the_samples(hostile_dir):
    hang, extras = hostile_dir / "sample-0-000000000008-full.rk.h5", hostile_dir / "sample-0-000000000007-full.rk.h5"
    runs = {
        "ls": cli("ls", hostile_dir, "--json"),
        "latest": cli("latest", hostile_dir, "--json"),
        "verify": cli("verify", hang, extras, hostile_dir / "sample-0-000000000001-full.rk.h5"),
        "inspect": cli("inspect", hang),
        "inspect-extras": cli("inspect", extras),
        "gc": cli("gc", hostile_dir, "--keep", "2"),
    }
    for what, proc in runs.items():
        assert "Traceback" not in proc.stdout + proc.stderr, (what, proc.stderr)
    latest = json.loads(runs["latest"].stdout)
    assert latest["step"] == 7, runs["latest"]
    assert [Path(s["path"]).name for s in latest["skipped"]] == [hang.name]  # skipped once, named
    assert "did not finish" in latest["skipped"][0]["reason"]
    assert hang.name in runs["ls"].stdout + runs["ls"].stderr
    assert runs["verify"].returncode == 1 and hang.name in runs["verify"].stdout + runs["verify"].stderr
    assert extras.name in runs["verify"].stdout + runs["verify"].stderr
    for what in ("inspect", "inspect-extras"):
        assert runs[what].returncode == 1 and "did not finish" in runs[what].stdout + runs[what].stderr, runs[what]
    assert runs["gc"].returncode == 0, runs["gc"]
    assert extras.exists() and (hostile_dir / "sample-0-000000000001-full.rk.h5").exists()


# ------------------------------------------------------------------ the pure parser alone


class CountingSource:
    """A file source that counts the bytes asked of it."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name, self.size, self.asked = data, name, len(data), 0

    def read(self, offset: int, n: int) -> memoryview:
        assert 0 <= offset and offset + n <= self.size
        self.asked += n
        return memoryview(self.data[offset : offset + n])


def test_locate_ends_bounded_on_any_damage():
    """h5layout.locate on 3000 seeded mutations of the HDF5 structure: it returns a stream inside the
    file, or raises NotFixedLayout / CheckpointError; it reads at most its metadata budget."""
    from rkckpt import h5layout
    from rkckpt.source import FileSource

    rng = random.Random(SEED)
    bases = []
    for n, opts in ((256, codec.COMPAT), (70000, codec.WriteOptions())):  # a small stream and a page-aligned one
        path = f"/dev/shm/rkckpt-locate-{os.getpid()}-{n}.rk.h5" if os.path.isdir("/dev/shm") else None
        if path is None:
            pytest.skip("no /dev/shm")
        container.write(path, sample_checkpoint(n=n), opts)
        with FileSource(path) as fs:
            loc = h5layout.locate(fs)
        with open(path, "rb") as fh:
            bases.append((fh.read(), loc.offset))
        os.unlink(path)
    outcomes = {"located": 0, "not fixed": 0, "refused": 0}
    for case in range(3000):
        raw, offset = bases[case % 2]
        buf = bytearray(raw[: max(offset + 64, 4096)] if rng.random() < 0.5 else raw)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(min(offset, len(buf)))
            if rng.random() < 0.5:
                buf[at] = rng.randrange(256)
            else:
                buf[at : at + 8] = rng.randbytes(8) if rng.random() < 0.5 else b"\xff" * 8
        if rng.random() < 0.1:
            del buf[rng.randrange(len(buf)) :]
        src = CountingSource(bytes(buf), "case.rk.h5")
        try:
            loc = h5layout.locate(src)
            assert 0 <= loc.offset and loc.offset + loc.length <= len(buf)
            outcomes["located"] += 1
        except h5layout.NotFixedLayout:
            outcomes["not fixed"] += 1
        except CheckpointError as exc:
            assert exc.source == "case.rk.h5"
            outcomes["refused"] += 1
        assert src.asked <= h5layout.MAX_METADATA_BYTES + h5layout.PAGE
    assert all(outcomes.values()), outcomes


# ------------------------------------------------------------------ mutation fuzz


def fuzz_worker(seed: int, cases: int, folder: str) -> dict:
    """Each case through the in-process readers; files land in ``folder`` for the CLI run."""
    rng = random.Random(seed)
    stats: dict = {"ok": 0, "refused": 0, "failures": [], "valid_steps": []}
    for case in range(cases):
        step = case + 1
        ck = sample_checkpoint(step=step, n=256)
        path = os.path.join(folder, f"sample-0-{step:012d}-full.rk.h5")
        container.write(path, ck, codec.COMPAT)
        with open(path, "rb") as fh:
            raw = fh.read()
        with open(path, "wb") as fh:
            fh.write(mutate(raw, rng))
        restored = try_reader(lambda p: container.read(p).checkpoint, path)  # the restore path
        if restored.read:
            if restored.value.content_digest() != ck.content_digest():
                stats["failures"].append({"case": case, "error": "damaged file read as different content"})
            stats["valid_steps"].append(step)
            stats["ok"] += 1
        stats["refused"] += restored.refused
        extras = (hdf5.check_h5, lambda p: hdf5.read_region(p, "velocity"))  # libhdf5, behind the probe
        for outcome in (restored, *(try_reader(read, path) for read in extras)):
            if outcome.bug is not None:
                stats["failures"].append({"case": case, "error": outcome.bug})
    return stats


@pytest.mark.timeout(240)
def test_fuzz_mutated_files_every_reader_finishes(tmp_path):
    """Seeded mutations of fresh .rk.h5 files: in-process readers (memory-limited child), then the CLI over the folder."""
    folder = tmp_path / "ck"
    folder.mkdir(mode=0o700)
    cases = 100
    code = (
        "import json, resource, sys\n"
        f"sys.path[:0] = [{str(TESTS)!r}, {str(Path(__file__).resolve().parent)!r}]\n"
        "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
        "import test_h5_hostile as t\n"
        f"print(json.dumps(t.fuzz_worker({SEED}, {cases}, {str(folder)!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not stats["failures"], stats["failures"][:10]
    assert stats["refused"] > 0 and stats["ok"] > 0  # both outcomes reached
    newest_valid = max(stats["valid_steps"])
    latest = cli("latest", folder, "--json")
    assert "Traceback" not in latest.stdout + latest.stderr, latest.stderr[-3000:]
    assert json.loads(latest.stdout)["step"] == newest_valid
    for args in (("ls", folder), ("verify", *sorted(folder.glob("*.rk.h5"))), ("gc", folder, "--keep", "3")):
        out = cli(*args)
        assert "Traceback" not in out.stdout + out.stderr, (args[0], out.stderr[-3000:])
        assert out.returncode in (0, 1), (args[0], out.returncode, out.stderr[-2000:])
    assert (folder / f"sample-0-{newest_valid:012d}-full.rk.h5").exists()  # gc never deletes the newest restorable


# ------------------------------------------------------------------ rkrun


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rkrun(*args: str, probe_timeout: str) -> subprocess.Popen:
    e = dict(rkrun_env(), RKCKPT_H5_PROBE_TIMEOUT=probe_timeout)
    return subprocess.Popen(
        [sys.executable, "-m", "rkkernel.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e
    )


def _run_args(ck: Path, out: Path, steps: int) -> tuple[str, ...]:
    grid = ("--grid", "16", "16", "16", "--steps", str(steps), "--checkpoint-every", "20", "--energy-every", "10")
    return ("wavesim", *grid, "--backend", "numpy", "--checkpoint-dir", str(ck), "--out", str(out))


@pytest.fixture
def run_with_hanging_newest(tmp_path: Path) -> Path:
    """An rkrun checkpoint folder (steps 20 and 40) with a libhdf5-hanging file as its newest (step 50)."""
    ck = tmp_path / "ck"
    p = _rkrun(*_run_args(ck, tmp_path / "first.h5", 40), probe_timeout=PROBE_TIMEOUT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    shutil.copy(HANG_STRUCTURE, ck / "wavesim-000000000050-full.rk.h5")
    return ck


def test_rkrun_restore_skips_a_hanging_file(run_with_hanging_newest, tmp_path):
    ck = run_with_hanging_newest
    p = _rkrun(*_run_args(ck, tmp_path / "r.h5", 60), probe_timeout=PROBE_TIMEOUT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "Traceback" not in out
    assert "wavesim-000000000050-full.rk.h5" in out and "did not finish" in out, out
    assert "restored from step 40" in out, out


def test_sigterm_during_a_stuck_probe_stops_rkrun(run_with_hanging_newest, tmp_path, monkeypatch):
    """The probe would wait 300 s; SIGTERM while it runs (forced: sent once the probe child exists) stops
    rkrun promptly with exit 75, and the newest restorable step does not go back."""
    ck = run_with_hanging_newest
    p = _rkrun(*_run_args(ck, tmp_path / "r.h5", 60), probe_timeout="300")
    deadline = time.monotonic() + 60
    while not _children(p.pid):
        assert p.poll() is None and time.monotonic() < deadline, "rkrun never started a probe"
        time.sleep(0.02)
    sent = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 75, out
    assert time.monotonic() - sent < 60
    assert "Traceback" not in out
    assert "abandoned" in out, out
    monkeypatch.setenv("RKCKPT_H5_PROBE_TIMEOUT", PROBE_TIMEOUT)
    rp = latest_restorable(FileStorage(ck), "wavesim", warn=False)
    assert rp is not None and rp.step >= 40


def test_probe_verdict_is_not_inherited_by_bytes_rewritten_in_place(tmp_path):
    """A verdict is remembered per file; the same inode rewritten in place, same size and mtime, is probed again."""
    path = tmp_path / "same.rk.h5"
    container.write(path, sample_checkpoint(n=256), codec.COMPAT)
    good = path.read_bytes()
    bad = HANG_STRUCTURE.read_bytes()
    assert len(good) == len(bad)
    hdf5.probe(path, timeout=30)
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(bad)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(CheckpointError, match="did not finish"):
        hdf5.probe(path, timeout=1)
