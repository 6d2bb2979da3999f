"""Under a non-rkslurm executor: keep the step's checkpoint folder only if it belongs to these params.

The rkslurm executor fingerprints the folder itself; this gives a local run
the same protection (a changed grid or step count never restores stale
state) using the executor package's own ``ckptdir.prepare``.
"""

from __future__ import annotations

import hashlib
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

    from snakemake_executor_plugin_rkslurm.ckptdir import prepare

    h = hashlib.sha256(text.encode())
    for f in files:  # small inputs (the velocity model): by content, not mtime
        h.update(b"\0" + hashlib.sha256(Path(f).read_bytes()).digest())
    res = prepare(Path(path), h.hexdigest())
    if res.stale_reason:
        print(f"simulate: old checkpoints in {path} not restored: {res.stale_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
