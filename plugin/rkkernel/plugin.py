"""Kernels as ``rkrun`` plugins: what a kernel declares so the one step loop can run it.

A plugin is a :class:`KernelPlugin`: a name, its own options (declared as
:class:`Option`, the same objects the common options are), and a ``build``
function that turns the option values into a :class:`KernelRun` (the
``KernelSpec`` plus what the result file holds, the host-side series to
sample and an optional early-stop test). ``rkkernel.runner`` owns
everything else: restore, batches, checkpoints, signals, the result file.

Options are validated in one place for both ways in: click converts
command-line values with each option's ``type``, and a config file's values
go through the very same ``type.convert`` (``parse_values``), so
``checkpoint_every: -5`` or ``steps: abc`` in a YAML file is refused exactly
like on the command line.

Plugins are found, in this order: the built-in kernels, the
``rkkernel.kernels`` entry-point group (``[project.entry-points."rkkernel.kernels"]``
in a package's pyproject, value ``module:OBJECT``), or ``module:OBJECT``
given directly (``rkrun --kernel mymod:KERNEL ...``) for a module on the
Python path. Importing this module loads no numpy: ``rkrun`` must install its
signal handlers before any native thread pool exists (see ``rkkernel.cli``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import numpy as np

    from .runtime import PersistentKernel
    from .spec import KernelSpec

ENTRY_POINT_GROUP = "rkkernel.kernels"
#: Built-in kernels: name -> "module:OBJECT" (imported on use).
BUILTIN = {
    "wavesim": "rkkernel.wavesim_plugin:PLUGIN",
    "traveltime": "rkkernel.traveltime_plugin:PLUGIN",
}


class PluginError(click.ClickException):
    """A kernel plugin cannot be found or is malformed (exit 2, like other bad input)."""

    exit_code = 2


class ConfigError(click.ClickException):
    """A config file cannot be used: one line ``FILE: problem``, exit 2 (no usage text: the command line was fine)."""

    exit_code = 2


# ---------------------------------------------------------------- option types
class BackendName(click.ParamType):
    """``auto`` or a back-end name ``rkkernel.backend_names`` accepts (checked without loading numpy)."""

    name = "backend"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .backend_names import BackendUnavailable, split_name

        text = str(value)
        if text != "auto":
            try:
                split_name(text)
            except BackendUnavailable as exc:
                self.fail(str(exc), param, ctx)
        return text


#: Range of the float32 values the kernels compute with: the largest finite
#: one, and the smallest normal one (the kernels flush subnormals to zero).
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
#: Integer types an option's value ends up in (kernel arguments are int32).
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def as_float32(v: float) -> float:
    """``v`` rounded to float32 as the device will hold it (OverflowError if it is out of range)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


class FiniteFloat(click.ParamType):
    """A finite float (never inf/nan) within optional bounds, checked in the dtype it is used as.

    ``dtype="float32"``: the value must be finite and, unless zero, normal as
    a float32, and the bounds are checked on the float32 value: ``1e39`` is
    a finite float64 but inf on the device, and ``1e-50`` is 0 there.
    """

    name = "float"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False, dtype: str = "float64") -> None:  # noqa: A002
        if dtype not in ("float32", "float64"):
            raise ValueError(f"FiniteFloat: dtype {dtype!r} is not float32 or float64")
        self.min, self.max, self.min_open, self.dtype = min, max, min_open, dtype

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{_short(value)} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{_short(value)} is not a finite number", param, ctx)
        used = v
        if self.dtype == "float32":
            try:
                used = as_float32(v)
            except OverflowError:
                self.fail(f"{v:g} is out of range for float32, the type it is used as (at most {FLOAT32_MAX:.4g})", param, ctx)
            if used != 0 and abs(used) < FLOAT32_TINY:
                self.fail(f"{v:g} is below float32's smallest normal number {FLOAT32_TINY:.4g} (the kernels flush it to zero)", param, ctx)
        shown = f"{v}" if used == v else f"{v} (float32: {used})"
        if self.min is not None and (used < self.min or (self.min_open and used == self.min)):
            self.fail(f"{shown} must be {'>' if self.min_open else '>='} {self.min}", param, ctx)
        if self.max is not None and used > self.max:
            self.fail(f"{shown} must be <= {self.max}", param, ctx)
        return v


