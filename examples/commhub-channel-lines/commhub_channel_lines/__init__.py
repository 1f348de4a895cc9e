"""Example commhub plugin: a JSON-lines TCP channel and a greeting workflow.

Everything a channel needs from the hub comes through ``self.ctx`` (a ChannelContext):
``publish_inbound`` to hand a user's message to the bus, ``outbound`` to follow the
replies of a conversation, ``publish_event`` for accept/close/error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from commhub.core.channel import Channel, ChannelContext
from commhub.core.envelope import Message, Sender, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.subjects import MIN_ID_CHARS, valid_id, valid_token
from commhub.core.workflow import WorkflowDef

__version__ = "0.1.0"


class LinesSettings(BaseModel):
    """``[plugins.lines]`` in the hub's config file."""

    model_config = ConfigDict(extra="forbid")  # a misspelled key fails at start

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port; the chosen one is printed at start


class LinesChannel(Channel):
    """One JSON object per line in; one JSON object per outbound message back.

    After :meth:`start`, ``port`` is the port actually bound. :meth:`stop` closes every
    connection and waits for its handler, so nothing of the channel outlives it.
    """

    name = "lines"
    Settings = LinesSettings

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        super().__init__(ctx, settings)
        self.config = settings if isinstance(settings, LinesSettings) else LinesSettings()
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> list[str]:
        self._server = await asyncio.start_server(self._serve, self.config.host, self.config.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return [f"lines: tcp://{self.config.host}:{self.port} (one JSON object per line)"]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        connection = new_id()
        followers: dict[str, asyncio.Task[None]] = {}
        try:
            await self.ctx.publish_event("accepted", connection=connection)
            while line := await reader.readline():
                try:
                    message = self._parse(line)
                except (ValueError, KeyError, TypeError) as exc:
                    await _write(writer, {"error": str(exc)})
                    continue
                try:
                    seq = await self.ctx.publish_inbound(message)
                except Exception as exc:
                    await _write(writer, {"error": f"not accepted, send it again: {exc}"})
                    continue
                if message.conversation not in followers:
                    # Only replies from now on: everything after this message's sequence
                    # (replies always come after the message they answer).
                    followers[message.conversation] = asyncio.create_task(
                        self._follow(message.conversation, seq, writer)
                    )
        except ConnectionError:
            pass  # the client went away
        finally:
            for follower in followers.values():
                follower.cancel()
            await asyncio.gather(*followers.values(), return_exceptions=True)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await self.ctx.publish_event("closed", connection=connection)
            self._handlers.discard(task)

    def _parse(self, line: bytes) -> Message:
        frame = json.loads(line)
        if not isinstance(frame, dict):
            raise TypeError("each line must be a JSON object")
        conversation, user = frame["conversation"], frame.get("user", "anon")
        if not (isinstance(conversation, str) and valid_token(conversation)
                and isinstance(user, str) and valid_token(user)):
            raise ValueError("conversation and user must be subject tokens")
        text, payload, id_ = frame.get("text"), frame.get("payload"), frame.get("id")
        if not (text is None or isinstance(text, str)):
            raise TypeError("text must be a string")
        if not (payload is None or isinstance(payload, dict)):
            raise TypeError("payload must be an object")
        if not (id_ is None or (isinstance(id_, str) and valid_id(id_))):
            # The id is the Nats-Msg-Id: the router refuses one that does not look unique.
            raise TypeError(f"id must be {MIN_ID_CHARS}-128 letters, digits, - or _ (a UUID)")
        return Message(
            id=id_ or new_id(),
            conversation=conversation,
            channel=self.name,
            direction="in",
            sender=Sender(id=user),
            text=text,
            payload=payload,
        )

    async def _follow(self, conversation: str, after: int, writer: asyncio.StreamWriter) -> None:
        async for cursor, message in self.ctx.outbound(conversation, after=after):
            await _write(writer, {"conversation": conversation, "cursor": cursor,
                                  "text": message.text, "payload": message.payload})


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
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
