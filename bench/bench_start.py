"""How long ``commhub up`` takes from the command to ready, with the classifier cached.

Usage: ``python bench/bench_start.py [--runs 3]``

It runs ``commhub up`` (embedded NATS, every port 0) on a temporary data directory and
times, from the moment the process is started, until it prints ``commhub is up`` (the
same moment ``/readyz`` turns ready and ``hub.json`` is written). The first start trains
the default classifier and caches it in the data directory; it is reported apart. The
next ``--runs`` starts reuse the cache and are the cold start to compare with the
target (< 3 s): min/median/max. Each start is stopped with SIGTERM before the next; a
start that takes longer than a minute fails the bench. With ``--lines`` it also prints
the log of the last start with the time of each line, to see where the time goes.
Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_hub import cpu_seconds, stop_hub  # the benches run from bench/

DEADLINE_SECONDS = 60.0
READY_LINE = "commhub is up"


def _start(data_dir: Path) -> tuple[float, float | None, list[tuple[float, str]]]:
    """Start ``commhub up``, wait for the ready line, stop it; return the seconds to
    ready, the CPU seconds the hub process had used by then, and every output line with
    its time."""
    env = {
        **os.environ,
        "COMMHUB_DATA_DIR": str(data_dir),
        "COMMHUB_NATS_PORT": "0",
        "COMMHUB_WS_PORT": "0",
        "COMMHUB_HTTP_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    lines: list[tuple[float, str]] = []
    ready = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "commhub.core.cli", "up"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.perf_counter() - started, line.rstrip()))
            if READY_LINE in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(DEADLINE_SECONDS):
            raise TimeoutError("commhub up was not ready within a minute:\n"
                               + "\n".join(line for _, line in lines))
        seconds = next(t for t, line in lines if READY_LINE in line)
        cpu = cpu_seconds([process.pid])
    finally:
        stop_hub(process, 30)
        reader.join(5)
    return seconds, cpu, lines


def _import_seconds() -> float:
    """A fresh interpreter importing the hub, as ``commhub up`` does first."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import commhub.core.hub"], check=True)
    return time.perf_counter() - started


def main(runs: int, show_lines: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="commhub-bench-start-") as tmp:
        data_dir = Path(tmp) / "data"
        first, _, _ = _start(data_dir)
        print(f"first start (trains and caches the classifier): {first:.2f} s")
        times = []
        cpus = []
        lines: list[tuple[float, str]] = []
        for run in range(runs):
            seconds, cpu, lines = _start(data_dir)
            times.append(seconds)
            cpu_text = "" if cpu is None else f" ({cpu:.2f} s of CPU)"
            if cpu is not None:
                cpus.append(cpu)
            print(f"start {run + 1} (classifier cached):             {seconds:.2f} s{cpu_text}")
        imports = sorted(_import_seconds() for _ in range(3))
        times.sort()
        print(f"cold start to ready, classifier cached: min {times[0]:.2f} s, "
              f"median {statistics.median(times):.2f} s, max {times[-1]:.2f} s "
              f"(target < 3 s)")
        if cpus:
            cpus.sort()
            print(f"CPU time of the hub process to ready: min {cpus[0]:.2f} s, "
                  f"median {statistics.median(cpus):.2f} s, max {cpus[-1]:.2f} s")
        print(f"of which `import commhub.core.hub` in a fresh interpreter: "
              f"median {statistics.median(imports):.2f} s")
        if show_lines:
            for t, line in lines:
                print(f"  {t:6.2f} s  {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="starts with the cache")
    parser.add_argument("--lines", action="store_true", help="show the last start's log")
    args = parser.parse_args()
    main(args.runs, args.lines)
