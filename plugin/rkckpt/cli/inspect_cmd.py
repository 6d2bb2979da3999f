"""``rkckpt inspect``: header, metadata and chunks of one file."""

from __future__ import annotations

import json
from typing import Any

import click

from ..describe import describe_file
from ..display import printable
from ..model import type_name
from . import main
from .common import about, errors_exit, parse


@main.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@errors_exit
def inspect_cmd(path: str, as_json: bool) -> None:
    """Show the header, metadata and chunks of a .rkcp or .rk.h5 file."""
    parsed, names = parse(path)
    with about(path):
        info = describe_file(parsed, names)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    _print_table(path, info)


def _print_table(path: str, info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped: don't fold ids and names at 80 columns
        console = Console(width=160)
    h, m = info["header"], info["metadata"]
    console.print(
        f"[bold]{escape(printable(path))}[/bold]  RKCKPT v{h['version']}  {h['total_size']} bytes  digest [cyan]{info['content_digest']}[/cyan]"
    )
    console.print(
        f"kernel [bold]{escape(printable(m['kernel_id']))}[/bold] ({escape(printable(m['kernel_type']))})  step {m['current_step']}  grid {tuple(m['grid_size'])}  tile {tuple(m['tile_size'])}  hlc {tuple(m['hlc'])}"
    )
    console.print(f"compression {h['compression']}  flags 0x{h['flags']:x}  checksum 0x{h['checksum']:08x}  created_at {h['created_at']}")
    if m["custom"]:
        custom = Table("key", "value", title="custom metadata", title_justify="left")
        for k, v in m["custom"].items():
            custom.add_row(escape(printable(k)), escape(printable(v if len(v) <= 80 else v[:77] + "...")))
        console.print(custom)
    table = Table(title="chunks", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("type", no_wrap=True)
    table.add_column("chunk_id", justify="right", overflow="fold", min_width=20)
    table.add_column("name", overflow="fold")
    table.add_column("flags", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("size", justify="right")
    table.add_column("crc32", no_wrap=True)
    for i, c in enumerate(info["chunks"]):
        table.add_row(
            str(i),
            f"{c['type']} {type_name(c['type'])}",
            str(c["chunk_id"]),
            escape(printable(c.get("name", ""))),
            f"0x{c['flags']:x}",
            str(c["compressed_size"]),
            str(c["uncompressed_size"]),
            f"{c['crc32']:08x}",
        )
    console.print(table)
