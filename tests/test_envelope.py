"""The envelope's pure parts: decoding any bad input to one error, JSON depth limits."""

from __future__ import annotations

import pytest

from commhub.core.envelope import EnvelopeError, Message, decode, decode_as
from commhub.core.jsonlimit import MAX_JSON_DEPTH, JsonInputError, decode_json, json_depth


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 3000 + b"]" * 3000,  # RecursionError inside msgspec
        b'{"type": "message", "payload": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001,
        b"\xff\xfe not utf-8",
        b"",
        b"{}",
    ],
    ids=["deep-array", "deep-payload", "not-utf8", "empty", "no-type"],
)
def test_every_decode_failure_is_an_envelope_error(data: bytes) -> None:
    """Whatever the decoder raises, callers see EnvelopeError with a one-line reason."""
    for attempt in (lambda: decode(data), lambda: decode_as(data, Message)):
        with pytest.raises(EnvelopeError) as caught:
            attempt()
        assert str(caught.value) and "\n" not in str(caught.value)


def test_json_depth_counts_levels_without_recursing() -> None:
    assert json_depth(1) == 0
    assert json_depth({}) == 1
    assert json_depth({"a": [1, {"b": []}]}) == 4
    deep: list[object] = []
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    assert json_depth(deep) == 5001
    assert json_depth(deep, stop_after=10) == 11


def test_decode_json_allows_the_limit_and_refuses_one_more() -> None:
    assert decode_json(nested(MAX_JSON_DEPTH)) is not None
    assert decode_json('{"t": "' + "[" * 500 + '"}') == {"t": "[" * 500}  # inside a string
    for too_deep in (nested(MAX_JSON_DEPTH + 1), nested(3000).encode()):
        with pytest.raises(JsonInputError) as caught:
            decode_json(too_deep)
        assert caught.value.kind == "depth"
        assert str(caught.value) == f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    with pytest.raises(JsonInputError) as caught:
        decode_json(b"{nope")
    assert caught.value.kind == "syntax" and str(caught.value).startswith("not valid JSON")
