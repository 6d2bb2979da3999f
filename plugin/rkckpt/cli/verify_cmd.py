"""``rkckpt verify``: check files fully; one line per bad file."""

from __future__ import annotations

import click

from ..container import check
from ..display import printable
from ..errors import CheckpointError
from . import main
from .common import EXIT_ERROR, about, errors_exit, one_line, parse


@main.command("verify")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print nothing for valid files.")
@errors_exit
def verify_cmd(paths: tuple[str, ...], quiet: bool) -> None:
    """Check files fully; exit 1 with one line per bad file on stderr."""
    bad = 0
    for path in paths:
        try:
            _verify_one(path)
        except CheckpointError as exc:
            bad += 1
            click.echo(f"BAD {printable(one_line(str(exc)))}", err=True)
            continue
        if not quiet:
            click.echo(f"OK  {path}")
    if bad:
        raise click.exceptions.Exit(EXIT_ERROR)


def _verify_one(path: str) -> None:
    parsed, _ = parse(path, deep=True)
    with about(path):
        check(parsed, path)
        ck = parsed.checkpoint
        if not ck.is_delta:
            for name in ck.regions():
                ck.region(name)  # declared regions exist with the declared size
