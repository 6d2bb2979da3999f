"""QC: do the first arrivals picked from the wave simulation agree with the computed traveltimes?

The wave result holds a pressure trace per receiver (``/traces``: step, then
one column per receiver; ``/receiver_cells``: (x, y, z)); the traveltime
result holds the first-arrival time of every cell (``/traveltime``). Each
trace is picked where its amplitude first reaches ``--threshold`` of its
maximum (the energy onset; 2% by default: an arrival through a fast lens
comes first but weak, and a 10% pick missed it by 3 samples at 128^3). A pick lags the true arrival by a constant that
depends on the source wavelet, so the lag is estimated as the median of
pick - traveltime and removed; the QC passes when every residual is within
``--tolerance`` sample intervals. Receivers the first arrival reaches only
late in the simulated time are left out. Writes a JSON report; exit 0 pass, 1 fail
(naming the receivers), 2 unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_path  # noqa: E402


class QCError(Exception):
    pass


def _read(path: str | Path, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise QCError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        missing = [n for n in names if not isinstance(f.get(n), h5py.Dataset)]
        if missing:
            raise QCError(f"{path}: missing dataset(s) {', '.join('/' + n for n in missing)}")
        return {n: np.asarray(f[n][()]) for n in names}, dict(f.attrs)


def pick(traces: np.ndarray, threshold: float) -> np.ndarray:
    """Step of the first sample whose |amplitude| reaches ``threshold`` of the trace's maximum (nan: silent trace)."""
    steps, amp = traces[:, 0], np.abs(traces[:, 1:])
    peak = amp.max(axis=0)
    hit = amp >= threshold * np.where(peak > 0, peak, np.inf)
    first = np.argmax(hit, axis=0)
    return np.where(hit.any(axis=0), steps[first], np.nan)


def qc(wave: str | Path, traveltime: str | Path, threshold: float = 0.02, tolerance: float = 2.0) -> dict[str, object]:
    w, wa = _read(wave, ("traces", "receiver_cells"))
    t, ta = _read(traveltime, ("traveltime",))
    traces, cells, tt = w["traces"], w["receiver_cells"].astype(np.int64), t["traveltime"]
    if traces.ndim != 2 or cells.ndim != 2 or cells.shape[1] != 3 or traces.shape[1] != 1 + len(cells):
        raise QCError(f"{wave}: /traces {traces.shape} does not match /receiver_cells {cells.shape}")
    if len(traces) < 2:
        raise QCError(f"{wave}: /traces has {len(traces)} samples; need at least 2")
    nz, ny, nx = tt.shape
    if (cells < 0).any() or (cells[:, 0] >= nx).any() or (cells[:, 1] >= ny).any() or (cells[:, 2] >= nz).any():
        raise QCError(f"{traveltime}: receivers lie outside its {nx}x{ny}x{nz} grid")
    dt = float(wa.get("dt", 0.0) or 0.0)
    if not dt > 0:
        raise QCError(f"{wave}: no time step (attribute dt)")
    interval = float(np.median(np.diff(traces[:, 0]))) * dt
    picks = pick(traces, threshold) * dt
    times = tt[cells[:, 2], cells[:, 1], cells[:, 0]].astype(np.float64)
    # a receiver the first arrival reaches only in the last quarter of the simulated time is not checked:
    # its onset may not have been recorded yet
    reached = np.isfinite(times) & (times <= 0.75 * float(traces[-1, 0]) * dt)
    ok = reached & np.isfinite(picks)
    if not ok.any():
        return {"receivers": cells.tolist(), "checked": 0, "pass": None, "note": "no receiver is reached early enough to pick"}
    lag = float(np.median(picks[ok] - times[ok]))
    resid = picks - times - lag
    bad = [int(i) for i in np.flatnonzero(reached & ~(np.abs(np.nan_to_num(resid, nan=np.inf)) <= tolerance * interval))]
    return {
        "checked": int(reached.sum()),
        "receivers": cells.tolist(),
        "pick_s": [None if not np.isfinite(p) else float(p) for p in picks],
        "traveltime_s": [None if not np.isfinite(x) else float(x) for x in times],
        "residual_s": [None if not np.isfinite(r) else float(r) for r in resid],
        "lag_s": lag,
        "sample_interval_s": interval,
        "tolerance_s": tolerance * interval,
        "rms_residual_s": float(np.sqrt(np.mean(resid[ok] ** 2))),
        "max_abs_residual_s": float(np.max(np.abs(resid[ok]))),
        "failed_receivers": bad,
        "pass": not bad,
        "traveltime_converged_step": int(ta.get("converged_step", -1)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wave", help="rkrun wavesim result with /traces (--receivers N)")
    ap.add_argument("traveltime", help="rkrun traveltime result")
    ap.add_argument("--json", required=True, help="QC report")
    ap.add_argument("--threshold", type=float, default=0.02, help="pick at this fraction of the trace's peak")
    ap.add_argument("--tolerance", type=float, default=2.0, help="allowed residual, in sample intervals")
    a = ap.parse_args(argv)
    try:
        report = qc(a.wave, a.traveltime, a.threshold, a.tolerance)
    except QCError as e:
        print(f"qc: {e}", file=sys.stderr)
        return 2
    with atomic_path(a.json) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    n = report["checked"]
    if report["pass"] is None:
        print(f"qc: nothing to check ({report['note']})")
        return 0
    print(
        f"qc: {n} receivers checked, picks - traveltimes after a {report['lag_s']:.4f} s wavelet lag: rms {report['rms_residual_s']:.4f} s, "
        f"max {report['max_abs_residual_s']:.4f} s (tolerance {report['tolerance_s']:.4f} s): {'PASS' if report['pass'] else 'FAIL'}"
    )
    if not report["pass"]:
        print(f"qc: receivers {report['failed_receivers']} disagree with the traveltimes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
