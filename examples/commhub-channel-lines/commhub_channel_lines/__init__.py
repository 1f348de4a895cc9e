"""Example commhub plugin: a JSON-lines TCP channel and a greeting workflow.

Everything a channel needs from the hub comes through ``self.ctx`` (a ChannelContext):
``publish_inbound`` to hand a user's message to the bus, ``outbound`` to follow the
replies of a conversation, ``publish_event`` for accept/close/error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from pydantic import BaseModel

from commhub.core.channel import Channel
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.subjects import valid_token
from commhub.core.workflow import WorkflowDef

__version__ = "0.1.0"


class LinesSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; the chosen one is printed at start


class LinesChannel(Channel):
    """One JSON object per line in; one JSON object per outbound message back."""

    name = "lines"
    Settings = LinesSettings

    async def start(self) -> list[str]:
        settings = self.settings or LinesSettings()
        self.server = await asyncio.start_server(self._serve, settings.host, settings.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return [f"lines: tcp://{settings.host}:{self.port} (one JSON object per line)"]

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = new_id()
        followers: dict[str, asyncio.Task[None]] = {}
        await self.ctx.publish_event("accepted", connection=connection)
        try:
            while line := await reader.readline():
                try:
                    frame = json.loads(line)
                    conversation, user = frame["conversation"], frame.get("user", "anon")
                    if not (valid_token(conversation) and valid_token(user)):
                        raise ValueError("conversation and user must be subject tokens")
                except (ValueError, KeyError, TypeError) as exc:
                    writer.write(json.dumps({"error": str(exc)}).encode() + b"\n")
                    continue
                if conversation not in followers:
                    followers[conversation] = asyncio.create_task(
                        self._follow(conversation, writer)
                    )
                await self.ctx.publish_inbound(Message(
                    id=frame.get("id") or new_id(),
                    conversation=conversation,
                    channel=self.name,
                    direction="in",
                    sender=Sender(id=user),
                    text=frame.get("text"),
                    payload=frame.get("payload"),
                ))
        finally:
            for task in followers.values():
                task.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await self.ctx.publish_event("closed", connection=connection)

    async def _follow(self, conversation: str, writer: asyncio.StreamWriter) -> None:
        # Only replies from now on: this simple channel has no resume cursor.
        info = await self.ctx.bus.js.stream_info(self.ctx.subjects.messages_stream)
        async for cursor, message in self.ctx.outbound(conversation, after=info.state.last_seq):
            line = {"conversation": conversation, "cursor": cursor, "text": message.text,
                    "payload": message.payload}
            writer.write(json.dumps(line).encode() + b"\n")
            await writer.drain()


GREETING = WorkflowDef.model_validate({
    "name": "greeting",
    "description": "Say hello",
    "examples": ["hello there", "hi", "good morning", "hey, how are you",
                 "greetings", "hello bot", "hi there!", "good evening"],
    "initial": "greet",
    "states": {
        "greet": {"say": "Hello! What is your name?",
                  "on": [{"message": {"slot": "name"}, "to": "done"}]},
        "done": {"final": True, "say": "Nice to meet you, {name}."},
    },
    "slots": {"name": {"type": "text"}},
})


@hookimpl
def register_channels(register):
    register(LinesChannel)


@hookimpl
def register_workflows(register):
    register(GREETING)
