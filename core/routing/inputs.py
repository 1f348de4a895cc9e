"""What the router accepts as an input: the subject's shape and ids, then the record.

Pure: :func:`decode_input` either returns the input or raises
:class:`~commhub.core.retry.Permanent` saying why it can never be handled, so the
delivery loop terminates it and reports it once on ``{prefix}.evt.invalid`` instead of
retrying it. The subject is checked before the data: a conversation id that is not a
valid subject token (``commhub.in.websocket.a+b``) would otherwise fail later, on the
state bucket's key, in a way that looks like a passing fault.
"""

from __future__ import annotations

from commhub.core.envelope import (
    EnvelopeError,
    Message,
    WorkflowInput,
    decode_tagged,
    record_problem,
)
from commhub.core.retry import Permanent
from commhub.core.subjects import Subjects, valid_token

__all__ = ["decode_input"]


def decode_input(subjects: Subjects, subject: str, data: bytes) -> Message | WorkflowInput:
    """The input on ``subject``: a Message on ``{p}.in.{channel}.{conversation}`` or a
    WorkflowInput on ``{p}.wf.{conversation}``. Raises :class:`Permanent` when the
    subject or the record is not acceptable; other exceptions of the decoder (a
    ``RecursionError``) pass through, and the loop treats them the same way."""
    tokens = subject.split(".")
    kind = tokens[1] if len(tokens) > 1 and tokens[0] == subjects.prefix else None
    if kind == "in" and len(tokens) == 4:
        ids = {"channel": tokens[2], "conversation": tokens[3]}
    elif kind == "wf" and len(tokens) == 3:
        ids = {"conversation": tokens[2]}
    else:
        raise Permanent(f"not an input subject: expected {subjects.prefix}.in.CHANNEL."
                        f"CONVERSATION or {subjects.prefix}.wf.CONVERSATION")
    for what, value in ids.items():
        if not valid_token(value):
            raise Permanent(f"invalid {what} {value[:200]!r} in the subject: use 1-128 "
                            "letters, digits, '-' or '_'")
    # The subject says what the record must be, so publishers in other languages may
    # leave out the "type" tag.
    expected = subjects.record_tag(subject)
    try:
        record = decode_tagged(data, expected)
    except EnvelopeError as exc:
        raise Permanent(f"not a valid {expected} record: {exc}") from None
    if not isinstance(record, Message | WorkflowInput):
        raise Permanent(f"{type(record).__name__} is not an input")
    problem = record_problem(subject, record)  # the bus contract, as channels apply on out
    if problem is not None:
        raise Permanent(problem)
    return record
