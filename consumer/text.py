"""Text from outside (message bodies, headers, producer metadata) made safe for a terminal.

A dead letter is whatever a producer sent: an escape sequence in it could move
the operator's cursor, clear the screen or print lines that look like ours. So
every character a terminal could act on is shown as an escape instead.
"""

from __future__ import annotations

from typing import Any

import orjson


def printable(text: str) -> str:
    """``text`` with every non-printable character written as an escape (``\\n``, ``\\x1b``, ``\\u202e``).

    Python's notion of printable is used: control characters (C0, DEL, C1),
    format characters such as the bidirectional overrides, line and paragraph
    separators and every space but the plain one are escaped; so are lone
    surrogates. Backslashes are left as they are: the result is for reading, and
    bodies are JSON, full of them.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def printable_bytes(data: bytes) -> str:
    """A body as text: UTF-8 where it is, ``\\xNN`` for bytes that are not, then :func:`printable`."""
    return printable(data.decode("utf-8", "backslashreplace"))


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe_json(data: Any) -> str:
    """Indented JSON whose text holds no character a terminal acts on.

    orjson escapes the C0 controls only; the others (DEL, C1 controls such as
    the single-byte CSI, bidirectional overrides) are written as ``\\uXXXX``
    here. The document parses to the same values: only its spelling changes.
    """
    text = orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode()
    # Outside strings the indented document holds only spaces and newlines, so any
    # other non-printable character is inside a string, where \u escapes are valid JSON.
    return "".join(char if char.isprintable() or char == "\n" else _json_escape(char) for char in text)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    high, low = divmod(code - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"
