"""Checkpoint sets that must not be restored: half-written, damaged, lying or hostile; the previous set is used.

Every window is forced deterministically: the parts of step 20 written but no
manifest, a part deleted, truncated or bit-flipped after the commit, the
manifest rewritten with each kind of lie, a FIFO or link under its name, and a
real SIGKILL of the committing process at each of its writes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import TESTS
from hostile_inputs import flip_stream_payload
from rkckpt import ckptset
from rkckpt.storage import FileStorage
from set_helpers import KID, SetWriter, global_state


@pytest.fixture
def two_sets(tmp_path: Path) -> tuple[FileStorage, ckptset.CheckpointSet]:
    """Committed sets of 2 ranks at steps 10 and 20 (the parts at 20 are deltas on 10); returns the one at 20."""
    storage = FileStorage(tmp_path / "sets")
    w = SetWriter(storage, 2)
    w.write(10)
    return storage, w.write(20)


def restores_step_10(storage: FileStorage, caplog: pytest.LogCaptureFixture, *why: str, run_id: str | None = None) -> None:
    """``latest_set`` passes over the set at 20, saying why, and the set at 10 reads back exactly."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rkckpt.ckptset"):
        s = ckptset.latest_set(storage, KID, run_id=run_id)
    assert s is not None and s.step == 10
    g = global_state(10)
    assert np.array_equal(ckptset.read_planes(storage, s, "p", 0, 12), g["p"])
    text = caplog.text
    assert ckptset.set_name(KID, 20, 2) in text
    for w in why:
        assert w in text, text


def test_parts_without_a_manifest_are_not_a_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = FileStorage(tmp_path / "half")
    w = SetWriter(storage, 2)
    w.write(10)
    w.write(20, commit=False)
    s = ckptset.latest_set(storage, KID)
    assert s is not None and s.step == 10
    assert np.array_equal(ckptset.read_planes(storage, s, "q", 3, 9), global_state(10)["q"][3:9])


def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


_flip = flip_stream_payload


@pytest.mark.parametrize(("damage", "why"), [(Path.unlink, "is missing"), (_truncate, "part 1"), (_flip, "part 1")])
def test_a_damaged_part_skips_its_set(two_sets, caplog, damage: Callable[[Path], None], why: str) -> None:
    storage, s20 = two_sets
    damage(storage.path(s20.parts[1].name))
    restores_step_10(storage, caplog, s20.parts[1].name, why)


def _part(i: int, **kw: object) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        doc["parts"][i].update(kw)

    return mutate


def _set(**kw: object) -> Callable[[dict], None]:
    return lambda doc: doc.update(kw)


