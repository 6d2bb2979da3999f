"""``rkckpt ls``, ``rkckpt latest`` and ``rkckpt gc``: checkpoint folders as chains."""

from __future__ import annotations

import json
import sys

import click

from rkckpt.chain import ChainIndex, describe, gc, latest_restorable, plan_gc
from rkckpt.cli import main
from rkckpt.errors import CheckpointError
from rkckpt.storage import FileStorage, Storage, open_storage

EXIT_NOTHING = 3


def _open(location: str) -> Storage:
    try:
        if "://" not in location or location.startswith("file://"):
            path = location.removeprefix("file://")
            return FileStorage(path, create=False)
        return open_storage(location, local=False)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None


def _where(storage: Storage, name: str) -> str:
    return f"{storage.url.rstrip('/')}/{name}"


@main.command("ls")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Check headers only, not every byte.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
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
    from rich.table import Table

    table = Table(title=f"checkpoints in {storage.url}")
    for col in ("step", "kind", "size", "digest", "parent", "valid?"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    for r in rows:
        ok = r.status == "ok"
        table.add_row(
            str(r.entry.step),
            r.entry.kind,
            f"{r.entry.size:,}",
            r.entry.state_digest or "?",
            r.parent or "-",
            "[green]yes[/green]" if ok else f"[red]NO: {r.status}[/red]",
        )
    Console(width=200).print(table)


@main.command("latest")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (default: path and step).")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
def latest_cmd(location: str, as_json: bool, kernel_id: str | None) -> None:
    """The newest restorable checkpoint in DIR|URL; exit 3 when there is none."""
    storage = _open(location)
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
            click.echo(f"skipped {s['path']}: {s['reason']}", err=True)
        if rp is not None:
            click.echo(f"{doc['path']}\tstep {rp.step}\tchain of {len(rp.chain)}")
    if rp is None:
        if not as_json:
            click.echo(f"nothing restorable in {storage.url}", err=True)
        sys.exit(EXIT_NOTHING)


@main.command("gc")
@click.argument("location")
@click.option("--keep", type=click.IntRange(min=1), required=True, help="Complete chains to keep (newest first).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
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
        click.echo(("would delete " if dry_run else "deleted ") + _where(storage, n))
    click.echo(f"{len(doomed)} file(s) {'to delete' if dry_run else 'deleted'}", err=True)
