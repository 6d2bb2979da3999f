"""``rkrun``: run a checkpointed kernel as a workflow step.

rkrun wavesim --grid 64 64 64 --steps 1000 --checkpoint-dir ck/ --checkpoint-every 100 --out result.h5
rkrun traveltime --grid 64 64 64 --steps 400 --checkpoint-dir ck/ --checkpoint-every 10 --out tt.h5
rkrun --kernel mymodule:KERNEL --grid ... (a kernel plugin from a module on the Python path)
rkrun --config run.yaml            (keys as the long options, plus "kernel": NAME or module:OBJECT)
rkrun traveltime --config run.yaml --steps 50   (options given on the command line win)

Every kernel gets the common options (``plugin.common_options``) and adds its
own; both are declared once (``plugin.Option``) and validated the same way
whether they come from the command line or a config file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from .plugin import ConfigError, KernelPlugin, PluginError, all_options, find_plugin, finish_values, known_kernels, parse_values
from .signals import StopFlag, ignore_stop_signals

EX_USAGE = 2
_STOP: StopFlag | None = None


def _stop() -> StopFlag:
    """The process's stop flag, installed the first time anything is about to load.

    Handlers first: a SIGTERM during the (slow) imports still ends in a
    checkpoint and exit 75, not in a killed process.
    """
    global _STOP
    if _STOP is None:
        _STOP = StopFlag().install()
    return _STOP


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="rkrun: %(message)s", stream=sys.stderr, force=True)


#: What a config value may be: a scalar, or a short flat list of them (``grid: [64, 64, 64]``).
_SCALARS = (str, int, float, bool, type(None))
_MAX_LIST = 16


def _load_config(path: Path) -> dict:
    """A config file as a mapping of option names to plain values, or a one-line ``ConfigError``.

    The file is read without blocking (a FIFO is refused, not waited on) and
    with a size cap (``/dev/zero`` is refused), decoded strictly as UTF-8, and
    parsed without executing anything (``yaml.safe_load``, JSON). Values are
    scalars or flat lists of them, so no error message ever formats a huge
    nested structure (a YAML alias bomb).
    """
    from .inputs import CONFIG_MAX_BYTES, InputFileError, decode_text, one_line, read_bounded

    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        text = decode_text(read_bounded(path, "config file", CONFIG_MAX_BYTES), path, "config file")
    except InputFileError as exc:
        raise ConfigError(str(exc)) from None
    if is_yaml:
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: a YAML config needs PyYAML, which is not installed (pip install pyyaml, or use a .json config)"
            ) from None
        # Not CSafeLoader: libyaml recurses on the C stack and a deeply nested file
        # ("a: [[[[...") crashes the process (SIGSEGV); the Python loader stops at
        # Python's recursion limit with an exception. Config files are small.
        loader = yaml.SafeLoader
    try:
        doc = yaml.load(text, Loader=loader) if is_yaml else json.loads(text)  # noqa: S506 - a safe loader
    except Exception as exc:  # noqa: BLE001 - any parse error is "bad config"
        raise ConfigError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'}: {one_line(exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: config must be a mapping of option names to values, not {_what(doc)}")
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if not isinstance(k, str):
            raise ConfigError(f"{path}: key {one_line(repr(k), 60)} is not a string")
        name = k.replace("-", "_")
        if isinstance(v, list):
            if len(v) > _MAX_LIST or not all(isinstance(x, _SCALARS) for x in v):
                raise ConfigError(f"{path}: {one_line(name, 60)}: must be a value or a short list of plain values, not {_what(v)}")
        elif not isinstance(v, _SCALARS):
            raise ConfigError(f"{path}: {one_line(name, 60)}: must be a number, a string or a list of them, not {_what(v)}")
        out[name] = v
    return out


def _what(doc: object) -> str:
    if isinstance(doc, list):
        return "a list" if all(isinstance(x, _SCALARS) for x in doc) else "a nested list"
    if doc is None:
        return "nothing (empty file)"
    name = type(doc).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _plugin(ref: str, source: str) -> KernelPlugin:
    # The imports run with the stop signals held, so threads they start
    # (OpenBLAS's pool, when a plugin loads numpy) inherit the blocked mask and
    # a stop signal is always delivered to this thread: see StopFlag.held.
    with _stop().held():
        return find_plugin(ref, source)


def _run(plugin: KernelPlugin, values: dict[str, Any], source: str) -> int:
    stop = _stop()
    values = finish_values(values, source)
    with stop.held():
        from rkckpt.errors import CheckpointError
        from rkckpt.logsafe import install as mask_credentials_in_logs

        from .backends import BackendUnavailable
        from .comm import world
        from .ranks import run_step

        try:
            comm = world()  # MPI starts here, with the stop signals held like any native runtime
        except ValueError as exc:  # $RKSLURM_RANK_TIMEOUT that is not a number of seconds
            logging.getLogger("rkrun").error("error: %s", exc)
            return EX_USAGE

    mask_credentials_in_logs()  # -v lets botocore log signed request headers
    try:
        return run_step(plugin, values, stop, comm)  # one process, or one rank of an MPI launch
    except (CheckpointError, BackendUnavailable) as exc:
        logging.getLogger("rkrun").error("error: %s", exc)
        return EX_USAGE if isinstance(exc, BackendUnavailable) else 1
    except OSError as exc:
        logging.getLogger("rkrun").error("error: %s: %s", exc.filename or "", exc.strerror or exc)
        return 1
    finally:
        ignore_stop_signals()


def kernel_command(plugin: KernelPlugin) -> click.Command:
    """The ``rkrun NAME`` command of a plugin: common options, its own, and ``--config``."""
    options = all_options(plugin)

    def callback(**kw: Any) -> None:
        ctx = click.get_current_context()
        config = kw.pop("config")
        if config is not None:
            doc = _load_config(config)
            kernel = doc.pop("kernel", plugin.name)
            if kernel != plugin.name:
                raise ConfigError(f"{config}: is for kernel {str(kernel)[:60]!r}, not {plugin.name!r}")
            values = parse_values(plugin, doc, str(config))
            for o in options:  # the command line wins over the file
                if ctx.get_parameter_source(o.name) == click.core.ParameterSource.COMMANDLINE or (
                    o.name not in doc and ctx.get_parameter_source(o.name) == click.core.ParameterSource.ENVIRONMENT
                ):
                    values[o.name] = kw[o.name]
        else:
            values = dict(kw)
        ctx.exit(_run(plugin, values, f"rkrun {plugin.name}"))

    params: list[click.Parameter] = [o.click_option() for o in options]
    params.append(
        click.Option(["--config"], type=click.Path(path_type=Path, dir_okay=False), default=None, help="Defaults from a JSON/YAML file.")
    )
    return click.Command(plugin.name, params=params, callback=callback, help=plugin.help or f"Run kernel {plugin.name}.")


class KernelGroup(click.Group):
    """Subcommands are the registered kernels (built in, entry points), or ``--kernel module:OBJECT``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(known_kernels())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in known_kernels() and ":" not in cmd_name:
            return None
        try:
            return kernel_command(_plugin(cmd_name, "rkrun"))
        except PluginError:
            if ctx.resilient_parsing:
                return None
            raise

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        ref = ctx.params.get("kernel")
        if ref:
            plugin = _plugin(ref, "--kernel")
            return plugin.name, kernel_command(plugin), args
        return super().resolve_command(ctx, args)


@click.group(
    cls=KernelGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "ignore_unknown_options": True},
)
@click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False), help="Run from a JSON/YAML file instead of options.")
@click.option("--kernel", "kernel", default=None, metavar="MODULE:OBJECT", help="Run a kernel plugin from a module on the Python path.")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def main(ctx: click.Context, config: Path | None, kernel: str | None, verbose: bool) -> None:
    """Run checkpointed persistent kernels (exit 75 = stopped by a signal, resumable)."""
    _setup_logging(verbose)
    if config is not None:
        if ctx.invoked_subcommand is not None:
            raise click.UsageError("use either --config or a kernel command (NAME --config FILE)")
        doc = _load_config(config)
        named = doc.pop("kernel", None)
        if named is not None and not (isinstance(named, str) and named.strip()):
            raise ConfigError(f"{config}: kernel: must be a kernel name or module:OBJECT, not {named!r:.60}")
        ref = named or kernel or "wavesim"
        plugin = _plugin(ref, str(config))
        ctx.exit(_run(plugin, parse_values(plugin, doc, str(config)), str(config)))
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(EX_USAGE)


if __name__ == "__main__":  # pragma: no cover
    main()