def _both(*fs: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        for f in fs:
            f(doc)

    return mutate


LIES = {
    "wrong digest": (_part(0, digest="deadbeef"), "the manifest says deadbeef"),
    "wrong plane ranges": (_both(_part(0, z1=5), _part(1, z0=5)), "which has only 7 planes"),
    "offset past the part": (_part(1, offset=10**6), "which has only 7 planes"),
    "fewer parts than ranks": (lambda d: d["parts"].pop(), "1 parts listed for 2 ranks"),
    "ranks unlike its name": (_set(ranks=3), "its name says otherwise"),
    "overlapping planes": (_part(1, z0=4), "overlaps the previous part"),
    "gapped planes": (_part(1, z0=8), "leaves a gap"),
    "huge nz": (_set(nz=10**30), "nz is"),
    "huge plane": (_part(1, z1=2**63), "z1 is"),
    "huge offset": (_part(0, offset=2**62), "offset is"),
    "float nz": (_set(nz=12.0), "nz is 12.0"),
    "bool rank": (_part(0, rank=True), "rank is True"),
    "nz unlike the parts": (_set(nz=11), "z1 is 12"),
    "other kernel's file": (_part(0, name="other-000000000020-full.rk.h5"), "is not a checkpoint of wave.r0of2"),
    "path in a part name": (_part(0, name="../wave.r0of2-000000000020-full.rk.h5"), "is not a checkpoint of"),
    "other step's file": (_part(0, name="wave.r0of2-000000000010-full.rk.h5"), "at step 20"),
    "not a digest": (_part(0, digest=["x"]), "is not a hex digest"),
    "no parts": (_set(parts=None), "no parts listed"),
    "not our format": (_set(format="zip"), "not a version 1 rkckpt-set manifest"),
    "run_id not text": (_set(run_id={"a": 1}), "run_id is"),
    "kernel unlike its name": (_set(kernel_id="other"), "its name says otherwise"),
    "no decomposed regions": (_set(decomposed=[]), "decomposed is not"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_manifest_that_lies_is_skipped(two_sets, caplog, lie: str) -> None:
    storage, s20 = two_sets
    mutate, why = LIES[lie]
    path = storage.path(str(s20.name))
    doc = json.loads(path.read_bytes())
    mutate(doc)
    path.write_text(json.dumps(doc))
    restores_step_10(storage, caplog, why)


RAW = {
    "not JSON": (b"{not json", "not valid JSON"),
    "binary": (bytes(range(256)), "not valid JSON"),
    "deep nesting": (b"[" * 100_000, "nested deeper"),
    "over 1 MiB": (b"{}" + b" " * (1 << 20), "more than the 1048576 allowed"),
    "a list": (b"[1, 2]", "not a version 1"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(RAW))
def test_a_hostile_manifest_file_is_skipped(two_sets, caplog, kind: str) -> None:
    storage, s20 = two_sets
    data, why = RAW[kind]
    storage.path(str(s20.name)).write_bytes(data)
    restores_step_10(storage, caplog, why)


def test_a_fifo_under_the_manifest_name_never_blocks(two_sets, caplog) -> None:
    storage, s20 = two_sets
    path = storage.path(str(s20.name))
    path.unlink()
    os.mkfifo(path)
    restores_step_10(storage, caplog, "not a regular file")


def test_a_folder_under_the_manifest_name_is_skipped(two_sets, caplog) -> None:
    storage, s20 = two_sets
    path = storage.path(str(s20.name))
    path.unlink()
    path.mkdir()
    restores_step_10(storage, caplog, "not a regular file")


def test_a_symlink_under_the_manifest_name_is_refused(two_sets, caplog, tmp_path: Path) -> None:
    storage, s20 = two_sets
    path = storage.path(str(s20.name))
    elsewhere = tmp_path / "planted.json"
    elsewhere.write_bytes(path.read_bytes())  # a perfectly valid manifest, but not one the folder holds
    path.unlink()
    path.symlink_to(elsewhere)
    restores_step_10(storage, caplog, "a symbolic link")


def test_sets_of_another_run_are_not_mixed_in(tmp_path: Path, caplog) -> None:
    storage = FileStorage(tmp_path / "runs")
    SetWriter(storage, 2, run_id="run-a").write(10)
    SetWriter(storage, 2, run_id="run-b").write(20)
    restores_step_10(storage, caplog, "written by run 'run-b', not this run 'run-a'", run_id="run-a")
    assert ckptset.latest_set(storage, KID).step == 20  # without a run to match, the newest set


def test_commit_refuses_a_set_it_cannot_vouch_for(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "refuse")
    w = SetWriter(storage, 2)
    s = w.write(10, commit=False)
    bad = {
        "gap": ckptset.CheckpointSet(**{**s.__dict__, "parts": (s.parts[0], ckptset.Part(**{**s.parts[1].__dict__, "z0": 7}))}),
        "digest": ckptset.CheckpointSet(
            **{**s.__dict__, "parts": (ckptset.Part(**{**s.parts[0].__dict__, "digest": "0badf00d"}), s.parts[1])}
        ),
        "ranks": ckptset.CheckpointSet(**{**s.__dict__, "parts": s.parts[:1]}),
    }
    for why, b in bad.items():
        with pytest.raises(ckptset.SetError, match="refusing to commit"):
            ckptset.commit_set(storage, b)
        assert not [n for n in storage.list() if n.endswith(ckptset.SET_SUFFIX)], why
    storage.path(s.parts[1].name).unlink()
    with pytest.raises(ckptset.SetError, match="part 1 is missing"):
        ckptset.commit_set(storage, s)


KILLER = """
import sys
sys.path.insert(0, {tests!r})
from set_helpers import SetWriter
from rkckpt.storage import FileStorage
w = SetWriter(FileStorage({folder!r}), 2)
w.write(10)
w.write(20)
print("not killed")
"""


@pytest.mark.parametrize("nth", [4, 5, 6])
def test_a_sigkill_at_any_write_of_a_commit_leaves_the_previous_set(tmp_path: Path, nth: int) -> None:
    """Writes 1-3 are set 10 (two parts, manifest); 4 and 5 are the parts of set 20, 6 its manifest."""
    folder = tmp_path / "killed"
    env = {**os.environ, "RKSLURM_TEST_SIGNAL": f"write:SIGKILL:{nth}"}
    code = KILLER.format(tests=str(TESTS), folder=str(folder))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    storage = FileStorage(folder)
    s = ckptset.latest_set(storage, KID)
    assert s is not None and s.step == 10
    assert np.array_equal(ckptset.read_planes(storage, s, "p", 0, 12), global_state(10)["p"])
    assert not [n for n in storage.list() if n.endswith(ckptset.SET_SUFFIX) and "-000000000020-" in n]


def test_header_checks_alone_catch_missing_parts_and_wrong_digests(two_sets, caplog) -> None:
    """``full=False`` (each rank reads only its planes) still refuses a set whose part is gone or not the one committed."""
    storage, s20 = two_sets
    path = storage.path(str(s20.name))
    doc = json.loads(path.read_bytes())
    doc["parts"][1]["digest"] = "0badf00d"
    path.write_text(json.dumps(doc))
    assert ckptset.latest_set(storage, KID, full=False).step == 10
    storage.path(s20.parts[0].name).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rkckpt.ckptset"):
        assert ckptset.latest_set(storage, KID, full=False).step == 10
    assert "part 0 is missing" in caplog.text


def test_gc_never_counts_a_set_with_a_corrupt_part_as_kept(tmp_path: Path, caplog) -> None:
    """A flipped payload bit leaves perfect headers: gc reads the kept sets in full before deleting older ones."""
    storage = FileStorage(tmp_path / "gcbad")
    w = SetWriter(storage, 2, full_every=0)  # every part a full: set 10 needs nothing of set 20
    w.write(10)
    s20 = w.write(20)
    _flip(storage.path(s20.parts[0].name))
    with caplog.at_level(logging.WARNING, logger="rkckpt.ckptset"):
        assert ckptset.gc_sets(storage, KID, 1) == []
    assert "not counting checkpoint set" in caplog.text and s20.parts[0].name in caplog.text
    restores_step_10(storage, caplog, "part 0")
    w.write(30)
    assert ckptset.set_name(KID, 20, 2) in ckptset.gc_sets(storage, KID, 1), "a good newer set supersedes both"
