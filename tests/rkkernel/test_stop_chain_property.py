"""Issue 18, item 1: a stop never writes over or behind what is durable.

A property test on real ``rkrun`` processes: 50 rounds of seeded random
SIGTERM/SIGKILL schedules, each forced at a deterministic point through
``RKSLURM_TEST_SIGNAL`` (``rkckpt.testhook``): during start-up, during the
restore (a chain found, its state not yet loaded: the re-preemption right
after a resubmission), and during a write in flight (the checkpoint's bytes
written, its name not yet given), alone or combined (SIGTERM on one write,
SIGKILL during the stop's own write). After every round the newest
restorable step (what ``rkckpt latest`` reports) never goes back, no file is
orphaned, and a stop's marker names that step; every sequence that runs to
the end gives a result bit-identical to an uninterrupted run.

The traveltime kernel on a 48^3 grid writes real delta chains (a full and
up to 8 deltas) and converges in 35 steps, so a process takes well under a
second.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from fixtures_kernel import rkrun_env
from rkckpt.chain import ChainIndex, latest_restorable
from rkckpt.storage import FileStorage
from rkckpt.testhook import ENV

SEED = 18_2026
ROUNDS = 50
KERNEL_ARGS = ("traveltime", "--grid", "48", "48", "48", "--steps", "400", "--checkpoint-every", "2", "--batch", "1", "--backend", "numpy")


def _rkrun(ck: Path, out: Path, fmt: str, schedule: str | None, log: Path) -> int:
    env = rkrun_env()
    env.pop(ENV, None)
    if schedule:
        env[ENV] = schedule
    args = [*KERNEL_ARGS, "--checkpoint-dir", str(ck), "--out", str(out), "--checkpoint-format", fmt]
    with open(log, "ab") as fh:
        fh.write(f"\n=== {schedule}\n".encode())
        fh.flush()
        return subprocess.run(
            [sys.executable, "-m", "rkkernel.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=120
        ).returncode


def _result(path: Path) -> dict[str, object]:
    with h5py.File(path, "r") as f:
        out: dict[str, object] = {k: f[k][()].tobytes() for k in f}
        out.update({f"@{k}": repr(v) for k, v in f.attrs.items() if k != "backend"})
    return out


def _newest(ck: Path) -> int:
    """The newest restorable step, as ``rkckpt latest`` finds it (-1: none); also: no file is orphaned."""
    if not ck.exists():
        return -1
    storage = FileStorage(ck, create=False)
    index = ChainIndex(storage)
    rp = latest_restorable(storage, "traveltime", index=index, warn=False)
    orphans = [e.name for e in index.sorted() if (index.chain_of(e)[1] or "").startswith("orphaned")]
    assert not orphans, f"orphaned checkpoints: {orphans}"
    return -1 if rp is None else rp.step


#: what a round's signal plan may be; each appears equally often in the shuffled 50 rounds
KINDS = ("start:TERM", "start:KILL", "restore:TERM", "restore:KILL", "write:TERM", "write:KILL", "term-then-kill", "none")


def _schedules(rng: random.Random, rounds: int) -> list[str]:
    """Seeded signal plans: where, which signal, on which visit (``rkckpt.testhook`` syntax)."""
    kinds = [KINDS[i % len(KINDS)] for i in range(rounds)]
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        if kind == "none":
            out.append("")
        elif kind == "term-then-kill":  # SIGTERM during one write, SIGKILL during the stop's own write
            n = rng.randint(1, 5)
            out.append(f"write:TERM:{n},write:KILL:{n + 1}")
        elif kind.startswith("write:"):
            out.append(f"{kind}:{rng.randint(1, 6)}")
        else:
            out.append(f"{kind}:1")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("ref")
    rc = _rkrun(d / "ck", d / "r.h5", "rk.h5", None, d / "log")
    assert rc == 0, (d / "log").read_text()
    return _result(d / "r.h5")


def test_random_signal_schedules_never_lose_a_checkpoint(tmp_path: Path, reference: dict[str, object]) -> None:
    rng = random.Random(SEED)
    log = tmp_path / "rkrun.log"
    seq, finished, seen = 0, 0, set()
    ck, out = tmp_path / "ck0", tmp_path / "r0.h5"
    newest = -1
    for rnd, schedule in enumerate(_schedules(rng, ROUNDS)):
        fmt = "rk.h5" if seq % 2 == 0 else "rkcp"
        marker = ck / "rkrun.stopped.json"
        if marker.exists():
            marker.unlink()
        rc = _rkrun(ck, out, fmt, schedule, log)
        where = f"round {rnd} (sequence {seq}, {schedule or 'no signal'}, rc {rc}); log {log}"
        after = _newest(ck)
        assert after >= newest, f"the newest restorable step went back from {newest} to {after} in {where}"
        newest = after
        if rc == -signal.SIGKILL:
            seen.add(f"{schedule.split(':')[0]}:KILL")
            continue
        if rc == 75:
            seen.add(f"{schedule.split(':')[0]}:TERM")
            doc = json.loads(marker.read_text())
            assert doc["step"] == newest, f"the stop marker names step {doc['step']}, the newest restorable is {newest}: {where}"
            continue
        assert rc == 0, f"{where}\n{log.read_text()[-3000:]}"
        assert _result(out) == reference, f"result differs from the uninterrupted run after {where}"
        finished += 1
        seq += 1
        ck, out, newest = tmp_path / f"ck{seq}", tmp_path / f"r{seq}.h5", -1
    if newest >= 0:  # the last sequence, interrupted: it too ends bit-identical
        assert _rkrun(ck, out, "rk.h5", None, log) == 0, log.read_text()[-3000:]
        assert _result(out) == reference
        assert _newest(ck) >= newest
    print(f"{ROUNDS} rounds: {finished} sequence(s) ran to the end, signals {sorted(seen)}")
    # the seed must exercise what the test is about, not only the happy path
    assert seen >= {"start:TERM", "start:KILL", "restore:TERM", "restore:KILL", "write:TERM", "write:KILL"}, seen
    assert finished >= 2, finished
    assert os.environ.get(ENV) is None