class StrictInt(click.IntRange):
    """``IntRange`` that refuses booleans and floats with a fraction (YAML ``true``, ``2.5``),
    and values outside the integer type the value is used as (``dtype``: int32 or int64)."""

    def __init__(self, min: int | None = None, max: int | None = None, dtype: str = "int64", **kw: Any) -> None:  # noqa: A002
        if dtype not in INT_RANGES:
            raise ValueError(f"StrictInt: dtype {dtype!r} is not one of {sorted(INT_RANGES)}")
        super().__init__(min=min, max=max, **kw)
        self.dtype = dtype

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if isinstance(value, str) and len(value) > 40:
            self.fail(f"{_short(value)} is not an integer of at most 40 characters", param, ctx)
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(f"{value!r} is not an integer", param, ctx)
        v = super().convert(value, param, ctx)
        lo, hi = INT_RANGES[self.dtype]
        if not lo <= v <= hi:
            self.fail(f"{v} is out of range for {self.dtype}, the type it is used as ({lo} to {hi})", param, ctx)
        return v


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut: a config value may be a huge string or a deeply nested list."""
    if isinstance(value, list | tuple | dict):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


class OrAuto(click.ParamType):
    """``auto`` (the interval is chosen by cost, see ``rkkernel.autointerval``) or a value of ``inner``."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = f"{inner.name}|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return self.inner.convert(value, param, ctx)


class NonEmpty(click.ParamType):
    """A non-empty string (``--checkpoint-dir ""`` must not mean "the current folder")."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool) or not str(value).strip():
            self.fail(f"{_short(value)}: must be a non-empty string", param, ctx)
        if "\x00" in str(value):
            self.fail(f"{_short(value)}: must not contain a NUL character", param, ctx)
        return str(value)


KERNEL_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")


class KernelId(click.ParamType):
    """A kernel id is part of every checkpoint file name: letters, digits, ``_.+-``, at most 128, no ``..``."""

    name = "id"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        s = value if isinstance(value, str) else None
        if s is None or not KERNEL_ID_RE.match(s) or ".." in s:
            self.fail(
                f"{str(value)[:60]!r}{'...' if len(str(value)) > 60 else ''}: a kernel id is 1-128 characters "
                "of letters, digits and _ . + - (no '/', '..', spaces or newlines)",
                param,
                ctx,
            )
        return s


# ---------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Option:
    """One ``rkrun`` option, declared once for the command line and config files."""

    name: str  # python name; the flag is --name-with-dashes, the config key name_with_underscores
    type: click.ParamType
    default: Any = None
    help: str = ""
    nargs: int = 1
    envvar: str | None = None
    hidden: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def click_option(self) -> click.Option:
        return click.Option(
            [self.flag, self.name],
            type=self.type,
            default=self.default,
            help=self.help,
            nargs=self.nargs,
            envvar=self.envvar,
            hidden=self.hidden,
            show_default=self.default is not None and not self.hidden,
        )

    def convert(self, value: Any, source: str) -> Any:
        """A config file's value through the same type as the command line's."""
        if value is None:
            return None
        try:
            if self.nargs == 1:
                return self.type.convert(value, None, None)
            if not isinstance(value, list | tuple) or len(value) != self.nargs:
                raise click.BadParameter(f"must be a list of {self.nargs} values, got {_short(value)}")
            return tuple(self.type.convert(v, None, None) for v in value)
        except click.BadParameter as exc:
            raise ConfigError(f"{source}: {self.name}: {exc.message}") from None


@dataclass(frozen=True)
class Series:
    """A host-side series sampled every ``every`` steps (and at the last step).

    It is part of the checkpointed state (region ``rkrun.<name>``, float64,
    one row ``[step, value, ...]`` per sample), so an interrupted run's
    series equals an uninterrupted one's, and it is written to the result
    as dataset ``<name>``.
    """

    name: str
    columns: int  # values per sample, not counting the step
    every: int  # 0: off
    sample: Callable[[PersistentKernel, int], Sequence[float]]
    #: Optional: the series is Σx² of one float32 3-D region, ``sumsq(step)`` names
    #: it. The runner then reduces on the device at each sample step inside a
    #: batch (no host copy, batches not cut; order of ``rkkernel.reduce``), and
    #: ``sample`` must give the same bits (``reduce.sumsq``): it is the reference.
    sumsq: Callable[[int], str] | None = None

    @property
    def region(self) -> str:
        return f"rkrun.{self.name}"


@dataclass
class KernelRun:
    """One run's kernel, built by a plugin from the option values."""

    spec: KernelSpec
    #: Result datasets and attributes from the final state (``PersistentKernel``, step).
    result: Callable[[PersistentKernel, int], tuple[Mapping[str, np.ndarray], Mapping[str, object]]]
    series: tuple[Series, ...] = ()
    #: Early stop: the step at which the computation is complete (nothing
    #: changes any more), or None to go on. The result's ``step`` is that step,
    #: so it does not depend on where batches happened to end.
    done_at: Callable[[PersistentKernel], int | None] | None = None
    #: One rank of a multi-rank run (``rkkernel.decomp.SlabRun``), or None: a single
    #: process. The runner then totals plane sums over the ranks (``decomp.total``),
    #: keeps one checkpoint chain per rank and writes the result on rank 0 only;
    #: ``result`` returns the global arrays on rank 0.
    decomp: Any = None
    #: A decomposed run: the fingerprint of the whole simulation (one process's spec),
    #: which the result and the checkpoint sets carry instead of the slab's own.
    global_fingerprint: str | None = None


