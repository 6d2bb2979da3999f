"""``rkrun``: run a checkpointed kernel as a workflow step.

rkrun wavesim --grid 64 64 64 --steps 1000 --checkpoint-dir ck/ --checkpoint-every 100 --out result.h5
rkrun --config run.json      (or run.yaml; keys as the long options, plus "kernel": "wavesim")
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .signals import StopFlag, ignore_stop_signals

if TYPE_CHECKING:
    from .runner import RunConfig

EX_USAGE = 2

CONFIG_KEYS = {
    "grid",
    "steps",
    "checkpoint_dir",
    "checkpoint_every",
    "checkpoint_seconds",
    "out",
    "backend",
    "energy_every",
    "batch",
    "kernel_id",
    "throttle_ms",
    "velocity",
    "dx",
    "v_top",
    "v_bottom",
}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="rkrun: %(message)s", stream=sys.stderr, force=True)


def _load_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.UsageError(f"{path}: cannot read config: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is "bad config"
        raise click.UsageError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from None
    if not isinstance(doc, dict):
        raise click.UsageError(f"{path}: config must be a mapping")
    doc = {str(k).replace("-", "_"): v for k, v in doc.items()}
    kernel = doc.pop("kernel", "wavesim")
    if kernel != "wavesim":
        raise click.UsageError(f"{path}: unknown kernel {kernel!r} (known: wavesim)")
    unknown = set(doc) - CONFIG_KEYS
    if unknown:
        raise click.UsageError(f"{path}: unknown keys {sorted(unknown)}")
    return doc


def _config_from(doc: dict, source: str) -> RunConfig:
    import os

    from .runner import RunConfig

    if "checkpoint_dir" not in doc or doc["checkpoint_dir"] is None:
        doc["checkpoint_dir"] = os.environ.get("RKSLURM_CHECKPOINT_DIR")
    missing = [k for k in ("grid", "steps", "checkpoint_dir", "out") if doc.get(k) is None]
    if missing:
        raise click.UsageError(f"{source}: missing {', '.join(missing)} (checkpoint_dir may come from RKSLURM_CHECKPOINT_DIR)")
    grid = doc["grid"]
    if not (isinstance(grid, list | tuple) and len(grid) == 3 and all(isinstance(g, int) for g in grid)):
        raise click.UsageError(f"{source}: grid must be three integers")
    return RunConfig(
        grid=(int(grid[0]), int(grid[1]), int(grid[2])),
        steps=int(doc["steps"]),
        checkpoint_dir=str(doc["checkpoint_dir"]),
        checkpoint_every=doc.get("checkpoint_every"),
        checkpoint_seconds=doc.get("checkpoint_seconds"),
        out=str(doc["out"]),
        backend=str(doc.get("backend") or "auto"),
        energy_every=int(doc.get("energy_every", 10) or 0),
        batch=int(doc.get("batch", 32)),
        kernel_id=str(doc.get("kernel_id") or "wavesim"),
        throttle_ms=float(doc.get("throttle_ms", 0.0) or 0.0),
        velocity=str(doc["velocity"]) if doc.get("velocity") else None,
        dx=float(doc.get("dx") or 10.0),
        v_top=float(doc.get("v_top") or 1500.0),
        v_bottom=float(doc.get("v_bottom") or 2500.0),
    )


def _run(doc: dict, source: str) -> int:
    # Handlers first: a SIGTERM during the (slow) imports below still ends in
    # a checkpoint and exit 75, not in a killed process. The imports run with
    # the stop signals held, so the threads they start (OpenBLAS's pool, when
    # numpy is not loaded yet) inherit the blocked mask and a stop signal is
    # always delivered to this thread: see StopFlag.held.
    stop = StopFlag().install()
    with stop.held():
        from rkckpt.errors import CheckpointError
        from rkstep.events import run_attempt

        from .backends import BackendUnavailable
        from .runner import run_wavesim

    try:
        cfg = _config_from(doc, source)
        return run_attempt(cfg.checkpoint_dir, lambda events: run_wavesim(cfg, stop, events))
    except (CheckpointError, BackendUnavailable) as exc:
        logging.getLogger("rkrun").error("error: %s", exc)
        return EX_USAGE if isinstance(exc, BackendUnavailable) else 1
    except OSError as exc:
        logging.getLogger("rkrun").error("error: %s: %s", exc.filename or "", exc.strerror or exc)
        return 1
    finally:
        ignore_stop_signals()


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False), help="Run from a JSON/YAML file instead of options.")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """Run checkpointed persistent kernels (exit 75 = stopped by a signal, resumable)."""
    _setup_logging(verbose)
    if config is not None:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("use either --config or a subcommand")
        ctx.exit(_run(_load_config(config), str(config)))
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(EX_USAGE)


@main.command()
@click.option("--grid", nargs=3, type=click.IntRange(min=3), required=True, help="NX NY NZ")
@click.option("--steps", type=click.IntRange(min=0), required=True)
@click.option(
    "--checkpoint-dir", envvar="RKSLURM_CHECKPOINT_DIR", required=True, help="Directory or URL (default: $RKSLURM_CHECKPOINT_DIR)."
)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints.")
@click.option(
    "--checkpoint-seconds", type=click.FloatRange(min=0, min_open=True), default=None, help="Also checkpoint after this many seconds."
)
@click.option("--backend", type=click.Choice(["auto", "opencl", "cuda", "numpy"]), default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Result HDF5 file.")
@click.option("--energy-every", type=click.IntRange(min=0), default=10, show_default=True, help="Record energy every M steps (0: off).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Steps enqueued per batch (signal latency).")
@click.option("--kernel-id", default="wavesim", show_default=True)
@click.option("--velocity", type=click.Path(dir_okay=False), default=None, help="Velocity model .npy, shape (NZ, NX), m/s.")
@click.option("--dx", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True, help="Cell size in metres.")
@click.option(
    "--v-top", type=click.FloatRange(min=0, min_open=True), default=1500.0, show_default=True, help="Built-in model: upper layer."
)
@click.option(
    "--v-bottom", type=click.FloatRange(min=0, min_open=True), default=2500.0, show_default=True, help="Built-in model: lower layer."
)
@click.option("--throttle-ms", type=float, default=0.0, hidden=True, help="Sleep after each batch (tests).")
@click.pass_context
def wavesim(ctx: click.Context, **kw: object) -> None:
    """3D acoustic wave FDTD."""
    doc = dict(kw)
    doc["grid"] = list(doc["grid"])  # type: ignore[call-overload]
    ctx.exit(_run(doc, "rkrun wavesim"))


if __name__ == "__main__":  # pragma: no cover
    main()
