"""Settings: flags over environment over the TOML file, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from commhub.core.config import load_settings


def test_lists_come_from_the_environment_comma_separated_or_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """COMMHUB_TOKENS=a,b and COMMHUB_TOKENS='["a","b"]' both give two tokens."""
    monkeypatch.setenv("COMMHUB_TOKENS", "s3cret, other")
    monkeypatch.setenv("COMMHUB_DISABLE_PLUGINS", '["commhub.channels.websocket"]')
    settings = load_settings()
    assert settings.tokens == ["s3cret", "other"]
    assert settings.disable_plugins == ["commhub.channels.websocket"]


def test_flags_beat_environment_which_beats_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A flag overrides COMMHUB_*, which overrides the config file; the file fills the rest."""
    config = tmp_path / "commhub.toml"
    config.write_text(
        'ws_port = 9001\nhttp_port = 9002\nprefix = "fromfile"\n'
        "[plugins.websocket]\nmax_queue = 8\n"
    )
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    monkeypatch.setenv("COMMHUB_WS_PORT", "9100")
    monkeypatch.setenv("COMMHUB_PREFIX", "fromenv")
    settings = load_settings(config, prefix="fromflag")
    assert settings.prefix == "fromflag"
    assert settings.ws_port == 9100
    assert settings.http_port == 9002
    assert settings.plugin_settings("websocket") == {"max_queue": 8}


def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid value fails validation with the setting's name in the message."""
    monkeypatch.setenv("COMMHUB_WS_PORT", "70000")
    with pytest.raises(ValidationError, match="ws_port"):
        load_settings()


def test_an_unknown_key_in_the_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A misspelled setting in the config file is refused, not silently ignored."""
    config = tmp_path / "commhub.toml"
    config.write_text("ws_prot = 9001\n")
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    with pytest.raises(ValidationError, match="ws_prot"):
        load_settings(config)


def test_anonymous_clients_only_on_loopback_by_default() -> None:
    """Anonymous clients are allowed on 127.0.0.1 and refused on any other interface."""
    assert load_settings(host="127.0.0.1").anonymous_allowed
    assert not load_settings(host="0.0.0.0").anonymous_allowed
    assert load_settings(host="0.0.0.0", allow_anonymous=True).anonymous_allowed
