"""``rkckpt ls / latest / verify / gc`` on folders holding checkpoint sets: a set is one row, valid only if all its parts are."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rkckpt import ckptset
from rkckpt.cli import main
from rkckpt.storage import FileStorage
from set_helpers import KID, SetWriter, global_state, write_plain


def run(*args: object):  # noqa: ANN201
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A plain chain at steps 1-2, sets of 2 ranks at 10, 20, 30 (30's part 1 truncated), parts of 40 not committed."""
    d = tmp_path / "ck"
    storage = FileStorage(d)
    write_plain(storage, [1, 2])
    w = SetWriter(storage, 2)
    for step in (10, 20):
        w.write(step)
    broken = w.write(30).parts[1].name
    os.truncate(storage.path(broken), 200)
    w.write(40, commit=False)
    storage.close()  # release the writer lock: the CLI runs as another writer would
    return d


def test_ls_shows_each_set_as_one_row(folder: Path) -> None:
    r = run("ls", "--json", folder)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert not [d for d in rows if ".r0of2" in d["name"] or ".r1of2" in d["name"]], "part files are not rows of their own"
    sets = {d["step"]: d for d in rows if d["kind"] == "set"}
    assert sorted(sets) == [10, 20, 30]
    assert sets[10]["valid"] and sets[20]["valid"] and sets[10]["ranks"] == 2 and len(sets[10]["parts"]) == 2
    assert not sets[30]["valid"] and "wave.r1of2-000000000030-" in sets[30]["problem"] and "part 1" in sets[30]["problem"]
    assert [d["kind"] for d in rows if d["kind"] != "set"] == ["full", "delta"]  # the plain chain, as before
    table = run("ls", folder).output
    assert "set of 2 parts" in table and "NO: wave.r1of2-000000000030" in table


def test_latest_names_the_newest_restorable_set(folder: Path) -> None:
    r = run("latest", "--json", "--kernel", KID, folder)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["step"] == 20 and doc["path"].endswith(ckptset.set_name(KID, 20, 2)) and doc["set"]["ranks"] == 2
    assert doc["skipped"][0]["path"].endswith(ckptset.set_name(KID, 30, 2))
    plain = run("latest", folder)
    assert f"{ckptset.set_name(KID, 20, 2)}\tstep 20\tset of 2 parts" in plain.output
    assert "skipped" in plain.output and "part 1" in plain.output


def test_latest_falls_back_to_the_plain_chain(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "p")
    write_plain(storage, [3])
    storage.close()
    doc = json.loads(run("latest", "--json", tmp_path / "p").output)
    assert doc["step"] == 3 and "set" not in doc and len(doc["chain"]) == 1


def test_verify_checks_every_part_of_every_set(folder: Path) -> None:
    r = run("verify", "-q", folder)
    assert r.exit_code == 1
    bad = [line for line in r.output.splitlines() if line.startswith("BAD")]
    assert any(ckptset.set_name(KID, 30, 2) in line and "part 1" in line for line in bad), r.output
    assert not any(ckptset.set_name(KID, 20, 2) in line for line in bad)
    ok = run("verify", folder / ckptset.set_name(KID, 20, 2))
    assert ok.exit_code == 0 and "set of 2 parts" in ok.output
    os.truncate(folder / "wave.r0of2-000000000010-full.rk.h5", 100)  # the root every later part's chain needs
    r = run("verify", folder / ckptset.set_name(KID, 20, 2))
    assert r.exit_code == 1 and "wave.r0of2-" in r.output


def test_verify_reports_a_hostile_manifest_in_one_line(folder: Path) -> None:
    (folder / ckptset.set_name(KID, 20, 2)).write_bytes(b"[" * 50_000)
    r = run("verify", folder / ckptset.set_name(KID, 20, 2))
    assert r.exit_code == 1 and "nested deeper" in r.output and "Traceback" not in r.output


def test_gc_is_set_aware(folder: Path) -> None:
    dry = run("gc", "--keep", "1", "--dry-run", folder)
    assert dry.exit_code == 0, dry.output
    assert dry.output.splitlines()[0].endswith(ckptset.set_name(KID, 10, 2)), "a set's manifest goes before its parts"
    r = run("gc", "--keep", "1", folder)
    assert r.exit_code == 0, r.output
    names = set(os.listdir(folder))
    assert ckptset.set_name(KID, 20, 2) in names and ckptset.set_name(KID, 10, 2) not in names
    assert "wave-000000000001-full.rk.h5" not in names, "the plain chain a newer set supersedes goes"
    assert {n for n in names if "-000000000040-" in n}, "uncommitted newer parts stay"
    storage = FileStorage(folder, create=False)
    s = ckptset.latest_set(storage, KID)
    assert s is not None and s.step == 20
    assert np.array_equal(ckptset.read_planes(storage, s, "p", 0, 12), global_state(20)["p"])


def test_gc_refuses_a_part_kernel(folder: Path) -> None:
    r = CliRunner().invoke(main, ["gc", "--keep", "1", "--kernel", "wave.r0of2", str(folder)])
    assert r.exit_code == 2 and "part of checkpoint sets" in r.output


def test_plain_gc_never_collects_part_chains(tmp_path: Path) -> None:
    """Parts are many fulls in a row (full_every=0); plain retention alone would keep only the newest of each."""
    d = tmp_path / "parts"
    storage = FileStorage(d)
    w = SetWriter(storage, 2, full_every=0)
    for step in (1, 2, 3):
        w.write(step, commit=step < 3)
    storage.close()
    before = {n for n in os.listdir(d) if n.endswith(".rk.h5")}
    r = run("gc", "--keep", "2", d)
    assert r.exit_code == 0, r.output
    assert {n for n in os.listdir(d) if n.endswith(".rk.h5")} == before
