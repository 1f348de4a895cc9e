"""What each fault costs on a 3-node cluster: the longest wait for a reply to a message
sent just after one NATS node, a router, the active recorder and a channel process are
killed (8 s apart), next to the usual reply time.

    python bench/bench_cluster.py

Runs the scenario of tests/test_cluster.py (its helpers: tests/cluster.py,
tests/steadyclient.py): two processes of each role with replicas = 3, paced clients
throughout (one message every 0.5 s each).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchrun import run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster import NatsCluster, RoleProcess, TwoOfEach
from steadyclient import SteadyClient

GAP = 8.0  # seconds between faults, and the window after each


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="commhub-cluster-") as tmp:
        root = Path(tmp)
        cluster = NatsCluster(root / "nats").start()
        processes: list[RoleProcess] = []
        try:
            await cluster.wait_ready()
            roles = await TwoOfEach.start(root, cluster.url, {"COMMHUB_REPLICAS": "3"},
                                          processes)
            channels, routers = roles.channels, roles.routers
            recorder1 = roles.recorders[0]
            ports = [p.ws_port for p in channels]
            clients: list[SteadyClient] = []
            tasks = []
            faults = [("a NATS node (SIGKILL)", lambda: cluster.kill(2)),
                      ("a router (SIGKILL)", routers[0].kill),
                      ("the active recorder (SIGKILL)", recorder1.kill),
                      ("a channel process (SIGKILL)", channels[0].kill)]
            duration = GAP * (len(faults) + 1)
            start = time.monotonic()
            # A new paced conversation every 0.25 s for the whole run.
            fault_times: list[float] = []

            async def spawn() -> None:
                n = 0
                while time.monotonic() - start < duration:
                    client = SteadyClient(ports, f"bench-{n}", paced=True, first=n, pause=0.5)
                    clients.append(client)
                    tasks.append(asyncio.create_task(client.run(120)))
                    n += 1
                    await asyncio.sleep(0.25)

            spawner = asyncio.create_task(spawn())
            for _what, fault in faults:
                await asyncio.sleep(GAP)
                fault_times.append(time.monotonic())
                fault()
            await spawner
            await asyncio.gather(*tasks)
        finally:
            for process in processes:
                process.stop()
            cluster.stop()
    waits = [(c.sent_at[m], c.replied_at[m] - c.sent_at[m]) for c in clients
             for m in c.sent_at if m in c.replied_at]
    quiet = [w for at, w in waits if at < fault_times[0]]
    print(f"{len(clients)} conversations, {len(waits)} messages, 3-node cluster, R3, "
          "2 channel processes, 2 routers, 2 recorders")
    print(f"  before any fault: reply p50 {statistics.median(quiet) * 1000:.0f} ms, "
          f"max {max(quiet) * 1000:.0f} ms")
    for (what, _), at in zip(faults, fault_times, strict=True):
        window = [w for sent, w in waits if at - 1 <= sent < at + GAP - 1]
        print(f"  {what}: longest wait {max(window):.1f} s, p50 "
              f"{statistics.median(window) * 1000:.0f} ms ({len(window)} messages)")
    lost = sum(len(c.sent) - len(c.replied_at) for c in clients)
    print(f"  messages without a reply: {lost}")


if __name__ == "__main__":
    run(main())
