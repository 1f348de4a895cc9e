"""Idle WebSocket connections on one channel process: memory per connection, and the
JetStream consumers they cost on the server (none of their own: one live feed per
channel process).

    python bench/bench_ws_idle.py [--connections 10000]

Starts a nats-server and one ``commhub up --role channels`` process on free ports,
opens N WebSocket connections to N conversations from this process (each an owner
record in the owners bucket, as in real use), and reads the channel process's resident
memory (VmRSS) and the messages stream's consumer count before and after; then sends one
reply to one of the connections and times its arrival, to show the process still serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from benchrun import run
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from commhub.core.natsserver import EmbeddedNats


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def start_channels(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "commhub.core.cli", "up"],
                                env=env, stdout=out, stderr=out)


async def wait_up(log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = read(log)
        if "commhub is up" in text:
            return int(text.split("websocket: ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        if process.poll() is not None:
            raise SystemExit(f"the channels process exited:\n{text}")
        await asyncio.sleep(0.2)
    raise SystemExit("the channels process did not start")


async def consumers(nc: nats.NATS, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.consumer_count)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="commhub-idle-") as tmp:
        root = Path(tmp)
        server = EmbeddedNats(root / "nats", port=0)
        url = await server.start()
        (root / "bench.toml").write_text(
            f"[plugins.websocket]\nmax_connections = {args.connections + 100}\n")
        log = root / "channels.log"
        env = {**os.environ, "COMMHUB_NATS_URL": url, "COMMHUB_ROLE": "channels",
               "COMMHUB_DATA_DIR": str(root / "channels"), "COMMHUB_WS_PORT": "0",
               "COMMHUB_HTTP_PORT": "0", "COMMHUB_CONFIG": str(root / "bench.toml")}
        process = start_channels(env, log)
        sockets: list[ClientConnection] = []
        nc = await nats.connect(url)
        try:
            port = await wait_up(log, process)
            base = f"ws://127.0.0.1:{port}/ws"
            # One connection first, so that the channel's live feed exists before we count.
            sockets.append(await connect(f"{base}?conversation=idle-first&user=u0"))
            await asyncio.sleep(1)
            rss_before = rss_mib(process.pid)
            consumers_before = await consumers(nc, "commhub_messages")
            started = time.perf_counter()
            # Handshakes in flight at once: enough to keep the channel busy, few enough
            # that none waits out the server's 10 s opening timeout on a loaded machine.
            semaphore = asyncio.Semaphore(50)
            retried = 0

            async def one(n: int) -> ClientConnection:
                nonlocal retried
                async with semaphore:
                    for attempt in range(3):
                        try:
                            ws = await connect(f"{base}?conversation=idle-{n}&user=u{n}",
                                               open_timeout=60, ping_interval=None)
                            await asyncio.wait_for(ws.recv(), 60)  # the "connected" frame
                            return ws
                        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed):
                            if attempt == 2:
                                raise
                            retried += 1  # said in the output: not hidden
                    raise AssertionError("unreachable")

            sockets.extend(await asyncio.gather(*(one(n) for n in range(args.connections))))
            opened = time.perf_counter() - started
            await asyncio.sleep(3)
            rss_after = rss_mib(process.pid)
            consumers_after = await consumers(nc, "commhub_messages")

            # A reply to one of them still arrives at once.
            target = sockets[-1]
            mid = uuid.uuid4().hex
            reply = {"type": "message", "id": mid, "conversation": f"idle-{args.connections - 1}",
                     "channel": "websocket", "direction": "out",
                     "sender": {"id": "agent-7", "kind": "agent"}, "text": "still there?"}
            sent = time.perf_counter()
            await nc.jetstream().publish(f"commhub.out.websocket.idle-{args.connections - 1}",
                                         json.dumps(reply).encode(),
                                         headers={"Nats-Msg-Id": mid})
            while json.loads(await asyncio.wait_for(target.recv(), 10)).get("id") != mid:
                pass
            delivered_ms = (time.perf_counter() - sent) * 1000
        except BaseException:
            # Say what the channel process saw (it goes with the temporary directory).
            print(f"the channel process's log ends:\n{read(log)[-3000:]}", file=sys.stderr)
            raise
        finally:
            for ws in sockets:
                ws.transport.abort()
            await nc.close()
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            server.stop()
    n = args.connections
    print(f"{n:,} idle WebSocket connections on one channel process ({os.cpu_count()} cores)")
    print(f"  opened in {opened:.1f} s ({n / opened:,.0f}/s, each with its owner record; "
          f"{retried} handshakes retried)")
    print(f"  channel process RSS: {rss_before:.0f} MiB -> {rss_after:.0f} MiB, "
          f"{(rss_after - rss_before) * 1024 / n:.1f} KiB per connection")
    print(f"  consumers on commhub_messages: {consumers_before} -> {consumers_after} "
          "(one live feed per channel process, none per connection)")
    print(f"  a reply to one of them delivered in {delivered_ms:.1f} ms")


if __name__ == "__main__":
    run(main())
