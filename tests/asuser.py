"""Run a function in a forked child as an unprivileged user (uid/gid 65534, no groups).

``setpriv --reuid=65534 ...`` cannot be used here: it would have to exec the
interpreter again, and the test interpreter and its packages may live under
a folder only root can enter (``/root/.pyenv``). Forking after everything is
imported and dropping to the user with setgroups/setgid/setuid gives the same
process state (no capabilities, so no root overrides of file permissions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

NOBODY = 65534


def run_as_nobody(fn: Callable[[], Any], timeout: float = 60) -> Any:
    """``fn()`` in a child running as uid/gid 65534; return its JSON-able result (or raise RuntimeError)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            assert os.geteuid() == NOBODY and os.getegid() == NOBODY
            out = {"ok": fn()}
        except BaseException:  # noqa: BLE001 - reported to the parent
            out = {"error": traceback.format_exc()}
            code = 1
        try:
            os.write(w, json.dumps(out, default=str).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    doc = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    if "error" in doc:
        raise RuntimeError(doc["error"])
    return doc["ok"]


def cli_as_nobody(args: list[str]) -> dict[str, Any]:
    """Invoke the ``rkckpt`` CLI in-process in a child as uid 65534: exit code, output, exception type."""
    import io

    from click.testing import CliRunner
    from rich.console import Console
    from rich.table import Table

    # the commands import rich lazily, and the user may not be able to read site-packages: load it all now
    t = Table("a", title="[red]x[/red] :smile:")
    t.add_row("[green]yes[/green]")
    Console(file=io.StringIO(), width=200).print(t)

    from rkckpt.cli import main

    def go() -> dict[str, Any]:
        res = CliRunner().invoke(main, args)
        exc = res.exception
        return {
            "exit_code": res.exit_code,
            "output": res.output,
            "exception": None if exc is None or isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}",
        }

    return run_as_nobody(go)


@contextlib.contextmanager
def enterable_tmp() -> Iterator[str]:
    """A temporary folder every user can enter (pytest's ``tmp_path`` is root-only)."""
    d = tempfile.mkdtemp(prefix="rkckpt-asuser-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
