"""Snakemake executor plugin ``rkslurm``: the stock Slurm executor plus
checkpoint-aware handling of preemption, requeue, node failure and time limits.

Select it with ``snakemake --executor rkslurm``. Submission and all sbatch
options come from ``snakemake-executor-plugin-slurm`` (its settings are
available here under the ``--rkslurm-`` prefix); this package adds its own
submitter (:mod:`.submitter`) and a status loop (:mod:`.monitor`) that maps
every Slurm state through :func:`.policy.classify` and :func:`.policy.decide`.
The step side of the contract is :mod:`rkstep`.
"""

# No ``from __future__ import annotations`` here: Snakemake's plugin registry
# uses the dataclass field types as argparse ``type=`` callables.
from dataclasses import dataclass, field

from snakemake_executor_plugin_slurm import ExecutorSettings as _StockSettings
from snakemake_interface_executor_plugins.settings import CommonSettings

from rkstep.folder import rkslurm_checkpoint_dir

__all__ = ["Executor", "ExecutorSettings", "common_settings", "rkslurm_checkpoint_dir"]


def _setting(default: object, help_text: str) -> object:
    """One ``--rkslurm-*`` option: a command-line setting only (no environment variable), never required."""
    return field(default=default, metadata={"help": help_text, "env_var": False, "required": False})


@dataclass
class ExecutorSettings(_StockSettings):
    """The stock ``--slurm-*`` settings (as ``--rkslurm-*``) plus ours."""

    max_preemptions: int = _setting(
        10,
        "Resubmit a step after at most this many preemptions (CANCEL resubmits and REQUEUE restarts together); one more fails the step, listing all its Slurm job ids.",
    )
    max_timeouts: int = _setting(
        20,
        "Continue a step that hit its time limit at most this many times; each continuation needs checkpoint progress since the previous attempt.",
    )
    max_node_failures: int = _setting(3, "Resubmit after NODE_FAIL/BOOT_FAIL at most this many times (the failed node is excluded).")
    min_nodes: int = _setting(
        0,
        "A multi-node step (resources nodes/tasks) whose partition has too few nodes left after a node failure may be resubmitted on as few as this many nodes, its tasks scaled down in proportion (2 nodes x 4 tasks -> 1 x 2); the step restores its checkpoint on the new rank count. 0: never fewer nodes than requested (the step fails, saying so). A rule's resource rkslurm_min_nodes overrides it. Such steps are submitted with --no-requeue, so that a node failure comes back to rkslurm instead of Slurm requeueing the full size.",
    )
    node_failure_wait: float = _setting(
        60.0,
        "Seconds a multi-node step's job that ended FAILED/CANCELLED without a word from the step is held before it counts as a kill or an error: its MPI launcher may have given up on a dead node before slurmctld marked it down (SlurmdTimeout); once Slurm names the node, the step is resubmitted without it.",
    )
    shrink_after: float = _setting(
        60.0,
        "Seconds a resubmitted (or requeued) multi-node step may wait in the queue for its full size (reason Resources, Priority, ReqNodeNotAvail) before it is cancelled and resubmitted on the nodes that are free now, tasks scaled down in proportion; only where --rkslurm-min-nodes (or the rule's rkslurm_min_nodes) allows fewer nodes. The shrinking lasts one job: the next resubmission asks for the full size again.",
    )
    max_kills: int = _setting(
        3,
        "Resubmit a step whose attempt was killed by a signal it could not catch (SIGKILL, the OOM killer) after writing a newer checkpoint at most this many times; a plain error exit is never resubmitted.",
    )
    submit_retry_minutes: float = _setting(
        10.0, "Keep retrying sbatch (with backoff) this many minutes while it cannot reach slurmctld, before failing the step."
    )
    poll_interval: float = _setting(
        2.0, "Seconds between status polls while a step runs on a preemptible partition (PreemptMode CANCEL/REQUEUE)."
    )
    slow_poll_interval: float = _setting(5.0, "Seconds between status polls when no active step is preemptible.")
    checkpoint_root: str = _setting(
        ".snakemake/rkslurm",
        "Folder under which each step gets <rule>/<wildcards> as its checkpoint folder (exported to the job as RKSLURM_CHECKPOINT_DIR). A rule overrides it with the resource or param 'rkslurm_checkpoint_dir'.",
    )
    keep_checkpoints: bool = _setting(False, "Keep a step's checkpoint folder after the step succeeded (default: remove it).")
    signal_lead_time: int = _setting(
        60,
        "Seconds before the time limit at which Slurm sends SIGTERM to the step (sbatch --signal=TERM@N), so it can write its final checkpoint.",
    )


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=False,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=1,
)

from .executor import Executor  # noqa: E402  (needs ExecutorSettings above)
