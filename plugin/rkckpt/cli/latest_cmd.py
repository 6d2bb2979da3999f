"""``rkckpt latest``: the newest restorable checkpoint (exit 3: none)."""

from __future__ import annotations

import json

import click

from ..chain import ChainIndex, latest_restorable
from ..display import printable
from . import main
from .common import EXIT_NOTHING, errors_exit, open_location, where


@main.command("latest")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (default: path and step).")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@errors_exit
def latest_cmd(location: str, as_json: bool, kernel_id: str | None) -> None:
    """The newest restorable checkpoint in DIR|URL; exit 3 when there is none."""
    storage = open_location(location, must_exist=False)
    index = ChainIndex(storage)
    rp = latest_restorable(storage, kernel_id, index=index, warn=False)  # skipped files are reported below
    skipped = []
    if rp is None:
        # everything was skipped; recompute reasons for the report
        for e in reversed(index.sorted(kernel_id)):
            _, problem = index.chain_of(e)
            skipped.append({"path": where(storage, e.name), "reason": problem or e.error or "not restorable"})
        doc = {"path": None, "step": None, "chain": [], "skipped": skipped}
    else:
        skipped = [{"path": where(storage, n), "reason": why} for n, why in rp.skipped]
        doc = {"path": where(storage, rp.chain[-1]), "step": rp.step, "chain": [where(storage, n) for n in rp.chain], "skipped": skipped}
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
        raise click.exceptions.Exit(EXIT_NOTHING)
