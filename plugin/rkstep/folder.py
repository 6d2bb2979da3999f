"""The step folder, owned by rkstep (in the manner of submitit's ``JobPaths``).

Why one owner: the executor, rkrun and the workflow's local preparation all
touch the folder; each of them deleting, trusting or parsing files of its own
is how a user's ``results/`` got wiped and a planted symlink got written
through. :class:`StepFolder` is the only code that

- creates the folder (0700) and claims it with an ownership marker, refusing a
  folder that holds files it did not create;
- on a fingerprint change deletes the files of an *owned* folder only, never
  following a link;
- reads what the step wrote (events, stop marker, progress) as hostile input
  (:mod:`rkstep.safeio`), incrementally: :meth:`StepFolder.observe` returns the
  byte offset read so far, and reads only what was appended since.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .events import EVENTS_MAX_BYTES, Attempt, AttemptLog, parse_events
from .fingerprint import HashCache, step_fingerprint
from .protocol import FINGERPRINT_FILE, HASHCACHE_FILE, OWNER_FILE, StepPaths
from .safeio import FolderError, atomic_write, ensure_private_folder, load_json_object, read_tail

__all__ = [
    "DEFAULT_ROOT",
    "FolderError",
    "FolderRefused",
    "Prepared",
    "StepFolder",
    "Story",
    "default_checkpoint_dir",
    "ensure_private_folder",
    "rkslurm_checkpoint_dir",
    "step_key",
    "wildcards_key",
]

DEFAULT_ROOT = ".snakemake/rkslurm"
#: files rkstep itself keeps in an owned folder (kept when the step's files are cleared)
_OWN_FILES = (OWNER_FILE, HASHCACHE_FILE)


def _stderr(text: str) -> None:
    print(f"rkstep: {text}", file=sys.stderr, flush=True)


class FolderRefused(FolderError):
    """The folder holds files rkstep did not create, or belongs to another step: nothing in it was touched."""


def wildcards_key(wildcards: Mapping[str, Any] | None) -> str:
    """A stable, filesystem-safe folder name for a wildcard assignment (``_`` for none); values
    are percent-encoded so ``a/b`` cannot escape the folder."""
    items = sorted((str(k), str(v)) for k, v in dict(wildcards or {}).items())
    if not items:
        return "_"
    return ",".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in items)


def step_key(rule: str, wildcards: Mapping[str, Any] | None = None) -> str:
    """Which step a folder belongs to: ``<rule>/<wildcards-key>``."""
    return f"{quote(rule, safe='')}/{wildcards_key(wildcards)}"


def default_checkpoint_dir(rule: str, wildcards: Mapping[str, Any] | None, root: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """``<root>/<rule>/<wildcards-key>``, absolute (jobs may run elsewhere)."""
    return (Path(root) / quote(rule, safe="") / wildcards_key(wildcards)).absolute()


def rkslurm_checkpoint_dir(rule: str, root: str | os.PathLike[str] | None = None) -> Callable[[Any], str]:
    """Snakefile helper: a params function giving the folder the rkslurm executor would use by default,
    so ``{params.rkslurm_checkpoint_dir}`` names the same folder under any executor.
    ``root`` defaults to ``$RKSLURM_CHECKPOINT_ROOT`` or ``.snakemake/rkslurm``."""

    def _dir(wildcards: Any) -> str:
        r = root if root is not None else os.environ.get("RKSLURM_CHECKPOINT_ROOT", DEFAULT_ROOT)
        return str(default_checkpoint_dir(rule, dict(wildcards.items()) if wildcards is not None else {}, r))

    return _dir


@dataclass(frozen=True)
class Prepared:
    path: Path
    #: nothing to resume from
    fresh: bool
    #: why the step's old files were deleted (None: kept, or there were none)
    stale_reason: str | None


@dataclass(frozen=True)
class Story:
    """What the folder says about one Slurm job's attempt, as of ``offset`` bytes of its events file."""

    job_id: str
    #: the newest attempt of that job (None: it wrote no start yet, or writes no events)
    attempt: Attempt | None
    #: newest checkpointed step of the folder: ``checkpoint``/``stop`` events, stop marker, progress file
    newest_checkpoint: int | None
    #: bytes of the events file read so far: pass as ``since`` to read only what follows
    offset: int
    #: events read by this call
    new_events: int = 0

    @property
    def killed(self) -> bool:
        return self.attempt is not None and self.attempt.killed

    @property
    def stopped_step(self) -> int | None:
        return self.attempt.stopped_step if self.attempt is not None else None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass
