"""Our own small sbatch submitter: the stock plugin's command, our extras, retried.

The stock executor builds its sbatch command with public helpers
(``get_submit_command``, ``set_gres_string``, account/partition arguments, the
job's exec line); we call them as they are and add what a checkpointed step
needs -- ``--signal``, ``--requeue``, the step's tag as ``--comment``,
``RKSLURM_CHECKPOINT_DIR`` in the job's environment -- as plain arguments. No
stock function is rebound and no private method overridden, so the stock
plugin's version can move within the tested range.

sbatch that cannot reach slurmctld (a controller restart, a failover, a
network blip) is retried with exponential backoff for a bounded window, so a
short outage during a resubmission does not fail a step that was only waiting.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import interruptions, ranks
from .ranks import Geometry

#: sbatch errors that say "slurmctld is not answering right now", not "this request is wrong"
TRANSIENT_SBATCH_ERROR = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Slurm temporarily unable|temporarily unavailable|"
    r"Connection refused|Transport endpoint|Zero Bytes were transmitted|Communication connection failure|"
    r"slurm_persist_conn|Slurm backup controller in standby mode|Resource temporarily unavailable",
    re.I,
)


class SubmitError(RuntimeError):
    """sbatch refused the job, or slurmctld stayed unreachable for the whole retry window."""


@dataclass(frozen=True)
class SubmitExtras:
    """What rkslurm adds to the stock sbatch command of one step."""

    env: Mapping[str, str] = field(default_factory=dict)
    options: Sequence[str] = ()
    #: ``--comment``: names the step so a later head process can find and adopt its live job
    comment: str | None = None
    #: nodes to keep away from (failed under this step before)
    exclude: Sequence[str] = ()
    #: nodes x tasks to ask for instead of the rule's (a multi-rank step resubmitted smaller); None: the rule's
    geometry: Geometry | None = None
    #: run the step-level Snakemake in the batch shell, not in slurm-jobstep's ``srun -n1`` (multi-rank steps)
    in_batch_shell: bool = False


@dataclass(frozen=True)
class SbatchRun:
    """The outcome of one ``sbatch`` run (injectable for tests)."""

    returncode: int
    stdout: str
    stderr: str


def run_sbatch(call: str, stdin: str | None, timeout: float = 120.0) -> SbatchRun:
    p = subprocess.run(call, shell=True, input=stdin, capture_output=True, text=True, timeout=timeout)
    return SbatchRun(p.returncode, p.stdout, p.stderr)


def sbatch_with_retry(
    call: str,
    stdin: str | None,
    window_seconds: float,
    *,
    run: Callable[[str, str | None], SbatchRun] = run_sbatch,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    warn: Callable[[str], None] | None = None,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
) -> str:
    """Run sbatch; retry transient failures with backoff until ``window_seconds`` have passed.

    Returns sbatch's stdout. Raises :class:`SubmitError` at once for any other
    failure (bad options, an unknown partition: retrying cannot help), and
    after the window for a controller that never answered.
    """
    deadline = clock() + max(0.0, window_seconds)
    delay = first_delay
    tries = 0
    while True:
        tries += 1
        try:
            r = run(call, stdin)
        except subprocess.TimeoutExpired as exc:
            r = SbatchRun(124, "", f"sbatch timed out after {exc.timeout} s (Socket timed out)")
        if r.returncode == 0:
            if tries > 1 and warn is not None:
                warn(f"sbatch worked again after {tries - 1} failed tries")
            return r.stdout
        err = (r.stderr or r.stdout).strip()
        if not TRANSIENT_SBATCH_ERROR.search(err):
            raise SubmitError(f"sbatch failed (exit {r.returncode}): {err[:1000]}")
        left = deadline - clock()
        if left <= 0:
            raise SubmitError(
                f"sbatch could not reach slurmctld for {window_seconds / 60:.1f} min ({tries} tries; "
                f"--rkslurm-submit-retry-minutes): {err[:500]}"
            )
        wait = min(delay, max_delay, left)
        if warn is not None:
            warn(f"sbatch cannot reach slurmctld ({err[:200]}); retry {tries} in {wait:.0f} s, giving up in {left / 60:.1f} min")
        sleep(wait)
        delay *= 2


def add_extras(stock_call: str, extras: SubmitExtras) -> str:
    """``sbatch <stock options>`` → ``ENV=... sbatch <ours> <stock options>``.

    Our ``--comment`` goes last among the options so it wins over the stock
    ``--comment rule_...`` (sbatch takes the last value of a repeated option).
    """
    if not stock_call.startswith("sbatch "):
        raise SubmitError(f"unexpected stock submit command (does not start with 'sbatch '): {stock_call[:200]}")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in extras.env.items())
    opts = " ".join(extras.options)
    rest = stock_call[len("sbatch ") :]
    comment = f" --comment {shlex.quote(extras.comment)}" if extras.comment else ""
    return f"{env + ' ' if env else ''}sbatch {opts + ' ' if opts else ''}{rest}{comment}"


def build_submission(executor: Any, job: Any, extras: SubmitExtras) -> tuple[str, str | None, Path]:
    """The full sbatch call for ``job`` as the stock executor would build it, plus our extras.

    Returns (shell command, script for stdin or None, log path pattern with %j).
    """
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import get_job_wildcards, set_gres_string
    from snakemake_executor_plugin_slurm.validation import validate_slurm_extra

    partition = job.resources.get("slurm_partition") or getattr(executor, "_default_partition", None)
    extras = dataclasses.replace(extras, env=interruptions.job_env(extras.env, partition))  # M for --checkpoint-every auto
    wildcard_str = get_job_wildcards(job)
    logfile = log_pattern(executor, job)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    validate_slurm_extra(job)
    stock_comment = f"rule_{job.name}" + (f"_wildcards_{wildcard_str}" if wildcard_str else "")
    if extras.comment:
        # keep the stock comment (tools match on rule_<name>) and add our tag as its own word
        extras = dataclasses.replace(extras, comment=f"{stock_comment} {extras.comment}")
    params = {
        "run_uuid": executor.run_uuid,
        "slurm_logfile": logfile,
        "comment_str": stock_comment,
        "account": next(executor.get_account_arg(job)),
        "partition": executor.get_partition_arg(job),
        "workdir": executor.workflow.workdir_init,
    }
    s = executor.workflow.executor_settings
    # the stock setting --slurm-exclude-failed-nodes fills the stock's set; ours come from the step's history
    failed = set(getattr(executor, "_failed_nodes", ()) or ()) | set(extras.exclude)
    call = get_submit_command(job, params, settings=s, failed_nodes=failed)
    if extras.geometry is not None:
        call = ranks.apply(call, extras.geometry)
    call += set_gres_string(job)
    call = add_extras(call, extras)
    exec_job = executor.format_job_exec(job)
    if extras.in_batch_shell:
        exec_job = ranks.batch_exec(exec_job, executor.additional_general_args())
    if getattr(s, "pass_command_as_script", False):
        return call + " /dev/stdin", "\n".join(["#!/bin/sh", exec_job]), logfile
    escaped = exec_job.replace('"', '\\"')
    return f'{call} --wrap="{escaped}"', None, logfile


def log_pattern(executor: Any, job: Any) -> Path:
    """Where the stock executor puts a job's Slurm log (``%j`` for the job id)."""
    from snakemake_executor_plugin_slurm.utils import get_job_wildcards

    return Path(executor.slurm_logdir) / f"rule_{job.name}" / get_job_wildcards(job) / "%j.log"


def parse_job_id(stdout: str) -> str:
    """``--parsable`` prints ``<id>`` or ``<id>;<cluster>``."""
    first = stdout.strip().split(";")[0].strip()
    if not first.isdigit():
        m = re.search(r"Submitted batch job (\d+)", stdout)
        if not m:
            raise SubmitError(f"cannot find a job id in sbatch's output {stdout.strip()[:200]!r}")
        first = m.group(1)
    return first
