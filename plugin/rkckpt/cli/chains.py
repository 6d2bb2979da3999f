"""``rkckpt ls``, ``rkckpt latest`` and ``rkckpt gc``: checkpoint folders as chains."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from rkckpt.chain import ChainIndex, describe, gc, latest_restorable, plan_gc
from rkckpt.cli import main
from rkckpt.display import printable
from rkckpt.errors import CheckpointError
from rkckpt.storage import FileStorage, Storage, open_storage

EXIT_NOTHING = 3
F = TypeVar("F", bound=Callable[..., Any])


def _open(location: str, *, must_exist: bool = True) -> Storage:
    try:
        if "://" not in location or location.startswith("file://"):
            path = location.removeprefix("file://")
            if must_exist and not os.path.isdir(path):
                what = "not a folder" if os.path.exists(path) else "no such checkpoint folder"
                raise click.ClickException(f"{printable(path)}: {what}")
            return FileStorage(path, create=False)
        return open_storage(location, local=False)
    except CheckpointError as exc:
        raise click.ClickException(printable(exc)) from None


def _clean_errors(fn: F) -> F:
    """A storage or permission problem is one line naming the folder, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            raise click.ClickException(printable(exc)) from None
        except OSError as exc:
            raise click.ClickException(printable(f"{exc.filename or kwargs.get('location', '')}: {exc.strerror or exc}")) from None

    return wrapper  # type: ignore[return-value]


def _where(storage: Storage, name: str) -> str:
    return f"{storage.url.rstrip('/')}/{name}"


@main.command("ls")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Check headers only, not every byte.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@_clean_errors
def ls_cmd(location: str, as_json: bool, quick: bool, kernel_id: str | None) -> None:
    """List the checkpoints in DIR|URL as chains (step, kind, size, digest, parent, valid?)."""
    storage = _open(location)
    try:
        rows = describe(storage, verify=not quick, kernel_id=kernel_id)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        out = [
            {
                "name": r.entry.name,
                "path": _where(storage, r.entry.name),
                "kernel_id": r.entry.kernel_id,
                "step": r.entry.step,
                "kind": r.entry.kind,
                "size": r.entry.size,
                "digest": r.entry.state_digest,
                "parent": r.parent,
                "valid": r.status == "ok",
                "problem": None if r.status == "ok" else r.status,
            }
            for r in rows
        ]
        click.echo(json.dumps(out, indent=1))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"checkpoints in {printable(storage.url)}"))
    for col in ("step", "kind", "size", "digest", "parent", "valid?"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    for r in rows:
        ok = r.status == "ok"
        table.add_row(
            str(r.entry.step),
            r.entry.kind,
            f"{r.entry.size:,}",
            escape(printable(r.entry.state_digest or "?")),
            escape(printable(r.parent or "-")),
            "[green]yes[/green]" if ok else f"[red]NO: {escape(printable(r.status))}[/red]",
        )
    Console(width=200).print(table)


@main.command("latest")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (default: path and step).")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@_clean_errors
def latest_cmd(location: str, as_json: bool, kernel_id: str | None) -> None:
    """The newest restorable checkpoint in DIR|URL; exit 3 when there is none."""
    storage = _open(location, must_exist=False)
    try:
        index = ChainIndex(storage)
        rp = latest_restorable(storage, kernel_id, index=index, warn=False)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    skipped = []
    if rp is None:
        # everything was skipped; recompute reasons for the report
        for e in reversed(index.sorted(kernel_id)):
            _, problem = index.chain_of(e)
            skipped.append({"path": _where(storage, e.name), "reason": problem or e.error or "not restorable"})
        doc = {"path": None, "step": None, "chain": [], "skipped": skipped}
    else:
        skipped = [{"path": _where(storage, n), "reason": why} for n, why in rp.skipped]
        doc = {"path": _where(storage, rp.chain[-1]), "step": rp.step, "chain": [_where(storage, n) for n in rp.chain], "skipped": skipped}
    if as_json:
        click.echo(json.dumps(doc, indent=1))
    else:
        for s in skipped:
            click.echo(printable(f"skipped {s['path']}: {s['reason']}"), err=True)
        if rp is not None:
            click.echo(f"{printable(doc['path'])}\tstep {rp.step}\tchain of {len(rp.chain)}")
    if rp is None:
        if not as_json:
            click.echo(f"nothing restorable in {printable(storage.url)}", err=True)
        sys.exit(EXIT_NOTHING)


@main.command("gc")
@click.argument("location")
@click.option("--keep", type=click.IntRange(min=1), required=True, help="Complete chains to keep (newest first).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@_clean_errors
def gc_cmd(location: str, keep: int, dry_run: bool, kernel_id: str | None) -> None:
    """Delete checkpoints outside the newest KEEP complete chains (never a kept delta's parent)."""
    storage = _open(location)
    try:
        if dry_run:
            index = ChainIndex(storage)
            index.refresh()
            doomed = plan_gc(index, keep, kernel_id)
        else:
            doomed = gc(storage, keep, kernel_id)
            if doomed:
                ChainIndex(storage).refresh()
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        storage.close()
    for n in doomed:
        click.echo(("would delete " if dry_run else "deleted ") + printable(_where(storage, n)))
    click.echo(f"{len(doomed)} file(s) {'to delete' if dry_run else 'deleted'}", err=True)
