"""A bounded fuzz of the whole hub: hostile input on every door, then a normal chat.

    python bench/fuzz_hub.py [--inputs 100000] [--seed 7]

Starts ``commhub up`` in a subprocess (embedded nats-server, temporary data directory,
free ports, loopback only) and sends ``--inputs`` inputs, mixed across

* WebSocket frames: bad JSON, wrong types, unknown frame types, JSON nested 3,000 deep,
  binary frames, huge ids, buttons of the wrong shape, and valid messages;
* HTTP bodies: the native API and the Rasa REST endpoint, with the same kinds of junk,
  bad cursors and invalid conversation ids, and valid messages;
* bus records published straight onto ``in``, ``out``, ``wf`` and ``evt`` subjects:
  nesting 3,000 deep, invalid subject tokens (``a+b``), wrong types, wrong directions,
  short ids, mismatched conversations, and valid inbound messages.

Then it checks, and prints, that a normal conversation is answered at once, that every
valid message sent during the fuzz is in DuckDB, that the recorder's pending count
returns to 0, and the RSS of the hub and of nats-server before and after (the issue's
bound is 1.5x). Exits non-zero when a check fails. Bounded in count and time (a 600 s
cap); it stops the hub at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import nats
from benchrun import run
from nats.aio.client import Client as NATS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

DEEP = "[" * 3000 + "]" * 3000
DEEP_OBJECT = '{"a":' * 3000 + "1" + "}" * 3000
PREFIX = "commhub"
TIME_CAP = 600.0


# -- the hub under test ---------------------------------------------------------------
class Hub:
    """``commhub up`` in a subprocess on a temporary data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        config = data_dir / "fuzz.toml"
        # The fuzz client is one peer sending far faster than a person: lift the
        # per-connection limits so that hostile input, not rate limiting, is what is tested.
        config.write_text(
            "[plugins.websocket]\nmax_messages_per_second = 1000000\nrate_burst = 1000000\n"
            "[plugins.http]\nmax_messages_per_second = 1000000\nrate_burst = 1000000\n"
        )
        self.env = {**os.environ, "COMMHUB_DATA_DIR": str(data_dir), "COMMHUB_NATS_PORT": "0",
                    "COMMHUB_WS_PORT": "0", "COMMHUB_HTTP_PORT": "0",
                    "COMMHUB_CONFIG": str(config)}
        self.log = open(data_dir / "hub.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen([sys.executable, "-m", "commhub.core.cli", "up"],
                                        env=self.env, stdout=self.log, stderr=self.log)
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"commhub up exited with {self.process.returncode}")
            try:
                self.info = json.loads((self.data_dir / "hub.json").read_text())
                return
            except (OSError, ValueError):
                time.sleep(0.1)
        raise SystemExit("the hub did not start within 120 s")

    def endpoint(self, scheme: str) -> str:
        for line in self.info["endpoints"]:
            if f" {scheme}://" in line:
                url = line.split(f"{scheme}://", 1)[1].split()[0].split("/", 1)[0]
                return f"{scheme}://{url}"
        raise SystemExit(f"no {scheme} endpoint in hub.json")

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "commhub.core.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise SystemExit(f"commhub {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def nats_server_pid(self) -> int | None:
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if "nats-server" in Path(f"/proc/{child}/cmdline").read_text():
                        return int(child)
        return None

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def connect_bus(hub: Hub) -> NATS:
    """The hub's own NATS, with the credentials ``commhub nats-url`` gives (when it has
    any), else the URL in hub.json."""
    url = str(hub.info["nats_url"])
    with contextlib.suppress(SystemExit):
        url = hub.cli("nats-url").strip() or url
    return await nats.connect(url, max_reconnect_attempts=3)


def rss_kib(pid: int | None) -> int:
    if pid is None:
        return 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- what the fuzz sends -------------------------------------------------------------------
def junk_json(rng: random.Random) -> str:
    """A body that is not a valid message: each kind is something a client could send."""
    choice = rng.randrange(14)
    if choice == 0:
        return DEEP
    if choice == 1:
        return DEEP_OBJECT
    if choice == 2:
        return "{" + "x" * rng.randrange(1, 40)
    if choice == 3:
        return json.dumps({"type": "message", "text": rng.choice([1, True, None, [], {}])})
    if choice == 4:
        return json.dumps({"type": rng.choice(["nope", "", 7, None, "ack", "event"])})
    if choice == 5:
        return json.dumps({"type": "message", "id": "x" * rng.randrange(200, 400), "text": "hi"})
    if choice == 6:
        return json.dumps({"type": "message", "payload": {"buttons": "not a list"}})
    if choice == 7:
        return json.dumps([1, 2, 3])
    if choice == 8:
        return json.dumps({"type": "message", "text": "\udcff"}, ensure_ascii=True)
    if choice == 9:
        return json.dumps({"sender": {"a": DEEP}, "message": 5})
    if choice == 10:
        return json.dumps({"type": "message", "text": "hi", "payload": json.loads(
            "[" * 60 + "]" * 60)})
    if choice == 11:
        return ""
    if choice == 12:
        return json.dumps({"type": "message", "id": "", "text": ""})
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))).decode("latin-1")


