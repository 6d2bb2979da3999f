"""In-process storage for tests and for keeping a hot copy in RAM."""

from __future__ import annotations

import io
import threading
from typing import BinaryIO

from .base import Payload, StorageBase, StorageError, check_range, validate_name, write_payload


class MemoryStorage(StorageBase):
    def __init__(self, url: str = "mem:") -> None:
        self.url = url
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def save(self, name: str, data: Payload) -> int:
        validate_name(name)
        buf = io.BytesIO()
        write_payload(buf, data)
        blob = buf.getvalue()
        with self._lock:
            self._objects[name] = blob
        return len(blob)

    def load(self, name: str) -> bytes:
        validate_name(name)
        with self._lock:
            try:
                return self._objects[name]
            except KeyError:
                raise StorageError(f"{self.url}{name}", "no such checkpoint object") from None

    def open_read(self, name: str) -> BinaryIO:
        return io.BytesIO(self.load(name))

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        validate_name(name)
        check_range(name, offset, length)
        return self.load(name)[offset : offset + length]

    def size(self, name: str) -> int:
        return len(self.load(name))

    def list(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    def delete(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            self._objects.pop(name, None)

    def exists(self, name: str) -> bool:
        validate_name(name)
        with self._lock:
            return name in self._objects

    def __repr__(self) -> str:
        return f"MemoryStorage({self.url!r})"
