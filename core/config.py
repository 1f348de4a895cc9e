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

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .subjects import Subjects

__all__ = ["Settings", "Role", "load_settings"]

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
    allow_anonymous: bool | None = Field(
        None, description="Accept clients without a token; default: only on a loopback host."
    )
    max_frame_bytes: int = Field(64 * 1024, ge=256)

    threshold: float = Field(
        0.35, ge=0.0, le=1.0, description="Minimum confidence to start a workflow."
    )
    classifier: str = Field("tfidf", description="Name of the classifier plugin to use.")
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

    @field_validator("prefix")
    @classmethod
    def _prefix_is_token(cls, value: str) -> str:
        Subjects(value)  # raises with a clear reason
        return value

    @field_validator("tokens", "disable_plugins", "workflow_paths", mode="before")
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
        return _is_loopback(self.host)

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "commhub.duckdb"

    def plugin_settings(self, name: str) -> dict[str, Any]:
        return self.plugins.get(name, {})


def _is_loopback(host: str) -> bool:
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