@dataclass(frozen=True)
class KernelPlugin:
    """A kernel ``rkrun`` can run: its name, its own options and how to build a run."""

    name: str
    build: Callable[[Mapping[str, Any]], KernelRun]
    options: tuple[Option, ...] = ()
    help: str = ""
    default_kernel_id: str | None = None  # default: the plugin name

    @property
    def kernel_id(self) -> str:
        return self.default_kernel_id or self.name


# ---------------------------------------------------------------- common options
def common_options(plugin: KernelPlugin) -> tuple[Option, ...]:
    return (
        Option("grid", StrictInt(min=3, dtype="int32"), None, "NX NY NZ", nargs=3),
        # A step is a float64 in the series rows: exact up to 2^53.
        Option("steps", StrictInt(min=0, max=2**53), None, "Steps to run (a kernel may finish earlier)."),
        Option("checkpoint_dir", NonEmpty(), None, "Directory or URL (default: $RKSLURM_CHECKPOINT_DIR).", envvar="RKSLURM_CHECKPOINT_DIR"),
        Option("checkpoint_every", OrAuto(StrictInt(min=1)), None, "Steps between checkpoints (auto: Young-Daly, by measured cost)."),
        Option(
            "checkpoint_seconds",
            OrAuto(FiniteFloat(min=0, min_open=True)),
            None,
            "Also checkpoint after this many seconds (auto: Young-Daly, by measured cost).",
        ),
        Option("full_every", StrictInt(min=0), 8, "Deltas between full checkpoints (0: every checkpoint full)."),
        Option("checkpoint_format", click.Choice(["rk.h5", "rkcp"]), "rk.h5", "Checkpoint files: HDF5-wrapped or bare RKCKPT."),
        Option(
            "backend",
            BackendName(),
            "auto",
            "auto, cuda, opencl, numpy, or opencl:DEVICE (e.g. opencl:intel, opencl:pocl, opencl:0:0).",
        ),
        Option("out", NonEmpty(), None, "Result HDF5 file."),
        Option("batch", StrictInt(min=1, dtype="int32"), 32, "Steps enqueued per batch (signal latency)."),
        Option("kernel_id", KernelId(), plugin.kernel_id, "Name of the checkpoint chain (part of file names)."),
        Option("throttle_ms", FiniteFloat(min=0, max=3.6e6), 0.0, "Sleep after each batch (tests).", hidden=True),
    )


REQUIRED = ("grid", "steps", "checkpoint_dir", "out")


def all_options(plugin: KernelPlugin) -> tuple[Option, ...]:
    own = {o.name for o in plugin.options}
    return tuple(o for o in common_options(plugin) if o.name not in own) + plugin.options


