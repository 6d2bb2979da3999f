"""``rkckpt ls``: the checkpoints of a folder or URL as chains, and each checkpoint set as one row."""

from __future__ import annotations

import json

import click

from ..chain import Row, describe
from ..ckptset import SetStatus, is_part_kernel, plain_view, scan_sets
from ..display import printable
from ..errors import CheckpointError
from ..storage import Storage, StorageError
from . import main
from .common import clean_errors, open_location, where


def _file_doc(storage: Storage, r: Row) -> dict[str, object]:
    return {
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


def _set_size(storage: Storage, st: SetStatus) -> int | None:
    """Bytes of the set's part files at its step (None when a part cannot be sized)."""
    if st.set is None:
        return None
    try:
        return sum(storage.size(p.name) for p in st.set.parts)
    except StorageError:
        return None


def set_doc(storage: Storage, st: SetStatus) -> dict[str, object]:
    """One checkpoint set as one row: valid only when every part is."""
    return {
        "name": st.name,
        "path": where(storage, st.name),
        "kernel_id": st.kernel_id,
        "step": st.step,
        "kind": "set",
        "ranks": st.ranks,
        "size": _set_size(storage, st),
        "digest": None,
        "parent": None,
        "run_id": st.set.run_id if st.set else None,
        "parts": [where(storage, p.name) for p in st.set.parts] if st.set else [],
        "valid": st.ok,
        "problem": st.problem,
    }


def _docs(storage: Storage, quick: bool, kernel_id: str | None) -> list[dict[str, object]]:
    chains = storage if kernel_id is not None and is_part_kernel(kernel_id) else plain_view(storage)
    docs = [_file_doc(storage, r) for r in describe(chains, verify=not quick, kernel_id=kernel_id)]
    docs += [set_doc(storage, st) for st in scan_sets(storage, kernel_id, full=not quick)]
    docs.sort(key=lambda d: d["step"])  # type: ignore[arg-type,return-value]  # stable: the chains' own order, a set after the files of its step
    return docs


@main.command("ls")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Check headers only, not every byte.")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@clean_errors
def ls_cmd(location: str, as_json: bool, quick: bool, kernel_id: str | None) -> None:
    """List the checkpoints in DIR|URL as chains (step, kind, size, digest, parent, valid?); a set of N parts is one row."""
    storage = open_location(location)
    try:
        docs = _docs(storage, quick, kernel_id)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(docs, indent=1))
        return
    _print_table(storage, docs)


def _print_table(storage: Storage, docs: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"checkpoints in {printable(storage.url)}"))
    for col in ("step", "kind", "size", "digest", "parent", "valid?"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    for d in docs:
        is_set = d["kind"] == "set"
        table.add_row(
            str(d["step"]),
            f"set of {d['ranks']} parts" if is_set else str(d["kind"]),
            "?" if d["size"] is None else f"{d['size']:,}",
            escape(printable(str(d["digest"] or ("-" if is_set else "?")))),
            escape(printable(str(d["parent"] or "-"))),
            "[green]yes[/green]" if d["valid"] else f"[red]NO: {escape(printable(str(d['problem'])))}[/red]",
        )
    Console(width=200).print(table)
