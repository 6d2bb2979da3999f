"""``rkckpt ls``: the checkpoints of a folder or URL as chains."""

from __future__ import annotations

import json

import click

from ..chain import describe
from ..display import printable
from . import main
from .common import errors_exit, open_location, where


@main.command("ls")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Check headers only, not every byte.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@errors_exit
def ls_cmd(location: str, as_json: bool, quick: bool, kernel_id: str | None) -> None:
    """List the checkpoints in DIR|URL as chains (step, kind, size, digest, parent, valid?)."""
    storage = open_location(location)
    rows = describe(storage, verify=not quick, kernel_id=kernel_id)
    if as_json:
        out = [
            {
                "name": r.entry.name,
                "path": where(storage, r.entry.name),
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
