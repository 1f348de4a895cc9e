"""Hub settings: command-line flags, then ``COMMHUB_*`` environment, then a TOML file.

pydantic-settings does the layering and validation, so a bad value fails at start with
the setting's name and the reason instead of somewhere deep in a channel.

The TOML file is ``--config PATH`` or ``COMMHUB_CONFIG``; its keys are the field names
below (``ws_port = 9000``); a ``[plugins.NAME]`` table holds a plugin's own settings.
A file that is missing or not valid TOML is a :class:`ConfigFileError` (one line: file,
line, problem); :func:`load_settings` turns invalid values into a :class:`SettingsError`
whose lines name each setting and where its value came from.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from commhub.core.origins import OriginPolicy, check_origin
from commhub.core.subjects import Subjects
from commhub.core.tokens import TokenAuthority

# The defaults of ``cancel_phrases``/``restart_phrases`` (the router imports them).
DEFAULT_CANCEL_PHRASES = ("cancel", "stop", "quit", "never mind", "nevermind", "abort")
DEFAULT_RESTART_PHRASES = ("restart", "start over", "start again", "begin again")

__all__ = [
    "ConfigFileError",
    "Role",
    "Settings",
    "SettingsError",
    "is_loopback",
    "load_settings",
    "read_config_file",
    "split_list",
]

Role = Literal["all", "channels", "router", "recorder"]

# Settings whose values an error message must not show.
SECRET_SETTINGS = frozenset({"tokens", "token_secret", "sql_tokens", "agent_tokens",
                             "plugins", "nats_password", "nats_token"})


class ConfigFileError(ValueError):
    """The config file is missing, unreadable or not valid TOML; the message is one line
    that names the file (and the line, for a syntax error)."""


class SettingsError(ValueError):
    """Settings that do not validate: one line per problem, each naming the setting and
    where its value came from (a ``COMMHUB_*`` variable, the config file and line)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def split_list(value: Any) -> Any:
    """The one parser of a list setting given as text (an environment variable): a JSON
    list (``'["a", "b"]'``) or comma-separated items (``a, b``). Other values (lists from
    TOML or flags) pass unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not a JSON list: {exc}") from None
    return [item.strip() for item in text.split(",") if item.strip()]


def read_config_file(path: str | Path, origin: str | None = None) -> dict[str, Any]:
    """The TOML config file as a dict; a :class:`ConfigFileError` if it is missing,
    unreadable or broken. ``origin`` says where the path came from (``COMMHUB_CONFIG``)."""
    where = f"{path} (from {origin})" if origin else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"config file {where} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigFileError(f"config file {where} cannot be read: {reason}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(_toml_problem(where, text, exc)) from None


def _toml_problem(where: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """``FILE:LINE:COLUMN: invalid TOML: problem`` from tomllib's message."""
    message = str(exc).splitlines()[0]
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if found:
        problem = message[: found.start()]
        return f"{where}:{found[1]}:{found[2]}: invalid TOML: {problem}"
    found = re.search(r"\s*\(at end of document\)$", message)
    if found:
        lines = max(len(text.splitlines()), 1)
        return f"{where}:{lines}: invalid TOML: {message[: found.start()]} at the end of the file"
    return f"{where}: invalid TOML: {message}"


