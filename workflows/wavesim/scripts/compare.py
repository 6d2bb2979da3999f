"""Are two rkrun results bit-identical? Every dataset: same dtype, shape and bytes.

Used by the demo to prove that a run preempted several times ends exactly
where an uninterrupted run does. Prints a SHA-256 per dataset; exit 0 when
identical, 1 when not (naming the datasets and how much they differ), 2 when
a file cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_path  # noqa: E402

#: attributes that must agree too (the backend may legitimately be named differently)
CHECKED_ATTRS = ("step", "grid", "kernel_type", "params_fingerprint")


@dataclass(frozen=True)
class Difference:
    name: str
    problem: str


def _datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    out: dict[str, h5py.Dataset] = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return out


def compare(a_path: str | Path, b_path: str | Path) -> tuple[list[Difference], dict[str, str]]:
    """Differences (empty when bit-identical) and the SHA-256 of each dataset of ``a``."""
    diffs: list[Difference] = []
    digests: dict[str, str] = {}
    with h5py.File(a_path, "r") as fa, h5py.File(b_path, "r") as fb:
        da, db = _datasets(fa), _datasets(fb)
        for name in sorted(set(da) ^ set(db)):
            diffs.append(Difference(name, f"only in {a_path if name in da else b_path}"))
        for name in sorted(set(da) & set(db)):
            x, y = np.asarray(da[name][()]), np.asarray(db[name][()])
            digests[name] = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(Difference(name, f"{x.dtype}{x.shape} vs {y.dtype}{y.shape}"))
            elif np.ascontiguousarray(x).tobytes() != np.ascontiguousarray(y).tobytes():
                ne = np.count_nonzero(x != y) if x.dtype.kind in "fiu" else -1
                worst = float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.dtype.kind in "fiu" else float("nan")
                diffs.append(Difference(name, f"{ne} of {x.size} values differ (max abs difference {worst:.3g})"))
        for key in CHECKED_ATTRS:
            va, vb = fa.attrs.get(key), fb.attrs.get(key)
            if not np.array_equal(np.asarray(va), np.asarray(vb)):
                diffs.append(Difference(f"@{key}", f"{va!r} vs {vb!r}"))
    return diffs, digests


def write_verdict(path: str, a: str, b: str, diffs: list[Difference], digests: dict[str, str]) -> None:
    """The comparison as JSON (for the workflow's ``compare_mpi``), written atomically."""
    doc = {
        "a": a,
        "b": b,
        "identical": not diffs,
        "sha256": digests,
        "differences": [{"name": d.name, "problem": d.problem} for d in diffs],
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", help="also write the verdict here (identical, digests, differences), atomically")
    a = ap.parse_args(argv)
    try:
        diffs, digests = compare(a.a, a.b)
    except OSError as e:
        print(f"compare: cannot read results: {e}", file=sys.stderr)
        return 2
    if a.json:
        write_verdict(a.json, a.a, a.b, diffs, digests)
    for name, digest in digests.items():
        print(f"  /{name:<16} sha256 {digest[:16]}…")
    if diffs:
        print(f"compare: NOT bit-identical: {a.a} vs {a.b}", file=sys.stderr)
        for d in diffs:
            print(f"  /{d.name}: {d.problem}", file=sys.stderr)
        return 1
    print(f"compare: BIT-IDENTICAL: all {len(digests)} datasets of {a.a} equal {a.b} byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
