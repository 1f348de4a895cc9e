"""The tools that talk to a running hub: `commhub shell` through a terminal, and
`commhub test --hub`, both against a real `commhub up` subprocess."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubproc import HubProcess

from commhub.core.cli import main

HUB_TESTS = """\
tests:
  - test: books through the hub
    steps:
      - user: I'd like to book a table
      - classified: book_table
      - bot: How many people is the table for?
      - state: ask_party_size
      - user: "2"
      - slots: {party_size: 2}

  - test: a back office event reaches the conversation
    steps:
      - user: the app keeps crashing
      - user: It closes at start.
      - press: Urgent
      - user: kim@example.com
      - press: Yes, send it
      - events: [request.created]
      - event: request.resolved
        data: {resolution: Fixed.}
      - bot: "Good news: your support request is resolved. Fixed."
      - workflow: none

  - test: a wrong reply fails against the hub too
    steps:
      - user: I'd like to book a table
      - bot: How many?

  - test: waiting is for the in-process run
    steps:
      - user: hello
      - wait: 1m
"""


@pytest.fixture(scope="module")
def running_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One `commhub up` for the module (embedded NATS, free ports)."""
    process = HubProcess(tmp_path_factory.mktemp("hub") / "data").start(timeout=120)
    yield process
    if process.terminate() != 0:
        pytest.fail(f"the hub did not stop cleanly:\n{process.output()}")


def ws_url(hub: HubProcess) -> str:
    return f"ws://127.0.0.1:{hub.ws_port}"


def test_shell_chats_through_a_terminal_and_presses_numbered_buttons(
    running_hub: HubProcess
) -> None:
    """`commhub shell` in a pty finds the local hub from its data directory, prints
    the bot's reply with its buttons numbered, and typing a number presses that
    button; --explain shows the classification; /quit leaves with status 0."""
    primary, secondary = pty.openpty()
    shell = subprocess.Popen(running_hub.command("shell", "--explain"), env=running_hub.env,
                             stdin=secondary, stdout=secondary, stderr=secondary,
                             start_new_session=True)
    os.close(secondary)
    terminal = Terminal(primary)
    try:
        terminal.read_until("you> ")
        terminal.type("blorp")
        shown = terminal.read_until("3) Report a problem to customer support")
        assert "bot> Sorry, I'm not sure what you mean. I can help with:" in shown
        assert "  1) Book a table at the restaurant" in shown
        assert "  2) Check the status of an order" in shown
        terminal.read_until("you> ")
        terminal.type("1")
        terminal.read_until("bot> How many people is the table for?")
        terminal.read_until("you> ")
        terminal.type("/quit")
        assert shell.wait(30) == 0
        transcript = terminal.seen + terminal.read_to_end()
        assert "[classified: fallback 0.0" in transcript
        assert "[classified: button book_table 1.00" in transcript
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait(30)
        os.close(primary)


def test_the_same_test_file_runs_against_a_running_hub(
    running_hub: HubProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`commhub test --hub` runs a file over WebSocket: with --nats-url it checks the
    classification, state, slots and events and sends service events; a wrong reply
    fails with the same diff as in process; a test that moves the clock is skipped."""
    path = tmp_path / "hub.yaml"
    path.write_text(HUB_TESTS)
    hub = ws_url(running_hub)
    status = main(["test", str(path), "--hub", hub, "--nats-url", running_hub.nats_url])
    out = capsys.readouterr().out
    assert status == 1
    assert f"{path}: 2 passed, 1 failed, 1 skipped" in out, out
    assert (f"FAIL {path}:24: a wrong reply fails against the hub too\n"
            f"  turn 1 at {path}:26: user: I'd like to book a table\n"
            f"    {path}:27: reply 1\n"
            "      expected: How many?\n"
            "      got:      How many people is the table for?\n") in out
    assert (f"SKIP {path}:29: waiting is for the in-process run: 'wait:' moves the clock, "
            "which only the in-process run can do") in out
    assert "not checked" not in out


def test_without_nats_only_the_replies_are_checked_against_a_hub(
    running_hub: HubProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --nats-url the replies still count; classification, state and slots
    are not checked (one note says how many and why), and a test that publishes a
    service event is skipped."""
    path = tmp_path / "hub.yaml"
    path.write_text(HUB_TESTS)
    status = main(["test", str(path), "--hub", ws_url(running_hub)])
    out = capsys.readouterr().out
    assert status == 1  # the wrong reply is still wrong
    assert f"{path}: 1 passed, 1 failed, 2 skipped" in out, out
    assert ("note: 3 expectations (classified, slots, state) not checked: needs --nats-url "
            "(it is seen on the bus, not over WebSocket)") in out
    assert "'event:' publishes a workflow input on the bus: give --nats-url" in out


class Terminal:
    """The user's side of a pty: type lines, read what the program printed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = ""
        self.seen = ""  # everything read_until returned

    def read_to_end(self) -> str:
        """What is left once the program has ended."""
        while select.select([self.fd], [], [], 5)[0]:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.pending += chunk.decode(errors="replace").replace("\r\n", "\n")
        return self.pending

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def read_until(self, text: str, timeout: float = 60) -> str:
        """Everything printed up to and including ``text`` (the rest stays pending)."""
        deadline = time.monotonic() + timeout
        while text not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} never came; the terminal shows:\n"
                                     f"{self.pending}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the program ended
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended before {text!r}:\n"
                                         f"{self.pending}")
                self.pending += chunk.decode(errors="replace").replace("\r\n", "\n")
        head, _, self.pending = self.pending.partition(text)
        self.seen += head + text
        return head + text


if sys.platform == "win32":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="pty is POSIX only")
