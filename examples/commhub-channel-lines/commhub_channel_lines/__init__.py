"""Example commhub plugin: two channels and a greeting workflow.

* ``LinesChannel``: a JSON-lines TCP channel; a connected client gets the replies of
  its conversations live (``ctx.outbound``).
* ``SpoolChannel``: the shape of an SMS or e-mail channel. Messages come in over HTTP
  (a provider's webhook); replies go out through a call that can fail, here writing a
  file, delivered durably with ``ctx.deliver_outbound``: retried with backoff while the
  call fails, and sent after a restart if the hub stopped first.

Everything a channel needs from the hub comes through ``self.ctx`` (a ChannelContext):
``publish_inbound`` to hand a user's message to the bus, ``outbound`` to follow the
replies of a conversation, ``deliver_outbound`` to deliver every reply durably,
``publish_event`` for accept/close/error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from commhub.core.channel import Channel, ChannelContext
from commhub.core.delivery import Delivery, DeliveryLoop, Retry
from commhub.core.envelope import Message, Sender, derived_id, new_id
from commhub.core.hookspecs import hookimpl
from commhub.core.owners import ConversationForbidden
from commhub.core.subjects import MIN_ID_CHARS, valid_id, valid_token
from commhub.core.tokens import Identity
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
                    # A line carries no token: its user id is the client's word, so it
                    # may not enter a conversation that a signed-token user owns.
                    await self.ctx.claim_conversation(message.conversation, message.sender.id,
                                                      Identity("anonymous"))
                except ConversationForbidden as exc:
                    await self.ctx.publish_event("rejected", connection=connection,
                                                 conversation=message.conversation,
                                                 user=message.sender.id, reason=str(exc))
                    await _write(writer, {"error": str(exc)})
                    continue
                except Exception as exc:
                    await _write(writer, {"error": f"not accepted, send it again: {exc}"})
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


class SpoolSettings(BaseModel):
    """``[plugins.spool]`` in the hub's config file."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = None  # where replies are written; unset: the channel is off


class SpoolChannel(Channel):
    """Messages in by ``POST /spool/{conversation}``, replies out as files.

    ``{"user": "ann", "text": "hello", "id": "provider-id-1"}`` posted to
    ``/spool/{conversation}`` on the hub's HTTP server becomes an inbound message (the
    provider's id, when given, makes its retries one message). Every reply on
    ``out.spool.>`` is written to ``{dir}/{conversation}/{cursor}.json``: the stand-in
    for an SMS gateway's "send" call. Delivery is the hub's durable loop: a reply is
    acked once written; a write that fails is retried with backoff (the conversation's
    later replies wait behind it at first), also across restarts.
    """

    name = "spool"
    Settings = SpoolSettings

    def __init__(self, ctx: ChannelContext, settings: BaseModel | None = None) -> None:
        super().__init__(ctx, settings)
        self.config = settings if isinstance(settings, SpoolSettings) else SpoolSettings()
        self._delivery: DeliveryLoop[Message] | None = None

    async def start(self) -> list[str]:
        if self.config.dir is None:
            return ["spool: off (set [plugins.spool] dir)"]
        self.ctx.web.add_post("/spool/{conversation}", self._receive)
        self._delivery = await self.ctx.deliver_outbound(self._send)
        return [f"spool: {self.ctx.web.url}/spool/ID in, replies to {self.config.dir}"]

    async def stop(self) -> None:
        if self._delivery is not None:
            await self._delivery.stop(grace=5)
            self._delivery = None

    async def _receive(self, request: web.Request) -> web.Response:
        conversation = request.match_info["conversation"]
        try:
            body = await request.json()
            user, text = body["user"], body["text"]
            if not (valid_token(conversation) and isinstance(user, str) and valid_token(user)
                    and isinstance(text, str)):
                raise ValueError("conversation and user must be subject tokens, text a string")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        provider_id = body.get("id")
        await self.ctx.publish_inbound(Message(
            id=derived_id("spool", provider_id) if isinstance(provider_id, str) else new_id(),
            conversation=conversation, channel=self.name, direction="in",
            sender=Sender(id=user), text=text,
        ))
        return web.json_response({"ok": True})

    async def _send(self, delivery: Delivery[Message]) -> None:
        """The gateway call. Returning acks the reply; raising Retry retries it later.

        Idempotent, as a redelivered reply needs: the file is named by the cursor and
        replaced whole, so a second run rewrites the same file instead of adding one.
        """
        assert self.config.dir is not None
        message = delivery.record
        folder = self.config.dir / message.conversation
        target = folder / f"{delivery.seq}.json"
        body = json.dumps({"id": message.id, "text": message.text, "payload": message.payload,
                           "attempt": delivery.attempt})
        try:
            await asyncio.to_thread(_write_atomically, target, body)
        except OSError as exc:
            await self.ctx.publish_event("error", conversation=message.conversation,
                                         connection=message.id,
                                         reason=f"cannot send reply: {exc}")
            raise Retry(f"cannot write {target}: {exc}") from None


def _write_atomically(target: Path, body: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(body)
    os.replace(partial, target)


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
    register(SpoolChannel)


@hookimpl
def register_workflows(register):
    register(GREETING)
