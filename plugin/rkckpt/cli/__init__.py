"""The ``rkckpt`` command. Each subcommand lives in the module named after it (``<command>_cmd.py``)."""

from __future__ import annotations

import click

from rkckpt import logsafe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rkslurm")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug, the S3 client's too; credentials are masked).")
def main(verbose: int = 0) -> None:
    """Inspect, verify, convert and manage RKCKPT checkpoints."""
    logsafe.configure(verbose, "rkckpt")


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from . import apply_cmd, convert_cmd, export_cmd, gc_cmd, inspect_cmd, latest_cmd, ls_cmd, verify_cmd  # noqa: F401


_register()
