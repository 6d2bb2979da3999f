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


# ---------------------------------------------------------------- SIGKILL during gc and retention
GC_KILLS = 50
GC_KID = "gckill"


def gc_state(step: int):
    from rkckpt.model import Checkpoint, Metadata

    c = Checkpoint(Metadata(GC_KID, "test", step))
    c.add_region("a", np.arange(2048, dtype=np.float32) + (step // 3))
    c.add_region("b", np.full(256, step, dtype=np.int32))
    return c


def _add_chains(d, n: int) -> None:
    """Continue from the newest restorable state with ``n`` more steps (a new chain every 3)."""
    from rkckpt.chain import newest_named_step
    from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse

    base = newest_named_step(os.listdir(d)) or 0 if d.exists() else 0
    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=2, keep_chains=1000), GC_KID) as m:
        m.latest()
        for s in range(base + 1, base + 1 + n):
            m.final(SnapshotResponse(SnapshotRequest(s), gc_state(s)))


def _flip_newest_full(d) -> None:
    fulls = sorted(p for p in d.glob(f"{GC_KID}-*-full.rk.h5"))
    b = bytearray(fulls[-1].read_bytes())
    b[-12] ^= 0xFF  # same size, valid header, bad checksum
    fulls[-1].write_bytes(bytes(b))


def _gc_child(d) -> None:
    from click.testing import CliRunner

    from rkckpt.cli import main

    CliRunner().invoke(main, ["gc", str(d), "--keep", "1"])


def _retention_child(d) -> None:
    from rkckpt.manager import CheckpointManager, CheckpointPolicy, SnapshotRequest, SnapshotResponse

    with CheckpointManager(d, CheckpointPolicy(every_steps=1, full_every=1, keep_chains=1), GC_KID) as m:
        rp = m.latest()
        s = 0 if rp is None else rp.step
        for step in range(s + 1, s + 4):  # retention runs after each write
            m.final(SnapshotResponse(SnapshotRequest(step), gc_state(step)))


def _kill_during(target, delay: float) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: say "starting", then run until killed
        try:
            os.close(r)
            os.write(w, b"go")
            target()
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 2) == b"go"
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    finally:
        os.waitpid(pid, 0)
        os.close(r)


def _newest(d):
    return latest_restorable(FileStorage(d, create=False), GC_KID, warn=False)


def test_sigkill_during_gc_and_retention_never_loses_the_newest_chain(tmp_path):
    from rkckpt.chain import describe
    from rkckpt.retention import gc as run_gc

    d = tmp_path / "gc"
    rng = random.Random(SEED + 1)
    interrupted = 0
    for i in range(GC_KILLS):
        _add_chains(d, 6)
        if rng.random() < 0.35:
            _flip_newest_full(d)  # gc must not count it as a kept chain
        before = _newest(d)
        assert before is not None, f"kill {i}: nothing restorable before gc"
        files = set(os.listdir(d))
        if i % 2 == 0:
            _kill_during(lambda: _gc_child(d), rng.uniform(0.0, 0.05))
        else:
            _kill_during(lambda: _retention_child(d), rng.uniform(0.0, 0.1))
        gone = files - set(os.listdir(d))
        interrupted += bool(gone)
        after = _newest(d)
        assert after is not None and after.step >= before.step, f"kill {i}: newest restorable {after and after.step} < {before.step}"
        for region in ("a", "b"):
            np.testing.assert_array_equal(after.checkpoint.region(region), gc_state(after.step).region(region), err_msg=f"kill {i}")
        # the next run finishes the job and leaves nothing orphaned
        with FileStorage(d) as s:
            run_gc(s, 1, GC_KID)
        rows = describe(FileStorage(d, create=False), verify=False, kernel_id=GC_KID)
        orphans = [r.entry.name for r in rows if r.status.startswith("orphaned")]
        assert not orphans, f"kill {i}: orphaned after the next gc: {orphans}"
        assert _newest(d).step >= after.step
    assert interrupted > 0
    print(f"{GC_KILLS} kills, {interrupted} of them after at least one file was deleted")
