"""One hub per data directory: an advisory lock that the OS releases when we die.

``flock`` is held for the life of the process; a SIGKILL releases it with the process,
so a crashed hub never blocks the next start, while a live one is always detected.
The hub also writes ``hub.json`` beside the lock so that ``commhub sql`` and friends can
find the running hub's bus.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DataDirLock", "HubAlreadyRunning", "read_hub_info", "hub_is_running"]


class HubAlreadyRunning(RuntimeError):
    """Another hub holds the data directory; the message names its pid."""


class DataDirLock:
    """An exclusive, non-blocking lock on ``data_dir/hub.lock``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "hub.lock"
        self.info_path = data_dir / "hub.json"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_hub_info(self.data_dir) or {}
            raise HubAlreadyRunning(
                f"another commhub is already running on {self.data_dir} "
                f"(pid {info.get('pid', '?')}); stop it first or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def write_info(self, info: dict[str, Any]) -> None:
        """Write ``hub.json`` atomically, readable by its owner only (mode 0600)."""
        tmp = self.info_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover tmp file keeps its old mode otherwise
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(info, indent=2))
        tmp.replace(self.info_path)

    def release(self) -> None:
        if self._fd is None:
            return
        self.info_path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def hub_is_running(data_dir: Path) -> bool:
    """True when a live process holds the data directory's lock."""
    path = data_dir / "hub.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def read_hub_info(data_dir: Path) -> dict[str, Any] | None:
    """What the running hub wrote about itself (nats url, prefix, endpoints), if any."""
    try:
        return dict(json.loads((data_dir / "hub.json").read_text()))
    except (OSError, ValueError):
        return None
