"""PNG figures: slices of the final pressure field over the velocity model (with the
first-arrival traveltimes as contours), and a timeline of each preemptible step
marking every preemption (stop) and every restore with the chain it came from.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyse import ResultError, load_result  # noqa: E402
from common import atomic_path  # noqa: E402

from rkstep.events import Attempt, attempts, read_events, summarise  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def velocity_3d(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """rkkernel stores a 2-D (nz, nx) model constant along y, or a full 3-D one; give a (nz, ny, nx) view."""
    nz, ny, nx = shape
    if v.shape == (nz, ny, nx):
        return v
    if v.shape == (nz, nx):
        return np.broadcast_to(v[:, None, :], (nz, ny, nx))
    raise ValueError(f"model shape {v.shape} does not match the field {shape} (expected (nz, nx) or (nz, ny, nx))")


def plot_fields(
    pressure: np.ndarray,
    velocity: np.ndarray | None,
    source: tuple[int, int, int] | None,
    out: str | Path,
    title: str = "",
    traveltime: np.ndarray | None = None,
) -> None:
    """Three slices through the source: x-z (side), x-y (plan) and y-z; velocity as contours,
    first-arrival times (``traveltime``, seconds) as labelled green contours."""
    nz, ny, nx = pressure.shape
    sx, sy, sz = source if source is not None else (nx // 2, ny // 2, nz // 4)
    lim = float(np.abs(pressure).max()) or 1.0
    slices = [
        (f"x–z at y={sy}", pressure[:, sy, :], None if velocity is None else velocity[:, sy, :], "x", "z"),
        (f"x–y at z={sz}", pressure[sz, :, :], None if velocity is None else velocity[sz, :, :], "x", "y"),
        (f"y–z at x={sx}", pressure[:, :, sx], None if velocity is None else velocity[:, :, sx], "y", "z"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), constrained_layout=True)
    im = None
    for ax, (name, p, v, xl, yl) in zip(axes, slices, strict=True):
        im = ax.imshow(p, cmap="seismic", vmin=-lim, vmax=lim, origin="upper", interpolation="nearest")
        if v is not None and float(v.max()) > float(v.min()):
            ax.contour(v, levels=[0.5 * (float(v.min()) + float(v.max()))], colors="k", linewidths=0.8)
        if traveltime is not None:
            tt = {"x–z": traveltime[:, sy, :], "x–y": traveltime[sz, :, :], "y–z": traveltime[:, :, sx]}[name.split(" ")[0]]
            finite = tt[np.isfinite(tt)]
            if finite.size and float(finite.max()) > 0:
                levels = np.linspace(0, float(finite.max()), 8)[1:]
                cs = ax.contour(np.where(np.isfinite(tt), tt, np.nan), levels=levels, colors="tab:green", linewidths=0.7)
                ax.clabel(cs, fmt="%.2f s", fontsize=6)
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.colorbar(im, ax=axes, shrink=0.8, label="pressure")
    what = "black: velocity interface" + (", green: first-arrival time" if traveltime is not None else "")
    fig.suptitle(f"{title or 'final pressure field'} ({what})")
    _save(fig, out)


_SET_RANKS = re.compile(r"\.r\d+of(\d+)-")


def written_by(a: Attempt) -> int | None:
    """How many ranks wrote the checkpoint set an attempt restored from (its part names ``<kernel>.r<i>of<N>-…``)."""
    m = _SET_RANKS.search(a.chain[0]) if a.chain else None
    return int(m.group(1)) if m else (1 if a.chain else None)


def plot_timeline(
    runs: list[Attempt],
    out: str | Path,
    total_steps: int | None = None,
    more: list[tuple[str, list[Attempt], int | None] | tuple[str, list[Attempt], int | None, bool]] = (),
) -> None:
    """Step reached against wall time, one segment per attempt; ✕ stops, ▲ restores (with the chain restored).

    ``more``: further steps' timelines (name, attempts, total steps[, show ranks]), one panel each
    below; with ranks, each attempt is labelled with its rank count (its ``start`` event's ``ranks``)
    and each restore with the rank count that wrote the set.
    """
    panels = [("simulation", runs, total_steps, False), *((*p, False)[:4] for p in more)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.2 * len(panels)), constrained_layout=True, squeeze=False)
    for ax, (name, r, total, ranks) in zip(axes[:, 0], panels, strict=True):
        _timeline_panel(ax, name, r, total, ranks)
    _save(fig, out)


def _labels(a: Attempt, i: int, ranks: bool) -> tuple[str, str]:
    """The attempt's legend label and the text after its restore marker (with ``ranks``: the rank counts)."""
    label = f"job {a.job}" if a.job else f"attempt {i + 1}"
    if not ranks:
        return label, ""
    n = a.ranks
    label += f": {n} rank{'s' if n != 1 else ''}" if n else ": ranks unknown"
    w = written_by(a)
    return label, f" from a set of {w} rank{'s' if w != 1 else ''}" if w else ""


def _timeline_panel(ax: plt.Axes, name: str, runs: list[Attempt], total_steps: int | None, ranks: bool = False) -> None:
    times = [t for a in runs for t in (a.start_time, a.end_time, *(p[0] for p in a.points)) if t is not None]
    t0 = min(times) if times else None
    use_time = t0 is not None and all(a.start_time is not None for a in runs)

    def x(t: float | None, i: int, frac: float) -> float:
        if use_time and t is not None and t0 is not None:
            return t - t0
        return i + frac

    for i, a in enumerate(runs):
        start = a.start_step or 0
        pts = [(x(a.start_time, i, 0.0), start)]
        pts += [(x(t, i, 0.5), s) for t, s in a.points if s >= start]
        end = a.reached if a.reached is not None else (pts[-1][1] if pts else start)
        end_x = x(a.end_time, i, 0.9) if a.end_time is not None or not use_time else pts[-1][0]
        pts.append((end_x, end))
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        label, restored_ranks = _labels(a, i, ranks)
        ax.plot(xs, ys, "-", lw=2, label=label)
        if a.restored:
            ax.plot([xs[0]], [start], "^", color="tab:green", ms=10, zorder=5)
            shape = a.chain_shape if written_by(a) in (None, 1) else None  # a set's parts are not a delta chain
            chain = f" (full {shape[0]} + {shape[1]} Δ)" if shape is not None else ""
            ax.annotate(
                f"restore @ {start}{chain}{restored_ranks}",
                (xs[0], start),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
                color="tab:green",
            )
        if a.interrupted:
            ax.plot([xs[-1]], [end], "X", color="tab:red", ms=10, zorder=5)
            ax.axvline(xs[-1], color="tab:red", ls=":", lw=1)
            what = f"preempted @ {end}" + (f" ({a.stop_signal})" if a.stop_signal else "")
            ax.annotate(what, (xs[-1], end), textcoords="offset points", xytext=(4, 6), fontsize=8, color="tab:red")
        if a.done:
            ax.plot([xs[-1]], [end], "o", color="k", ms=7, zorder=5)
    if total_steps:
        ax.axhline(total_steps, color="grey", ls="--", lw=1)
    s = summarise(runs)
    ax.set_title(f"{name} timeline: {s['attempts']} attempts, {s['interruptions']} preemptions, {s['restores']} restores")
    ax.set_xlabel("wall time since first start (s)" if use_time else "attempt")
    ax.set_ylabel("simulation step")
    if runs:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def total_of(attrs: dict) -> int | None:
    step = attrs.get("step")
    return step if isinstance(step, int) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("result", help="rkrun result HDF5")
    ap.add_argument("--model", help="velocity model .npy (default: /velocity of the result)")
    ap.add_argument("--log", help="the simulate step's attempt events (rkstep.events.jsonl of its checkpoint folder)")
    ap.add_argument("--traveltime", help="rkrun traveltime result: first-arrival contours over the field")
    ap.add_argument("--tt-log", help="the traveltime step's attempt events: a second timeline panel")
    ap.add_argument(
        "--mpi-log",
        help="the multi-rank step's attempt events (simulate_mpi): a panel with the ranks of each attempt (their start events')",
    )
    ap.add_argument("--fields", required=True, help="output PNG: slices of the final field")
    ap.add_argument("--timeline", required=True, help="output PNG: timeline of the run")
    a = ap.parse_args(argv)
    try:
        res = load_result(a.result)
    except ResultError as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    pressure = res["pressure"]
    attrs = res["attrs"]
    assert isinstance(pressure, np.ndarray) and isinstance(attrs, dict)
    velocity = None
    if a.model:
        try:
            velocity = velocity_3d(np.load(a.model, allow_pickle=False), pressure.shape)
        except (OSError, ValueError) as e:
            print(f"plot: {a.model}: {e}", file=sys.stderr)
            return 2
    traveltime = None
    tt_total = None
    if a.traveltime:
        try:
            with h5py.File(a.traveltime, "r") as f:
                traveltime = np.asarray(f["traveltime"][()], dtype=np.float64)
                tt_total = int(f.attrs["step"]) if "step" in f.attrs else None
        except (OSError, KeyError) as e:
            print(f"plot: {a.traveltime}: not a traveltime result ({e})", file=sys.stderr)
            return 2
        if traveltime.shape != pressure.shape:
            print(f"plot: {a.traveltime}: traveltime grid {traveltime.shape} differs from the field's {pressure.shape}", file=sys.stderr)
            return 2
    src = attrs.get("source")
    source = tuple(int(v) for v in src) if isinstance(src, list | tuple) and len(src) == 3 else None
    plot_fields(
        pressure,
        velocity,
        source,
        a.fields,
        title=f"final pressure at step {attrs.get('step', '?')} ({attrs.get('backend', '?')})",
        traveltime=traveltime,
    )
    runs = attempts(read_events(a.log)) if a.log else []
    more: list = [("traveltime", attempts(read_events(a.tt_log)), tt_total)] if a.tt_log else []
    if a.mpi_log:
        more.append(("multi-rank simulation (MPI)", attempts(read_events(a.mpi_log)), total_of(attrs), True))
    plot_timeline(runs, a.timeline, total_steps=attrs.get("step") if isinstance(attrs.get("step"), int) else None, more=more)
    s = summarise(runs)
    print(
        f"plot: wrote {a.fields} and {a.timeline} ({s['attempts']} attempts, {s['interruptions']} preemptions, restored from {s['restored_from']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
