"""rkrun writes the step protocol's attempt events (rkstep): start, restore with
chain, checkpoint, stop, end -- and nothing after a SIGKILL, which is how the
executor tells a killed attempt from an error exit."""

from __future__ import annotations

import signal
from pathlib import Path

from helpers import wait_until
from rkstep import StepPaths, attempts, read_events
from rkstep.protocol import EX_OK, EX_TEMPFAIL

ARGS = ("wavesim", "--grid", "16", "16", "16", "--steps", "200", "--checkpoint-every", "20", "--batch", "4", "--backend", "numpy")


def _attempts(ck: Path):  # type: ignore[no-untyped-def]
    return attempts(read_events(StepPaths(ck).events))


def test_sigterm_sigkill_then_finish_leave_a_readable_story(rkrun, tmp_path: Path) -> None:
    ck, out = tmp_path / "ck", tmp_path / "r.h5"
    args = (*ARGS, "--checkpoint-dir", str(ck), "--out", str(out))
    p = rkrun(*args, "--throttle-ms", "15")
    wait_until(lambda: any(a.checkpoints for a in _attempts(ck)) or p.proc.poll() is not None, 60, "a checkpoint event")
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait() == EX_TEMPFAIL, p.log()
    (first,) = _attempts(ck)
    assert first.ended and first.end_rc == EX_TEMPFAIL and first.stopped and first.stop_signal == "SIGTERM"
    assert first.checkpoints and first.stopped_step is not None and first.stopped_step >= max(first.checkpoints)

    p = rkrun(*args, "--throttle-ms", "15")
    wait_until(lambda: len(_attempts(ck)) == 2 and bool(_attempts(ck)[1].checkpoints) or p.proc.poll() is not None, 60, "a checkpoint")
    p.proc.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    second = _attempts(ck)[1]
    assert second.restored_from == first.stopped_step and second.chain, second
    assert second.killed, "a SIGKILLed attempt has a start and no end"

    p = rkrun(*args)
    assert p.wait(120) == EX_OK, p.log()
    third = _attempts(ck)[2]
    assert third.ended and third.end_rc == EX_OK and third.restored_from is not None and third.restored_from >= max(second.checkpoints)
    assert f"restored from step {third.restored_from} " in p.log()  # events and log agree


def test_error_exit_has_an_end_event(rkrun, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    p = rkrun(*ARGS, "--checkpoint-dir", str(ck), "--out", str(tmp_path / "r.h5"), "--velocity", str(tmp_path / "missing.npy"))
    rc = p.wait(60)
    assert rc != 0
    (a,) = _attempts(ck)
    assert a.ended and a.end_rc == rc and not a.killed
