"""Split a reply into Telegram-sized parts, counting the way Telegram counts.

Telegram limits a message's text to 4,096 characters, and counts UTF-16 code units, not
code points: an emoji outside the Basic Multilingual Plane (😀) counts 2. A text that
fits in 4,096 code points can therefore still be refused ("message is too long").

:func:`split_text` cuts at the last paragraph break (blank line) of a part, else the
last line break, else the last space, and only where that leaves the part at least half
full; failing all of them it cuts hard, never inside a surrogate pair. The separator at
a cut is dropped; parts that would be only whitespace are left out (Telegram refuses
them). Pure functions: no I/O, no state.
"""

from __future__ import annotations

__all__ = ["TELEGRAM_TEXT_LIMIT", "split_text", "utf16_len"]

TELEGRAM_TEXT_LIMIT = 4096

# Preferred cut points, best first.
_SEPARATORS = ("\n\n", "\n", " ")


def utf16_len(text: str) -> int:
    """Length of ``text`` in UTF-16 code units, the unit of Telegram's limits."""
    return len(text.encode("utf-16-le")) // 2


def _window(text: str, limit: int) -> str:
    """The longest prefix of ``text`` within ``limit`` UTF-16 units (whole code points)."""
    raw = text.encode("utf-16-le")[: 2 * limit]
    if len(raw) >= 2 and 0xD800 <= int.from_bytes(raw[-2:], "little") <= 0xDBFF:
        raw = raw[:-2]  # do not split a surrogate pair: keep the whole emoji for later
    return raw.decode("utf-16-le")


def _cut(window: str, limit: int) -> tuple[int, int]:
    """Where to cut ``window``: (end of the part, start of the rest)."""
    for min_units in (limit // 2, 1):
        for sep in _SEPARATORS:
            pos = window.rfind(sep)
            if pos > 0 and utf16_len(window[:pos]) >= min_units:
                return pos, pos + len(sep)
    return len(window), len(window)


def split_text(text: str, limit: int = TELEGRAM_TEXT_LIMIT) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` UTF-16 units each, in order.

    A text within the limit comes back whole (as the only part, unless it is blank).
    """
    if limit < 2:
        raise ValueError("limit must be at least 2 UTF-16 units (one emoji)")
    parts: list[str] = []
    rest = text
    while utf16_len(rest) > limit:
        window = _window(rest, limit)
        end, start = _cut(window, limit)
        parts.append(rest[:end])
        rest = rest[start:]
    parts.append(rest)
    return [part for part in parts if part.strip()]
