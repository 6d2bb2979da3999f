"""Text from checkpoint files, made safe to print on a terminal.

Kernel ids, metadata values and file names come from files anyone could
have written. Printed raw, an escape sequence in them can rewrite the
terminal (move the cursor, hide text, set the window title). ``printable``
shows every control or format character as a visible escape instead.
"""

from __future__ import annotations

import unicodedata

_UNSAFE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))


def printable(text: object) -> str:
    """``str(text)`` with control/format characters shown as ``\\xNN``/``\\uNNNN`` escapes."""
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch != " " and unicodedata.category(ch) in _UNSAFE:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)