def bus_junk(rng: random.Random, valid_id: str) -> tuple[str, bytes]:
    """A subject and a payload a careless or hostile service could publish."""
    conv = f"fz{rng.randrange(1000)}"
    msg = {"id": valid_id, "conversation": conv, "channel": "websocket", "direction": "in",
           "sender": {"id": "svc", "kind": "user"}, "text": "hello"}
    choice = rng.randrange(10)
    if choice == 0:
        return f"{PREFIX}.in.websocket.{conv}", DEEP.encode()
    if choice == 1:
        return f"{PREFIX}.in.websocket.a+b", json.dumps({**msg, "conversation": "a+b"}).encode()
    if choice == 2:
        return f"{PREFIX}.in.websocket.{conv}", json.dumps({**msg, "text": 42}).encode()
    if choice == 3:
        return f"{PREFIX}.out.websocket.{conv}", json.dumps(msg).encode()  # wrong direction
    if choice == 4:
        return f"{PREFIX}.out.websocket.{conv}", json.dumps(
            {**msg, "id": "x1", "direction": "out"}).encode()
    if choice == 5:
        return f"{PREFIX}.out.websocket.{conv}", json.dumps(
            {**msg, "direction": "out", "conversation": "someone-else"}).encode()
    if choice == 6:
        return f"{PREFIX}.wf.{conv}", DEEP_OBJECT.encode()
    if choice == 7:
        return f"{PREFIX}.evt.classified.{conv}", b"\xff\xfe"
    if choice == 8:
        mismatched = {**msg, "conversation": "other"}
        return f"{PREFIX}.in.websocket.{conv}", json.dumps(mismatched).encode()
    return f"{PREFIX}.wf.{conv}", json.dumps({"id": valid_id, "conversation": conv,
                                               "event": 12}).encode()


