"""Reading small JSON documents that anyone could have written (indexes, markers).

Such a file is a cache or a hint, never the truth, so reading it must not be
able to hurt: the size is bounded before a byte is parsed, nesting that
would exhaust the interpreter's recursion (``"[" * 100000``) is refused
up front, and every failure is one ``ValueError`` the caller turns into
"ignore it and look at the real files".
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

#: Deeper nesting than any document we write; far below the recursion limit.
MAX_DEPTH = 32


def _check_depth(text: str, limit: int) -> None:
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise ValueError(f"JSON nested deeper than {limit} levels")
        elif ch in "]}":
            depth -= 1


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data`` as JSON, or raise ``ValueError`` saying why not."""
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes, more than the {max_bytes} allowed")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        if text.count("[") + text.count("{") > max_depth:
            _check_depth(text, max_depth)
        return json.loads(text)
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def load_file(path: str | os.PathLike[str], *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``loads`` of a regular file's contents; ``OSError`` if it cannot be read."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        data = f.read(max_bytes + 1)
    return loads(data, max_bytes=max_bytes, max_depth=max_depth)
