"""What a step's checkpoints belong to: one SHA-256 over the rule, its params, its
code and the *contents* of its inputs, computed the same in every process.

Why this shape:

- contents, not mtimes: a touched or copied input keeps the checkpoints
  resumable, and the local and the rkslurm executor compute the same value;
- a ``directory()`` input is hashed recursively (relative names and contents,
  sorted), so a changed file inside it starts the step fresh;
- params are canonicalised (sets sorted, no ``repr``): a value whose ``repr``
  varies by process would wipe the folder on every rerun, so a type without a
  stable value is refused with :class:`FingerprintError` instead;
- content hashes are cached by (path, size, mtime_ns, inode) in the step
  folder (:class:`HashCache`), so a resubmission costs a ``stat`` per input.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .safeio import atomic_write, load_json_object

__all__ = [
    "CHECKPOINT_DIR_PARAM",
    "FINGERPRINT_PARAMS",
    "FingerprintError",
    "HashCache",
    "canonical",
    "declared_fingerprint",
    "fingerprint",
    "step_fingerprint",
]

#: the rule param or resource naming the step's folder (not part of what decides the result)
CHECKPOINT_DIR_PARAM = "rkslurm_checkpoint_dir"
#: params a rule may use to state, as text, what decides its result
FINGERPRINT_PARAMS = ("rkslurm_fingerprint", "fingerprint")
#: a file changed this recently may change again within the same mtime tick: never cached
_RACY_SECONDS = 2.0
_CACHE_MAX_BYTES = 8 << 20


class FingerprintError(ValueError):
    """A param has no value that every process would encode the same."""


def canonical(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON that does not depend on the process (set order, ``repr``)."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, bytes | bytearray):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [canonical(v, f"{where} item") for v in value]
        return {"set": sorted(items, key=lambda v: json.dumps(v, sort_keys=True))}
    if isinstance(value, list | tuple):
        return [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise FingerprintError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no value every process "
        "computes the same; give it as text, numbers, lists, dicts or sets (or declare the result with param "
        "'rkslurm_fingerprint')"
    )


@dataclass
class HashCache:
    """SHA-256 of input files by (path, size, mtime_ns, inode), kept in a JSON file of the step folder."""

    path: Path | None = None
    entries: dict[str, list[Any]] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None) -> HashCache:
        doc = load_json_object(path, _CACHE_MAX_BYTES) if path is not None else None
        entries = doc.get("files") if isinstance(doc, dict) else None
        ok = {
            k: v
            for k, v in (entries or {}).items()
            if isinstance(v, list)
            and len(v) == 4
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v[:3])
            and isinstance(v[3], str)
        }
        return cls(Path(path) if path is not None else None, ok)

    def digest(self, path: str, st: os.stat_result) -> str:
        key = os.path.abspath(path)
        hit = self.entries.get(key)
        if hit is not None and hit[:3] == [st.st_size, st.st_mtime_ns, st.st_ino]:
            return str(hit[3])
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            return f"<unreadable: {exc.strerror}>"
        hexd = h.hexdigest()
        if time.time() - st.st_mtime_ns / 1e9 > _RACY_SECONDS:
            self.entries[key] = [st.st_size, st.st_mtime_ns, st.st_ino, hexd]
            self.changed = True
        return hexd

    def save(self) -> None:
        """Write the cache when it learned something (best effort: it is only a cache)."""
        if self.path is None or not self.changed:
            return
        try:
            atomic_write(self.path, (json.dumps({"files": self.entries}, sort_keys=True) + "\n").encode())
            self.changed = False
        except OSError:
            pass


def _hash_input(h: Any, path: str, cache: HashCache) -> None:
    h.update(b"\0input\0" + path.encode("utf-8", "surrogateescape") + b"\0")
    try:
        st = os.stat(path)
    except OSError as exc:
        h.update(f"<missing: {exc.strerror}>".encode())
        return
    if stat.S_ISREG(st.st_mode):
        h.update(cache.digest(path, st).encode())
        return
    if not stat.S_ISDIR(st.st_mode):
        h.update(b"<not a file>")
        return
    rows: list[tuple[str, str]] = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            try:
                fst = os.stat(full)
            except OSError as exc:
                rows.append((rel, f"<missing: {exc.strerror}>"))
                continue
            if stat.S_ISREG(fst.st_mode):
                rows.append((rel, cache.digest(full, fst)))
            elif stat.S_ISDIR(fst.st_mode):
                rows.append((rel, "<link to folder: " + os.readlink(full) + ">"))
            else:
                rows.append((rel, "<not a file>"))
    for rel, digest in sorted(rows):
        h.update(b"\0file\0" + rel.encode("utf-8", "surrogateescape") + b"\0" + digest.encode())


def fingerprint(doc: Mapping[str, Any], files: Iterable[str | os.PathLike[str]] = (), cache: HashCache | None = None) -> str:
    """SHA-256 over a canonical JSON document and the contents of ``files`` (directories recursively)."""
    h = hashlib.sha256(json.dumps(canonical(dict(doc), "fingerprint document"), sort_keys=True).encode())
    c = cache if cache is not None else HashCache()
    for f in files:
        _hash_input(h, os.fspath(f), c)
    return h.hexdigest()


def declared_fingerprint(text: str, files: Iterable[str | os.PathLike[str]] = (), cache: HashCache | None = None) -> str:
    """The fingerprint of a rule that states what decides its result (``grid=... steps=...``) plus its inputs;
    the workflow's local preparation and the rkslurm executor both call this."""
    return fingerprint({"declared": str(text)}, files, cache)


def step_fingerprint(
    rule: str, params: Mapping[str, Any], code: str, inputs: Iterable[str | os.PathLike[str]], cache: HashCache | None = None
) -> str:
    """The one fingerprint of a step: a declared text (param ``rkslurm_fingerprint`` or ``fingerprint``)
    with its inputs, else rule, params (less the folder), code and inputs."""
    for name in FINGERPRINT_PARAMS:
        declared = params.get(name)
        if isinstance(declared, str):
            return declared_fingerprint(declared, inputs, cache)
    doc = {
        "rule": rule,
        "params": {str(k): canonical(v, f"param {k!r} of rule {rule}") for k, v in params.items() if k != CHECKPOINT_DIR_PARAM},
        "code": code,
    }
    return fingerprint(doc, inputs, cache)
