"""PNG figures: slices of the final pressure field over the velocity model, and a
timeline of the run marking each preemption (stop) and each restore.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyse import ResultError, load_result  # noqa: E402
from common import atomic_path  # noqa: E402
from events import Attempt, attempts, read_events, summarise  # noqa: E402


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
    pressure: np.ndarray, velocity: np.ndarray | None, source: tuple[int, int, int] | None, out: str | Path, title: str = ""
) -> None:
    """Three slices through the source: x-z (side), x-y (plan) and y-z; velocity as contours."""
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
        ax.set_title(name)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.colorbar(im, ax=axes, shrink=0.8, label="pressure")
    fig.suptitle(title or "final pressure field (black: velocity interface)")
    _save(fig, out)


def plot_timeline(runs: list[Attempt], out: str | Path, total_steps: int | None = None) -> None:
    """Step reached against wall time, one segment per attempt; ✕ stops, ▲ restores."""
    fig, ax = plt.subplots(figsize=(10, 4.2), constrained_layout=True)
    times = [t for a in runs for t in (a.start_time, a.end_time, *(p[0] for p in a.points)) if t is not None]
    t0 = min(times) if times else None
    use_time = t0 is not None and all(a.start_time is not None for a in runs)

    def x(t: float | None, i: int, frac: float) -> float:
        if use_time and t is not None and t0 is not None:
            return t - t0
        return i + frac

    for i, a in enumerate(runs):
        pts = [(x(a.start_time, i, 0.0), a.start_step)]
        pts += [(x(t, i, 0.5), s) for t, s in a.points if s >= a.start_step]
        end = a.end_step if a.end_step is not None else (pts[-1][1] if pts else a.start_step)
        end_x = x(a.end_time, i, 0.9) if a.end_time is not None or not use_time else pts[-1][0]
        pts.append((end_x, end))
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        label = f"job {a.job}" if a.job else f"attempt {i + 1}"
        ax.plot(xs, ys, "-", lw=2, label=label)
        if a.restored:
            ax.plot([xs[0]], [a.start_step], "^", color="tab:green", ms=10, zorder=5)
            ax.annotate(
                f"restore @ {a.start_step}",
                (xs[0], a.start_step),
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
    ax.set_title(f"simulation timeline: {s['attempts']} attempts, {s['interruptions']} preemptions, {s['restores']} restores")
    ax.set_xlabel("wall time since first start (s)" if use_time else "attempt")
    ax.set_ylabel("simulation step")
    if runs:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("result", help="rkrun result HDF5")
    ap.add_argument("--model", help="velocity model .npy (default: /velocity of the result)")
    ap.add_argument("--log", help="the simulate step's run log (rkrun output of every attempt)")
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
    src = attrs.get("source")
    source = tuple(int(v) for v in src) if isinstance(src, list | tuple) and len(src) == 3 else None
    plot_fields(
        pressure, velocity, source, a.fields, title=f"final pressure at step {attrs.get('step', '?')} ({attrs.get('backend', '?')})"
    )
    runs = attempts(read_events(a.log)) if a.log else []
    plot_timeline(runs, a.timeline, total_steps=attrs.get("step") if isinstance(attrs.get("step"), int) else None)
    s = summarise(runs)
    print(
        f"plot: wrote {a.fields} and {a.timeline} ({s['attempts']} attempts, {s['interruptions']} preemptions, restored from {s['restored_from']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