class Settings(BaseSettings):
    """Everything a hub process needs to know; every field can come from env or file."""

    model_config = SettingsConfigDict(
        env_prefix="COMMHUB_", extra="forbid", validate_default=True
    )
    # The TOML file load_settings was given (a subclass sets it); None: COMMHUB_CONFIG.
    config_file: ClassVar[str | None] = None

    data_dir: Path = Field(
        Path("commhub-data"), description="JetStream store, DuckDB file, model cache, lock."
    )
    nats_url: str | None = Field(
        None, description="An existing NATS server or cluster; unset starts the embedded one."
    )
    nats_port: int = Field(4222, ge=0, le=65535, description="Embedded server port (0: any free).")
    nats_creds: Path | None = Field(
        None, description="A NATS .creds file (user JWT and nkey seed) to connect with.")
    nats_nkey: Path | None = Field(
        None, description="A file holding an nkey seed (SU...) to connect with.")
    nats_user: str | None = Field(None, description="NATS user name to connect with.")
    nats_password: SecretStr | None = Field(None, description="NATS password (a secret).")
    nats_token: SecretStr | None = Field(None, description="NATS token (a secret).")
    nats_tls_cert: Path | None = Field(
        None, description="Client certificate (PEM) for TLS to NATS; with nats_tls_key.")
    nats_tls_key: Path | None = Field(None, description="The client certificate's key (PEM).")
    nats_tls_ca: Path | None = Field(
        None, description="CA file (PEM) that NATS servers' certificates are checked against.")
    nats_conf: Path | None = Field(None, description="nats.conf for the embedded server.")
    prefix: str = Field("commhub", description="First token of every subject.")
    role: Role = "all"
    replicas: int = Field(
        1, ge=1, le=5, description="Replicas of every stream and bucket made (R3 on a cluster).",
    )
    placement_tags: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Server tags the streams' and buckets' replicas must be placed on.",
    )
    placement_cluster: str | None = Field(
        None, description="The cluster the streams and buckets are placed in.",
    )
    partitions: int = Field(
        16, ge=1, le=1024,
        description="Partitions of the router inputs (fixed when the stream is made).",
    )
    manage_streams: bool = Field(
        True, description="Create and update streams and buckets at start; false: they "
        "must exist (`commhub streams apply`), so roles need no rights to make them.",
    )

    host: str = Field("127.0.0.1", description="Interface the channels listen on.")
    ws_port: int = Field(8765, ge=0, le=65535)
    http_port: int = Field(8080, ge=0, le=65535)
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Static client tokens (env: comma-separated)."
    )
    token_secret: SecretStr | None = Field(
        None, description="Secret that signs client tokens (`commhub token`); unset: none."
    )
    allow_anonymous: bool | None = Field(
        None, description="Accept clients without a token; default: only on a loopback host."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port], '*' for any) whose pages may use "
        "the HTTP API and the WebSocket from a browser (env: comma-separated).",
    )
    widget_ws_url: str | None = Field(
        None, pattern=r"^wss?://[^\s]+$",
        description="The WebSocket URL the chat widget connects to (behind a proxy); "
        "unset: the host the page reached the hub on, with ws_port.",
    )
    max_frame_bytes: int = Field(64 * 1024, ge=256)
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest HTTP request body the hub accepts."
    )

    # 0.35, not "auto", by default: calibrated on the three built-in workflows' few
    # examples, the threshold comes out near 0.04, which lets small talk and unclear text
    # start workflows that the fallback and the conversation tests expect to catch.
    threshold: float | Literal["auto"] = Field(
        0.35,
        description='Minimum confidence to start a workflow: a number in [0, 1], or "auto" '
                    "for the classifier's calibrated threshold.",
    )
    classifier: str = Field("tfidf", description="Name of the classifier plugin to use.")
    clarify_margin: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Top two candidates closer than this: ask which one (0: never ask).",
    )
    idle_expiry_seconds: float = Field(
        3600.0, ge=0.0, description="A workflow run idle this long expires (0: never)."
    )
    cancel_phrases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_CANCEL_PHRASES),
        description="Messages that cancel the active workflow (env: comma-separated).",
    )
    restart_phrases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_RESTART_PHRASES),
        description="Messages that restart the active workflow (env: comma-separated).",
    )
    timezone: str = Field(
        "UTC", description="IANA time zone in which relative dates (tomorrow) are read.",
    )
    smalltalk: dict[str, str | bool] = Field(
        default_factory=dict,
        description="Small-talk replies by intent (greeting, thanks, goodbye, capabilities, "
        "bot): a text replaces the built-in one, false turns it off.",
    )
    agent_ttl_seconds: float = Field(
        30.0, gt=0, description="An agent's heartbeat counts for this long.",
    )
    handoff_needs_agent: bool = Field(
        True, description="Hand off only while an agent's heartbeat is present.",
    )
    workflow_paths: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Extra workflow files or folders (env: comma-separated)."
    )
    disable_plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Plugin names not to load (env: comma-separated)."
    )
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-plugin settings, validated by each plugin."
    )

    router_concurrency: int = Field(64, ge=1, description="Conversations handled at once.")
    recorder_batch: int = Field(1000, ge=1)
    recorder_flush_seconds: float = Field(0.2, gt=0)
    sql_timeout_seconds: float = Field(10.0, gt=0)
    sql_max_rows: int = Field(10_000, ge=1)
    sql_max_result_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Most bytes of values one SQL result holds."
    )
    sql_snapshot_seconds: float = Field(
        1.0, ge=0, description="Live SQL reads a snapshot of the records at most this old."
    )
    sql_memory_limit: str = Field(
        "1GB",
        pattern=r"(?i)^\s*\d+(\.\d+)?\s*(b|bytes?|[kmgt]i?b)\s*$",
        description="DuckDB memory limit of each SQL worker (KB/MB/GB/TB or KiB/MiB/GiB/TiB).",
    )
    sql_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens for SQL over HTTP (/v1/sql); env: comma-separated.",
    )
    agent_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens for the agents' inbox (/inbox, /v1/inbox); "
        "env: comma-separated.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from commhub.core.engine.entities import valid_timezone

        return valid_timezone(value)

    @field_validator("smalltalk")
    @classmethod
    def _known_smalltalk(cls, value: dict[str, str | bool]) -> dict[str, str | bool]:
        from commhub.core.routing.smalltalk import SmallTalk

        SmallTalk.from_settings(value)
        return value

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold_is_auto_or_unit(cls, value: Any) -> Any:
        # One clear sentence instead of pydantic's two errors for the union.
        if isinstance(value, str) and value.strip().casefold() == "auto":
            return "auto"
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not 0.0 <= number <= 1.0:
            raise ValueError(f'must be "auto" or a number in [0, 1], not {value!r}')
        return number
    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        return [check_origin(origin) for origin in value]

    @field_validator("prefix")
    @classmethod
    def _prefix_is_token(cls, value: str) -> str:
        Subjects(value)  # raises with a clear reason
        return value

    @field_validator(
        "tokens", "disable_plugins", "workflow_paths", "cancel_phrases", "restart_phrases",
        "sql_tokens", "cors_origins", "agent_tokens", "placement_tags", mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Environment variables give "a,b" (or a JSON list); TOML and flags give lists.
        return split_list(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file, origin = _config_file(settings_cls)
        if config_file:
            data = read_config_file(config_file, origin)
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    # -- derived ------------------------------------------------------------------
    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def embedded_nats(self) -> bool:
        return self.nats_url is None

    @property
    def anonymous_allowed(self) -> bool:
        """Anonymous clients are the default only when nobody else can reach the hub."""
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return is_loopback(self.host)

    def origin_policy(self) -> OriginPolicy:
        """Which browser pages may use the hub (``cors_origins`` and its own pages)."""
        return OriginPolicy(self.cors_origins)

    def token_authority(self) -> TokenAuthority:
        """The checker every built-in channel uses for client tokens."""
        secret = self.token_secret.get_secret_value() if self.token_secret else None
        return TokenAuthority(self.tokens, secret, self.anonymous_allowed)

    def nats_options(self) -> dict[str, Any]:
        """nats-py ``connect`` options for the credentials and TLS settings (secrets
        included: pass them on, never show them)."""
        from commhub.core.natsconnect import auth_options

        return auth_options(
            creds=self.nats_creds, nkey=self.nats_nkey, user=self.nats_user,
            password=self.nats_password.get_secret_value() if self.nats_password else None,
            token=self.nats_token.get_secret_value() if self.nats_token else None,
            tls_cert=self.nats_tls_cert, tls_key=self.nats_tls_key, tls_ca=self.nats_tls_ca,
        )

    @property
    def layout(self) -> Any:
        """Replicas, placement and partitions of the streams and buckets
        (a :class:`commhub.core.streams.Layout`)."""
        from commhub.core.streams import Layout

        return Layout(replicas=self.replicas, placement_tags=tuple(self.placement_tags),
                      placement_cluster=self.placement_cluster, partitions=self.partitions,
                      agent_ttl=self.agent_ttl_seconds)

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "commhub.duckdb"

    def plugin_settings(self, name: str) -> dict[str, Any]:
        return self.plugins.get(name, {})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (nobody else can reach them)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_file(settings_cls: type[BaseSettings]) -> tuple[str | None, str | None]:
    """The config file's path and where it was named (None: given to load_settings)."""
    given = getattr(settings_cls, "config_file", None)
    if given:
        return str(given), None
    return os.environ.get("COMMHUB_CONFIG") or None, "COMMHUB_CONFIG"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from flags (``overrides`` that are not None), env and a TOML file.

    ``config_file`` takes the place of ``COMMHUB_CONFIG``. Raises
    :class:`ConfigFileError` for a missing or broken file, and :class:`SettingsError`
    (from pydantic's ValidationError) naming each bad setting and where it came from.
    """
    cls: type[Settings] = Settings
    if config_file is not None:
        # A subclass that knows its file, rather than a process-wide environment change.
        cls = type("Settings", (Settings,), {"config_file": str(config_file)})
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        raise SettingsError(_problems(exc, given, _config_file(cls)[0])) from exc


def _problems(exc: ValidationError, given: dict[str, Any], config_file: str | None) -> list[str]:
    """One line per error: the setting, its value, where it came from, what is wrong.

    The source is the first that gives the setting, in the order settings are layered:
    flags (``given``), then ``COMMHUB_*`` variables, then the config file.
    """
    env = {name.upper(): name for name in os.environ}
    text, in_file = "", {}
    if config_file:
        # The file was read a moment ago: this cannot fail unless it changed meanwhile.
        with contextlib.suppress(OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            text = Path(config_file).read_text(encoding="utf-8")
            in_file = tomllib.loads(text)
    problems = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = str(loc[0]) if loc else ""
        setting = _setting_path(loc) or "settings"
        source = ""
        if field and field not in given:
            variable = f"COMMHUB_{field}".upper()
            if variable in env:
                source = f" (from {env[variable]})"
            elif field in in_file:
                line = _line_of(text, field)
                source = f" (from {config_file}{f', line {line}' if line else ''})"
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {setting}{source}")
            continue
        value = ""
        if "input" in error and field not in SECRET_SETTINGS and len(loc) == 1:
            shown = repr(error["input"])
            value = f" = {shown if len(shown) <= 60 else shown[:57] + '...'}"
        problems.append(f"invalid setting {setting}{value}{source}: {error['msg']}")
    return problems


def _setting_path(loc: tuple[int | str, ...]) -> str:
    """``workflow_paths[0]``, ``plugins.websocket``: where in the settings an error is."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def _line_of(text: str, field: str) -> int | None:
    """The line of a top-level ``field = ...`` (or of its ``[field...]`` table) in TOML."""
    key = re.compile(rf"""^\s*(["']?){re.escape(field)}\1\s*=""")
    table = re.compile(rf"""^\s*\[\s*(["']?){re.escape(field)}\1\s*[.\]]""")
    top_level = True
    for number, line in enumerate(text.splitlines(), 1):
        if table.match(line):
            return number
        if line.lstrip().startswith("["):
            top_level = False  # keys below a table header belong to that table
        elif top_level and key.match(line):
            return number
    return None
