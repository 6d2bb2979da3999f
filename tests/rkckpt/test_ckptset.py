"""Checkpoint sets: parts written by N ranks, committed last, read back on M ranks bit for bit, on every back end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rkckpt import ckptset
from rkckpt.storage import FileStorage, FsspecStorage, MemoryStorage, TwoLevelStorage, open_storage
from set_helpers import DECOMPOSED, KID, NZ, SetWriter, assert_reads_back, global_state, local_state, split, write_plain


def _store(kind: str, tmp_path: Path):  # noqa: ANN202
    if kind == "file":
        return FileStorage(tmp_path / "f")
    if kind == "memory":
        return MemoryStorage()
    if kind == "fsspec":
        return FsspecStorage(f"memory://sets-{os.getpid()}-{tmp_path.name}")
    return TwoLevelStorage(FileStorage(tmp_path / "local"), FileStorage(tmp_path / "shared"))


@pytest.mark.parametrize("kind", ["file", "memory", "fsspec", "twolevel"])
@pytest.mark.parametrize(("n", "m"), [(4, 2), (2, 3)])
def test_a_set_of_n_parts_reads_back_on_m_ranks(tmp_path: Path, kind: str, n: int, m: int) -> None:
    storage = _store(kind, tmp_path)
    w = SetWriter(storage, n)
    for step in (10, 11, 12):
        w.write(step)
    s = ckptset.latest_set(storage, KID)
    assert s is not None and (s.step, s.ranks, s.run_id) == (12, n, "run-a")
    assert s.name == ckptset.set_name(KID, 12, n)
    assert any(p.name.endswith("-delta.rk.h5") for p in s.parts), "some part must be a delta chain"
    assert_reads_back(storage, s, 12, m)
    for r, p in enumerate(s.parts):  # each part's materialised state is exactly what the rank handed in
        want, _ = local_state(global_state(12), 12, r, n)
        assert ckptset.part_checkpoint(storage, s, r).content_digest() == want.content_digest() == p.digest


def test_a_plain_chain_is_a_one_part_set_read_as_four_slabs(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "plain")
    write_plain(storage, [5, 6])
    s = ckptset.latest_set(storage, KID)
    assert s is not None and s.name is None and (s.step, s.ranks, s.nz) == (6, 1, NZ)
    assert s.decomposed == DECOMPOSED
    assert s.parts[0].name.endswith("-delta.rk.h5")
    assert_reads_back(storage, s, 6, 4)


def test_the_newer_of_plain_chain_and_set_wins(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "mix")
    write_plain(storage, [5])
    assert ckptset.latest_set(storage, KID).name is None
    SetWriter(storage, 2).write(8)
    s = ckptset.latest_set(storage, KID)
    assert (s.step, s.ranks) == (8, 2)
    assert_reads_back(storage, s, 8, 1)


class CountingStorage(MemoryStorage):
    """Memory storage that records which objects were read (whole or by range)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def load(self, name: str) -> bytes:
        self.read.add(name)
        return super().load(name)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.read.add(name)
        return super().read_range(name, offset, length)


def test_read_planes_opens_only_the_parts_that_own_them() -> None:
    storage = CountingStorage()
    w = SetWriter(storage, 4)
    w.write(10)
    s = w.write(11)
    touched = {}
    for z0, z1 in split(NZ, 2):  # rank 0 of 2 owns parts 0 and 1 of 4; rank 1 owns parts 2 and 3
        storage.read.clear()
        got = ckptset.read_planes(storage, s, "p", z0, z1)
        assert np.array_equal(got, global_state(11)["p"][z0:z1])
        touched[(z0, z1)] = {n.split("-")[0] for n in storage.read if n.endswith(".rk.h5")}
    assert touched == {(0, 6): {f"{KID}.r0of4", f"{KID}.r1of4"}, (6, 12): {f"{KID}.r2of4", f"{KID}.r3of4"}}


def test_read_planes_refuses_bad_requests(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "req")
    s = SetWriter(storage, 2).write(3)
    with pytest.raises(ValueError, match="not decomposed"):
        ckptset.read_planes(storage, s, "t", 0, 1)
    with pytest.raises(ValueError, match="within"):
        ckptset.read_planes(storage, s, "p", 5, 99)
    with pytest.raises(ValueError, match="decomposed"):
        ckptset.read_replicated(storage, s, "p")


def test_parts_on_s3_and_two_level_over_s3(s3_server, tmp_path: Path) -> None:
    url = f"s3://{s3_server.bucket()}/sets"
    s3 = open_storage(url, **s3_server.options())
    SetWriter(s3, 4).write(20)
    s = ckptset.latest_set(s3, KID)
    assert s is not None and s.step == 20
    assert_reads_back(s3, s, 20, 2)
    s3.save(ckptset.set_name(KID, 30, 4), b"{" + b" " * (2 << 20) + b"}")  # a newer "manifest" of 2 MiB: never loaded
    assert ckptset.latest_set(s3, KID) == s
    two = TwoLevelStorage(FileStorage(tmp_path / "node"), open_storage(url, **s3_server.options()))
    SetWriter(two, 2).write(21)  # commit_set flushes: the manifest is durable on S3 when it returns
    fresh = open_storage(url, **s3_server.options())
    s = ckptset.latest_set(fresh, KID)
    assert s is not None and (s.step, s.ranks) == (21, 2)
    assert_reads_back(fresh, s, 21, 3)
    two.close()


