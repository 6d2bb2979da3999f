"""Under a non-rkslurm executor: keep the step's checkpoint folder only if it belongs to these params.

The rkslurm executor fingerprints the folder itself; this gives a local run
the same protection (a changed grid or step count never restores stale
state) using the executor package's own ``ckptdir.prepare`` and the step
protocol's ``declared_fingerprint`` -- the value the executor computes from
the rule's ``fingerprint`` param and inputs, so the folder survives a switch
between executors.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: prepare_ckpt.py DIR FINGERPRINT-TEXT [INPUT-FILE...]", file=sys.stderr)
        return 2
    path, text, files = args[0], args[1], args[2:]
    if "://" in path:
        return 0  # remote storage: rkrun itself refuses a checkpoint of another simulation
    from pathlib import Path

    from rkstep.protocol import declared_fingerprint
    from snakemake_executor_plugin_rkslurm.ckptdir import prepare

    # by content, not mtime; the same function the rkslurm executor uses for a rule
    # with a declared fingerprint, so switching executors resumes the folder
    res = prepare(Path(path), declared_fingerprint(text, files))
    if res.stale_reason:
        print(f"simulate: old checkpoints in {path} not restored: {res.stale_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
