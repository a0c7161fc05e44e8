"""File names as people see them: the one way every message, table and JSON value shows a
name that came from a guest tree (or from any path we did not choose).

Names are bytes on Linux.  Inside the process ``os`` represents undecodable bytes as
surrogate escapes (PEP 383), which is lossless but cannot be printed or written to UTF-8.
``shown`` turns such a name into printable text that says exactly which bytes it holds, in
the manner of ``ls --quoting-style=escape``: a byte that is not UTF-8 is ``\\xNN``, control
characters are ``\\n``, ``\\t``, ... or ``\\xNN``, other unprintable characters ``\\uNNNN``,
and a backslash itself ``\\\\``.  So two names never show alike, no name can end a line or
start a fake message, and nothing shown can fail to encode.
"""

from __future__ import annotations

import os

_NAMED = {
    "\\": "\\\\",
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
}


def _escape(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, surrogate-escaped by os.fsdecode
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02x}"
    if c.isprintable():
        return c
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def shown(name: str | bytes | os.PathLike[str]) -> str:
    """``name`` as printable, unambiguous text (see the module's docstring)."""
    text = os.fsdecode(name)
    if text.isprintable() and "\\" not in text:
        return text  # the common case, unchanged
    return "".join(_escape(c) for c in text)
