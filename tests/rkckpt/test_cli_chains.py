"""``rkckpt ls / latest / gc`` on real checkpoint folders."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import chain_state
from rkckpt.cli import main
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
from rkckpt.model import Checkpoint
from rkckpt.storage import open_storage

KID = "cli"


def state(step: int) -> Checkpoint:
    return chain_state(KID, step, big=8192, small=64, small_dtype=np.int32)


def name(step: int, kind: str) -> str:
    return f"{KID}-{step:012d}-{kind}.rk.h5"


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ck"
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=2, keep_chains=10), KID) as m:
        for s in range(1, 6):  # full 1, delta 2 3, full 4, delta 5
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_ls_json_and_table(folder):
    r = run("ls", folder, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["step"], x["kind"], x["valid"]) for x in rows] == [
        (1, "full", True),
        (2, "delta", True),
        (3, "delta", True),
        (4, "full", True),
        (5, "delta", True),
    ]
    assert rows[1]["parent"] == name(1, "full") and rows[2]["parent"] == name(2, "delta") and rows[0]["parent"] is None
    assert all(x["size"] > 0 and len(x["digest"]) == 8 for x in rows)
    t = run("ls", folder)
    assert t.exit_code == 0
    for col in ("step", "kind", "size", "digest", "parent", "valid?"):
        assert col in t.output
    assert name(2, "delta") in t.output


def test_latest_json_and_fallback(folder):
    r = run("latest", folder, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["step"] == 5 and doc["path"] == str(folder / name(5, "delta"))
    assert doc["chain"] == [str(folder / name(4, "full")), str(folder / name(5, "delta"))] and doc["skipped"] == []
    # break the newest full: the newest restorable point is step 3, and ls marks what is broken
    p = folder / name(4, "full")
    p.write_bytes(p.read_bytes()[:-1])
    doc = json.loads(run("latest", folder, "--json").output)
    assert doc["step"] == 3 and doc["chain"][0].endswith(name(1, "full"))
    assert [s["path"] for s in doc["skipped"]] == [str(folder / name(5, "delta")), str(folder / name(4, "full"))]
    assert "truncated" in doc["skipped"][1]["reason"]
    rows = {x["name"]: x for x in json.loads(run("ls", folder, "--json").output)}
    assert not rows[name(4, "full")]["valid"] and "truncated" in rows[name(4, "full")]["problem"]
    assert not rows[name(5, "delta")]["valid"]
    assert rows[name(3, "delta")]["valid"]
    human = run("latest", folder)
    assert human.exit_code == 0 and name(3, "delta") in human.output


def test_latest_exit_3_when_nothing_restorable(tmp_path):
    (tmp_path / "e").mkdir()
    r = run("latest", tmp_path / "e", "--json")
    assert r.exit_code == 3 and json.loads(r.output)["path"] is None
    (tmp_path / "e" / name(1, "full")).write_bytes(b"RKCKPT01 nope")
    r = run("latest", tmp_path / "e", "--json")
    assert r.exit_code == 3 and json.loads(r.output)["skipped"][0]["path"].endswith(name(1, "full"))
    # also through the installed entry point
    exe = shutil.which("rkckpt")
    if exe is not None:
        p = subprocess.run([exe, "latest", str(tmp_path / "e")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 3 and "nothing restorable" in p.stderr


def test_latest_missing_folder_means_nothing_restorable(tmp_path):
    r = CliRunner().invoke(main, ["latest", str(tmp_path / "nope")])
    assert r.exit_code == 3 and "nothing restorable" in r.output
    assert not (tmp_path / "nope").exists()  # read-only commands create nothing


def test_gc_keeps_newest_chains(folder):
    r = run("gc", folder, "--keep", 1, "--dry-run")
    assert r.exit_code == 0 and "would delete" in r.output
    assert (folder / name(1, "full")).exists()
    r = run("gc", folder, "--keep", 1)
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in folder.glob("*.rk.h5"))
    assert left == [name(4, "full"), name(5, "delta")]
    assert json.loads(run("latest", folder, "--json").output)["step"] == 5
    assert run("gc", folder, "--keep", 0).exit_code == 2  # usage error


def test_gc_refuses_while_a_writer_holds_the_folder(folder):
    with CheckpointManager(folder, CheckpointPolicy(every_steps=1), KID):
        r = CliRunner().invoke(main, ["gc", str(folder), "--keep", "1"])
        assert r.exit_code == 1 and "locked by another writer" in r.output


@pytest.mark.s3
def test_ls_and_latest_on_s3_url(s3_server, monkeypatch):
    url = f"s3://{s3_server.bucket()}/cli"
    with CheckpointManager(open_storage(url, **s3_server.options()), CheckpointPolicy(every_steps=1, full_every=2), KID) as m:
        for s in range(1, 4):
            m.submit(SnapshotResponse(SnapshotRequest(s), state(s)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("RKCKPT_LOCAL_DIR", "/nonexistent/should-not-be-used")
    rows = json.loads(run("ls", url, "--json").output)
    assert [(x["step"], x["kind"], x["valid"]) for x in rows] == [(1, "full", True), (2, "delta", True), (3, "delta", True)]
    doc = json.loads(run("latest", url, "--json").output)
    assert doc["step"] == 3 and doc["chain"] == [f"{url}/{name(1, 'full')}", f"{url}/{name(2, 'delta')}", f"{url}/{name(3, 'delta')}"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret-value")
    r = CliRunner().invoke(main, ["latest", url, "--json"])
    assert r.exit_code == 1 and "not-the-right-secret-value" not in r.output and "Error" in r.output
