"""What the router accepts as an input, as a pure function: the subject's shape and ids
first, then the record; everything refused says why, as a Permanent failure."""

from __future__ import annotations

import pytest

from commhub.core.envelope import Message, Sender, WorkflowInput, encode
from commhub.core.retry import Permanent
from commhub.core.routing.inputs import decode_input
from commhub.core.subjects import Subjects

S = Subjects("commhub")


def message(conversation: str = "c1", direction: str = "in") -> bytes:
    return encode(Message(id="m1-0123456789abcdef", conversation=conversation, channel="websocket",
                          direction=direction, sender=Sender(id="ann"),  # type: ignore[arg-type]
                          text="hi"))


def test_inputs_on_their_subjects_are_accepted() -> None:
    record = decode_input(S, "commhub.in.websocket.c1", message())
    assert isinstance(record, Message) and record.conversation == "c1"
    # No "type": the subject says what the record is.
    data = b'{"id": "w1-0123456789abcdef", "conversation": "c1", "event": "paid"}'
    assert isinstance(decode_input(S, "commhub.wf.c1", data), WorkflowInput)


@pytest.mark.parametrize(("subject", "data", "reason"), [
    ("commhub.in.websocket.a+b", message("a+b"), "invalid conversation 'a+b'"),
    ("commhub.in.web$.c1", message(), "invalid channel 'web$'"),
    ("commhub.wf.a+b", b"{}", "invalid conversation 'a+b'"),
    ("commhub.in.c1", message(), "not an input subject"),
    ("commhub.wf.c1.extra", b"{}", "not an input subject"),
    ("other.in.websocket.c1", message(), "not an input subject"),
    ("commhub.in.websocket.c1", b"{not json", "not a valid message record"),
    ("commhub.in.websocket.c1", message(direction="out"), "direction 'out' on an 'in' subject"),
    ("commhub.in.websocket.c2", message("c1"), "'c1' does not match the subject"),
    ("commhub.wf.c1", b'{"type": "message"}', "not a valid workflow_input record"),
])
def test_what_no_retry_can_fix_is_permanent(subject: str, data: bytes, reason: str) -> None:
    with pytest.raises(Permanent) as refused:
        decode_input(S, subject, data)
    assert reason in refused.value.reason
