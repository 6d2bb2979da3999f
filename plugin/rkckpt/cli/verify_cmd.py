"""``rkckpt verify``: check files fully; one line per bad file. Folders and set manifests: every part of every set."""

from __future__ import annotations

import os
from collections.abc import Iterator

import click

from ..chain import NAME_RE
from ..ckptset import SET_SUFFIX, read_manifest, scan_sets, verify_set
from ..container import check
from ..display import printable
from ..errors import CheckpointError
from ..storage import FileStorage
from . import main
from .common import about, one_line, parse


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files.")
def verify_cmd(paths: tuple[str, ...], quiet: bool) -> None:
    """Check files fully; exit 1 with one line per bad file on stderr.

    A folder: every checkpoint file in it, and every checkpoint set (each
    part's whole chain applied and matched against the manifest). A
    ``.rkset.json`` manifest: that set.
    """
    bad = 0
    for path in paths:
        for label, problem in _checks(path):
            if problem is not None:
                bad += 1
                click.echo(f"BAD {printable(one_line(problem))}", err=True)
            elif not quiet:
                click.echo(f"OK  {printable(label)}")
    if bad:
        raise click.exceptions.Exit(1)


def _checks(path: str) -> Iterator[tuple[str, str | None]]:
    """(what was checked, problem or None) for one argument."""
    if os.path.isdir(path):
        yield from _folder(path)
    elif path.endswith(SET_SUFFIX):
        yield _manifest(path)
    else:
        try:
            _verify_one(path)
            yield path, None
        except CheckpointError as exc:
            yield path, str(exc)


def _manifest(path: str) -> tuple[str, str | None]:
    folder, name = os.path.split(path)
    try:
        storage = FileStorage(folder or ".", create=False)
        s = read_manifest(storage, name)
        verify_set(storage, s)
    except CheckpointError as exc:
        detail = exc.problem if exc.source in (None, name) else f"{exc.source}: {exc.problem}"
        return path, f"{path}: {detail}"
    return f"{path} (set of {s.ranks} parts)", None


def _folder(path: str) -> Iterator[tuple[str, str | None]]:
    storage = FileStorage(path, create=False)
    try:
        names = storage.list()
    except CheckpointError as exc:
        yield path, str(exc)
        return
    for n in names:
        if NAME_RE.match(n):
            yield from _checks(os.path.join(path, n))
    for st in reversed(scan_sets(storage)):
        full = os.path.join(path, st.name)
        yield (f"{full} (set of {st.ranks} parts)", None) if st.ok else (full, f"{full}: {st.problem}")


def _verify_one(path: str) -> None:
    parsed, _ = parse(path, deep=True)
    with about(path):
        check(parsed, path)
        ck = parsed.checkpoint
        if not ck.is_delta:
            for name in ck.regions():
                ck.region(name)  # declared regions exist with the declared size
