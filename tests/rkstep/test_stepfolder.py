"""Issue 20: the step folder belongs to rkstep; every file in it is hostile; fingerprints that are right.

Real files and real processes throughout (FIFOs, symlinks, /dev/zero, a
second writer process); every window is forced, never timed.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import helpers
from rkstep import EventWriter, StepFolder, attempts, latest_attempt, read_events
from rkstep.events import run_attempt, writer_for
from rkstep.fingerprint import CHECKPOINT_DIR_PARAM, FingerprintError, HashCache, declared_fingerprint, step_fingerprint
from rkstep.folder import FolderError, FolderRefused, default_checkpoint_dir, rkslurm_checkpoint_dir, wildcards_key
from rkstep.protocol import EVENTS_FILE, FINGERPRINT_FILE, OWNER_FILE, PROGRESS_FILE, STOP_MARKER

PLUGIN = str(helpers.PLUGIN)


def child(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a real second process) with rkstep importable; a hang fails by timeout."""
    e = {**os.environ, "PYTHONPATH": PLUGIN + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=e)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------- paths (moved from the executor's ckptdir)


def test_wildcards_key_is_stable_and_safe() -> None:
    assert wildcards_key({}) == "_"
    assert wildcards_key({"b": "2", "a": "x/y"}) == "a=x%2Fy,b=2"
    assert wildcards_key({"a": "x/y", "b": 2}) == wildcards_key({"b": "2", "a": "x/y"})
    assert "/" not in wildcards_key({"a": "../../etc"})


def test_default_dir_and_snakefile_helper_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    d = default_checkpoint_dir("simulate", {"size": "64"})
    assert d == tmp_path / ".snakemake/rkslurm/simulate/size=64"

    class WC(dict):
        pass

    assert rkslurm_checkpoint_dir("simulate")(WC(size="64")) == str(d)
    assert rkslurm_checkpoint_dir("simulate", root="/x")(WC()) == "/x/simulate/_"


def test_local_runs_need_no_executor_package() -> None:
    """The Snakefile helper and the local preparation import rkstep only (rkstep imports no numpy either)."""
    r = child(
        """
        import sys
        sys.modules["snakemake_executor_plugin_rkslurm"] = None  # importing it would raise
        import rkstep, rkstep.folder
        sys.path.insert(0, "workflows/wavesim/scripts")
        import prepare_ckpt
        print("numpy" in sys.modules)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# --------------------------------------------------------------- ownership (defect 2)


def test_prepare_resumes_same_fingerprint_and_clears_changed(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    f = StepFolder(d, key="sim/_")
    r = f.prepare("aaa")
    assert r.fresh and r.stale_reason is None
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    (d / "state-000000000010-full.rkcp").write_bytes(b"x")
    (d / "sub").mkdir()
    (d / "sub" / "y").write_bytes(b"y")
    r = f.prepare("aaa")
    assert not r.fresh and r.stale_reason is None and (d / "state-000000000010-full.rkcp").exists()
    r = f.prepare("bbb")
    assert r.fresh and r.stale_reason and "changed" in r.stale_reason
    assert sorted(os.listdir(d)) == sorted([OWNER_FILE, FINGERPRINT_FILE])
    assert json.loads((d / FINGERPRINT_FILE).read_text())["fingerprint"] == "bbb"


def test_folder_with_other_files_is_refused_and_untouched(tmp_path: Path) -> None:
    """``rkslurm_checkpoint_dir="results"`` with earlier outputs: refused, nothing deleted or written."""
    d = tmp_path / "results"
    d.mkdir()
    (d / "energy.csv").write_text("1,2\n")
    (d / "old").mkdir()
    (d / "old" / "plot.png").write_bytes(b"png")
    before = snapshot(d)
    names = sorted(os.listdir(d))
    with pytest.raises(FolderRefused, match=r"holds files rkstep did not create \(energy.csv, old\)"):
        StepFolder(d, key="sim/_").prepare("aaa")
    StepFolder(d).remove()  # after a "success": not ours, so nothing goes
    assert snapshot(d) == before and sorted(os.listdir(d)) == names


def test_two_steps_sharing_a_folder_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    a = StepFolder(d, key="simulate/_")
    a.prepare("aaa")
    (d / "wave-000000000010-full.rkcp").write_bytes(b"live checkpoint")
    with pytest.raises(FolderRefused, match="belongs to step 'simulate/_'"):
        StepFolder(d, key="traveltime/_").prepare("bbb")
    assert (d / "wave-000000000010-full.rkcp").read_bytes() == b"live checkpoint"


def test_remove_deletes_only_what_rkstep_created(tmp_path: Path) -> None:
    made = StepFolder(tmp_path / "new", key="s/_")
    made.prepare("a")
    (made.path / "x.rkcp").write_bytes(b"x")
    made.remove()
    assert not made.path.exists()
    given = tmp_path / "given"
    given.mkdir(mode=0o700)  # an empty folder the user named: claimed, emptied, kept
    f = StepFolder(given, key="s/_")
    f.prepare("a")
    (given / "x.rkcp").write_bytes(b"x")
    f.remove()
    assert given.is_dir() and os.listdir(given) == []


def test_a_link_in_the_folder_is_deleted_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    f = StepFolder(tmp_path / "ck", key="s/_")
    f.prepare("a")
    (f.path / "link").symlink_to(outside)
    (f.path / "filelink").symlink_to(outside / "precious")
    f.prepare("b")
    assert (outside / "precious").read_text() == "keep"
    assert not os.path.lexists(f.path / "link")


def test_a_symlinked_or_shared_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "ln").symlink_to(real)
    with pytest.raises(FolderError, match="symbolic link"):
        StepFolder(tmp_path / "ln").prepare("a")
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(FolderError, match="writable by group or others"):
        StepFolder(open_dir).prepare("a")
    assert os.listdir(real) == [] and os.listdir(open_dir) == []


# --------------------------------------------------------------- writing only after the folder check (defect 3)


def test_run_attempt_never_writes_through_a_planted_events_link(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("theirs\n")
    (d / EVENTS_FILE).symlink_to(victim)
    r = child(
        f"""
        from rkstep.events import run_attempt
        print(run_attempt({str(d)!r}, lambda ev: 0))
        """
    )
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr
    assert victim.read_text() == "theirs\n"
    assert "cannot record event" in r.stderr  # said once, on stderr (the job log)
    assert r.stderr.count("cannot record event") == 1


def test_writer_for_creates_the_folder_private_and_refuses_a_shared_one(tmp_path: Path) -> None:
    w = writer_for(tmp_path / "a" / "ck")
    assert stat.S_IMODE((tmp_path / "a" / "ck").stat().st_mode) == 0o700
    w.start()
    assert stat.S_IMODE((tmp_path / "a" / "ck" / EVENTS_FILE).stat().st_mode) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    said: list[str] = []
    assert run_attempt(shared, lambda ev: 0) == 0  # the body runs; its storage refuses the folder itself
    writer_for(shared, warn=said.append).start()
    assert not (shared / EVENTS_FILE).exists() and "writable by group or others" in said[0]


# --------------------------------------------------------------- hostile events (defects 4 and 5)

HOSTILE_LINES = [
    "[" * 100_000,
    json.dumps({"event": "start", "job": "7", "restart": "1a", "pid": 1}),
    '{"event": "checkpoint", "job": "7", "restart": 0, "pid": 1, "step": NaN}',
    '{"event": "checkpoint", "job": "7", "restart": 0, "pid": 1, "step": Infinity}',
    '{"event": "checkpoint", "job": "7", "restart": 0, "pid": 1, "step": 1e999}',
    json.dumps([{"event": "start"}]),
    json.dumps({"event": "end", "job": "7", "restart": 0, "pid": 1, "rc": [1]}),
    json.dumps({"event": "start", "job": {"x": 1}}),
    json.dumps({"event": "start", "job": "7", "restart": 0, "pid": 1, "ranks": 0}),  # no launcher starts 0 ranks
    json.dumps({"event": "start", "job": "7", "restart": 0, "pid": 1, "ranks": "4"}),
]


def test_hostile_event_lines_are_skipped_with_one_warning(tmp_path: Path) -> None:
    p = tmp_path / EVENTS_FILE
    good = [
        {"event": "start", "job": "7", "restart": 0, "pid": 1, "t": 1.0},
        {"event": "checkpoint", "job": "7", "restart": 0, "pid": 1, "step": 40},
        {"event": "end", "job": "7", "restart": 0, "pid": 1, "rc": 0, "step": 50},
    ]
    lines = [json.dumps(good[0]), *HOSTILE_LINES, json.dumps(good[1]), json.dumps(good[2])]
    p.write_text("\n".join(lines) + "\n")
    said: list[str] = []
    evs = read_events(p, warn=said.append)
    assert [e["event"] for e in evs] == ["start", "checkpoint", "end"]
    assert len(said) == 1 and f"skipped {len(HOSTILE_LINES)} line(s)" in said[0]
    a = latest_attempt(evs, "7")
    assert a is not None and a.ended and a.end_rc == 0 and a.checkpoints == [40]
    # attempts() itself is defensive too (a caller may hand it raw dicts)
    assert len(attempts([{"event": "start", "restart": "1a"}, {"event": "start", "job": "1", "t": float("nan")}, {"x": 1}])) == 0


def test_rkrun_side_under_slurm_survives_a_hostile_events_file(tmp_path: Path) -> None:
    """EventWriter.for_folder counts earlier starts of the job: hostile lines must not traceback."""
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    (d / EVENTS_FILE).write_text("\n".join([*HOSTILE_LINES, json.dumps({"event": "start", "job": "42", "pid": 3})]) + "\n")
    r = child(
        f"""
        from rkstep.events import run_attempt
        print(run_attempt({str(d)!r}, lambda ev: ev.restart))
        """,
        env={"SLURM_JOB_ID": "42"},
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.strip() == "1"  # the body saw restart 1: the one earlier start of job 42 was counted
    assert "skipped" in r.stderr
    last = [json.loads(x) for x in (d / EVENTS_FILE).read_text().splitlines()[-2:]]
    assert [e["event"] for e in last] == ["start", "end"] and last[0]["restart"] == 1


def test_special_files_never_hang_or_allocate(tmp_path: Path) -> None:
    """FIFOs named as every file we read, and links to /dev/zero: all read as "nothing there", in a child with a timeout."""
    d = tmp_path / "ck"
    f = StepFolder(d, key="s/_")
    f.prepare("aaa")
    for name in (STOP_MARKER, PROGRESS_FILE, EVENTS_FILE):
        os.mkfifo(d / name)
    (d / FINGERPRINT_FILE).unlink()
    os.mkfifo(d / FINGERPRINT_FILE)
    z = tmp_path / "z"
    z.mkdir(mode=0o700)
    for name in (STOP_MARKER, EVENTS_FILE, FINGERPRINT_FILE):
        (z / name).symlink_to("/dev/zero")
    r = child(
        f"""
        from pathlib import Path
        from rkstep import StepFolder, EventWriter, read_events
        f = StepFolder(Path({str(d)!r}), key="s/_")
        print(f.progress(), f.observe("1").attempt, read_events(f.paths.events))
        said = []
        EventWriter(f.paths.events, warn=said.append).start()
        print(len(said), f.prepare("aaa").stale_reason is not None)
        z = StepFolder(Path({str(z)!r}))
        print(z.progress(), read_events(z.paths.events), z.stored_fingerprint())
        """,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "None None []"
    assert out[1] == "1 True"  # the write into the FIFO failed once, said once; the FIFO fingerprint is no fingerprint
    assert out[2] == "None [] None"


def test_huge_events_file_is_read_from_its_tail(tmp_path: Path) -> None:
    p = tmp_path / EVENTS_FILE
    with open(p, "wb") as fh:
        fh.truncate(40 << 20)  # 40 MiB of NULs (sparse), then real events
        fh.seek(40 << 20)
        fh.write(b"\n" + json.dumps({"event": "start", "job": "9", "pid": 2}).encode() + b"\n")
        fh.write(json.dumps({"event": "checkpoint", "job": "9", "pid": 2, "step": 8}).encode() + b"\n")
    said: list[str] = []
    f = StepFolder(tmp_path, warn=said.append)
    story = f.observe("9")
    assert story.attempt is not None and story.newest_checkpoint == 8 and story.offset == p.stat().st_size
    assert any("skipped" in s for s in said)


def test_observe_reads_incrementally_and_takes_progress_from_events(tmp_path: Path) -> None:
    f = StepFolder(tmp_path / "ck", key="s/_")
    f.prepare("a")
    w = EventWriter(f.paths.events, job="5")
    w.start()
    (f.path / "wave-000000099999-full.rkcp").write_bytes(b"")  # a file name is no evidence of progress
    s1 = f.observe("5")
    assert s1.attempt is not None and s1.newest_checkpoint is None and s1.new_events == 1
    w.checkpoint(10)
    with open(f.paths.events, "ab") as fh:
        fh.write(b'{"event": "checkpoint", "job": "5", "pid": 1')  # a line being written: not read yet
    s2 = f.observe("5", since=s1.offset)
    assert s2.new_events == 1 and s2.newest_checkpoint == 10 and s2.offset > s1.offset
    assert f.observe("5").new_events == 0  # nothing new since
    f.paths.events.write_text("")  # replaced under us: read again from the start, said once
    assert f.observe("5").attempt is None
    w.start()
    assert f.observe("5").attempt is not None
    f.paths.events.unlink()  # the folder's story deleted under the job: forgotten, never told from memory
    gone = f.observe("5")
    assert gone.attempt is None and gone.newest_checkpoint is None and gone.offset == 0


# --------------------------------------------------------------- interleaved attempts (defect 7)


def test_a_second_rkrun_start_does_not_swallow_the_first_attempts_end(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from rkstep.events import writer_for
                w = writer_for({str(d)!r})
                w.start(step=0)
                print("started", flush=True)
                sys.stdin.readline()  # the second process starts here
                w.checkpoint(100)
                w.end(0, step=100)
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": PLUGIN, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"},
    )
    assert first.stdout is not None and first.stdin is not None
    assert first.stdout.readline().strip() == "started"
    r = child(
        f"from rkstep.events import writer_for\nwriter_for({str(d)!r}).start(step=0)",
        env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "0"},
    )
    assert r.returncode == 0, r.stderr
    first.stdin.write("go\n")
    first.stdin.close()
    assert first.wait(timeout=60) == 0
    runs = attempts(read_events(d / EVENTS_FILE))
    assert len(runs) == 2 and runs[0].ended and runs[0].end_rc == 0 and runs[0].checkpoints == [100]
    assert runs[1].killed and not runs[1].checkpoints


# --------------------------------------------------------------- fingerprints (defect 6)


def test_directory_inputs_are_hashed_recursively(tmp_path: Path) -> None:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a")
    (d / "sub" / "b.bin").write_bytes(b"b")
    base = step_fingerprint("r", {"n": 1}, "cmd", [str(d)])
    (d / "sub" / "b.bin").write_bytes(b"B")
    changed = step_fingerprint("r", {"n": 1}, "cmd", [str(d)])
    assert changed != base
    (d / "sub" / "b.bin").rename(d / "sub" / "c.bin")  # a rename changes it too
    assert step_fingerprint("r", {"n": 1}, "cmd", [str(d)]) not in (base, changed)


def test_set_params_give_the_same_fingerprint_in_every_process(tmp_path: Path) -> None:
    code = """
        from rkstep.fingerprint import step_fingerprint
        print(step_fingerprint("r", {"names": {"alpha", "beta", "gamma", "delta", "eps"}, "t": ("x", 1.5), "d": {"b": 1, "a": frozenset({3, 1})}}, "c", []))
    """
    values = {child(code, env={"PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3, 4)}
    assert len(values) == 1 and len(values.pop()) == 64


def test_params_without_a_stable_value_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FingerprintError, match="param 'f' of rule r is a builtins.object"):
        step_fingerprint("r", {"f": object()}, "", [])
    assert step_fingerprint("r", {"n": 1, CHECKPOINT_DIR_PARAM: "/a"}, "c", []) == step_fingerprint(
        "r", {"n": 1, CHECKPOINT_DIR_PARAM: "/b"}, "c", []
    )
    assert step_fingerprint("r", {"n": 1}, "c", []) != step_fingerprint("r", {"n": 2}, "c", [])
    assert step_fingerprint("r", {"fingerprint": "grid=8"}, "c", []) == declared_fingerprint("grid=8")


def test_content_hashes_are_cached_by_stat_in_the_folder(tmp_path: Path) -> None:
    big = tmp_path / "in.bin"
    big.write_bytes(b"x" * 1000)
    os.utime(big, ns=(10**18, 10**18 - 5 * 10**9 * 10**6))  # long ago: not "racy"
    f = StepFolder(tmp_path / "ck", key="s/_")
    f.prepare("first")
    fp1 = f.fingerprint("r", {}, "", [str(big)])
    assert str(big) in json.loads(f.paths.hashcache.read_text())["files"]
    st = big.stat()
    big.write_bytes(b"y" * 1000)  # same size; put mtime and inode back: the cache answers (a stat only)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.fingerprint("r", {}, "", [str(big)]) == fp1
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # any stat change: hashed again
    assert f.fingerprint("r", {}, "", [str(big)]) != fp1
    # a folder that is not ours gets no cache file
    other = tmp_path / "other"
    other.mkdir()
    StepFolder(other).fingerprint("r", {}, "", [str(big)])
    assert os.listdir(other) == []
    assert HashCache.load(tmp_path / "missing").entries == {}


def test_declared_fingerprint_matches_the_workflow_preparation_script(tmp_path: Path) -> None:
    """Local executor (prepare_ckpt.py, a real process) and rkslurm compute the same value: switching keeps the folder."""
    model = tmp_path / "velocity.npy"
    model.write_bytes(b"model bytes")
    text = "grid=8 8 8 steps=100"
    d = tmp_path / "ck"
    script = helpers.REPO / "workflows" / "wavesim" / "scripts" / "prepare_ckpt.py"
    env = {**os.environ, "PYTHONPATH": PLUGIN}
    assert subprocess.run([sys.executable, str(script), str(d), text, str(model)], env=env, timeout=60).returncode == 0
    (d / "x-000000000010-full.rkcp").write_bytes(b"c")
    params = {"fingerprint": text, "steps": 100, CHECKPOINT_DIR_PARAM: str(d)}
    f = StepFolder(d, key="simulate/_")
    digest = f.fingerprint("simulate", params, "rkrun ...", [str(model)])
    r = f.prepare(digest)
    assert r.stale_reason is None and not r.fresh and (d / "x-000000000010-full.rkcp").exists()
    assert step_fingerprint("simulate", {**params, "fingerprint": "grid=9 9 9"}, "", [str(model)]) != digest
    # the script refuses a folder of other files, touching nothing
    res = tmp_path / "results"
    res.mkdir()
    (res / "keep.txt").write_text("k")
    p = subprocess.run([sys.executable, str(script), str(res), text], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "holds files rkstep did not create" in p.stderr and os.listdir(res) == ["keep.txt"]


# --------------------------------------------------------------- the executor side (defects 1, 4, 8, 9)


def test_plan_adoption_trusts_only_our_uid_and_our_fingerprint() -> None:
    from snakemake_executor_plugin_rkslurm.adoption import LiveJob, parse_squeue, plan_adoption

    rows = parse_squeue(
        "10|0|RUNNING|rule_sim rkslurm:abc rkfp:old\n"
        "11|65534|RUNNING|rule_sim rkslurm:abc rkfp:new\n"
        "12|0|PENDING|rule_sim rkslurm:abc rkfp:new\n"
        "13|0|RUNNING|rule_sim rkslurm:abc rkfp:new\n"
        "14|0|RUNNING|rule_sim rkslurm:other rkfp:new\n"
        "15|0|RUNNING|rule_sim rkslurm:abc rkfp:new|with a bar\n"
    )
    assert rows[0] == LiveJob("10", "rule_sim rkslurm:abc rkfp:old", 0, "RUNNING")
    owners = {"10": 0, "12": 0, "13": 0, "15": 65534}  # scontrol's word on each job
    plan = plan_adoption(rows, "rkslurm:abc", "rkfp:new", uid=0, owner_of=owners.get)
    assert plan.adopt is not None and plan.adopt.job_id == "13"
    assert [(j.job_id, "fingerprint differs" in why or "newest" in why) for j, why in plan.cancel] == [("10", True), ("12", True)]
    assert sorted(j.job_id for j, _ in plan.ignore) == ["11", "15"]  # another uid: by squeue's row, and by scontrol
    assert plan_adoption(rows, "rkslurm:abc", "rkfp:zzz", uid=0, owner_of=owners.get).adopt is None


class _Logger:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, m: str) -> None:
        self.lines.append(m)

    info = debug = warning


def _fake_executor(tmp_path: Path) -> types.SimpleNamespace:
    from snakemake_executor_plugin_rkslurm.executor import Executor

    ex = types.SimpleNamespace(
        logger=_Logger(),
        _default_partition="main",
        workflow=types.SimpleNamespace(executor_settings=types.SimpleNamespace(checkpoint_root=str(tmp_path / "root"))),
    )
    for name in ("_checkpoint_dir_for", "_fingerprint", "_new_step", "_prepare", "_plan_each", "_wildcards"):
        fn = getattr(Executor, name)
        setattr(ex, name, fn if isinstance(Executor.__dict__[name], staticmethod) else types.MethodType(fn, ex))
    return ex


def _job(**resources: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        name="sim",
        resources=dict(slurm_partition="main", **resources),
        params={"n": 1},
        wildcards={},
        input=[],
        rule=types.SimpleNamespace(shellcmd="rkrun ...", run_func=None),
    )


def test_executor_masks_credentials_of_a_storage_url(tmp_path: Path) -> None:
    ex = _fake_executor(tmp_path)
    step, _ = ex._new_step(_job(rkslurm_checkpoint_dir="s3://AKIDEXAMPLE:Secret123@bucket/ck"))
    assert step.export.startswith("s3://AKIDEXAMPLE:Secret123@")  # the job still gets the real URL
    text = "\n".join(ex.logger.lines)
    assert "bucket/ck" in text and "Secret123" not in text


def test_executor_refuses_a_foreign_folder_before_submission(tmp_path: Path) -> None:
    ex = _fake_executor(tmp_path)
    res = tmp_path / "results"
    res.mkdir()
    (res / "out.txt").write_text("mine")
    with pytest.raises(FolderRefused):
        ex._new_step(_job(rkslurm_checkpoint_dir=str(res)))
    assert os.listdir(res) == ["out.txt"]
    step, digest = ex._new_step(_job())  # the default folder: nothing touched until _prepare
    assert step.checkpoint_dir is not None and not step.checkpoint_dir.exists() and step.fingerprint_tag == "rkfp:" + digest[:24]
    ex._prepare(step, digest)
    assert (step.checkpoint_dir / OWNER_FILE).exists()


def test_status_loop_fails_only_the_step_that_raised(tmp_path: Path) -> None:
    from snakemake_executor_plugin_rkslurm.monitor import Monitor, Step
    from snakemake_executor_plugin_rkslurm.policy import PolicySettings
    from snakemake_executor_plugin_rkslurm.slurmquery import JobRecord

    class Broken(StepFolder):
        def observe(self, job_id: str, since: int | None = None):  # type: ignore[no-untyped-def]
            raise OverflowError("a bug in one step's reading")

    class Slurm:
        def query(self, ids):  # type: ignore[no-untyped-def]
            return {i: JobRecord(job_id=i, state="RUNNING", partition="main") for i in ids}

        def tagged_jobs(self, tag):  # type: ignore[no-untyped-def]
            return []

        def cancel(self, job_id):  # type: ignore[no-untyped-def]
            pass

    good = Step(rule="good", checkpoint_dir=tmp_path / "g")
    bad = Step(rule="bad", checkpoint_dir=tmp_path / "b", folder=Broken(tmp_path / "b"))
    good.submitted("1", None, 0.0)
    bad.history = bad.history.with_submission("2", None, None)
    ex = _fake_executor(tmp_path)
    ex.monitor = Monitor(Slurm(), PolicySettings(), {}, clock=lambda: 0.0)
    plans, broken = ex._plan_each([("g", good), ("b", bad)])
    assert [p.key for p in plans] == ["g"] and [(k, type(e).__name__) for k, _, e in broken] == [("b", "OverflowError")]


def test_the_sbatch_line_and_error_messages_are_masked() -> None:
    from snakemake_executor_plugin_rkslurm.executor import redact

    line = "RKSLURM_CHECKPOINT_DIR=s3://AKIDEXAMPLE:Secret123@bucket/ck sbatch --comment 'rule_sim rkslurm:abc' --wrap=\"x\""
    masked = redact(line)
    assert "Secret123" not in masked and "AKIDEXAMPLE" not in masked
    assert masked.startswith("RKSLURM_CHECKPOINT_DIR=s3://***@bucket/ck sbatch") and "rkslurm:abc" in masked
    assert redact("/plain/folder and https://host/x") == "/plain/folder and https://host/x"


def test_the_executor_reads_no_chain_file_names() -> None:
    """Progress comes from rkstep's events: the executor package does not import rkckpt.chain."""
    r = child(
        """
        import sys
        import snakemake_executor_plugin_rkslurm.executor, snakemake_executor_plugin_rkslurm.monitor
        print("rkckpt.chain" in sys.modules)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
