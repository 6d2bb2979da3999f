"""Per-step checkpoint folders: where a step keeps its checkpoint chain between
Slurm jobs, and how we tell a stale folder (rule changed) from a resumable one.

This module has no Snakemake executor dependency so that a Snakefile run with
the local executor can point a step at the very same folder
(``params: rkslurm_checkpoint_dir=rkslurm_checkpoint_dir("simulate")``) and a
killed workflow resumes every checkpointed step on rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from rkckpt import safejson
from rkckpt.atomic import atomic_open
from rkckpt.chain import newest_named_step
from rkstep import protocol

DEFAULT_ROOT = ".snakemake/rkslurm"
ENV_VAR = protocol.ENV_CHECKPOINT_DIR
PARAM_NAME = "rkslurm_checkpoint_dir"
#: a rule param stating what decides the step's result (see rkstep.protocol.declared_fingerprint)
FINGERPRINT_PARAM = "rkslurm_fingerprint"
FINGERPRINT_FILE = protocol.FINGERPRINT_FILE
STOP_MARKER = protocol.STOP_MARKER
PROGRESS_FILE = protocol.PROGRESS_FILE
#: markers are a few lines of JSON; anything bigger is not ours
MARKER_MAX_BYTES = 64 << 10


def wildcards_key(wildcards: Mapping[str, Any] | None) -> str:
    """A stable, filesystem-safe folder name for a wildcard assignment.

    Values are percent-encoded so ``a/b`` cannot escape the folder; ``_`` is
    the key of a rule without wildcards.
    """
    items = sorted((str(k), str(v)) for k, v in dict(wildcards or {}).items())
    if not items:
        return "_"
    return ",".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in items)


def default_checkpoint_dir(rule: str, wildcards: Mapping[str, Any] | None, root: str | os.PathLike[str] = DEFAULT_ROOT) -> Path:
    """``<root>/<rule>/<wildcards-key>``, absolute (jobs may run elsewhere)."""
    return (Path(root) / quote(rule, safe="") / wildcards_key(wildcards)).absolute()


def rkslurm_checkpoint_dir(rule: str, root: str | os.PathLike[str] | None = None) -> Callable[[Any], str]:
    """Snakefile helper: a params function giving the step's checkpoint folder.

    ``params: rkslurm_checkpoint_dir=rkslurm_checkpoint_dir("simulate")`` yields
    the same folder the rkslurm executor would use by default, so the rule can
    pass ``{params.rkslurm_checkpoint_dir}`` to its command under any executor.
    ``root`` defaults to ``$RKSLURM_CHECKPOINT_ROOT`` or ``.snakemake/rkslurm``.
    """

    def _dir(wildcards: Any) -> str:
        r = root if root is not None else os.environ.get("RKSLURM_CHECKPOINT_ROOT", DEFAULT_ROOT)
        return str(default_checkpoint_dir(rule, dict(wildcards.items()) if wildcards is not None else {}, r))

    return _dir


def fingerprint(inputs: list[str], params: Mapping[str, Any], code: str, rule: str) -> str:
    """What determines a step's result -- the rule, its params (less the folder
    itself) and command/code, and the *contents* of its input files -- through
    the one protocol function :func:`rkstep.protocol.fingerprint`.
    """
    doc = {"rule": rule, "params": {str(k): v for k, v in sorted(params.items()) if k != PARAM_NAME}, "code": code}
    return protocol.fingerprint(doc, inputs)


def step_fingerprint(rule: str, params: Mapping[str, Any], code: str, inputs: list[str]) -> str:
    """The fingerprint the executor stores for a step.

    A rule that declares what decides its result (param ``rkslurm_fingerprint``,
    or ``fingerprint``, a string) gets :func:`rkstep.protocol.declared_fingerprint`
    of it and its inputs -- the value its own preparation script computes under
    another executor, so switching executors resumes the folder. Otherwise
    :func:`fingerprint` of rule, params, code and inputs.
    """
    declared = params.get(FINGERPRINT_PARAM, params.get("fingerprint"))
    if isinstance(declared, str):
        return protocol.declared_fingerprint(declared, inputs)
    return fingerprint(inputs, params, code, rule)


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file in the same dir, fsync, rename, fsync dir."""
    with atomic_open(path, mkdir=True) as f:
        f.write(text.encode())


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    fresh: bool  # True when there was nothing to resume from
    stale_reason: str | None  # set when an existing folder was wiped


def prepare(path: Path, digest: str) -> PrepareResult:
    """Make the folder ready for a (re)start of the step.

    Same fingerprint → keep everything (resume). Different or unreadable
    fingerprint with content present → wipe, so stale state is never restored.
    """
    path = Path(path)
    fp = path / FINGERPRINT_FILE
    stale: str | None = None
    has_content = path.is_dir() and any(p.name != FINGERPRINT_FILE for p in path.iterdir())
    if fp.exists():
        old = (read_marker(fp) or {}).get("fingerprint")
        if old != digest:
            stale = "the rule's inputs, params or code changed since these checkpoints were written"
    elif has_content:
        stale = "the folder has no fingerprint, so its checkpoints cannot be matched to this rule"
    if stale is not None and path.exists():
        shutil.rmtree(path)
        has_content = False
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # checkpoint writers refuse group/other-writable folders
    if stale is not None or not fp.exists():
        atomic_write_text(fp, json.dumps({"fingerprint": digest}) + "\n")
    return PrepareResult(path=path, fresh=not has_content, stale_reason=stale)


def read_marker(path: Path) -> dict[str, Any] | None:
    """A small JSON object file (stop marker, progress, fingerprint), or None when missing or damaged.

    Bounded and depth-limited (``rkckpt.safejson``): anyone who can write the
    folder can write these files, and they are only hints.
    """
    try:
        doc = safejson.load_file(path, max_bytes=MARKER_MAX_BYTES)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_progress(path: Path) -> int | None:
    """Newest checkpointed step in the folder: from the stop marker written at a
    signal, ``rkslurm.progress.json``, or the chain's file names
    (``<kernel>-<step:012d>-<full|delta>.rk.h5`` or ``.rkcp``); None when nothing was
    checkpointed. Used to tell progress from a step stuck before its first
    checkpoint (time-limit continuation needs progress).
    """
    path = Path(path)
    best: int | None = None
    for name in (STOP_MARKER, PROGRESS_FILE):
        step = (read_marker(path / name) or {}).get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            best = step if best is None else max(best, step)
    try:
        named = newest_named_step(os.listdir(path))
    except OSError:
        named = None
    if named is not None:
        best = named if best is None else max(best, named)
    return best


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
