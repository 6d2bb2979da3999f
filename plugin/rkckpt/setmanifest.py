"""The manifest of a checkpoint set: its names, its data model, and reading one that anyone could have written.

A manifest (``<kernel>-<step:012d>-set<N>.rkset.json``) is the commit record
of a set (``rkckpt.ckptset``): small JSON naming every part with its digest
and the global planes it owns. Readers trust nothing in it: it is bounded in
size (1 MiB) and nesting before it is parsed, never read through a symbolic
link or from a FIFO, and every number is checked against the file name and
the other parts (ranges cover ``[0, nz)`` in rank order, no gaps, no
overlaps, no huge values). Every failure is one ``SetError`` naming the
manifest and the first lie found.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
from dataclasses import dataclass

from . import safejson
from .chain import NAME_RE
from .errors import CheckpointError
from .storage.base import Storage, StorageError
from .storage.file import FileStorage
from .storage.twolevel import TwoLevelStorage

SET_SUFFIX = ".rkset.json"
SET_FORMAT = "rkckpt-set"
SET_VERSION = 1
SET_RE = re.compile(r"^(?P<kernel_id>.+)-(?P<step>\d{12})-set(?P<ranks>\d{1,7})\.rkset\.json$")
PART_RE = re.compile(r"^(?P<kernel_id>.+)\.r(?P<rank>\d{1,7})of(?P<ranks>\d{1,7})$")
#: A manifest is a few hundred bytes per rank; anything larger is not one of ours.
MAX_MANIFEST_BYTES = 1 << 20
MAX_RANKS = 1 << 16
#: Planes along axis 0: far beyond any grid, far below what would make an allocation hurt.
MAX_PLANES = 1 << 31
MAX_STEP = 10**12 - 1
_DIGEST_RE = re.compile(r"^[0-9a-f]{8,64}$")
_MAX_TEXT = 200


class SetError(CheckpointError):
    """A checkpoint set that cannot be committed or restored (names the manifest or the part, and why)."""


def part_kernel_id(kernel_id: str, rank: int, ranks: int) -> str:
    """Kernel id of rank ``rank``'s part chain in a set of ``ranks`` parts: ``<kernel_id>.r<rank>of<ranks>``."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} is not in [0, {ranks})")
    return f"{kernel_id}.r{rank}of{ranks}"


def set_name(kernel_id: str, step: int, ranks: int) -> str:
    """File name of the manifest of the set of ``kernel_id`` at ``step`` written by ``ranks`` ranks."""
    return f"{kernel_id}-{step:012d}-set{ranks}{SET_SUFFIX}"


def is_part_kernel(kernel_id: str) -> bool:
    """True for a part chain's kernel id (``<kernel>.r<rank>of<ranks>``): retention of plain chains leaves it alone."""
    m = PART_RE.match(kernel_id)
    return m is not None and int(m["rank"]) < int(m["ranks"])


@dataclass(frozen=True)
class Part:
    rank: int
    name: str  # the part chain's checkpoint file at the set's step (its tail)
    digest: str  # materialised content digest of that checkpoint (chain ``Entry.state_digest``)
    z0: int  # owned global planes [z0, z1)
    z1: int
    offset: int  # local plane index of global plane z0 in the part's decomposed regions


