"""Settings: flags over environment over the TOML file, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from commhub.core.config import ConfigFileError, SettingsError, load_settings


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
    """An invalid value fails validation with the setting's name and the variable it came
    from in the message."""
    monkeypatch.setenv("COMMHUB_WS_PORT", "70000")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.problems == [
        "invalid setting ws_port = '70000' (from COMMHUB_WS_PORT): "
        "Input should be less than or equal to 65535"]


def test_an_unknown_key_in_the_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A misspelled setting in the config file is refused, not silently ignored."""
    config = tmp_path / "commhub.toml"
    config.write_text("ws_prot = 9001\n")
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert info.value.problems == [f"unknown setting ws_prot (from {config}, line 1)"]


def test_a_wrong_type_in_the_file_names_the_file_line_and_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A value of the wrong type in the TOML file names the file, its line and the
    setting; a bad value from the environment names its variable instead, and a flag's
    value is the flag's (it overrides the file)."""
    config = tmp_path / "commhub.toml"
    config.write_text('prefix = "ok"\n\nws_port = "lots"\nthreshold = 2\n'
                      "[plugins.websocket]\nthreshold = 1\n")
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    monkeypatch.setenv("COMMHUB_HTTP_PORT", "many")
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert info.value.problems == [  # in the order of the settings
        f"invalid setting ws_port = 'lots' (from {config}, line 3): Input should be a valid "
        "integer, unable to parse string as an integer",
        "invalid setting http_port = 'many' (from COMMHUB_HTTP_PORT): Input should be a "
        "valid integer, unable to parse string as an integer",
        f"invalid setting threshold = 2 (from {config}, line 4): Value error, must be "
        '"auto" or a number in [0, 1], not 2',
    ]
    monkeypatch.delenv("COMMHUB_HTTP_PORT")
    with pytest.raises(SettingsError) as info:
        load_settings(config, ws_port=70000, threshold=0.5)
    assert info.value.problems == [
        "invalid setting ws_port = 70000: Input should be less than or equal to 65535"]


def test_a_broken_config_file_names_the_file_and_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A TOML syntax error is one line: file, line, column and tomllib's problem."""
    config = tmp_path / "commhub.toml"
    config.write_text("prefix = \"ok\"\nws_port = \n")
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    with pytest.raises(ConfigFileError) as info:
        load_settings(config)
    assert str(info.value) == f"{config}:2:11: invalid TOML: Invalid value"
    config.write_text('prefix = "never closed\n')
    with pytest.raises(ConfigFileError, match=r":1:\d+: invalid TOML: "):
        load_settings(config)


def test_a_missing_config_file_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A config file that does not exist is an error, whether given to load_settings
    (--config) or in COMMHUB_CONFIG; an empty COMMHUB_CONFIG means none."""
    missing = tmp_path / "nope.toml"
    monkeypatch.delenv("COMMHUB_CONFIG", raising=False)
    with pytest.raises(ConfigFileError) as info:
        load_settings(missing)
    assert str(info.value) == f"config file {missing} does not exist"
    monkeypatch.setenv("COMMHUB_CONFIG", str(missing))
    with pytest.raises(ConfigFileError) as info:
        load_settings()
    assert str(info.value) == f"config file {missing} (from COMMHUB_CONFIG) does not exist"
    monkeypatch.setenv("COMMHUB_CONFIG", "")
    assert load_settings().prefix == "commhub"


def test_anonymous_clients_only_on_loopback_by_default() -> None:
    """Anonymous clients are allowed on 127.0.0.1 and refused on any other interface."""
    assert load_settings(host="127.0.0.1").anonymous_allowed
    assert not load_settings(host="0.0.0.0").anonymous_allowed
    assert load_settings(host="0.0.0.0", allow_anonymous=True).anonymous_allowed
