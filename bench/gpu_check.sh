#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (see issue 4):
#   1. cupy present (installs the cupy-cuda12x wheel if missing: from ./.whl/
#      when that folder holds it, else from PyPI),
#   2. CUDA == NumPy bit for bit on a small grid, for both the per-step path
#      and the persistent cooperative kernel, plus a checkpoint round trip
#      CUDA -> NumPy,
#   3. the stencil benchmark at 512^3 (Mcells/s vs the device's copy roofline).
# Usage: bash bench/gpu_check.sh      (from anywhere; prints everything, exits non-zero on a mismatch)
set -euo pipefail
cd "$(dirname "$0")/.."
export RKSLURM_CACHE_DIR="${RKSLURM_CACHE_DIR:-$PWD/.cache/rkslurm}"
export PYTHONPATH="$PWD/plugin${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader || echo "(nvidia-smi not available)"

echo "== cupy"
if ! "$PY" -c "import cupy" 2>/dev/null; then
    if ls .whl/cupy_cuda12x-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links .whl cupy-cuda12x
    else
        "$PY" -m pip install -q "cupy-cuda12x>=13"
    fi
fi
"$PY" -c "import cupy as cp; print('cupy', cp.__version__, 'CUDA runtime', cp.cuda.runtime.runtimeGetVersion(), 'devices', cp.cuda.runtime.getDeviceCount())"

echo "== bit identity: CUDA vs NumPy"
"$PY" - <<'PYEOF'
import os, sys, time
import numpy as np
from rkckpt import container
from rkkernel.control import Command
from rkkernel.runtime import PersistentKernel
from rkkernel.wavesim import WaveParams, current_field, make_spec

params = WaveParams(40, 36, 44)
STEPS = 300

def run(backend, persistent="0", batch=37):
    os.environ["RKKERNEL_CUDA_PERSISTENT"] = persistent
    k = PersistentKernel(make_spec(params), backend)
    k.send(Command.SNAPSHOT, 100, a=1)
    done = 0
    while done < STEPS:
        n = min(batch, STEPS - done)
        k.run(n)
        done += n
    assert k.step == STEPS, k.step
    f = current_field({n: k.region(n) for n in ("pressure_a", "pressure_b")}, STEPS)
    return k, f

ok = True
_, ref = run("numpy")
for mode in ("0", "1"):
    t = time.perf_counter()
    k, got = run("cuda", mode)
    same = got.tobytes() == ref.tobytes()
    ok &= same
    label = "persistent loop" if (mode == "1" and getattr(k.backend, "persistent", None)) else "one launch per step"
    print(f"cuda ({label}): {'IDENTICAL' if same else 'DIFFERENT'} to numpy "
          f"(max |diff| {float(np.abs(got - ref).max()):.3g}, {time.perf_counter() - t:.2f} s)")

# checkpoint written on CUDA, restored on NumPy, continued on both
os.environ["RKKERNEL_CUDA_PERSISTENT"] = "1"
k = PersistentKernel(make_spec(params), "cuda")
k.run(120)
ck = container.read(container.encode(k.create_checkpoint())).checkpoint
r = PersistentKernel(make_spec(params), "numpy")
r.restore_from_checkpoint(ck)
k.run(80); r.run(80)
same = (current_field({n: k.region(n) for n in ("pressure_a", "pressure_b")}, 200).tobytes()
        == current_field({n: r.region(n) for n in ("pressure_a", "pressure_b")}, 200).tobytes())
ok &= same
print(f"checkpoint cuda@120 -> numpy, both to 200: {'IDENTICAL' if same else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
PYEOF

echo "== stencil benchmark (512^3)"
"$PY" bench/stencil.py --backends cuda cuda-loop --sizes 256 512
