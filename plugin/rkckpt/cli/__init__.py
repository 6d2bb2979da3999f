"""The ``rkckpt`` command. Subcommands live in one module per concern."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rkslurm")
def main() -> None:
    """Inspect, verify, convert and manage RKCKPT checkpoints."""


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from . import chains, codec  # noqa: F401


_register()