class StepFolder:
    """One step's checkpoint folder: ownership, preparation, observation."""

    path: Path
    #: the step the folder belongs to (:func:`step_key`); "" accepts any owner
    key: str = ""
    warn: Callable[[str], None] = _stderr
    _log: AttemptLog = field(default_factory=AttemptLog, init=False, repr=False)
    _offset: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def paths(self) -> StepPaths:
        return StepPaths(self.path)

    # ------------------------------------------------------------ ownership

    def owner(self) -> dict[str, Any] | None:
        """The ownership marker, or None when the folder is not rkstep's."""
        doc = load_json_object(self.paths.owner)
        return doc if doc is not None and doc.get("owner") == "rkstep" else None

    def check(self) -> None:
        """Raise :class:`FolderRefused` unless the folder is new, empty, or rkstep's for this step. Touches nothing."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise FolderRefused(f"checkpoint folder {self.path} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a folder'}")
        owner = self.owner()
        if owner is not None:
            theirs = owner.get("key")
            if self.key and isinstance(theirs, str) and theirs and theirs != self.key:
                raise FolderRefused(
                    f"checkpoint folder {self.path} belongs to step {theirs!r}, not to {self.key!r}: give each step its own "
                    "'rkslurm_checkpoint_dir' (nothing in it was touched)"
                )
            return
        names = sorted(os.listdir(self.path))
        if not names or names == [FINGERPRINT_FILE] or FINGERPRINT_FILE in names and self._legacy():
            return
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise FolderRefused(
            f"checkpoint folder {self.path} holds files rkstep did not create ({shown}); refusing to use it, and nothing "
            "in it was touched: point 'rkslurm_checkpoint_dir' at a new or empty folder"
        )

    def _legacy(self) -> bool:
        """A folder an earlier rkslurm prepared (its fingerprint marker, no owner marker yet)."""
        doc = load_json_object(self.paths.fingerprint)
        return doc is not None and isinstance(doc.get("fingerprint"), str)

    def _claim(self, made: bool) -> None:
        doc = {"owner": "rkstep", "key": self.key, "made_folder": made, "uid": os.geteuid()}
        atomic_write(self.paths.owner, (json.dumps(doc, sort_keys=True) + "\n").encode())

    # ------------------------------------------------------------ fingerprint and preparation

    def hash_cache(self) -> HashCache:
        """The folder's input-hash cache (empty, and not saved, while the folder is not ours)."""
        return HashCache.load(self.paths.hashcache) if self.owner() is not None else HashCache(self.paths.hashcache)

    def fingerprint(self, rule: str, params: Mapping[str, Any], code: str, inputs: Iterable[str | os.PathLike[str]]) -> str:
        """:func:`rkstep.fingerprint.step_fingerprint` with this folder's hash cache (saved only into an owned folder)."""
        cache = self.hash_cache()
        digest = step_fingerprint(rule, params, code, [os.fspath(i) for i in inputs], cache)
        if self.owner() is not None:
            cache.save()
        return digest

    def stored_fingerprint(self) -> str | None:
        v = (load_json_object(self.paths.fingerprint) or {}).get("fingerprint")
        return v if isinstance(v, str) else None

    def prepare(self, fingerprint: str) -> Prepared:
        """Make the folder ready for a (re)start: same fingerprint keeps everything (resume);
        another one deletes the step's files first, so stale state is never restored.

        Raises :class:`FolderRefused` (nothing touched) for a folder that is not rkstep's,
        :class:`FolderError` for one that is not safe to write.
        """
        self.check()
        made = not os.path.lexists(self.path)
        ensure_private_folder(self.path)
        if self.owner() is None:
            self._claim(made)
        old = self.stored_fingerprint()
        has_content = any(n not in (*_OWN_FILES, FINGERPRINT_FILE) for n in os.listdir(self.path))
        stale: str | None = None
        if old is not None and old != fingerprint:
            stale = "the rule's inputs, params or code changed since these checkpoints were written"
        elif old is None and has_content:
            stale = "the folder has no fingerprint, so its checkpoints cannot be matched to this rule"
        if stale is not None:
            self.clear()
            has_content = False
        if old != fingerprint:
            atomic_write(self.paths.fingerprint, (json.dumps({"fingerprint": fingerprint}) + "\n").encode())
        self._log, self._offset = AttemptLog(), 0
        return Prepared(self.path, fresh=not has_content, stale_reason=stale)

    def clear(self) -> None:
        """Delete the step's files of an owned folder (never through a link); keep rkstep's own."""
        if self.owner() is None:
            raise FolderRefused(f"checkpoint folder {self.path} is not rkstep's; not deleting anything in it")
        for entry in os.scandir(self.path):
            if entry.name in _OWN_FILES:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def remove(self) -> None:
        """After success: delete the step's files and rkstep's; the folder too when rkstep made it."""
        owner = self.owner()
        if owner is None:
            return
        self.clear()
        for name in (HASHCACHE_FILE, OWNER_FILE):
            try:
                os.unlink(self.path / name)
            except FileNotFoundError:
                pass
        if owner.get("made_folder"):
            try:
                os.rmdir(self.path)
            except OSError:
                pass

    # ------------------------------------------------------------ observation

    def read_marker(self, path: Path) -> dict[str, Any] | None:
        return load_json_object(path)

    def marker_step(self, path: Path) -> int | None:
        return _int((self.read_marker(path) or {}).get("step"))

    def observe(self, job_id: str, since: int | None = None) -> Story:
        """The story of job ``job_id``'s newest attempt, reading only the events appended after
        byte ``since`` (default: where the previous call stopped)."""
        start = self._offset if since is None else max(0, int(since))
        if start != self._offset or start == 0:
            self._log, self._offset = AttemptLog(), start
        new = 0
        try:
            tail = read_tail(self.paths.events, start, EVENTS_MAX_BYTES)
        except OSError:
            # gone (the folder deleted under the job) or replaced by a FIFO, a link: what was read
            # before no longer describes the folder, so the story is forgotten, not kept from memory
            tail = None
            self._log, self._offset = AttemptLog(), 0
        if tail is not None:
            if tail.shrunk:
                self.warn(f"{self.paths.events} shrank under us (truncated or replaced); reading it again from its start")
                self._log = AttemptLog()
            if tail.skipped:
                self.warn(f"{self.paths.events}: skipped {tail.skipped} bytes of older events (more than {EVENTS_MAX_BYTES} new bytes)")
            events = parse_events(tail.data, self.warn, os.fspath(self.paths.events))
            self._log.add(events)
            self._offset, new = tail.end, len(events)
        steps = [
            s
            for s in (
                self._log.newest_checkpoint,
                self.marker_step(self.paths.stop_marker),
                self.marker_step(self.paths.progress),
            )
            if s is not None
        ]
        return Story(str(job_id), self._log.latest(str(job_id)), max(steps) if steps else None, self._offset, new)

    def progress(self) -> int | None:
        """Newest checkpointed step (events, stop marker, progress file); None when nothing was checkpointed."""
        return self.observe("", None).newest_checkpoint
