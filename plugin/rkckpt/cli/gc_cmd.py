"""``rkckpt gc``: chain-aware retention, and set-aware for checkpoint sets."""

from __future__ import annotations

import click

from ..chain import ChainIndex
from ..ckptset import SET_RE, gc_sets, is_part_kernel, manifest_names, plan_gc_sets
from ..display import printable
from ..errors import CheckpointError
from ..retention import gc
from ..retention import plan as plan_gc
from ..storage import Storage
from . import main
from .common import clean_errors, open_location, where


def _set_kernels(storage: Storage, kernel_id: str | None) -> list[str]:
    """Kernels with checkpoint sets in ``storage`` (just ``kernel_id`` when given)."""
    kernels = {m["kernel_id"] for n in manifest_names(storage, kernel_id) if (m := SET_RE.match(n))}
    return sorted(kernels)


def _collect(storage: Storage, keep: int, dry_run: bool, kernel_id: str | None) -> list[str]:
    """Plain chains first (retention leaves part chains alone), then each kernel's sets (``ckptset.gc_sets``)."""
    if dry_run:
        index = ChainIndex(storage)
        index.refresh()
        doomed = plan_gc(index, keep, kernel_id)
        for k in _set_kernels(storage, kernel_id):
            doomed += [n for n in plan_gc_sets(storage, k, keep, index) if n not in doomed]
        return doomed
    doomed = gc(storage, keep, kernel_id)
    for k in _set_kernels(storage, kernel_id):
        doomed += gc_sets(storage, k, keep)
    if doomed:
        ChainIndex(storage).refresh()
    return doomed


@main.command("gc")
@click.argument("location")
@click.option("--keep", type=click.IntRange(min=1), required=True, help="Complete chains (and checkpoint sets) to keep (newest first).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@clean_errors
def gc_cmd(location: str, keep: int, dry_run: bool, kernel_id: str | None) -> None:
    """Delete checkpoints outside the newest KEEP complete chains (never a kept delta's parent).

    Checkpoint sets count as one each: the newest KEEP valid sets of a kernel
    stay with every part file their chains need; older sets go, manifest first.
    """
    if kernel_id is not None and is_part_kernel(kernel_id):
        raise click.BadParameter(f"{kernel_id} is a part of checkpoint sets: name the kernel of the sets instead", param_hint="--kernel")
    storage = open_location(location)
    try:
        doomed = _collect(storage, keep, dry_run, kernel_id)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        storage.close()
    for n in doomed:
        click.echo(("would delete " if dry_run else "deleted ") + printable(where(storage, n)))
    click.echo(f"{len(doomed)} file(s) {'to delete' if dry_run else 'deleted'}", err=True)
