"""A WebSocket chat client that rides out faults: it reconnects to another channel
process with its last cursor, re-sends a message that got no ack with the same id, and
keeps every reply it receives, in arrival order (duplicates included, to be counted)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

TEXTS = ("I'd like to book a table", "4", "tomorrow", "19:30", "Ann")


class SteadyClient:
    def __init__(self, ports: list[int], conversation: str, *, paced: bool,
                 first: int = 0, pause: float = 0.8) -> None:
        self.ports = ports
        self.conversation = conversation
        self.paced = paced
        self.pause = pause  # between a reply and the next message, when paced
        self.turn = first  # which channel process to use next
        self.sent = [(uuid.uuid4().hex, text) for text in TEXTS]
        self.replies: list[dict[str, Any]] = []  # bot messages, as they arrived
        self.cursor: int | None = None
        self.reconnects = 0
        self.sent_at: dict[str, float] = {}  # first send of each message (monotonic)
        self.replied_at: dict[str, float] = {}  # its first reply
        self.resends = 0
        self._acked: set[str] = set()
        self._ws: ClientConnection | None = None
        self._frames: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def replied_to(self) -> list[str]:
        return [str(m.get("reply_to")) for m in self.replies]

    async def run(self, deadline: float) -> None:
        async with asyncio.timeout(deadline):
            pending = list(self.sent)
            while pending:
                batch = pending[:1] if self.paced else pending
                for message_id, text in batch:
                    await self._send_until_acked(message_id, text)
                for message_id, _ in batch:
                    await self._await_reply(message_id)
                pending = pending[len(batch):]
                if self.paced:
                    await asyncio.sleep(self.pause)
        await self._close()

    async def _connect(self) -> None:
        await self._close()
        while True:
            port = self.ports[self.turn % len(self.ports)]
            url = (f"ws://127.0.0.1:{port}/ws?conversation={self.conversation}"
                   f"&user={self.conversation}")
            if self.cursor is not None:
                url += f"&after={self.cursor}"
            try:
                self._ws = await connect(url, open_timeout=5)
            except (OSError, TimeoutError, Exception):
                self.turn += 1  # that channel process is gone: the other one
                await asyncio.sleep(0.3)
                continue
            self._frames = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._read(self._ws, self._frames))
            return

    async def _read(self, ws: ClientConnection, frames: asyncio.Queue[Any]) -> None:
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame.get("type") == "message":
                    self.replies.append(frame)
                    self.replied_at.setdefault(str(frame.get("reply_to")), time.monotonic())
                    self.cursor = max(self.cursor or 0, int(frame["cursor"]))
                elif frame.get("type") == "ack":
                    self._acked.add(frame["id"])
                await frames.put(frame)
        except Exception:
            pass
        await frames.put(None)  # the connection is gone

    async def _close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._ws = None

    async def _next(self, timeout: float) -> dict[str, Any] | None:
        """The next frame; None when the connection went away (it is made again)."""
        if self._ws is None:
            await self._connect()
        try:
            frame = await asyncio.wait_for(self._frames.get(), timeout)
        except TimeoutError:
            return {}
        if frame is None:
            self.reconnects += 1
            self.turn += 1
            await self._connect()
        return frame

    async def _send_until_acked(self, message_id: str, text: str) -> None:
        self.sent_at.setdefault(message_id, time.monotonic())
        while message_id not in self._acked:
            if self._ws is None:
                await self._connect()
            assert self._ws is not None
            with contextlib.suppress(Exception):
                await self._ws.send(json.dumps({"type": "message", "id": message_id,
                                                "text": text}))
            waited = 0.0
            while message_id not in self._acked and waited < 8:
                frame = await self._next(1.0)
                waited += 1.0
                if frame is None:
                    break  # reconnected: send again (same id: stored once)
                if frame.get("type") == "error" and frame.get("code") == "unavailable":
                    await asyncio.sleep(0.5)
                    break
            if message_id not in self._acked:
                self.resends += 1

    async def _await_reply(self, message_id: str) -> None:
        while message_id not in self.replied_to():
            await self._next(2.0)
