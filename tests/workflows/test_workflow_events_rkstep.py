"""The workflow's timeline numbers come from the step protocol's JSONL events (rkstep.events), no log text."""

from __future__ import annotations

from pathlib import Path

from rkstep import EventWriter, StepPaths
from rkstep.events import attempts, read_events, summarise


def test_rkstep_events_tell_the_whole_story(tmp_path: Path) -> None:
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
    runs = attempts(read_events(p))
    assert [r.job for r in runs] == ["11", "12", "13"]
    assert runs[0].stopped and runs[0].reached == 130 and runs[0].stop_signal == "SIGTERM" and runs[0].end_rc == 75
    assert runs[1].restored and runs[1].start_step == 130 and runs[1].reached == 200 and not runs[1].done and runs[1].interrupted
    assert runs[1].chain_shape == (100, 1)
    assert runs[2].done and runs[2].reached == 300 and runs[2].end_rc == 0
    s = summarise(runs)
    assert s["restored_from"] == [130, 200] and s["stopped_at"] == [130] and s["completed"] is True