def parse_values(plugin: KernelPlugin, doc: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validate and convert a config mapping (keys as the long options, ``-`` or ``_``)."""
    opts = {o.name: o for o in all_options(plugin)}
    raw = {str(k).replace("-", "_"): v for k, v in doc.items()}
    unknown = set(raw) - set(opts) - {"kernel"}
    if unknown:
        shown = [_short(k, 40) for k in sorted(unknown)[:8]]
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ConfigError(f"{source}: unknown keys [{', '.join(shown)}]{more} for kernel {plugin.name!r}")
    out = {n: (o.convert(raw[n], source) if n in raw else o.default) for n, o in opts.items()}
    return out


def finish_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Fill ``checkpoint_dir`` from the environment and check the required values are there."""
    import os

    if values.get("checkpoint_dir") is None:
        env = os.environ.get("RKSLURM_CHECKPOINT_DIR")
        if env is not None:
            values["checkpoint_dir"] = NonEmpty().convert(env, None, None) if env.strip() else _empty_env(source)
    missing = [k for k in REQUIRED if values.get(k) is None]
    if missing:
        raise click.UsageError(f"{source}: missing {', '.join(missing)} (checkpoint_dir may come from RKSLURM_CHECKPOINT_DIR)")
    return values


def _empty_env(source: str) -> str:
    raise click.UsageError(f"{source}: RKSLURM_CHECKPOINT_DIR is set but empty")


# ---------------------------------------------------------------- registry
def load_object(ref: str, source: str = "--kernel") -> KernelPlugin:
    """``module:OBJECT`` (the module on the Python path) as a ``KernelPlugin``."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise PluginError(f"{source}: {ref!r} is not of the form module:OBJECT")
    mod = _import(mod_name, source)
    obj: Any = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part, None)
        except Exception as exc:  # noqa: BLE001 - a module __getattr__ or a property may raise anything
            raise PluginError(f"{source}: {ref}: looking up {part!r} raised {_one_line_exc(exc)}") from None
        if obj is None:
            raise PluginError(f"{source}: module {mod_name!r} has no {attr!r}")
    if not isinstance(obj, KernelPlugin):
        raise PluginError(f"{source}: {ref} is a {type(obj).__name__}, not a rkkernel.plugin.KernelPlugin")
    return obj


def _one_line_exc(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import(mod_name: str, source: str) -> Any:
    """Import a kernel module; whatever goes wrong in it is one line naming the module, exit 2.

    A module is user code: a syntax error, an exception at import, or a
    ``sys.exit()`` in it must not become a traceback, or worse exit 0 without
    running anything.
    """
    try:
        return importlib.import_module(mod_name)
    except SyntaxError as exc:
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        raise PluginError(f"{source}: cannot import {mod_name!r}: syntax error{where}: {exc.msg}") from None
    except ImportError as exc:
        raise PluginError(f"{source}: cannot import {mod_name!r}: {_one_line_exc(exc) if exc.name != mod_name else exc}") from None
    except SystemExit as exc:
        raise PluginError(f"{source}: importing {mod_name!r} called sys.exit({_short(exc.code)}); a kernel module must not exit") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything at import
        raise PluginError(f"{source}: importing {mod_name!r} raised {_one_line_exc(exc)}") from None


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    try:
        return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # noqa: BLE001 - a broken distribution must not break rkrun
        return {}


def known_kernels() -> dict[str, str]:
    """Kernel name -> ``module:OBJECT``: the built-in ones, then the entry-point group's."""
    found = dict(BUILTIN)
    for name, ref in _entry_points().items():
        found.setdefault(name, ref)
    return found


def guarded(plugin: KernelPlugin) -> KernelPlugin:
    """``plugin`` whose ``build`` (user code) fails as a ValueError, which rkrun reports in one line with exit 2.

    A ``sys.exit(0)`` in a plugin's build would otherwise end rkrun with 0
    having run nothing, and any other exception in it with a traceback. The
    built-in kernels are this project's code: their bugs keep their tracebacks.
    """
    if str(getattr(plugin.build, "__module__", "")).startswith("rkkernel."):
        return plugin
    build = plugin.build

    def guarded_build(values: Mapping[str, Any]) -> KernelRun:
        try:
            return build(values)
        except ValueError as exc:  # the plugin's own "bad value" message, on one line
            raise ValueError(" ".join(str(exc).split())[:1000] or f"kernel {plugin.name!r}: ValueError") from None
        except SystemExit as exc:
            raise ValueError(
                f"kernel {plugin.name!r}: building the run called sys.exit({_short(exc.code)}); a kernel plugin must not exit"
            ) from None
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise ValueError(f"kernel {plugin.name!r}: building the run raised {_one_line_exc(exc)}") from None

    return dataclasses.replace(plugin, build=guarded_build)


def find_plugin(name: str, source: str = "rkrun") -> KernelPlugin:
    """A registered kernel by name, or ``module:OBJECT`` for one on the path."""
    if ":" in name:
        return guarded(load_object(name, source))
    ref = known_kernels().get(name)
    if ref is None:
        raise PluginError(f"{source}: unknown kernel {name!r} (known: {', '.join(sorted(known_kernels()))}; or module:OBJECT)")
    return guarded(load_object(ref, f"kernel {name!r}"))
