"""One Slurm query per poll (issue 21): squeue for all ids, sacct for the purged, one listing.

Stand-in squeue/sacct are shell scripts on PATH that answer with output
recorded on the local cluster (Slurm 22.05, bench/data/) and log every call,
so each test counts the calls the real code makes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import REPO
from snakemake_executor_plugin_rkslurm import slurmquery
from snakemake_executor_plugin_rkslurm.monitor import Pacer, SlurmCli

DATA = REPO / "bench" / "data"

# recorded: `squeue -h -t all -j ... -O SQUEUE_FORMAT` (job 2 exited 3 on `short`; 4 requeued once)
ROWS = (
    "1|COMPLETED|0|N/A|2026-12-07T05:52:28|n1|0|0:30|UNLIMITED|main|1|(null)\n"
    "4|PENDING|1|N/A|2026-12-07T05:53:49|n/a|0|0:00|UNLIMITED|requeue|1|(null)\n"
    "2|FAILED|0|N/A|2026-12-07T05:52:28|n2|768|0:00|1:00|short|1|(null)\n"
    "5|FAILED|0|2026-12-07T06:00:09|2026-12-07T06:00:01|n1|15|0:08|UNLIMITED|scavenger|1|rule_sim rkslurm:ab|c d\n"
)


def _shim(tmp_path: Path, name: str, script: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(f'#!/bin/sh\necho "{name} $*" >> {tmp_path / "calls"}\n' + script)
    p.chmod(0o755)
    return p


def _calls(tmp_path: Path) -> list[str]:
    f = tmp_path / "calls"
    return f.read_text().splitlines() if f.exists() else []


@pytest.fixture
def shims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return tmp_path


def test_recorded_output_parses() -> None:
    recs = slurmquery.parse_squeue((DATA / "squeue_jobs.txt").read_text() + ROWS)
    assert recs["2"].state == "FAILED" and recs["2"].exit_code == "3:0" and recs["2"].time_limit_seconds == 60
    assert recs["4"].restarts == 1 and recs["4"].node is None and recs["4"].partition == "requeue"
    assert recs["1"].run_seconds == 30 and recs["1"].time_limit_seconds is None and recs["1"].preempted is False
    five = recs["5"]  # PreemptTime after this run's StartTime; exit by signal 15; a comment holding the separator
    assert five.preempted is True and five.exit_code == "0:15" and five.comment == "rule_sim rkslurm:ab|c d"
    assert all(r.source == "squeue" for r in recs.values())


def test_one_squeue_for_all_ids_then_one_sacct_for_the_purged(shims: Path) -> None:
    _shim(shims, "squeue", f"cat <<'EOF'\n{ROWS}EOF\n")
    _shim(shims, "sacct", "echo '99|COMPLETED|0:0|n1|main|00:00:03|UNLIMITED'\n")
    ids = ["1", "2", "4", "5", *(str(i) for i in range(100, 400)), "99"]
    got = slurmquery.query(ids)
    calls = _calls(shims)
    assert len(calls) == 2, calls
    assert calls[0].startswith("squeue -h -t all -j 1,2,4,5,100,") and "-O JobID:|,State:|" in calls[0]
    assert calls[1].startswith("sacct ") and "-j 100,101," in calls[1] and ",99 " in calls[1]
    assert got["99"].source == "sacct" and got["99"].preempted is None
    assert got["2"].source == "squeue" and set(got) == {"1", "2", "4", "5", "99"}


def test_single_purged_id_goes_to_sacct(shims: Path) -> None:
    _shim(shims, "squeue", "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1\n")
    _shim(shims, "sacct", "echo '7|PREEMPTED|0:15|n2|scavenger|00:00:12|00:30:00'\n")
    got = slurmquery.query(["7"])
    assert got["7"].state == "PREEMPTED" and len(_calls(shims)) == 2


def test_nothing_asked_when_all_ids_are_known(shims: Path) -> None:
    _shim(shims, "squeue", f"cat <<'EOF'\n{ROWS}EOF\n")
    _shim(shims, "sacct", "exit 1\n")
    assert set(slurmquery.query(["1", "2"])) == {"1", "2"}
    assert [c.split()[0] for c in _calls(shims)] == ["squeue"]


@pytest.mark.parametrize(
    "err", ["squeue: error: Request rate limit exceeded", "slurm_load_jobs error: Socket timed out on send/recv operation"]
)
def test_rate_limit_and_timeouts_are_busy_not_states(shims: Path, err: str) -> None:
    _shim(shims, "squeue", f"echo '{err}' >&2; exit 1\n")
    _shim(shims, "sacct", "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    with pytest.raises(slurmquery.SlurmBusy, match="squeue"):
        slurmquery.query(["1", "2"])


def test_sacct_answers_while_slurmctld_is_away(shims: Path) -> None:
    _shim(shims, "squeue", "echo 'squeue: error: Unable to contact slurm controller (connect failure)' >&2; exit 1\n")
    _shim(shims, "sacct", "echo '5|RUNNING|0:0|n1|scavenger|00:00:03|UNLIMITED'\n")
    got = slurmquery.query(["5"])
    assert got["5"].state == "RUNNING" and got["5"].source == "sacct"


def test_other_failures_are_query_errors(shims: Path) -> None:
    _shim(shims, "squeue", "echo 'squeue: error: something odd' >&2; exit 1\n")
    _shim(shims, "sacct", "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    with pytest.raises(slurmquery.QueryError) as e:
        slurmquery.query(["5"])
    assert not isinstance(e.value, slurmquery.SlurmBusy)


def test_listing_is_one_squeue_me_shared_by_every_adoption_check(shims: Path) -> None:
    _shim(shims, "squeue", f"cat {DATA / 'squeue_me.txt'}\n")
    now = [0.0]
    cli = SlurmCli(listing_max_age=30.0, clock=lambda: now[0])
    rows = cli.my_jobs()
    assert rows[2] == slurmquery.QueueRow("8", "wrap", 0, "PENDING", "rule_sim rkslurm:0123abcd")
    for i in range(200):  # a start-up burst of submissions
        assert cli.tagged_jobs("rkslurm:0123abcd" if i == 0 else f"rkslurm:{i:08x}") == ([("8", "PENDING")] if i == 0 else [])
    assert _calls(shims) == ["squeue --me -h -O JobID:|,Name:|,UserID:|,State:|,Comment:"]
    now[0] = 31.0
    cli.tagged_jobs("x")
    assert len(_calls(shims)) == 2


def test_listing_failure_is_never_no_job(shims: Path) -> None:
    _shim(shims, "squeue", "echo 'squeue: error: Unable to contact slurm controller' >&2; exit 1\n")
    with pytest.raises(slurmquery.QueryError):
        SlurmCli().tagged_jobs("rkslurm:abc")


def test_pacer_backs_off_with_jitter_and_says_so_once() -> None:
    draws = iter([0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    p = Pacer(fast=2.0, slow=5.0, max_backoff=60.0, rng=lambda: next(draws))
    busy = slurmquery.SlurmBusy("squeue exited 1: Request rate limit exceeded")
    waits, msgs = zip(*(p.failed(busy) for _ in range(8)), strict=True)
    assert waits[0] == 2.0 and waits[1] == 8.0  # cap 4 s * 0.5 (floored at the fast interval), cap 8 s * 1.0
    assert max(waits) <= 60.0 and waits[-1] == 45.0  # capped at 60 s, jittered to 0.75 of it
    assert msgs[0] is not None and "rate-limiting" in msgs[0] and "no step is failed" in msgs[0]
    assert all(m is None for m in msgs[1:])
    wait, msg = p.ok(fast=False)
    assert wait == 5.0 and msg is not None and "8 failed" in msg
    assert p.ok(fast=True) == (2.0, None)