# ---------------------------------------------------------------- retention
def test_a_part_manager_with_retention_off_deletes_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "off")
    w = SetWriter(storage, 2, full_every=0)  # a full every time: plain retention would drop old chains
    for step in range(1, 6):
        w.write(step)
    assert len([n for n in storage.list() if n.endswith(".rk.h5")]) == 10


def test_gc_sets_keeps_the_newest_sets_and_everything_their_chains_need(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "gc")
    w = SetWriter(storage, 2)
    for step in (10, 11, 12, 13):
        w.write(step)
    w.write(14, commit=False)  # parts of a set in flight
    deleted = ckptset.gc_sets(storage, KID, 2)
    names = set(storage.list())
    assert ckptset.set_name(KID, 10, 2) in deleted and ckptset.set_name(KID, 11, 2) in deleted
    assert {ckptset.set_name(KID, 12, 2), ckptset.set_name(KID, 13, 2)} <= names
    assert {int(n.split("-")[1]) for n in deleted} == {10, 11}, "only what the two oldest sets alone needed"
    assert [n for n in names if "-000000000014-" in n], "the in-flight parts stay"
    for step in (12, 13):  # every kept set still restores, bit for bit
        s = ckptset.read_manifest(storage, ckptset.set_name(KID, step, 2))
        ckptset.verify_set(storage, s)
        assert_reads_back(storage, s, step, 3)
    assert ckptset.gc_sets(storage, KID, 2) == []


def test_gc_sets_deletes_nothing_without_more_valid_sets_than_kept(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "few")
    w = SetWriter(storage, 2)
    w.write(1)
    w.write(2)
    before = set(storage.list())
    assert ckptset.gc_sets(storage, KID, 2) == []
    assert set(storage.list()) == before


def test_committing_again_is_idempotent_and_a_stale_manifest_is_replaced(tmp_path: Path, caplog) -> None:
    storage = FileStorage(tmp_path / "again")
    w = SetWriter(storage, 2)
    s = w.write(10)
    assert ckptset.commit_set(storage, s) == s.name  # the same set again: nothing changes
    storage.path(str(s.name)).write_text('{"format": "rkckpt-set", "version": 1, "run_id": "old"}')
    with caplog.at_level("WARNING", logger="rkckpt.ckptset"):
        assert ckptset.commit_set(storage, s) == s.name
    assert "replacing the manifest" in caplog.text
    assert ckptset.latest_set(storage, KID) == s


class RangeLog(MemoryStorage):
    """Memory storage that logs every read: (name, offset or 'load', length)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, object, int]] = []

    def load(self, name: str) -> bytes:
        data = super().load(name)
        self.reads.append((name, "load", len(data)))
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        self.reads.append((name, offset, length))
        return self._objects[name][offset : offset + length]

    def size(self, name: str) -> int:  # MemoryStorage answers it with a load: not a read of the object
        return len(self._objects[name])


def test_a_full_part_is_read_plane_by_plane() -> None:
    """A part that is one full checkpoint with raw chunks: the planes asked for are one range read, not the region."""
    storage = RangeLog()
    s = SetWriter(storage, 2).write(10)
    storage.reads.clear()
    got = ckptset.read_planes(storage, s, "q", 3, 5)
    assert np.array_equal(got, global_state(10)["q"][3:5])
    part = [r for r in storage.reads if r[0] == s.parts[0].name]
    plane = 6 * 5 * 8
    assert not [r for r in part if r[1] == "load"], "never the whole file"
    assert (s.parts[0].name, 2 * plane) in [(n, ln) for n, _, ln in part], "the two planes in one read"
    assert sum(r[2] for r in part) < storage.size(s.parts[0].name), "less than the file (its HDF5 structure comes in 4 KiB reads)"


def test_an_elastic_restart_writes_sets_of_another_rank_count(tmp_path: Path) -> None:
    """4 ranks wrote sets at 10 and 11; the run went on with 2 ranks from 11: gc removes the 4-rank files once superseded."""
    storage = FileStorage(tmp_path / "elastic")
    four = SetWriter(storage, 4)
    four.write(10)
    four.write(11)
    two = SetWriter(storage, 2)
    two.write(12)
    s = ckptset.latest_set(storage, KID)
    assert (s.step, s.ranks) == (12, 2)
    assert ckptset.gc_sets(storage, KID, 2) == [ckptset.set_name(KID, 10, 4)], "set 11's parts are deltas on 10's"
    ckptset.verify_set(storage, ckptset.read_manifest(storage, ckptset.set_name(KID, 11, 4)))
    two.write(13)
    ckptset.gc_sets(storage, KID, 2)
    assert not [n for n in storage.list() if "of4" in n or "set4" in n]
    assert_reads_back(storage, ckptset.latest_set(storage, KID), 13, 3)
