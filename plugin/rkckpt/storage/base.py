"""The storage interface every back end implements, and name validation.

Checkpoint code never builds paths itself: it hands a flat *name* to a
``Storage``. Keeping names flat and validated in one place is what makes path
traversal impossible whichever back end sits underneath.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol, TypeVar, runtime_checkable

from ..errors import CheckpointError

#: A writer callback streams the object's bytes into the file it is given.
Writer = Callable[[BinaryIO], None]
Payload = bytes | bytearray | memoryview | Writer

log = logging.getLogger("rkckpt.storage")
T = TypeVar("T")

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
MAX_NAME = 200


class StorageError(CheckpointError):
    """A storage operation failed (I/O error, missing object, full disk...)."""


class InvalidNameError(StorageError):
    """A checkpoint name that could escape its folder or is unprintable."""


class LockedError(StorageError):
    """Another writer holds the checkpoint folder."""


class UnsafeFolderError(StorageError):
    """A checkpoint folder (or its lock file) that someone else could tamper with."""


class ListingError(StorageError):
    """The store could not be listed (after retries): unknown, which is not the same as empty."""


class ExistsError(StorageError):
    """``create`` found an object under the name already: checkpoints are never replaced.

    A checkpoint name is its step and kind; replacing one would swap a link of
    a chain that later deltas (and restore points) depend on.
    """


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe flat object name, else raise ``InvalidNameError``."""
    if not isinstance(name, str):
        raise InvalidNameError(None, f"checkpoint name must be a string, got {type(name).__name__}")
    if not name or name in (".", "..") or ".." in name:
        raise InvalidNameError(name, "invalid checkpoint name: empty or contains '..'")
    if _BAD_NAME.search(name):
        raise InvalidNameError(repr(name), "invalid checkpoint name: path separators and control characters are not allowed")
    if len(name) > MAX_NAME:
        raise InvalidNameError(name[:40] + "...", f"invalid checkpoint name: longer than {MAX_NAME} characters")
    return name


def check_range(name: str, offset: int, length: int) -> None:
    """A negative offset or length is a bug in the caller, never "from the end" (S3 would read it so)."""
    if offset < 0 or length < 0:
        raise StorageError(name, f"bad byte range: offset {offset}, length {length}")


def retry(op: Callable[[], T], what: str, *, attempts: int, delay: float) -> T:
    """``op()``, retried with exponential backoff on ``StorageError``; the last failure becomes ``ListingError``."""
    for i in range(max(1, attempts)):
        try:
            return op()
        except StorageError as exc:
            last = exc
            if i + 1 < attempts:
                log.info("%s failed (attempt %d of %d), retrying: %s", what, i + 1, attempts, exc.problem)
                time.sleep(delay * (1 << i))
    raise ListingError(last.source, f"{last.problem} (gave up after {max(1, attempts)} attempts)") from None


def write_payload(f: BinaryIO, data: Payload) -> None:
    if callable(data):
        data(f)
    else:
        f.write(data)


@runtime_checkable
class Storage(Protocol):
    """Flat key/value store of immutable objects (checkpoint files).

    ``save`` is atomic: readers see either the whole new object or nothing.
    """

    url: str

    def save(self, name: str, data: Payload) -> int: ...

    def create(self, name: str, data: Payload) -> int: ...

    def load(self, name: str) -> bytes: ...

    def open_read(self, name: str) -> BinaryIO: ...

    def read_range(self, name: str, offset: int, length: int) -> bytes: ...

    def size(self, name: str) -> int: ...

    def list(self) -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def exists(self, name: str) -> bool: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def durable(self, name: str) -> bool: ...

    def wait_uploaded(self, names: Iterable[str], timeout: float | None = None) -> None: ...

    def upload_failed(self, name: str) -> str | None: ...

    def expedite(self, names: Iterable[str]) -> None: ...

    def retry(self) -> int: ...

    def close(self) -> None: ...


class StorageBase:
    """Shared helpers; back ends override the primitives."""

    url: str = ""

    def create(self, name: str, data: Payload) -> int:
        """``save`` that never replaces: raises ``ExistsError`` when ``name`` is already stored.

        This generic form checks, then saves; it relies on the single-writer
        lock (no second writer can create the name in between). Back ends
        with an atomic no-replace primitive override it.
        """
        if self.exists(name):  # type: ignore[attr-defined]
            raise ExistsError(f"{self.url.rstrip('/')}/{name}", "a checkpoint with this name exists; refusing to replace it")
        return self.save(name, data)  # type: ignore[attr-defined]

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        check_range(name, offset, length)
        with self.open_read(name) as f:  # type: ignore[attr-defined]
            f.seek(offset)
            return f.read(length)

    def iter_chunks(self, name: str, block: int = 1 << 22) -> Iterator[bytes]:
        with self.open_read(name) as f:  # type: ignore[attr-defined]
            while True:
                b = f.read(block)
                if not b:
                    return
                yield b

    def copy_to(self, name: str, f: BinaryIO) -> None:
        for b in self.iter_chunks(name):
            f.write(b)

    def flush(self, timeout: float | None = None) -> None:
        """Make everything saved so far durable (no-op for synchronous stores)."""

    # Where a saved object may not yet be in its final place (two-level storage
    # uploads behind the save), a commit record must wait for it. A synchronous
    # store has nothing to wait for: what ``save`` returned from is durable.

    def durable(self, name: str) -> bool:
        """Whether ``name`` is where a restore on another node will look for it."""
        return True

    def wait_uploaded(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Wait until no transfer of ``names`` is still going (whether each arrived is ``durable``)."""

    def upload_failed(self, name: str) -> str | None:
        """Why the last transfer of ``name`` failed, or None."""
        return None

    def expedite(self, names: Iterable[str]) -> None:
        """Let the transfers of ``names`` go before others still queued (a commit record)."""

    def retry(self) -> int:
        """Queue failed transfers again without waiting; how many."""
        return 0

    def close(self) -> None:
        pass

    def acquire_lock(self) -> None:
        """Take the single-writer lock where the back end has one."""

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
