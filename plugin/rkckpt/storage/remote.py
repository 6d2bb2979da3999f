"""Object storage through fsspec (``s3://bucket/prefix``, ``memory://``...).

Objects are staged in a local temporary file and uploaded in one ``put``:
an S3 object only appears once its upload has completed, so a killed writer
never leaves a half object under the final name. Every error is re-raised as
``StorageError`` with credentials scrubbed from the message.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from typing import Any, BinaryIO

import fsspec

from ..logsafe import register_secret
from .base import Payload, StorageBase, StorageError, check_range, retry, validate_name, write_payload

#: A listing is retried this often, waiting LIST_DELAY, 2*LIST_DELAY... seconds in between.
LIST_ATTEMPTS = 5
LIST_DELAY = 0.5
_SECRET_KEYS = ("secret", "key", "token", "password", "aws_secret_access_key", "aws_access_key_id", "aws_session_token")
_URL_CREDS = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)[^/\s?#]+@", re.I)  # to the last @: a raw @ in a password


def redact_url(url: str) -> str:
    """Drop ``user:secret@`` from a URL before it is shown anywhere."""
    return _URL_CREDS.sub(r"\g<scheme>", url)


def _secrets(options: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(v, str) and len(v) >= 4 and any(s in k.lower() for s in _SECRET_KEYS):
                found.append(v)

    walk(options)
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        v = os.environ.get(env)
        if v and len(v) >= 4:
            found.append(v)
    return found


def _userinfo(url: str) -> list[str]:
    """The parts (user, password) of a URL's ``user:password@``, unquoted too, that are long enough to mask."""
    from urllib.parse import unquote

    m = _URL_CREDS.match(url)
    if not m:
        return []
    parts = url[len(m.group("scheme")) : m.end() - 1].split(":", 1)
    return [v for p in parts for v in {p, unquote(p)} if len(v) >= 4]


def scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        text = text.replace(s, "***")
    return redact_url(text)


class FsspecStorage(StorageBase):
    """Objects under ``url`` in any fsspec file system."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = redact_url(url.rstrip("/"))
        endpoint = str(storage_options.get("endpoint_url") or storage_options.get("client_kwargs", {}).get("endpoint_url") or "")
        self.endpoint = redact_url(endpoint)
        self.list_attempts = LIST_ATTEMPTS
        self.list_delay = LIST_DELAY
        # credentials embedded in the URL or the endpoint (RKCKPT_S3_ENDPOINT=http://u:pw@host), which
        # botocore and urllib3 log at -vv in forms of their own: remember them for scrubbing
        self._secrets = _secrets(storage_options) + _userinfo(url) + _userinfo(endpoint)
        register_secret(*self._secrets)  # masked in every log message too (rkckpt.logsafe)
        # a cached instance would keep credentials from an earlier, different environment
        storage_options.setdefault("skip_instance_cache", True)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except Exception as exc:  # noqa: BLE001 - any back-end error becomes one typed error
            raise self._error(self.url, "opening the storage", exc) from None
        self.root = root.rstrip("/")

    def _error(self, where: str, op: str, exc: BaseException) -> StorageError:
        msg = scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        if isinstance(exc, FileNotFoundError):
            msg = "no such checkpoint object"
        return StorageError(scrub(where, self._secrets), f"{op} failed: {msg}")

    def _path(self, name: str) -> str:
        return f"{self.root}/{validate_name(name)}"

    def _where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def save(self, name: str, data: Payload) -> int:
        path = self._path(name)
        if isinstance(data, bytes | bytearray | memoryview):
            blob = bytes(data)
            try:
                self.fs.pipe_file(path, blob)
            except Exception as exc:  # noqa: BLE001
                raise self._error(self._where(name), "uploading", exc) from None
            return len(blob)
        with tempfile.NamedTemporaryFile(prefix="rkckpt-up-") as tmp:
            write_payload(tmp, data)  # type: ignore[arg-type]
            tmp.flush()
            size = tmp.tell()
            try:
                self.fs.put_file(tmp.name, path)
            except Exception as exc:  # noqa: BLE001
                raise self._error(self._where(name), "uploading", exc) from None
        return size

    def put_local(self, local: str | os.PathLike[str], name: str) -> int:
        """Upload an existing local file as ``name`` (no staging copy)."""
        path = self._path(name)
        try:
            self.fs.put_file(os.fspath(local), path)
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "uploading", exc) from None
        return os.path.getsize(local)

    def load(self, name: str) -> bytes:
        path = self._path(name)
        try:
            self.fs.invalidate_cache(path)  # s3fs caches listings; another process may have just written it
            return self.fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "reading", exc) from None

    def open_read(self, name: str) -> BinaryIO:
        path = self._path(name)
        try:
            return self.fs.open(path, "rb")
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "opening", exc) from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        check_range(self._where(name), offset, length)
        if length == 0:
            return b""
        try:
            return self.fs.cat_file(path, start=offset, end=offset + length)
        except Exception as exc:  # noqa: BLE001
            if self._at_or_past_end(path, offset):
                return b""  # S3 answers "range not satisfiable"; every other store returns what is there: nothing
            raise self._error(self._where(name), "reading", exc) from None

    def _at_or_past_end(self, path: str, offset: int) -> bool:
        try:
            return offset >= int(self.fs.size(path))
        except Exception:  # noqa: BLE001 - missing or unreachable: the read's own error is the one to report
            return False

    def size(self, name: str) -> int:
        path = self._path(name)
        try:
            return int(self.fs.size(path))
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "stat", exc) from None

    def _ls(self) -> list[dict[str, Any]]:
        try:
            self.fs.invalidate_cache(self.root)
            return self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._error(self.url, "listing", exc) from None

    def list(self) -> list[str]:
        """Object names under the prefix; transient failures are retried, then raise ``ListingError``.

        A listing that failed says nothing about what is stored: it must never
        look like an empty prefix (that would restart a job from step 0).
        """
        entries = retry(self._ls, f"listing {self.url}", attempts=self.list_attempts, delay=self.list_delay)
        names = []
        for e in entries:
            if e.get("type") == "directory":
                continue
            n = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
            if n and not n.startswith("."):
                names.append(n)
        return sorted(names)

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "deleting", exc) from None

    def exists(self, name: str) -> bool:
        path = self._path(name)
        try:
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))
        except Exception as exc:  # noqa: BLE001
            raise self._error(self._where(name), "checking", exc) from None

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"
