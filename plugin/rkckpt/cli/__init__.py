"""The ``rkckpt`` command. Each subcommand lives in the module named after it (``<command>_cmd.py``)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rkslurm")
def main() -> None:
    """Inspect, verify, convert and manage RKCKPT checkpoints."""


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from . import apply_cmd, convert_cmd, export_cmd, gc_cmd, inspect_cmd, latest_cmd, ls_cmd, verify_cmd  # noqa: F401


_register()
