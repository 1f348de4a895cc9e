"""A client of a running hub: one conversation over its WebSocket channel and, when a
NATS URL is known, what the bus shows about it.

Over WebSocket a client sees the conversation's outbound messages (replies, agents'
messages) and the acks of its own messages; nothing says when the bot has finished
answering. With NATS it also sees the router's classifications and workflow events
(``{prefix}.evt.>``, core subscription), reads the conversation's state through the
``{prefix}.api.state`` request API, and can publish a service's workflow input on
``{prefix}.wf.{conversation}``; the state says exactly when the step of an input has
committed (its id is the state's ``last_input``), so a turn ends without guessing.

:func:`local_hub` finds the local hub from its ``hub.json`` in the data directory.

Failure behaviour: :class:`HubClientError` for a hub that cannot be reached, a
connection the hub refuses or closes (with its close code and reason), a message the
hub does not ack, an input that does not commit in time; one line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI

from commhub.core.envelope import (
    Classification,
    EnvelopeError,
    Sender,
    WorkflowEvent,
    WorkflowInput,
    decode,
    encode,
)
from commhub.core.lock import read_hub_info
from commhub.core.subjects import Subjects

__all__ = ["HubClient", "HubClientError", "LocalHub", "local_hub", "ws_url"]

ACK_SECONDS = 10.0
SERVICE = Sender(id="commhub-test", kind="service", name="commhub test")


class HubClientError(RuntimeError):
    """The hub cannot be reached, refused or dropped the connection, or did not answer
    in time; the message says which."""


@dataclass(frozen=True)
class LocalHub:
    """Where the hub running on a data directory listens (from its ``hub.json``)."""

    ws: str
    nats_url: str | None
    prefix: str


def local_hub(data_dir: Path) -> LocalHub:
    """The hub running on ``data_dir``; raises HubClientError when none is (no
    ``hub.json``) or it runs no WebSocket channel."""
    info = read_hub_info(data_dir)
    if info is None:
        raise HubClientError(f"no hub is running on {data_dir} (start one with `commhub up`"
                             ", or give --hub ws://HOST:PORT)")
    for line in info.get("endpoints", []):
        if str(line).startswith("websocket: ws://"):
            url = str(line).split(" ", 2)[1]
            base = urlsplit(url)
            return LocalHub(urlunsplit((base.scheme, base.netloc, "", "", "")),
                            info.get("nats_url"), str(info.get("prefix", "commhub")))
    raise HubClientError(f"the hub on {data_dir} runs no WebSocket channel")


def ws_url(hub: str, conversation: str, user: str, token: str | None = None) -> str:
    """The channel's URL for one conversation: ``hub`` is ``ws://HOST:PORT`` (the path
    defaults to ``/ws``); the conversation, user and token go in the query."""
    parts = urlsplit(hub)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise HubClientError(f"--hub {hub!r} is not a WebSocket URL like ws://127.0.0.1:8765")
    query = {"conversation": conversation, "user": user}
    if token:
        query["token"] = token
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/ws", urlencode(query), ""))


class HubClient:
    """One conversation with a running hub; see the module docstring. ``on_message``
    (optional) sees every outbound message frame as it arrives, ``on_classified``
    every classification of this conversation (NATS only)."""

    def __init__(self, conversation: str, subjects: Subjects) -> None:
        self.conversation = conversation
        self.subjects = subjects
        self.messages: list[dict[str, Any]] = []  # outbound message frames, in order
        self.classifications: list[Classification] = []
        self.events: list[WorkflowEvent] = []
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        self.on_classified: Callable[[Classification], None] | None = None
        self._ws: ClientConnection | None = None
        self._nc: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._arrived = asyncio.Event()
        self._closed: str | None = None

    @property
    def has_bus(self) -> bool:
        return self._nc is not None

    @classmethod
    async def open(
        cls,
        hub: str,
        conversation: str,
        user: str,
        token: str | None = None,
        nats_url: str | None = None,
        prefix: str = "commhub",
    ) -> HubClient:
        """Connect to ``hub`` (and to ``nats_url`` when given) for ``conversation``."""
        client = cls(conversation, Subjects(prefix))
        url = ws_url(hub, conversation, user, token)
        try:
            client._ws = await connect(url, open_timeout=10)
        except (OSError, TimeoutError, InvalidURI) as exc:
            raise HubClientError(f"cannot reach the hub at {hub}: {exc}") from None
        except Exception as exc:  # a refused handshake (an HTTP error status)
            raise HubClientError(f"the hub at {hub} refused the connection: {exc}") from None
        client._reader = asyncio.create_task(client._read(), name="hubclient-read")
        if nats_url:
            await client._connect_bus(nats_url)
        return client

    async def _connect_bus(self, url: str) -> None:
        import nats

        try:
            self._nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=3,
                                          name="commhub-client")
        except Exception as exc:
            raise HubClientError(f"cannot reach NATS at {url}: {exc}") from None
        await self._nc.subscribe(self.subjects.all_events, cb=self._on_event)
        await self._nc.flush()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- sending -----------------------------------------------------------------------
    async def send(self, text: str | None = None, payload: dict[str, Any] | None = None) -> str:
        """Send a message (or a button's ``payload``); returns its id once the hub acked
        it (it is on the bus)."""
        if self._ws is None or self._closed is not None:
            raise HubClientError(self._closed or "not connected")
        message_id = uuid.uuid4().hex
        frame: dict[str, Any] = {"type": "message", "id": message_id}
        if text is not None:
            frame["text"] = text
        if payload is not None:
            frame["payload"] = payload
        ack = asyncio.get_running_loop().create_future()
        self._acks[message_id] = ack
        try:
            await self._ws.send(json.dumps(frame))
            answer = await asyncio.wait_for(ack, ACK_SECONDS)
        except TimeoutError:
            raise HubClientError(f"the hub did not ack a message within {ACK_SECONDS:g} s"
                                 ) from None
        except ConnectionClosed:
            raise HubClientError(self._closed or "the hub closed the connection") from None
        finally:
            self._acks.pop(message_id, None)
        if answer.get("type") == "error":
            raise HubClientError(f"the hub refused the message: {answer.get('code')}: "
                                 f"{answer.get('message')}")
        return message_id

    async def publish_input(self, event: str, data: dict[str, Any]) -> str:
        """Publish a service's workflow input (needs NATS); returns its id."""
        if self._nc is None:
            raise HubClientError("a workflow input is published on the bus: give --nats-url")
        record = WorkflowInput(id=uuid.uuid4().hex, conversation=self.conversation,
                               event=event, data=data, sender=SERVICE)
        js = self._nc.jetstream()
        await js.publish(self.subjects.workflow_input(self.conversation), encode(record),
                         headers={"Nats-Msg-Id": record.id})
        return record.id

    # -- reading -----------------------------------------------------------------------
    async def state(self) -> dict[str, Any] | None:
        """The conversation's state from ``{prefix}.api.state`` (None: none yet)."""
        if self._nc is None:
            raise HubClientError("the state is read on the bus: give --nats-url")
        reply = await self._nc.request(self.subjects.api("state"), msgspec.json.encode(
            {"conversation": self.conversation}), timeout=5)
        body = msgspec.json.decode(reply.data)
        if not isinstance(body, dict) or "error" in body:
            return None
        return body

    async def committed(self, input_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The state once the step of input ``input_id`` has committed (needs NATS);
        HubClientError if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state()
            if state is not None and (state.get("last_input") == input_id
                                      or input_id in state.get("recent_inputs", [])):
                return state
            if time.monotonic() > deadline:
                raise HubClientError(f"the hub did not handle input {input_id} within "
                                     f"{timeout:g} s")
            await asyncio.sleep(0.02)

    async def replies(self, since: int, expected: int, timeout: float, settle: float
                      ) -> list[dict[str, Any]]:
        """The message frames after index ``since``: waits up to ``timeout`` seconds for
        ``expected`` of them, then until none came for ``settle`` seconds (so that more
        than expected are seen too)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) - since < expected and time.monotonic() < deadline:
            await self._next(deadline - time.monotonic())
        while True:
            count = len(self.messages)
            await self._next(settle)
            if len(self.messages) == count:
                return self.messages[since:]

    async def _next(self, seconds: float) -> None:
        if self._closed is not None:
            raise HubClientError(self._closed)
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), max(seconds, 0.0))

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    self.messages.append(frame)
                    if self.on_message is not None:
                        self.on_message(frame)
                    self._arrived.set()
                elif kind in ("ack", "error") and frame.get("id") in self._acks:
                    future = self._acks[frame["id"]]
                    if not future.done():
                        future.set_result(frame)
        except ConnectionClosed:
            pass
        except (ValueError, AttributeError):
            self._closed = "the hub sent a frame that is not a JSON object"
        ws = self._ws
        if self._closed is None:
            self._closed = (f"the hub closed the connection ({ws.close_code}"
                            f"{': ' + ws.close_reason if ws.close_reason else ''})")
        for future in self._acks.values():
            if not future.done():
                future.set_exception(HubClientError(self._closed))
        self._arrived.set()

    async def _on_event(self, msg: Any) -> None:
        try:
            record = decode(msg.data)
        except EnvelopeError:
            return
        if isinstance(record, Classification) and record.conversation == self.conversation:
            self.classifications.append(record)
            if self.on_classified is not None:
                self.on_classified(record)
        elif isinstance(record, WorkflowEvent) and record.conversation == self.conversation:
            self.events.append(record)
