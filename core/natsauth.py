"""The embedded nats-server's credentials: made once per data directory, kept private.

Without credentials the embedded server would take any process on the machine as a
client: one that publishes "bot" replies to users, runs SQL over the bus, reads the
conversation state. So the first start of a hub on a data directory makes a user and a
random password and keeps them in ``{data_dir}/nats-auth.json`` (mode 0600, JSON
``{"user": ..., "password": ...}``); every later start, and every ``commhub`` command
that talks to that hub (``sql``, ``export``, ``rebuild``, ``nats-url``), reads them
from there.

How the server learns them: the shipped ``nats.conf`` lists the hub's user as
``{user: $COMMHUB_NATS_USER, password: $COMMHUB_NATS_PASSWORD}`` in its
``authorization`` block, and :class:`~commhub.core.natsserver.EmbeddedNats` puts these
two variables in the server process's environment, where nats-server looks up a
variable its configuration does not define. Why not an included file: nats-server
parses an included file on its own, without the including file's variables, so a file
generated in the data directory could not fill in a user of ``nats.conf``; and the user
has to be in ``nats.conf`` so that an operator's copy can list its own services beside
it (``docs/bus.md``). A process's environment is readable only by its own OS user (and
root), like the 0600 file, and never appears on a command line.

The secret is never printed, logged or written to ``hub.json``; :func:`redact` hides
the password of a URL that carries one.

Thread-safe: module functions keep no state. Failure: an unreadable credentials file is
a :class:`NatsAuthError` saying which file and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

__all__ = [
    "CREDENTIALS_FILE",
    "HUB_USER",
    "PASSWORD_VARIABLE",
    "USER_VARIABLE",
    "NatsAuthError",
    "NatsCredentials",
    "load_or_create",
    "new_credentials",
    "read_credentials",
    "redact",
    "without_credentials",
]

log = logging.getLogger(__name__)

CREDENTIALS_FILE: Final = "nats-auth.json"
HUB_USER: Final = "commhub"
#: The variables ``nats.conf`` names the hub's user and password with.
USER_VARIABLE: Final = "COMMHUB_NATS_USER"
PASSWORD_VARIABLE: Final = "COMMHUB_NATS_PASSWORD"


class NatsAuthError(RuntimeError):
    """The credentials file cannot be read or written; the message says what to do."""


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """A NATS user and password. ``repr()`` leaves the password out."""

    user: str
    password: str = field(repr=False)

    def url(self, url: str) -> str:
        """``url`` (comma-separated servers allowed) with these credentials in each."""
        return ",".join(_with_userinfo(one.strip(), f"{self.user}:{self.password}")
                        for one in url.split(","))

    def server_environment(self) -> dict[str, str]:
        """The variables ``nats.conf`` reads, as quoted nats.conf strings (an unquoted
        value such as ``1e5x`` would be read as a number)."""
        return {USER_VARIABLE: json.dumps(self.user), PASSWORD_VARIABLE: json.dumps(self.password)}


def new_credentials() -> NatsCredentials:
    """The hub's user with a fresh random password (256 bits, URL-safe characters)."""
    return NatsCredentials(HUB_USER, secrets.token_urlsafe(32))


def read_credentials(data_dir: Path) -> NatsCredentials | None:
    """The credentials kept in ``data_dir``, or None when there are none yet."""
    path = data_dir / CREDENTIALS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NatsAuthError(f"cannot read the NATS credentials {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
        credentials = NatsCredentials(str(data["user"]), str(data["password"]))
    except (ValueError, KeyError, TypeError):
        raise NatsAuthError(
            f"{path} is not a commhub credentials file; delete it and start the hub again "
            "to make new credentials"
        ) from None
    if not credentials.user or not credentials.password:
        raise NatsAuthError(f"{path} has an empty user or password; delete it and start "
                            "the hub again to make new credentials")
    return credentials


def load_or_create(data_dir: Path) -> NatsCredentials:
    """The data directory's credentials, made (mode 0600) if it has none yet.

    Safe against a racing process: the file appears complete or not at all (written
    aside, then hard-linked into place, which fails if it exists), and the loser reads
    the winner's. A file other users can read is made private again, with a warning.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CREDENTIALS_FILE
    found = read_credentials(data_dir)
    if found is not None:
        _keep_private(path)
        return found
    credentials = new_credentials()
    body = json.dumps({"user": credentials.user, "password": credentials.password})
    aside = data_dir / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(body + "\n")
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: theirs
            os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)
    found = read_credentials(data_dir)
    assert found is not None
    return found


def _keep_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by other users (mode %o); made it 0600. If others "
                    "may have read it, delete it and restart the hub for new credentials",
                    path, mode)
        path.chmod(0o600)


def without_credentials(url: str) -> str:
    """``url`` (comma-separated servers allowed) with any user and password removed."""
    return ",".join(_with_userinfo(one.strip(), None) for one in url.split(","))


def redact(url: str) -> str:
    """``url`` as it may be shown: a password (or a token) it carries becomes ``***``."""

    def one(part: str) -> str:
        head, userinfo, tail = _split_userinfo(part.strip())
        if userinfo is None:
            return part.strip()
        if ":" not in userinfo:  # nats://TOKEN@host: the whole of it is the secret
            return f"{head}***@{tail}"
        return f"{head}{userinfo.split(':', 1)[0]}:***@{tail}"

    return ",".join(one(part) for part in url.split(","))


def _with_userinfo(url: str, userinfo: str | None) -> str:
    head, _, tail = _split_userinfo(url)
    return f"{head}{userinfo}@{tail}" if userinfo else f"{head}{tail}"


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``(scheme://, user:password or None, host:port/rest)`` of one server URL."""
    scheme_end = url.find("://")
    start = scheme_end + 3 if scheme_end >= 0 else 0
    slash = url.find("/", start)
    end = slash if slash >= 0 else len(url)
    userinfo, at, host = url[start:end].rpartition("@")
    return url[:start], (userinfo if at else None), host + url[end:]