class Fuzz:
    def __init__(self, hub: Hub, nc: NATS, rng: random.Random) -> None:
        self.hub = hub
        self.nc = nc
        self.rng = rng
        self.sent: Counter[str] = Counter()
        self.server_errors = 0  # HTTP 5xx answers to bad input
        self.accepted: list[str] = []  # valid messages the hub (or JetStream) acked
        self.ws_url = hub.endpoint("ws")
        self.http_url = hub.endpoint("http")

    def valid_id(self) -> str:
        return uuid.uuid4().hex

    async def websocket(self, count: int) -> None:
        per_socket = 500
        remaining = count
        while remaining > 0:
            batch = min(per_socket, remaining)
            remaining -= batch
            conv = f"fzw{self.rng.randrange(10**9)}"
            url = f"{self.ws_url}/ws?conversation={conv}&user=fz"
            try:
                async with connect(url, max_size=None) as ws:
                    reader = asyncio.create_task(_drain(ws, self.accepted))
                    for _ in range(batch):
                        if self.rng.random() < 0.01:
                            message_id = self.valid_id()
                            await ws.send(json.dumps({"type": "message", "id": message_id,
                                                      "text": "what can you do"}))
                            self.sent["websocket valid"] += 1
                        elif self.rng.random() < 0.05:
                            await ws.send(bytes(self.rng.randrange(256) for _ in range(16)))
                            self.sent["websocket junk"] += 1
                        else:
                            await ws.send(junk_json(self.rng))
                            self.sent["websocket junk"] += 1
                    await ws.close()  # the hub acks what it stored before the close frame
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await reader
            except ConnectionClosed:
                self.sent["websocket closed by hub"] += 1  # e.g. a frame over the size limit

    async def http(self, count: int) -> None:
        limits = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=limits) as session:
            async def one() -> None:
                roll = self.rng.random()
                conv = f"fzh{self.rng.randrange(1000)}"
                message_id = None
                if roll < 0.01:
                    message_id = self.valid_id()
                    body = json.dumps({"id": message_id, "text": "hello there"})
                    url = f"{self.http_url}/v1/conversations/{conv}/messages?user=fz"
                    kind = "http valid"
                elif roll < 0.45:
                    body = junk_json(self.rng)
                    url = f"{self.http_url}/v1/conversations/{conv}/messages"
                    kind = "http native junk"
                elif roll < 0.9:
                    body = junk_json(self.rng)
                    url = f"{self.http_url}/webhooks/rest/webhook"
                    kind = "http rasa junk"
                else:
                    body = ""
                    bad = self.rng.choice(["a+b", "x" * 300, "%2e%2e", "c?after=-1"])
                    url = f"{self.http_url}/v1/conversations/{bad}/messages?after=nope"
                    kind = "http bad url"
                method = "GET" if kind == "http bad url" else "POST"
                async with session.request(method, url, data=body.encode("utf-8", "replace"),
                                           headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status >= 500:
                        self.server_errors += 1
                    if message_id is not None:
                        if resp.status < 300:
                            self.accepted.append(message_id)
                        else:
                            self.sent[f"http valid refused ({resp.status})"] += 1
                self.sent[kind] += 1

            for start in range(0, count, 64):
                await asyncio.gather(*(one() for _ in range(min(64, count - start))))

    async def bus(self, count: int) -> None:
        js = self.nc.jetstream()
        for start in range(0, count, 256):
            acks = []
            for _ in range(min(256, count - start)):
                message_id = self.valid_id()
                if self.rng.random() < 0.02:
                    conv = f"fzb{self.rng.randrange(1000)}"
                    record = {"id": message_id, "conversation": conv, "channel": "websocket",
                              "direction": "in", "sender": {"id": "svc", "kind": "user"},
                              "text": "thanks"}
                    self.accepted.append(message_id)  # acked by JetStream below
                    acks.append(js.publish(f"{PREFIX}.in.websocket.{conv}",
                                           json.dumps(record).encode(),
                                           headers={"Nats-Msg-Id": message_id}))
                    self.sent["bus valid"] += 1
                else:
                    subject, data = bus_junk(self.rng, message_id)
                    acks.append(js.publish(subject, data))
                    self.sent["bus junk"] += 1
            await asyncio.gather(*acks)


async def _drain(ws: ClientConnection, accepted: list[str]) -> None:
    """Read every frame; note the ids of the messages the hub acked (stored)."""
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            with contextlib.suppress(ValueError, AttributeError):
                frame = json.loads(raw)
                if frame.get("type") == "ack" and frame.get("id"):
                    accepted.append(str(frame["id"]))


# -- the checks ----------------------------------------------------------------------------
async def normal_chat(ws_url: str) -> str | None:
    """A new person books a table: the first reply must come (None: it did not, in 30 s)."""
    conv = f"after-fuzz-{uuid.uuid4().hex[:8]}"
    async with connect(f"{ws_url}/ws?conversation={conv}&user=ann") as ws:
        await ws.send(json.dumps({"type": "message", "text": "I want to book a table"}))
        with contextlib.suppress(TimeoutError):
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame.get("type") == "message":
                    return str(frame.get("text"))
    return None


async def recorder_pending(nc: NATS) -> int:
    js = nc.jetstream()
    pending = 0
    for stream in (f"{PREFIX}_messages", f"{PREFIX}_events"):
        with contextlib.suppress(Exception):
            for info in await js.consumers_info(stream):
                if "recorder" in info.name:
                    pending += info.num_pending + info.num_ack_pending
    return pending


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="commhub-fuzz-") as tmp:
        hub = Hub(Path(tmp))
        try:
            hub.wait_ready()
            nc = await connect_bus(hub)
            fuzz = Fuzz(hub, nc, rng)
            if await normal_chat(fuzz.ws_url) is None:  # warm: the consumers are up
                raise SystemExit("the hub does not answer before the fuzz")
            rss_start = rss_kib(hub.process.pid), rss_kib(hub.nats_server_pid())
            # Two halves: the first brings caches (the classifier's, JetStream's file
            # store, Python's allocator) to their working size; growth from the middle
            # to the end is what would show a leak.
            half = args.inputs // 2
            for n, share in enumerate((half, args.inputs - half)):
                third = share // 3
                await asyncio.wait_for(asyncio.gather(
                    fuzz.websocket(third), fuzz.http(third), fuzz.bus(share - 2 * third)),
                    TIME_CAP)
                if n == 0:
                    rss_mid = rss_kib(hub.process.pid), rss_kib(hub.nats_server_pid())
            sent_at = time.monotonic()
            reply = await normal_chat(fuzz.ws_url)
            pending = await recorder_pending(nc)
            while pending and time.monotonic() - sent_at < 180:
                await asyncio.sleep(1)
                pending = await recorder_pending(nc)
            ids = ",".join(f"'{i}'" for i in fuzz.accepted)
            recorded = 0
            if ids:
                out = hub.cli("sql", f"SELECT count(*) AS n FROM messages WHERE id IN ({ids})",
                              "--format", "csv")
                recorded = int(out.strip().splitlines()[-1])
            rss_end = rss_kib(hub.process.pid), rss_kib(hub.nats_server_pid())
            await nc.close()
        finally:
            hub.stop()
            log = (Path(tmp) / "hub.log").read_text(errors="replace")
    tracebacks = log.count("Traceback (most recent call last)")
    print(f"inputs sent: {sum(fuzz.sent.values())} in {sent_at - started:.0f} s")
    for kind, n in sorted(fuzz.sent.items()):
        print(f"  {kind:<28} {n:>7}")
    print(f"a normal chat afterwards got: {reply!r}")
    print(f"valid messages recorded: {recorded} of {len(fuzz.accepted)}")
    print(f"recorder pending after the fuzz: {pending}")
    growth = []
    for i, name in enumerate(("hub", "nats-server")):
        start, mid, end = rss_start[i] / 1024, rss_mid[i] / 1024, rss_end[i] / 1024
        growth.append(end / max(mid, 1))
        print(f"{name} RSS: {start:.0f} MiB at start, {mid:.0f} after half the inputs, "
              f"{end:.0f} at the end ({end / max(start, 1):.2f}x the start, "
              f"{growth[-1]:.2f}x the middle)")
    print(f"tracebacks in the hub's log: {tracebacks}; log lines: {len(log.splitlines())}")
    failures = []
    if reply is None:
        failures.append("a normal chat got no reply after the fuzz")
    if recorded != len(fuzz.accepted):
        failures.append("valid messages missing from DuckDB")
    if pending:
        failures.append("the recorder did not catch up")
    if max(growth) > 1.5:
        failures.append("memory grew past 1.5x from the middle of the fuzz to its end")
    print(f"HTTP 5xx answers: {fuzz.server_errors}")
    if fuzz.server_errors:
        failures.append("HTTP answered 5xx to bad input")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    sys.exit(run(main_async(args)))


if __name__ == "__main__":
    main()
