"""Layer 1: how names are shown in messages (vsstore.names.shown)."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from vsstore.names import shown


def test_plain_names_are_unchanged():
    assert shown("usr/lib/libc.so.6") == "usr/lib/libc.so.6"
    assert shown("-rf") == "-rf"
    assert shown("Grüße/日本語 space") == "Grüße/日本語 space"


def test_bytes_and_control_characters_are_escaped_visibly():
    assert shown(os.fsdecode(b"usr/\xff\xfe")) == "usr/\\xff\\xfe"
    assert shown(b"usr/\xff\xfe") == "usr/\\xff\\xfe"
    assert shown("new\nline") == "new\\nline"
    assert shown("tab\tx\r") == "tab\\tx\\r"
    assert shown("esc\x1b[31m") == "esc\\x1b[31m"
    assert shown("del\x7f") == "del\\x7f"
    assert shown("nel\u0085 ls\u2028 rlo\u202e") == "nel\\u0085 ls\\u2028 rlo\\u202e"
    assert shown("a\\xff") == "a\\\\xff"  # a backslash in the name is doubled


NAMES = st.one_of(st.binary(max_size=24), st.text(max_size=12).map(str.encode))


@given(NAMES)
def test_any_name_shows_printable_encodable_and_unambiguous(raw):
    s = shown(raw)
    assert s.isprintable()
    s.encode("utf-8")  # never a UnicodeEncodeError
    assert "\n" not in s and "\t" not in s
    assert unshow(s) == raw  # unambiguous: the shown form gives the bytes back


_BACK = {
    "\\": b"\\",
    "a": b"\a",
    "b": b"\b",
    "t": b"\t",
    "n": b"\n",
    "v": b"\v",
    "f": b"\f",
    "r": b"\r",
}


def unshow(s: str) -> bytes:
    """The inverse of shown, written independently: \\xNN is a byte, \\u/\\U a code point."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] != "\\":
            out += s[i].encode()
            i += 1
            continue
        k = s[i + 1]
        if k in _BACK:
            out += _BACK[k]
            i += 2
        elif k == "x":
            out.append(int(s[i + 2 : i + 4], 16))
            i += 4
        else:
            width = 4 if k == "u" else 8
            out += chr(int(s[i + 2 : i + 2 + width], 16)).encode("utf-8", "surrogatepass")
            i += 2 + width
    return bytes(out)
