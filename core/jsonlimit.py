"""JSON from clients, decoded with a nesting limit: one pure function.

msgspec decodes JSON nested up to about a thousand levels and raises ``RecursionError``
past that, which is not a ``DecodeError``: a channel that only caught ``DecodeError``
answered a 3,000-deep frame with a traceback (WebSocket close 1011, HTTP 500). A
client's frame or body has no reason to nest deeper than a few levels, and whatever
passes here travels on to the bus, the workflows, the recorder and DuckDB's JSON
functions, so the channels refuse anything deeper than :data:`MAX_JSON_DEPTH` at the
door, with a one-line reason.

Pure and synchronous; never raises anything but :class:`JsonInputError`.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

__all__ = ["MAX_JSON_DEPTH", "JsonInputError", "decode_json", "json_depth"]

#: The deepest nesting a client's JSON may have: the outer object or array is level 1.
MAX_JSON_DEPTH: Final = 64

class JsonInputError(ValueError):
    """JSON refused: ``kind`` is ``"syntax"`` (not JSON at all) or ``"depth"`` (nested
    deeper than allowed); the message is one line, fit for the client."""

    def __init__(self, kind: Literal["syntax", "depth"], message: str) -> None:
        super().__init__(message)
        self.kind = kind


def json_depth(value: Any, stop_after: int | None = None) -> int:
    """How deeply ``value`` (decoded JSON) nests objects and arrays; a scalar is 0.

    Iterative, so it cannot hit the recursion limit itself; with ``stop_after`` it returns
    as soon as it has seen a level deeper than that.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if stop_after is not None and deepest > stop_after:
            break
        stack.extend((child, level + 1) for child in children
                     if isinstance(child, dict | list))
    return deepest


def decode_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode ``data`` as JSON no deeper than ``max_depth`` levels.

    Raises :class:`JsonInputError` for text that is not JSON (``kind="syntax"``, with
    msgspec's reason) and for JSON nested deeper than ``max_depth`` (``kind="depth"``),
    including JSON too deep for the decoder itself.
    """
    try:
        value = msgspec.json.decode(data)
    except RecursionError:
        raise JsonInputError("depth", _too_deep(max_depth)) from None
    except msgspec.DecodeError as exc:
        raise JsonInputError("syntax", f"not valid JSON: {exc}") from None
    # Fewer opening brackets than the limit cannot nest past it: skip the walk (the
    # count runs in C; brackets inside strings only make it walk when it need not).
    if isinstance(data, str):
        openers = data.count("{") + data.count("[")
    else:
        openers = data.count(b"{") + data.count(b"[")
    if openers > max_depth and json_depth(value, stop_after=max_depth) > max_depth:
        raise JsonInputError("depth", _too_deep(max_depth))
    return value


def _too_deep(max_depth: int) -> str:
    return f"JSON nested deeper than {max_depth} levels"
