"""SIGKILL a checkpointing process at many random instants; every restore must be exact.

The child derives its state from the step number, so after each kill the
test recomputes the expected arrays for whatever step ``latest`` returns and
compares them bit for bit. The child also reports steps that ``final()``
made durable; ``latest`` may never go back behind those.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time

import numpy as np

from rkckpt.chain import latest_restorable
from rkckpt.storage import FileStorage

KILLS = 50
SEED = 20260

STATE_CODE = r"""
import numpy as np
from rkckpt.model import Checkpoint, Metadata

def state(step):
    c = Checkpoint(Metadata("crash", "test", step))
    c.add_region("a", (np.arange(131072, dtype=np.float32) * 0.5 + (step // 7)))   # 512 KiB, changes every 7 steps
    c.add_region("b", np.full(16384, step, dtype=np.float32))                      # 64 KiB, changes every step
    return c
"""

CHILD = (
    STATE_CODE
    + r"""
import sys
from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse
m = CheckpointManager(sys.argv[1], CheckpointPolicy(every_steps=1, full_every=4, keep_chains=2), "crash")
rp = m.latest()
step = 0 if rp is None else rp.step
print("ready", step, flush=True)
while True:
    step += 1
    r = SnapshotResponse(SnapshotRequest(step), state(step))
    if step % 5 == 0:
        m.final(r)
        print("durable", step, flush=True)
    else:
        m.submit(r)
"""
)

ns: dict[str, object] = {}
exec(STATE_CODE, ns)  # noqa: S102 - the same state function the child uses
state = ns["state"]


def _read_lines(p: subprocess.Popen[str], until: str | None, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if until is not None and line.startswith(until):
            break
    return lines


def test_sigkill_at_random_instants_always_restores_exact_state(tmp_path):
    d = tmp_path / "ck"
    rng = random.Random(SEED)
    durable = 0
    restored_steps = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for i in range(KILLS):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            ready = _read_lines(p, "ready", 60)
            assert ready and ready[-1].startswith("ready"), (ready, p.stderr.read() if p.poll() is not None else "")
            assert int(ready[-1].split()[1]) >= durable
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
        rest = p.stdout.read().split()
        p.stdout.close()
        p.stderr.close()
        for j in range(len(rest) - 1):
            if rest[j] == "durable":
                durable = max(durable, int(rest[j + 1]))
        rp = latest_restorable(FileStorage(d), "crash", warn=False)
        if durable:
            assert rp is not None, f"kill {i}: nothing restorable after durable step {durable}"
        if rp is None:
            continue
        assert rp.step >= durable, f"kill {i}: restored step {rp.step} is behind durable step {durable}"
        want = state(rp.step)
        for name in ("a", "b"):
            np.testing.assert_array_equal(
                rp.checkpoint.region(name), want.region(name), err_msg=f"kill {i}: region {name} at step {rp.step}"
            )
        assert rp.checkpoint.metadata.current_step == rp.step
        restored_steps.append(rp.step)
    assert len(restored_steps) >= KILLS - 2
    assert restored_steps == sorted(restored_steps)  # progress is never lost
    assert restored_steps[-1] > 20
