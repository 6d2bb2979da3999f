"""Incremental events reading (issue 21): from the last offset, torn and hostile lines skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rkstep.events import EventWriter
from snakemake_executor_plugin_rkslurm.eventfeed import MAX_LINE, EventFeed


def test_reads_only_what_was_appended(tmp_path: Path) -> None:
    path = tmp_path / "rkstep.events.jsonl"
    feed = EventFeed(path)
    assert feed.poll() == [] and feed.reads == 0  # no file yet
    w = EventWriter(path, job="7")
    w.start(0)
    w.checkpoint(3)
    assert [e["event"] for e in feed.poll()] == ["start", "checkpoint"]
    assert feed.poll() == [] and feed.reads == 1  # nothing new: not even read
    w.stop(4, "SIGTERM")
    w.end(75, 4)
    a = feed.latest_attempt("7")
    assert a is not None and a.stopped_step == 4 and a.end_rc == 75 and feed.reads == 2


def test_torn_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    line = json.dumps({"event": "checkpoint", "job": "7", "restart": 0, "step": 5})
    path.write_text(line[:10])
    feed = EventFeed(path)
    assert feed.poll() == [] and feed.offset == 0
    with open(path, "a") as f:
        f.write(line[10:] + "\n")
    assert [e["step"] for e in feed.poll()] == [5]


def test_replaced_or_truncated_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    EventWriter(path, job="1").start(0)
    feed = EventFeed(path)
    feed.poll()
    tmp = tmp_path / "new"
    EventWriter(tmp, job="2").start(0)
    os.replace(tmp, path)
    assert [e["job"] for e in feed.poll()] == ["2"] and [e["job"] for e in feed.events] == ["2"]


def test_over_long_and_garbage_lines_are_skipped_not_buffered(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    with open(path, "wb") as f:
        f.write(b"x" * (MAX_LINE * 3))  # no newline: dropped as read
    feed = EventFeed(path)
    feed.poll()
    assert feed.events == [] and feed.offset == MAX_LINE * 3
    with open(path, "ab") as f:
        f.write(b"tail of the long line\nnot json\n[1, 2]\n")
        f.write((json.dumps({"event": "end", "job": "1", "restart": 0, "rc": 0}) + "\n").encode())
    assert [e["event"] for e in feed.poll()] == ["end"]
