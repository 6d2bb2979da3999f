"""Energy over time from rkrun's result file → CSV (step, time_s, energy) and a JSON summary.

The energy series (sum of p² over the grid, sampled every few steps) is
carried through every checkpoint by rkrun, so it is complete even when the
run was preempted; this script also checks that: no gaps, steps increasing,
last sample at the final step.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_path  # noqa: E402


class ResultError(Exception):
    """The result file is not what rkrun writes; names the file and the problem."""

    def __init__(self, source: str | Path, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source, self.problem = str(source), problem


def load_result(path: str | Path) -> dict[str, object]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ResultError(path, f"not a readable HDF5 file ({e})") from None
    with f:
        for name in ("pressure", "energy"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise ResultError(path, f"missing dataset /{name}")
        energy = np.asarray(f["energy"][()], dtype=np.float64)
        if energy.ndim != 2 or energy.shape[1] != 2:
            raise ResultError(path, f"/energy must be an (n, 2) array of (step, energy), got shape {energy.shape}")
        pressure = f["pressure"]
        if pressure.ndim != 3:
            raise ResultError(path, f"/pressure must be 3-D, got shape {pressure.shape}")
        attrs = {
            k: (v.tolist() if isinstance(v, np.ndarray) else (v.item() if isinstance(v, np.generic) else v)) for k, v in f.attrs.items()
        }
        p = np.asarray(pressure[()], dtype=np.float32)
        velocity = np.asarray(f["velocity"][()]) if isinstance(f.get("velocity"), h5py.Dataset) else None
    return {"energy": energy, "pressure": p, "attrs": attrs, "velocity": velocity}


def check_model(result: dict[str, object], model_path: str | Path) -> None:
    """The simulation must have run in the model this workflow made (rkrun stores the one it used)."""
    try:
        model = np.load(model_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ResultError(model_path, f"not a readable .npy array ({e})") from None
    used = result.get("velocity")
    if not isinstance(used, np.ndarray):
        raise ResultError("result", "has no /velocity dataset to check the model against")
    if used.shape != model.shape or not np.array_equal(used, model):
        raise ResultError(model_path, f"the simulation ran in a different velocity model (shape {used.shape} vs {model.shape})")


def analyse(result: dict[str, object]) -> tuple[np.ndarray, dict[str, object]]:
    """Rows (step, time_s, energy) and the summary; raises ResultError(“result”, …) on a broken series."""
    energy = result["energy"]
    attrs = result["attrs"]
    pressure = result["pressure"]
    assert isinstance(energy, np.ndarray) and isinstance(attrs, dict) and isinstance(pressure, np.ndarray)
    steps = energy[:, 0]
    if len(steps) == 0:
        raise ResultError("result", "empty energy series")
    if np.any(np.diff(steps) <= 0):
        raise ResultError("result", "energy series steps are not strictly increasing (duplicated or lost samples across a restore?)")
    if not np.all(np.isfinite(energy[:, 1])):
        raise ResultError("result", "energy series has non-finite values")
    dt = float(attrs.get("dt", 0.0) or 0.0)
    rows = np.column_stack([steps, steps * dt, energy[:, 1]])
    final_step = int(attrs.get("step", int(steps[-1])))
    if int(steps[-1]) != final_step:
        raise ResultError("result", f"last energy sample is at step {int(steps[-1])}, the result at step {final_step}")
    gaps = np.diff(steps)
    p64 = pressure.astype(np.float64)
    summary = {
        "final_step": final_step,
        "samples": int(len(steps)),
        "sample_interval": int(np.median(gaps)) if len(gaps) else 0,
        "max_gap": int(gaps.max()) if len(gaps) else 0,
        "dt_s": dt,
        "energy_max": float(energy[:, 1].max()),
        "energy_max_step": int(steps[int(np.argmax(energy[:, 1]))]),
        "energy_final": float(energy[-1, 1]),
        "final_field_energy": float(np.dot(p64.ravel(), p64.ravel())),
        "pressure_abs_max": float(np.abs(p64).max()),
        "grid": attrs.get("grid"),
        "backend": attrs.get("backend"),
    }
    return rows, summary


def write_csv(path: str | Path, rows: np.ndarray) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "time_s", "energy"])
    for step, t, e in rows:
        w.writerow([int(step), repr(float(t)), repr(float(e))])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_json(path: str | Path, doc: dict[str, object]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("result", help="rkrun result HDF5")
    ap.add_argument("--model", help="velocity model .npy the simulation must have used")
    ap.add_argument("--csv", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    try:
        result = load_result(a.result)
        rows, summary = analyse(result)
        if a.model:
            check_model(result, a.model)
            summary["velocity_matches_model"] = True
    except ResultError as e:
        if e.source == "result":
            e = ResultError(a.result, e.problem)
        print(f"analyse: {e}", file=sys.stderr)
        return 2
    write_csv(a.csv, rows)
    write_json(a.json, summary)
    print(
        f"analyse: {summary['samples']} energy samples to step {summary['final_step']}, max {summary['energy_max']:.4g} at step {summary['energy_max_step']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
