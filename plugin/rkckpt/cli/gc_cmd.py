"""``rkckpt gc``: chain-aware retention."""

from __future__ import annotations

import click

from ..chain import ChainIndex
from ..display import printable
from ..retention import gc
from ..retention import plan as plan_gc
from . import main
from .common import errors_exit, open_location, where


@main.command("gc")
@click.argument("location")
@click.option("--keep", type=click.IntRange(min=1), required=True, help="Complete chains to keep (newest first).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@errors_exit
def gc_cmd(location: str, keep: int, dry_run: bool, kernel_id: str | None) -> None:
    """Delete checkpoints outside the newest KEEP complete chains (never a kept delta's parent)."""
    storage = open_location(location)
    try:
        if dry_run:
            index = ChainIndex(storage)
            index.refresh()
            doomed = plan_gc(index, keep, kernel_id)
        else:
            doomed = gc(storage, keep, kernel_id)
            if doomed:
                ChainIndex(storage).refresh()
    finally:
        storage.close()
    for n in doomed:
        click.echo(("would delete " if dry_run else "deleted ") + printable(where(storage, n)))
    click.echo(f"{len(doomed)} file(s) {'to delete' if dry_run else 'deleted'}", err=True)
