"""``commhub shell``: chat with a running hub from a terminal.

Each line you type is a message on the hub's WebSocket channel; every message of the
conversation is printed as it arrives (``bot> ...``, ``agent> ...``), its buttons
numbered: typing a number presses that button of the latest message that offered
buttons. ``/quit`` (or end of input) leaves. Lines are read with ``readline`` where
Python has it (editing, history).

A turn is over when the hub has committed the message's step (when a NATS URL is
known: the local hub's ``hub.json`` has it) and no more replies came for a moment; with
only a WebSocket URL, when the first reply came and then no more for a moment, or
after ``timeout`` seconds of silence (a handed-off conversation says nothing).

``--explain`` prints the router's classification of each message beside its reply:
the ``Classification`` record the router publishes on
``{prefix}.evt.classified.{conversation}``, read from the bus (so it needs the NATS
URL), or says that no classification was made (a running workflow took the message).

Failure behaviour: :class:`~commhub.core.conversation.hubclient.HubClientError` (one
line) when the hub cannot be reached or drops the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, TextIO

from commhub.core.conversation.hubclient import HubClient
from commhub.core.envelope import Classification

__all__ = ["PROMPT", "ShellPrinter", "run_shell"]

PROMPT = "you> "
QUIT = ("/quit", "/exit")


@dataclass
class ShellPrinter:
    """Prints messages and classifications as they come, and keeps the numbered
    buttons of the latest message that offered buttons."""

    out: TextIO
    buttons: list[dict[str, Any]] = field(default_factory=list)
    prompting: bool = False  # the prompt is on screen: re-draw it after printing

    def message(self, frame: dict[str, Any]) -> None:
        sender = frame.get("sender") or {}
        who = str(sender.get("kind") or "bot")
        lines = [f"{who}> {frame.get('text') or ''}"]
        payload = frame.get("payload") or {}
        buttons = payload.get("buttons") if isinstance(payload, dict) else None
        if buttons:
            self.buttons = [b for b in buttons if isinstance(b, dict)]
            lines.extend(f"  {i}) {b.get('title')}" for i, b in enumerate(self.buttons, 1))
        self._print(lines)

    def classified(self, record: Classification) -> None:
        self._print([f"  [{explain_line(record)}]"])

    def note(self, text: str) -> None:
        self._print([f"  [{text}]"])

    def press(self, line: str) -> dict[str, Any] | None:
        """The payload of button number ``line``, if it is one shown."""
        if not line.isdigit() or not 1 <= int(line) <= len(self.buttons):
            return None
        payload = self.buttons[int(line) - 1].get("payload")
        return dict(payload) if isinstance(payload, dict) else None

    def _print(self, lines: list[str]) -> None:
        text = "\n".join(lines)
        if self.prompting:  # a message came while the user types: keep the prompt below
            self.out.write(f"\r{text}\n{PROMPT}{_typed()}")
        else:
            self.out.write(text + "\n")
        self.out.flush()


def explain_line(record: Classification) -> str:
    """``workflow book_table 0.97 (threshold 0.35; ranked: book_table 0.97, ...)``"""
    ranked = ", ".join(f"{a.workflow} {a.confidence:.2f}" for a in record.alternatives)
    chosen = f" {record.workflow}" if record.workflow else ""
    return (f"classified: {record.decision}{chosen} {record.confidence:.2f} (threshold "
            f"{record.threshold:.2f}" + (f"; ranked: {ranked})" if ranked else ")"))


async def run_shell(
    client: HubClient,
    out: TextIO,
    explain: bool = False,
    timeout: float = 5.0,
    settle: float = 0.3,
) -> int:
    """Chat until ``/quit`` or end of input; returns the exit status (0)."""
    printer = ShellPrinter(out)
    client.on_message = printer.message
    if explain:
        client.on_classified = printer.classified
    out.write(f"Chatting in conversation {client.conversation}. Type /quit to leave; a "
              "number presses that button.\n")
    out.flush()
    lines = _LineReader()
    while True:
        printer.prompting = True
        line = await lines.next(PROMPT)
        printer.prompting = False
        if line is None:
            out.write("\n")
            break
        text = line.strip()
        if text in QUIT:
            break
        if not text:
            continue
        payload = printer.press(text)
        since = len(client.messages)
        classified = len(client.classifications)
        message_id = await (client.send(None, payload) if payload else client.send(text))
        if client.has_bus:
            await client.committed(message_id, timeout=10.0)
            await client.replies(since, 0, timeout, settle)
        else:
            await client.replies(since, 1, timeout, settle)
        if explain and not await _classified(client, message_id, classified, settle):
            printer.note("not classified: the running workflow took the message")
    return 0


async def _classified(client: HubClient, message_id: str, since: int, wait: float) -> bool:
    """Whether the router recorded a classification of ``message_id`` (the record may
    come a moment after the replies: it is waited for up to ``wait`` seconds)."""
    deadline = asyncio.get_running_loop().time() + wait
    while not any(c.message_id == message_id for c in client.classifications[since:]):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class _LineReader:
    """Reads lines from the terminal in a daemon thread (``input()`` with readline),
    so the event loop keeps answering the hub's pings while the user types; a daemon
    thread does not keep the process alive when the shell ends."""

    def __init__(self) -> None:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())

    async def next(self, prompt: str) -> str | None:
        """The next line, or None at the end of input."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str | None] = loop.create_future()

        def give(line: str | None) -> None:
            if not done.done():
                done.set_result(line)

        def read() -> None:
            try:
                line: str | None = input(prompt)
            except EOFError:
                line = None
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(give, line)

        threading.Thread(target=read, name="shell-input", daemon=True).start()
        return await done


def _typed() -> str:
    """What the user has typed on the prompt line so far (readline only)."""
    try:
        import readline
    except ImportError:
        return ""
    return readline.get_line_buffer()