@dataclass(frozen=True)
class CheckpointSet:
    kernel_id: str
    step: int
    run_id: str
    ranks: int
    nz: int
    decomposed: tuple[str, ...]  # region names split along axis 0; all other regions are replicated
    parts: tuple[Part, ...]
    name: str | None = None  # the manifest; None: a plain single-process chain seen as a 1-part set

    def to_json(self) -> bytes:
        doc = {
            "format": SET_FORMAT,
            "version": SET_VERSION,
            "kernel_id": self.kernel_id,
            "step": self.step,
            "run_id": self.run_id,
            "ranks": self.ranks,
            "nz": self.nz,
            "decomposed": list(self.decomposed),
            "parts": [dataclasses.asdict(p) for p in self.parts],
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()


# ---------------------------------------------------------------- manifest checks
def _int(doc: dict[str, object], key: str, lo: int, hi: int, where: str) -> int:
    v = doc.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{where}{key} is {_show(v)}, not an integer in [{lo}, {hi}]")
    return v


def _text(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > _MAX_TEXT:
        raise ValueError(f"{what} is {_show(v)}, not a string of at most {_MAX_TEXT} characters")
    return v


def _show(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _parse_part(doc: object, kernel_id: str, step: int, ranks: int, nz: int) -> Part:
    if not isinstance(doc, dict):
        raise ValueError(f"a part is {type(doc).__name__}, not an object")
    rank = _int(doc, "rank", 0, ranks - 1, "part: ")
    where = f"part {rank}: "
    name = _text(doc.get("name"), f"{where}name")
    m = NAME_RE.match(name)
    want = part_kernel_id(kernel_id, rank, ranks)
    if m is None or m["kernel_id"] != want or int(m["step"]) != step:
        raise ValueError(f"{where}file {_show(name)} is not a checkpoint of {want} at step {step}")
    digest = doc.get("digest")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ValueError(f"{where}digest {_show(digest)} is not a hex digest")
    z0, z1 = _int(doc, "z0", 0, nz, where), _int(doc, "z1", 0, nz, where)
    return Part(rank, name, digest, z0, z1, _int(doc, "offset", 0, MAX_PLANES, where))


def check_layout(s: CheckpointSet) -> None:
    """``ValueError`` unless ``len(parts) == ranks`` and the parts own ``[0, nz)`` contiguously in rank order."""
    if len(s.parts) != s.ranks:
        raise ValueError(f"{len(s.parts)} parts listed for {s.ranks} ranks")
    at = 0
    for i, p in enumerate(s.parts):
        if p.rank != i:
            raise ValueError(f"part {i} says rank {p.rank}: parts must be listed in rank order")
        if p.z0 != at:
            what = "overlaps the previous part" if p.z0 < at else "leaves a gap after the previous part"
            raise ValueError(f"part {i} owns planes [{p.z0}, {p.z1}), which {what} (next plane is {at})")
        if p.z1 <= p.z0:
            raise ValueError(f"part {i} owns no planes ([{p.z0}, {p.z1}))")
        at = p.z1
    if at != s.nz:
        raise ValueError(f"the parts own planes [0, {at}), not [0, {s.nz})")


def parse_doc(doc: object, name: str) -> CheckpointSet:
    m = SET_RE.match(name)
    if m is None:
        raise ValueError("not a checkpoint set manifest name")
    if not isinstance(doc, dict) or doc.get("format") != SET_FORMAT or doc.get("version") != SET_VERSION:
        raise ValueError(f"not a version {SET_VERSION} {SET_FORMAT} manifest")
    kernel_id = _text(doc.get("kernel_id"), "kernel_id")
    step, ranks = _int(doc, "step", 0, MAX_STEP, ""), _int(doc, "ranks", 1, MAX_RANKS, "")
    if (kernel_id, step, ranks) != (m["kernel_id"], int(m["step"]), int(m["ranks"])):
        raise ValueError(f"it says kernel {_show(kernel_id)} step {step} ranks {ranks}, its name says otherwise")
    nz = _int(doc, "nz", 1, MAX_PLANES, "")
    dec, parts = doc.get("decomposed"), doc.get("parts")
    if not isinstance(dec, list) or not dec or len(dec) > 1024:
        raise ValueError("decomposed is not a non-empty list of region names")
    if not isinstance(parts, list) or len(parts) != ranks:
        raise ValueError(f"{len(parts) if isinstance(parts, list) else 'no'} parts listed for {ranks} ranks")
    s = CheckpointSet(
        kernel_id,
        step,
        _text(doc.get("run_id"), "run_id"),
        ranks,
        nz,
        tuple(_text(d, "a decomposed region name") for d in dec),
        tuple(_parse_part(p, kernel_id, step, ranks, nz) for p in parts),
        name,
    )
    check_layout(s)
    return s


def parse_manifest(name: str, data: bytes) -> CheckpointSet:
    """The set a manifest describes, or ``SetError`` naming the manifest and the first lie found."""
    try:
        return parse_doc(safejson.loads(data, max_bytes=MAX_MANIFEST_BYTES), name)
    except ValueError as exc:
        raise SetError(name, f"manifest rejected: {exc}") from None


def _read_regular(path: os.PathLike[str] | str, name: str) -> bytes:
    """A local manifest's bytes: never follows a link, never blocks on a FIFO, never reads past the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SetError(name, "manifest rejected: a symbolic link, not a regular file") from None
        raise SetError(name, f"manifest unreadable: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SetError(name, "manifest rejected: not a regular file (a FIFO, device or folder)")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise SetError(name, f"manifest rejected: {st.st_size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)


def manifest_bytes(storage: Storage, name: str) -> bytes:
    """The bytes under a manifest name, at most ``MAX_MANIFEST_BYTES``; never a link's target, never a FIFO's wait."""
    if isinstance(storage, TwoLevelStorage):
        inner = storage.local if os.path.lexists(storage.local.path(name)) else storage.shared
        return manifest_bytes(inner, name)
    if isinstance(storage, FileStorage):
        return _read_regular(storage.path(name), name)
    try:
        size = storage.size(name)
        if size > MAX_MANIFEST_BYTES:
            raise SetError(name, f"manifest rejected: {size} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
        return storage.load(name)
    except StorageError as exc:
        raise SetError(name, f"manifest unreadable: {exc.problem}") from None


def read_manifest(storage: Storage, name: str) -> CheckpointSet:
    """Read and check the manifest ``name`` (``SetError`` when it is absent, hostile or lies about its layout)."""
    return parse_manifest(name, manifest_bytes(storage, name))


def manifest_names(storage: Storage, kernel_id: str | None = None) -> list[str]:
    """Manifest names of ``kernel_id`` (all kernels: None), newest step first.

    A local folder is also searched for entries under a manifest name that
    are not regular files (a FIFO, a folder): the listing leaves those out,
    but a reader should hear that one is there and why it is not used.
    """
    names = set(storage.list())
    for fs in (storage.local, storage.shared) if isinstance(storage, TwoLevelStorage) else (storage,):
        if isinstance(fs, FileStorage):
            try:
                names.update(e.name for e in os.scandir(fs.root) if e.name.endswith(SET_SUFFIX))
            except OSError:
                pass
    out = [(m, n) for n in names if (m := SET_RE.match(n)) and (kernel_id is None or m["kernel_id"] == kernel_id)]
    out.sort(key=lambda t: (int(t[0]["step"]), t[1]), reverse=True)
    return [n for _, n in out]
