"""Client tokens: static and signed, as every built-in channel checks them."""

from __future__ import annotations

import base64
import json

import pytest

from commhub.core.cli import main
from commhub.core.tokens import Identity, TokenAuthority, TokenRefused, mint

NOW = 1_800_000_000.0


def refusal(authority: TokenAuthority, token: str | None, **who: str) -> str:
    with pytest.raises(TokenRefused) as caught:
        authority.check(token, now=NOW, **who)
    return str(caught.value)


def test_signed_token_admits_its_user_until_it_expires() -> None:
    authority = TokenAuthority(secret="s3cret")
    token = mint("s3cret", "alice", 60, now=NOW)
    assert authority.check(token, user="alice", now=NOW) == Identity(
        "signed", user="alice", expires=int(NOW + 60)
    )
    assert authority.check(token, now=NOW).user == "alice"  # no user given: the token's
    assert refusal(authority, token, user="bob") == "token is for another user"
    with pytest.raises(TokenRefused, match="token expired"):
        authority.check(token, now=NOW + 61)


def test_signed_token_bound_to_a_conversation() -> None:
    authority = TokenAuthority(secret="k")
    token = mint("k", "alice", 60, conversation="c1", now=NOW)
    assert authority.check(token, conversation="c1", now=NOW).conversation == "c1"
    assert refusal(authority, token, conversation="c2") == "token is for another conversation"


def test_tampered_or_foreign_tokens_are_invalid() -> None:
    authority = TokenAuthority(secret="k")
    token = mint("k", "alice", 60, now=NOW)
    prefix, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert refusal(authority, f"{prefix}.{forged}.{signature}") == "invalid token"
    assert refusal(authority, mint("other-secret", "alice", 60, now=NOW)) == "invalid token"
    assert refusal(authority, "ch1.garbage") == "invalid token"
    # Without a secret configured, signed tokens are just unknown static tokens.
    assert refusal(TokenAuthority(["t"]), token) == "invalid token"


def test_static_tokens_and_anonymous_rules() -> None:
    assert TokenAuthority(["a", "b"]).check("b").kind == "static"
    assert refusal(TokenAuthority(["a"]), "c") == "invalid token"
    assert refusal(TokenAuthority(["a"]), None) == "token required"
    open_hub = TokenAuthority(["a"], anonymous_allowed=True)
    assert open_hub.check(None).kind == "anonymous"
    # A wrong token is refused even where anonymous clients are welcome.
    assert refusal(open_hub, "wrong") == "invalid token"


def test_mint_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        mint("", "alice")


def test_cli_token_mints_a_token_the_hub_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMMHUB_TOKEN_SECRET", "cli-secret")
    assert main(["token", "--user", "alice", "--conversation", "c9", "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    identity = TokenAuthority(secret="cli-secret").check(token, conversation="c9")
    assert identity.user == "alice" and identity.conversation == "c9"


def test_cli_token_without_secret_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COMMHUB_TOKEN_SECRET", raising=False)
    assert main(["token", "--user", "alice"]) == 1
    assert "no token_secret configured" in capsys.readouterr().err
    monkeypatch.setenv("COMMHUB_TOKEN_SECRET", "x")
    assert main(["token", "--user", "not valid"]) == 1
    assert "invalid user" in capsys.readouterr().err
