"""Under a non-rkslurm executor: keep the step's checkpoint folder only if it belongs to these params.

The rkslurm executor prepares the folder itself; this gives a local run the
same protection (a changed grid or step count never restores stale state)
through the one owner of the folder, :class:`rkstep.StepFolder`, and the same
declared fingerprint the executor computes from the rule's ``fingerprint``
param and inputs, so the folder survives a switch between executors. It needs
rkstep only (installed with rkrun), not the executor package.
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

    from rkstep.fingerprint import declared_fingerprint
    from rkstep.folder import FolderError, StepFolder

    folder = StepFolder(Path(path))
    try:
        res = folder.prepare(declared_fingerprint(text, files, folder.hash_cache()))
    except FolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.stale_reason:
        print(f"simulate: old checkpoints in {path} not restored: {res.stale_reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
