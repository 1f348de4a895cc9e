"""Hub settings: command-line flags, then ``COMMHUB_*`` environment, then a TOML file.

pydantic-settings does the layering and validation, so a bad value fails at start with
the setting's name and the reason instead of somewhere deep in a channel.

The TOML file is ``--config PATH`` or ``COMMHUB_CONFIG``; its keys are the field names
below (``ws_port = 9000``); a ``[plugins.NAME]`` table holds a plugin's own settings.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from commhub.core.subjects import Subjects
from commhub.core.tokens import TokenAuthority

# The defaults of ``cancel_phrases``/``restart_phrases`` (the router imports them).
DEFAULT_CANCEL_PHRASES = ("cancel", "stop", "quit", "never mind", "nevermind", "abort")
DEFAULT_RESTART_PHRASES = ("restart", "start over", "start again", "begin again")

__all__ = ["Settings", "Role", "is_loopback", "load_settings"]

Role = Literal["all", "channels", "router", "recorder"]


class Settings(BaseSettings):
    """Everything a hub process needs to know; every field can come from env or file."""

    model_config = SettingsConfigDict(
        env_prefix="COMMHUB_", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(
        Path("commhub-data"), description="JetStream store, DuckDB file, model cache, lock."
    )
    nats_url: str | None = Field(
        None, description="An existing NATS server or cluster; unset starts the embedded one."
    )
    nats_port: int = Field(4222, ge=0, le=65535, description="Embedded server port (0: any free).")
    nats_conf: Path | None = Field(None, description="nats.conf for the embedded server.")
    prefix: str = Field("commhub", description="First token of every subject.")
    role: Role = "all"

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
    max_frame_bytes: int = Field(64 * 1024, ge=256)
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest HTTP request body the hub accepts."
    )

    threshold: float | Literal["auto"] = Field(
        "auto",
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
    sql_snapshot_seconds: float = Field(
        1.0, ge=0, description="Live SQL reads a snapshot of the records at most this old."
    )
    sql_memory_limit: str = Field(
        "1GB", min_length=1, description="DuckDB memory limit of each SQL snapshot instance."
    )
    sql_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens for SQL over HTTP (/v1/sql); env: comma-separated.",
    )

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

    @field_validator("prefix")
    @classmethod
    def _prefix_is_token(cls, value: str) -> str:
        Subjects(value)  # raises with a clear reason
        return value

    @field_validator(
        "tokens", "disable_plugins", "workflow_paths", "cancel_phrases", "restart_phrases",
        "sql_tokens", mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Environment variables give "a,b" (or a JSON list); TOML and flags give lists.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

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
        config_file = settings_cls.model_config.get("toml_file") or os.environ.get(
            "COMMHUB_CONFIG"
        )
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
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

    def token_authority(self) -> TokenAuthority:
        """The checker every built-in channel uses for client tokens."""
        secret = self.token_secret.get_secret_value() if self.token_secret else None
        return TokenAuthority(self.tokens, secret, self.anonymous_allowed)

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


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from flags (``overrides`` that are not None), env and a TOML file.

    ``config_file`` takes the place of ``COMMHUB_CONFIG``. Raises pydantic's
    ValidationError, whose message names each bad setting.
    """
    cls: type[Settings] = Settings
    if config_file is not None:
        # A subclass that knows its file, rather than a process-wide environment change.
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": str(config_file)})
        cls = type("Settings", (Settings,), {"model_config": config})
    return cls(**{k: v for k, v in overrides.items() if v is not None})
