"""sbatch retry and the extras our submitter adds to the stock command (no cluster)."""

from __future__ import annotations

import pytest

from snakemake_executor_plugin_rkslurm.submitter import (
    SbatchRun,
    SubmitError,
    SubmitExtras,
    add_extras,
    parse_job_id,
    sbatch_with_retry,
)

DOWN = SbatchRun(1, "", "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s

    def now(self) -> float:
        return self.t


def test_outage_shorter_than_the_window_is_survived() -> None:
    answers = [DOWN, DOWN, DOWN, SbatchRun(0, "123\n", "")]
    c = Clock()
    said: list[str] = []
    out = sbatch_with_retry("sbatch x", None, 60, run=lambda call, stdin: answers.pop(0), sleep=c.sleep, clock=c.now, warn=said.append)
    assert parse_job_id(out) == "123"
    assert c.sleeps == [1.0, 2.0, 4.0]  # exponential backoff
    assert any("worked again" in s for s in said)


def test_outage_longer_than_the_window_fails_with_the_reason() -> None:
    c = Clock()
    with pytest.raises(SubmitError, match="could not reach slurmctld.*Unable to contact"):
        sbatch_with_retry("sbatch x", None, 30, run=lambda call, stdin: DOWN, sleep=c.sleep, clock=c.now)
    assert sum(c.sleeps) == pytest.approx(30)


def test_a_wrong_request_is_not_retried() -> None:
    calls = []

    def run(call: str, stdin: str | None) -> SbatchRun:
        calls.append(call)
        return SbatchRun(1, "", "sbatch: error: invalid partition specified: nope")

    with pytest.raises(SubmitError, match="invalid partition"):
        sbatch_with_retry("sbatch x", None, 600, run=run, sleep=lambda s: None)
    assert len(calls) == 1


def test_extras_put_env_first_and_our_comment_last() -> None:
    stock = "sbatch --parsable --comment 'rule_sim' -p scavenger"
    call = add_extras(stock, SubmitExtras(env={"RKSLURM_CHECKPOINT_DIR": "/a b"}, options=["--signal=TERM@60"], comment="rkslurm:abc"))
    assert (
        call == "RKSLURM_CHECKPOINT_DIR='/a b' sbatch --signal=TERM@60 --parsable --comment 'rule_sim' -p scavenger --comment rkslurm:abc"
    )
    with pytest.raises(SubmitError):
        add_extras("srun x", SubmitExtras())


@pytest.mark.parametrize(("out", "jid"), [("123\n", "123"), ("77;cluster\n", "77"), ("Submitted batch job 9\n", "9")])
def test_parse_job_id(out: str, jid: str) -> None:
    assert parse_job_id(out) == jid


def test_parse_job_id_refuses_garbage() -> None:
    with pytest.raises(SubmitError):
        parse_job_id("sbatch: whatever")
