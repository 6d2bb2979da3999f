"""One contract, every back end: ``StoreTests`` runs the same tests against each ``Storage``.

As zarr's ``StoreTests``: a back end joins by subclassing and providing the
``store`` fixture, so file, memory, S3 (the real loopback SeaweedFS server of
``fixtures_s3``) and two-level storage cannot drift apart on what ``save``,
``create``, ``read_range``, a missing object or a hostile name mean. What only
one back end has (file modes, the writer lock, two-level durability, S3
secrets) stays in that back end's own test file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rkckpt.storage import (
    ExistsError,
    FileStorage,
    InvalidNameError,
    MemoryStorage,
    Storage,
    StorageError,
    TwoLevelStorage,
    open_storage,
)

#: Names that could escape the folder or are unprintable: every operation refuses them before touching anything.
HOSTILE_NAMES = ["../x", "a/b", "..", ".", "", "a\\b", "x\x00y", "new\nline", "tab\tname", "a..b", "/abs", "\x7f", "n" * 201]

#: Larger than S3's multipart part and than a read block: an object no back end can hold in one piece.
LARGE = (5 << 20) + 4099


def _pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(251)) * (n // 251) + bytes(i * 7 % 251 for i in range(n % 251))


class StoreTests:
    """The ``Storage`` contract; subclasses provide the ``store`` fixture (a fresh, empty store)."""

    @pytest.fixture
    def store(self) -> Iterator[Storage]:
        raise NotImplementedError

    def test_is_a_storage(self, store: Storage) -> None:
        assert isinstance(store, Storage) and store.list() == []

    def test_saved_is_durable_once_flushed(self, store: Storage) -> None:
        """What a commit record relies on: after ``wait_uploaded`` and ``flush`` a saved object is durable
        and no transfer of it is said to have failed (two-level: it is in the shared store)."""
        store.save("part", b"p" * 100)
        store.wait_uploaded(["part"], timeout=30)
        store.flush(timeout=30)
        assert store.durable("part") and store.upload_failed("part") is None
        assert store.retry() == 0  # nothing failed, nothing queued again

    def test_save_bytes_or_writer_and_load(self, store: Storage) -> None:
        assert store.save("one", b"0123456789") == 10
        assert store.save("two", lambda f: f.write(b"y" * 7000)) == 7000
        assert store.load("one") == b"0123456789"
        with store.open_read("two") as f:
            assert f.read() == b"y" * 7000

    def test_save_replaces_create_never_does(self, store: Storage) -> None:
        store.save("a", b"old")
        store.save("a", b"new")
        assert store.load("a") == b"new"
        with pytest.raises(ExistsError, match="refusing to replace"):
            store.create("a", b"other")
        assert store.load("a") == b"new"
        assert store.create("b", b"bb") == 2 and store.load("b") == b"bb"

    def test_read_range_bounds(self, store: Storage) -> None:
        store.save("r", b"0123456789")
        assert store.read_range("r", 3, 4) == b"3456"
        assert store.read_range("r", 0, 10) == b"0123456789"
        assert store.read_range("r", 8, 10) == b"89"  # past the end: what is there
        assert store.read_range("r", 10, 5) == b"" and store.read_range("r", 50, 5) == b""
        assert store.read_range("r", 4, 0) == b""
        for offset, length in ((-1, 5), (2, -1)):  # a caller's bug, never "from the end"
            with pytest.raises(StorageError, match="bad byte range"):
                store.read_range("r", offset, length)

    def test_size_exists_list_delete(self, store: Storage) -> None:
        store.save("b", b"12345")
        store.save("a", b"")
        assert store.size("b") == 5 and store.size("a") == 0
        assert store.exists("a") and store.exists("b") and not store.exists("c")
        assert store.list() == ["a", "b"]
        store.delete("a")
        store.flush()  # two-level: a delete waits in the queue behind the uploads
        assert not store.exists("a") and store.list() == ["b"]
        store.delete("a")  # deleting what is gone is not an error: retention may run twice

    def test_zero_length_object(self, store: Storage) -> None:
        assert store.create("empty", b"") == 0
        assert store.load("empty") == b"" and store.size("empty") == 0 and store.read_range("empty", 0, 10) == b""

    def test_large_object(self, store: Storage) -> None:
        data = _pattern(LARGE)
        assert store.save("big", lambda f: [f.write(data[i : i + (1 << 20)]) for i in range(0, LARGE, 1 << 20)]) == LARGE
        assert store.size("big") == LARGE
        edge = 5 << 20
        assert store.read_range("big", edge - 3, 10) == data[edge - 3 : edge + 7]
        assert store.read_range("big", LARGE - 5, 100) == data[-5:]
        assert store.load("big") == data

    @pytest.mark.parametrize("op", ["load", "size", "read_range", "open_read"])
    def test_missing_object_is_a_typed_error_naming_it(self, store: Storage, op: str) -> None:
        args = {"read_range": (0, 1)}.get(op, ())
        with pytest.raises(StorageError, match="nothere"):
            getattr(store, op)("nothere", *args)

    def test_hostile_names_are_refused_by_every_operation(self, store: Storage) -> None:
        """Every name in ``HOSTILE_NAMES`` through every operation (one test: the store is listed once, at the end)."""
        calls = {
            "save": (b"x",),
            "create": (b"x",),
            "load": (),
            "read_range": (0, 1),
            "size": (),
            "exists": (),
            "delete": (),
            "open_read": (),
        }
        for name in HOSTILE_NAMES:
            for op, args in calls.items():
                with pytest.raises(InvalidNameError, match="checkpoint name"):
                    getattr(store, op)(name, *args)
        assert store.list() == []


def _serve(store: Storage) -> Iterator[Storage]:
    """Yield ``store`` to one test, then flush (two-level: uploads and queued deletes) and close it."""
    yield store
    store.flush()
    store.close()


class TestFileStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path) -> Iterator[Storage]:
        yield from _serve(FileStorage(tmp_path / "ck"))
        assert not (tmp_path / "x").exists()  # no hostile name reached the parent folder


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self) -> Iterator[Storage]:
        yield from _serve(MemoryStorage())


class TestFsspecMemoryStore(StoreTests):
    """fsspec's in-memory filesystem: the remote back end's code without a server."""

    @pytest.fixture
    def store(self, request) -> Iterator[Storage]:
        yield from _serve(open_storage(f"memory://rk-conformance/{request.node.name.encode().hex()[:40]}"))


@pytest.mark.s3
class TestS3Store(StoreTests):
    @pytest.fixture
    def store(self, s3_server) -> Iterator[Storage]:
        yield from _serve(open_storage(f"s3://{s3_server.bucket()}/conf", **s3_server.options()))


@pytest.mark.s3
class TestTwoLevelStore(StoreTests):
    """Node-local folder in front of the real S3 store; what the node keeps must have reached S3 by the end."""

    @pytest.fixture
    def store(self, s3_server, tmp_path) -> Iterator[Storage]:
        shared = open_storage(f"s3://{s3_server.bucket()}/two", **s3_server.options())
        two = TwoLevelStorage(FileStorage(tmp_path / "node"), shared)
        yield from _serve(two)
        kept = two.local.list()
        assert [n for n in shared.list() if n in kept] == kept
