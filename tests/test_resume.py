"""The WebSocket acceptance: a client away for the middle of a conversation misses nothing.

While the client is disconnected, the workflow goes on answering (the same conversation
is driven from a second tab) and the hub is killed and restarted. The client reconnects
with the last cursor it saw and gets every reply it missed, once each, in order, then
live replies.
"""

from __future__ import annotations

import pytest
from hubproc import HubProcess
from wschat import Chat

pytestmark = pytest.mark.timeout(240)


async def test_reconnect_after_absence_and_restart_gets_every_reply_once_in_order(
    hub_process: HubProcess,
) -> None:
    hub_process.start()
    away = await Chat.open(hub_process.ws_port, "resume1", user="ann")
    await away.say("I'd like to book a table")
    left_at = away.cursor
    assert left_at is not None
    await away.close()

    # The conversation goes on without it: a second tab answers two questions...
    tab = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=left_at)
    await tab.say("4")
    await tab.say("tomorrow")
    await tab.close()
    missed = list(tab.messages)
    # ...the hub dies and comes back...
    hub_process.kill()
    hub_process.start()
    # ...and the tab answers one more question on the new hub.
    tab = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=tab.cursor)
    await tab.say("19:30")
    await tab.close()
    missed += tab.messages
    assert len(missed) >= 3

    back = await Chat.open(hub_process.ws_port, "resume1", user="ann", after=left_at)
    while len(back.messages) < len(missed):
        await back.next_frame("message")
    assert [m["id"] for m in back.messages] == [m["id"] for m in missed]
    assert [m["text"] for m in back.messages] == [m["text"] for m in missed]
    # Then live, with nothing repeated in between: the next frame is the new reply.
    live = await back.say("Ann")
    assert back.messages[len(missed)] == live
    cursors = [m["cursor"] for m in back.messages]
    assert cursors == sorted(set(cursors)) and cursors[0] > left_at
    await back.close()
    assert hub_process.terminate() == 0
