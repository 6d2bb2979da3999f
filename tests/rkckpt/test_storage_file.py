"""FileStorage / open_storage on real files and processes: what only the file store has (modes, lock, temp files).

The contract every store shares (names, ranges, missing objects) is test_store_conformance."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from rkckpt.storage import (
    FileStorage,
    FsspecStorage,
    LockedError,
    MemoryStorage,
    StorageError,
    TwoLevelStorage,
    open_storage,
)


def test_atomic_save_permissions(tmp_path):
    """Owner-only by default; the save/load/range/list contract itself is in test_store_conformance."""
    s = FileStorage(tmp_path / "ck")
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o700
    assert s.save("a.rkcp", b"hello world") == 11
    assert stat.S_IMODE((tmp_path / "ck" / "a.rkcp").stat().st_mode) == 0o600
    assert s.list() == ["a.rkcp"]  # lock file hidden
    assert sorted(os.listdir(tmp_path / "ck")) == [".rkckpt.lock", "a.rkcp"]  # no temp file left
    s.close()


def test_custom_modes(tmp_path):
    s = FileStorage(tmp_path / "shared", file_mode=0o640, dir_mode=0o750)
    s.save("a", b"1")
    assert stat.S_IMODE((tmp_path / "shared" / "a").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o750
    s.close()


def test_failed_writer_leaves_nothing(tmp_path):
    s = FileStorage(tmp_path / "ck")
    s.save("a", b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        s.save("a", boom)
    assert s.load("a") == b"old"
    assert sorted(os.listdir(tmp_path / "ck")) == [".rkckpt.lock", "a"]
    s.close()


def test_second_writer_gets_clear_error(tmp_path):
    a = FileStorage(tmp_path / "ck")
    a.save("x", b"1")
    b = FileStorage(tmp_path / "ck")
    with pytest.raises(LockedError, match=rf"locked by another writer \(pid {os.getpid()}\)"):
        b.save("y", b"2")
    assert b.load("x") == b"1"  # readers are never blocked
    a.close()
    b.save("y", b"2")
    b.close()


def test_lock_held_by_other_process(tmp_path):
    d = tmp_path / "ck"
    code = (
        "import sys,time; from rkckpt.storage import FileStorage;"
        f"s=FileStorage({str(d)!r}); s.acquire_lock(); print('locked', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"pid {p.pid}"):
            FileStorage(d).save("a", b"x")
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    FileStorage(d).save("a", b"x")  # released when the holder exits


def test_stale_temp_files_removed_by_next_writer(tmp_path):
    d = tmp_path / "ck"
    d.mkdir(mode=0o700)
    (d / ".rkckpt-tmp-deadbeef").write_bytes(b"half a checkpoint")
    s = FileStorage(d)
    s.acquire_lock()
    assert not (d / ".rkckpt-tmp-deadbeef").exists()
    s.close()


def test_open_storage_factory(tmp_path, monkeypatch):
    monkeypatch.delenv("RKCKPT_LOCAL_DIR", raising=False)
    assert isinstance(open_storage(tmp_path / "a"), FileStorage)
    assert isinstance(open_storage(f"file://{tmp_path}/b"), FileStorage)
    m = open_storage("memory://rk-factory/run")
    assert isinstance(m, FsspecStorage)
    m.save("k", b"v")
    assert m.list() == ["k"] and m.read_range("k", 0, 1) == b"v"
    two = open_storage("memory://rk-factory/two", local=tmp_path / "node")
    assert isinstance(two, TwoLevelStorage)
    two.save("z", b"zz")
    two.flush()
    assert two.durable("z") and open_storage("memory://rk-factory/two").load("z") == b"zz"
    two.close()
    s = MemoryStorage()
    assert open_storage(s) is s


def test_url_credentials_are_redacted():
    from rkckpt.storage import redact_url

    assert redact_url("s3://AKIA:supersecret@bucket/p") == "s3://bucket/p"


class _Outage(MemoryStorage):
    """A shared store that can be switched off (stands in for an unreachable one)."""

    down = False

    def save(self, name, data):
        if self.down:
            raise StorageError(self.url + name, "connection refused")
        return super().save(name, data)

    def delete(self, name):
        if self.down:
            raise StorageError(self.url + name, "connection refused")
        super().delete(name)


def test_two_level_defers_deletes_until_newer_uploads_arrive(tmp_path):
    shared = _Outage()
    two = TwoLevelStorage(FileStorage(tmp_path / "node"), shared)
    two.save("old", b"1")
    two.flush()
    assert two.durable("old") and shared.load("old") == b"1"
    shared.down = True
    two.save("new", b"2")
    two.delete("old")  # retention after the new save: must not thin out the shared copy
    with pytest.raises(StorageError, match="not durable"):
        two.flush(retry=False)
    assert not two.durable("new")
    assert shared.exists("old") and (tmp_path / "node" / "old").exists()
    assert two.load("new") == b"2"  # the node-local copy serves reads meanwhile
    shared.down = False
    two.flush()  # retries the upload, then the delete
    assert shared.load("new") == b"2" and not shared.exists("old") and not (tmp_path / "node" / "old").exists()
    assert two.durable("new")
    two.close()
