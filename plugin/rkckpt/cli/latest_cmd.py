"""``rkckpt latest``: the newest restorable checkpoint, or checkpoint set (exit 3: none)."""

from __future__ import annotations

import json
import sys

import click

from ..chain import ChainIndex, RestorePoint, latest_restorable
from ..ckptset import SetStatus, is_part_kernel, plain_view, scan_sets
from ..display import printable
from ..errors import CheckpointError
from ..storage import Storage
from . import main
from .common import clean_errors, open_location, where

EXIT_NOTHING = 3


def _chain_doc(storage: Storage, rp: RestorePoint | None, index: ChainIndex, kernel_id: str | None) -> dict[str, object]:
    if rp is None:
        # everything was skipped; recompute reasons for the report
        skipped = []
        for e in reversed(index.sorted(kernel_id)):
            _, problem = index.chain_of(e)
            skipped.append({"path": where(storage, e.name), "reason": problem or e.error or "not restorable"})
        return {"path": None, "step": None, "chain": [], "skipped": skipped}
    skipped = [{"path": where(storage, n), "reason": why} for n, why in rp.skipped]
    return {"path": where(storage, rp.chain[-1]), "step": rp.step, "chain": [where(storage, n) for n in rp.chain], "skipped": skipped}


def _with_sets(storage: Storage, doc: dict[str, object], kernel_id: str | None) -> dict[str, object]:
    """``doc`` (the newest plain chain) replaced by a newer valid set; sets skipped on the way are reported."""
    step = doc["step"] if doc["step"] is not None else -1
    skipped: list[dict[str, object]] = []
    found: SetStatus | None = None
    for st in scan_sets(storage, kernel_id, stop_at_valid=True):
        if st.step <= step:  # type: ignore[operator]
            break
        if st.ok:
            found = st
            break
        skipped.append({"path": where(storage, st.name), "reason": st.problem})
    if found is None or found.set is None:
        return {**doc, "skipped": skipped + doc["skipped"]}  # type: ignore[operator]
    s = found.set
    return {
        "path": where(storage, found.name),
        "step": s.step,
        "chain": [],
        "set": {"ranks": s.ranks, "run_id": s.run_id, "nz": s.nz, "parts": [where(storage, p.name) for p in s.parts]},
        "skipped": skipped,
    }


@main.command("latest")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (default: path and step).")
@click.option("--kernel", "kernel_id", default=None, help="Only this kernel id.")
@clean_errors
def latest_cmd(location: str, as_json: bool, kernel_id: str | None) -> None:
    """The newest restorable checkpoint (or checkpoint set) in DIR|URL; exit 3 when there is none."""
    storage = open_location(location, must_exist=False)
    chains = storage if kernel_id is not None and is_part_kernel(kernel_id) else plain_view(storage)
    try:
        index = ChainIndex(chains)
        rp = latest_restorable(chains, kernel_id, index=index, warn=False)  # skipped files are reported below
        doc = _with_sets(storage, _chain_doc(storage, rp, index, kernel_id), kernel_id)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=1))
    else:
        for s in doc["skipped"]:  # type: ignore[attr-defined]
            click.echo(printable(f"skipped {s['path']}: {s['reason']}"), err=True)
        if doc["step"] is not None:
            what = f"set of {doc['set']['ranks']} parts" if "set" in doc else f"chain of {len(doc['chain'])}"  # type: ignore[arg-type,index]
            click.echo(f"{printable(str(doc['path']))}\tstep {doc['step']}\t{what}")
    if doc["step"] is None:
        if not as_json:
            click.echo(f"nothing restorable in {printable(storage.url)}", err=True)
        sys.exit(EXIT_NOTHING)
