"""A tiny WebSocket chat client for tests: send a line, collect the bot's replies."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class Chat:
    """One WebSocket connection to a hub's ``/ws`` endpoint for one conversation."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.cursor: int | None = None
        self.messages: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, port: int, conversation: str, user: str = "u1",
                   after: int | None = None, token: str | None = None) -> Chat:
        url = f"ws://127.0.0.1:{port}/ws?conversation={conversation}&user={user}"
        if after is not None:
            url += f"&after={after}"
        if token is not None:
            url += f"&token={token}"
        return cls(await connect(url))

    async def send(self, text: str | None = None, payload: dict[str, Any] | None = None,
                   id: str | None = None) -> str:
        """Send a message frame, wait for the hub's ack, return the message id."""
        frame: dict[str, Any] = {"type": "message", "id": id or uuid.uuid4().hex}
        if text is not None:
            frame["text"] = text
        if payload is not None:
            frame["payload"] = payload
        await self.ws.send(json.dumps(frame))
        ack = await self.next_frame("ack")
        assert ack["id"] == frame["id"], ack
        return str(frame["id"])

    async def next_frame(self, type_: str, timeout: float = 15) -> dict[str, Any]:
        """The next frame of ``type_``; bot messages seen on the way are kept."""
        async with asyncio.timeout(timeout):
            while True:
                frame = json.loads(await self.ws.recv())
                if frame.get("type") == "message":
                    self.messages.append(frame)
                    self.cursor = frame["cursor"]
                if frame.get("type") == type_:
                    return frame

    async def replies_to(self, message_id: str, count: int = 1,
                         timeout: float = 15) -> list[dict[str, Any]]:
        """The first ``count`` bot messages that answer ``message_id``, in order."""
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.messages if m.get("reply_to") == message_id]
                if len(found) >= count:
                    return found[:count]
                await self.next_frame("message")

    async def say(self, text: str | None = None, payload: dict[str, Any] | None = None,
                  id: str | None = None) -> dict[str, Any]:
        """Send and return the first reply to it."""
        message_id = await self.send(text, payload, id)
        return (await self.replies_to(message_id))[0]

    async def close(self) -> None:
        await self.ws.close()
