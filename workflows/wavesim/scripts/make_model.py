"""Write the velocity model (float32 .npy, shape (nz, nx)) that ``rkrun wavesim --velocity`` runs in.

Starts from rkkernel's built-in two-layer model (so with no lens the file
equals what rkrun would build itself) and can add a lens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_path  # noqa: E402


def make_model(
    nx: int,
    ny: int,
    nz: int,
    dx: float = 10.0,
    v_top: float = 1500.0,
    v_bottom: float = 2500.0,
    lens_velocity: float = 0.0,
) -> np.ndarray:
    """rkkernel's two-layer model with a dipping interface, plus an optional circular lens.

    Shape (nz, nx), float32, constant along y: the shape ``rkrun wavesim
    --velocity`` takes. ``lens_velocity`` > 0 puts a disc of that velocity
    (radius min(nx, nz)/8) in the upper layer, so the field shows the model
    came from this file.
    """
    if min(nx, ny, nz) < 3:
        raise ValueError(f"grid must be at least 3 in each axis, got {nx}x{ny}x{nz}")
    if not (v_top > 0 and v_bottom > 0 and lens_velocity >= 0):
        raise ValueError(f"velocities must be positive, got top={v_top}, bottom={v_bottom}, lens={lens_velocity}")
    from rkkernel.wavesim import WaveParams, velocity_model

    v = np.array(velocity_model(WaveParams(nx=nx, ny=ny, nz=nz, dx=dx, v_top=v_top, v_bottom=v_bottom)), dtype=np.float32)
    if lens_velocity > 0:
        z = np.arange(nz, dtype=np.float64)[:, None]
        x = np.arange(nx, dtype=np.float64)[None, :]
        r = max(1.5, min(nx, nz) / 8)
        disc = (x - 0.72 * nx) ** 2 + (z - 0.3 * nz) ** 2 <= r * r
        v[disc] = np.float32(lens_velocity)
    return v


def save_model(path: str | Path, model: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, model, allow_pickle=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", nargs=3, type=int, required=True, metavar=("NX", "NY", "NZ"))
    ap.add_argument("--dx", type=float, default=10.0)
    ap.add_argument("--v-top", type=float, default=1500.0)
    ap.add_argument("--v-bottom", type=float, default=2500.0)
    ap.add_argument("--lens-velocity", type=float, default=0.0, help="velocity of a circular lens in the upper layer (0: none)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        model = make_model(*a.grid, dx=a.dx, v_top=a.v_top, v_bottom=a.v_bottom, lens_velocity=a.lens_velocity)
    except ValueError as e:
        print(f"make_model: {e}", file=sys.stderr)
        return 2
    save_model(a.out, model)
    print(f"make_model: wrote {a.out} shape={model.shape} v=[{model.min():.0f}, {model.max():.0f}] m/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
