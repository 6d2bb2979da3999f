"""Where checkpoint files live: local folders, object stores, or both.

``open_storage`` turns what a user typed (a path or an fsspec URL) into one
of the back ends; everything above it only sees the ``Storage`` interface.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from .base import (
    ExistsError,
    InvalidNameError,
    ListingError,
    LockedError,
    Storage,
    StorageBase,
    StorageError,
    UnsafeFolderError,
    validate_name,
)
from .file import FileStorage
from .memory import MemoryStorage
from .remote import FsspecStorage, redact_url
from .twolevel import TwoLevelStorage

__all__ = [
    "ExistsError",
    "FileStorage",
    "FsspecStorage",
    "InvalidNameError",
    "ListingError",
    "LockedError",
    "MemoryStorage",
    "Storage",
    "StorageBase",
    "StorageError",
    "TwoLevelStorage",
    "UnsafeFolderError",
    "open_storage",
    "redact_url",
    "scoped_local_dir",
    "validate_name",
]

#: Environment variable naming a node-local folder to stage checkpoints in.
LOCAL_ENV = "RKCKPT_LOCAL_DIR"


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    opts = dict(options)
    endpoint = os.environ.get("RKCKPT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
        opts["endpoint_url"] = endpoint
    return opts


def open_storage(
    url_or_path: str | os.PathLike[str] | Storage, *, local: str | os.PathLike[str] | bool | None = None, **options: Any
) -> Storage:
    """A ``Storage`` for a path or URL.

    ``local`` (or ``$RKCKPT_LOCAL_DIR`` for remote URLs) stages saves in a
    node-local folder first (``TwoLevelStorage``); ``local=False`` never
    does (read-only tools). ``options`` go to fsspec
    (e.g. ``endpoint_url``, ``key``, ``secret`` for S3).
    """
    if isinstance(url_or_path, StorageBase):
        return url_or_path
    url = os.fspath(url_or_path)  # type: ignore[arg-type]
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" not in url:
        base: Storage = FileStorage(url)
    else:
        if url.startswith("s3://") or url.startswith("s3a://"):
            options = _s3_options(options)
        base = FsspecStorage(url, **options)
        if local is None:
            local = os.environ.get(LOCAL_ENV) or None
    if local is not None and local is not False and local is not True:
        return TwoLevelStorage(FileStorage(scoped_local_dir(local, base)), base)
    return base


def scoped_local_dir(local: str | os.PathLike[str], shared: Storage) -> str:
    """The node-local folder of one shared location: ``<local>/<tail>-<digest>``.

    Jobs that share ``$RKCKPT_LOCAL_DIR`` but write to different buckets or
    prefixes get different folders, so one job never restores another's files.
    """
    where = f"{getattr(shared, 'endpoint', '')}|{shared.url}"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", shared.url.rstrip("/").rsplit("/", 1)[-1])[-40:] or "root"
    return os.path.join(os.fspath(local), f"{tail}-{hashlib.sha256(where.encode()).hexdigest()[:16]}")
