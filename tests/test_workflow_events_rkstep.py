"""workflows/wavesim/scripts/events.py reads the step protocol's JSONL events (no log grepping)."""

from __future__ import annotations

import sys
from pathlib import Path

from rkstep import EventWriter, StepPaths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows" / "wavesim" / "scripts"))
import events  # noqa: E402


def test_rkstep_events_become_the_same_attempts_as_the_log(tmp_path: Path) -> None:
    p = StepPaths(tmp_path).events
    a = EventWriter(p, job="11")
    a.start(0)
    a.checkpoint(100)
    a.stop(130, "SIGTERM")
    a.end(75, 130)
    b = EventWriter(p, job="12")
    b.start()
    b.restore(130, ["wavesim-000000000100-full.rkcp", "wavesim-000000000130-delta.rkcp"])
    b.checkpoint(200)  # then SIGKILLed: no end
    c = EventWriter(p, job="13")
    c.start()
    c.restore(200, ["wavesim-000000000200-full.rkcp"])
    c.end(0, 300)
    runs = events.attempts(events.read_events(p))
    assert [r.job for r in runs] == ["11", "12", "13"]
    assert runs[0].stopped and runs[0].end_step == 130 and runs[0].stop_signal == "SIGTERM" and runs[0].rc == 75
    assert runs[1].restored and runs[1].start_step == 130 and runs[1].end_step == 200 and not runs[1].done and runs[1].interrupted
    assert runs[2].done and runs[2].end_step == 300 and runs[2].rc == 0
    s = events.summarise(runs)
    assert s["restored_from"] == [130, 200] and s["stopped_at"] == [130] and s["completed"] is True
