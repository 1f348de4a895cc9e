"""The dashboard page and SQL over HTTP, on a real hub's HTTP server and a real nats-server."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from commhub.core.bus import Bus
from commhub.core.config import Settings
from commhub.core.hub import Hub
from commhub.core.records.dashboard import mount_dashboard, sql_access
from commhub.core.web import WebServer

ENDLESS = "SELECT count(*) FROM range(10000000000000) a, range(1000) b"
ANALYST = "analyst-token-2"


async def post_sql(
    url: str, body: Any, token: str | None = None, authorization: str | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    async with aiohttp.ClientSession() as http:
        kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with http.post(f"{url}/v1/sql", headers=headers, **kwargs) as response:
            return response.status, await response.json(), response.headers


@contextlib.asynccontextmanager
async def split_hub(settings: Settings, tmp_path: Path, **update: Any) -> AsyncIterator[Hub]:
    """A channels-role hub (the HTTP server, no DuckDB) beside a recorder-role hub that
    answers SQL over the bus; yields the channels hub. No router: nothing here needs a
    classifier, which keeps these tests quick."""
    hubs: list[Hub] = []
    try:
        for role in ("recorder", "channels"):
            hub = Hub(settings.model_copy(
                update={**update, "role": role, "data_dir": tmp_path / role}
            ))
            await hub.start()
            hubs.append(hub)
        yield hubs[-1]
    finally:
        for hub in reversed(hubs):
            await hub.stop()


@pytest.fixture
async def local(settings: Settings, tmp_path: Path) -> AsyncIterator[Hub]:
    """Defaults: loopback, no sql_tokens."""
    async with split_hub(settings, tmp_path) as hub:
        yield hub


@pytest.fixture
async def guarded(settings: Settings, tmp_path: Path) -> AsyncIterator[Hub]:
    """Two SQL tokens, a chat token (which must not grant SQL), a 1 s query time limit."""
    async with split_hub(
        settings, tmp_path, sql_tokens=["analyst-token-1", ANALYST], tokens=["chat-token"],
        sql_timeout_seconds=1.0,
    ) as hub:
        yield hub


def url(hub: Hub) -> str:
    assert hub.web is not None
    return hub.web.url


async def test_page_and_its_files_are_served_from_the_hub_alone(local: Hub) -> None:
    """/dashboard serves the page and its own script and style sheet, under a CSP that
    allows nothing from elsewhere; the page references no other origin."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url(local)}/dashboard") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            csp = response.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp
            assert response.headers["Referrer-Policy"] == "no-referrer"
            page = await response.text()
        linked = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert "dashboard/dashboard.js" in linked and "dashboard/dashboard.css" in linked
        for link in linked:
            assert "//" not in link, f"the page links another origin: {link}"
        for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            async with http.get(f"{url(local)}/dashboard/{name}") as response:
                assert response.status == 200 and response.content_type == kind
                text = await response.text()
            # The only absolute URL allowed is the SVG namespace, which is a name, not a load.
            others = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
            assert not others, f"{name} refers to {others}"


async def test_unknown_dashboard_file_is_a_json_404_and_a_slash_redirects(local: Hub) -> None:
    """Only the page's own files are served; /dashboard/ redirects to /dashboard."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url(local)}/dashboard/secrets.py") as response:
            body = await response.json()
            assert response.status == 404 and body["error"]["code"] == "not_found"
        async with http.get(f"{url(local)}/dashboard/", allow_redirects=False) as response:
            assert response.status == 308 and response.headers["Location"] == "/dashboard"


async def test_loopback_hub_without_sql_tokens_answers_sql_without_a_token(local: Hub) -> None:
    """The one-command demo: on 127.0.0.1 with no sql_tokens, no token is needed, but a
    wrong one is still refused."""
    status, body, _ = await post_sql(url(local), {"sql": "SELECT 42 AS answer, 'x' AS s"})
    assert status == 200
    assert body == {"columns": ["answer", "s"], "rows": [[42, "x"]], "truncated": False}
    status, body, _ = await post_sql(url(local), {"sql": "SELECT 1"}, token="guess")
    assert status == 401 and body["error"] == {"code": "unauthorized", "message": "invalid token"}


async def test_sql_tokens_are_required_when_configured(guarded: Hub) -> None:
    """With sql_tokens set, a request needs one of them as a Bearer token; missing, wrong
    or malformed credentials and the chat channels' tokens get 401."""
    base = url(guarded)
    status, body, headers = await post_sql(base, {"sql": "SELECT 1"})
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert "token required" in body["error"]["message"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    for token in ("wrong", "chat-token", "analyst-token-"):
        status, body, _ = await post_sql(base, {"sql": "SELECT 1"}, token=token)
        assert (status, body["error"]["message"]) == (401, "invalid token"), token
    status, body, _ = await post_sql(base, {"sql": "SELECT 1"}, authorization=f"Basic {ANALYST}")
    assert status == 401 and "Bearer" in body["error"]["message"]
    status, body, _ = await post_sql(base, {"sql": "SELECT 1 AS one"}, token=ANALYST)
    assert (status, body["rows"]) == (200, [[1]])


async def test_row_limit_marks_the_result_truncated(guarded: Hub) -> None:
    """max_rows caps the rows; truncated says there were more."""
    status, body, _ = await post_sql(
        url(guarded), {"sql": "SELECT * FROM range(10) t(n)", "max_rows": 3}, token=ANALYST
    )
    assert status == 200
    assert body == {"columns": ["n"], "rows": [[0], [1], [2]], "truncated": True}


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("DROP TABLE messages", "only SELECT statements are allowed, got DROP"),
        ("SELECT 1; SELECT 2", "exactly one SELECT statement is allowed"),
        ("SELECT * FROM read_csv('/etc/passwd')", "cannot access files"),
    ],
)
async def test_refused_sql_is_400_with_the_sandbox_message(
    guarded: Hub, sql: str, says: str
) -> None:
    """What the sandbox refuses comes back as 400, code refused, with its reason."""
    status, body, _ = await post_sql(url(guarded), {"sql": sql}, token=ANALYST)
    assert status == 400 and body["error"]["code"] == "refused"
    assert says in body["error"]["message"]


async def test_malformed_requests_are_400_bad_request(guarded: Hub) -> None:
    """A body that is not JSON (or nested too deep), not an object, without sql or with a
    bad max_rows."""
    deep = b'{"sql": "SELECT 1", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    for body in (b"SELECT 1", [1, 2], {"query": "SELECT 1"}, {"sql": "SELECT 1", "max_rows": 0},
                 deep):
        status, answer, _ = await post_sql(url(guarded), body, token=ANALYST)
        assert status == 400 and answer["error"]["code"] == "bad_request", (repr(body)[:60], answer)
        assert "\n" not in answer["error"]["message"]


async def test_unknown_table_is_400_failed_with_duckdb_message(guarded: Hub) -> None:
    """DuckDB's own error (an unknown table) reaches the client readably."""
    status, body, _ = await post_sql(url(guarded), {"sql": "SELECT * FROM nope"}, token=ANALYST)
    assert status == 400 and body["error"]["code"] == "failed"
    assert "nope" in body["error"]["message"]


async def test_query_past_the_time_limit_is_504(guarded: Hub) -> None:
    """A query the SQL service interrupts at its time limit answers 504, code timeout."""
    status, body, _ = await post_sql(url(guarded), {"sql": ENDLESS}, token=ANALYST)
    assert status == 504 and body["error"]["code"] == "timeout"


async def test_channels_role_reaches_the_recorder_over_the_bus(guarded: Hub) -> None:
    """A channels-only hub has no DuckDB; its /v1/sql is answered by the recorder role."""
    assert guarded.recorder is None and guarded.sql is None
    status, body, _ = await post_sql(
        url(guarded), {"sql": "SELECT max(version) AS v FROM schema_version"}, token=ANALYST
    )
    assert status == 200 and body["columns"] == ["v"] and body["rows"][0][0] >= 1


async def test_no_recorder_on_the_bus_is_503(bus: Bus, settings: Settings) -> None:
    """With nobody serving SQL on the bus, the endpoint says so with 503."""
    server = WebServer("127.0.0.1", 0)
    mount_dashboard(server, settings, bus)
    await server.start()
    try:
        status, body, _ = await post_sql(server.url, {"sql": "SELECT 1"})
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert "no recorder answers" in body["error"]["message"]
    finally:
        await server.stop()


async def test_public_hub_without_sql_tokens_refuses_all_sql(bus: Bus, settings: Settings) -> None:
    """A hub configured for a non-loopback interface with no sql_tokens never runs SQL over
    HTTP (403), whatever the request carries; the page itself is still served."""
    public = settings.model_copy(update={"host": "0.0.0.0"})
    server = WebServer("127.0.0.1", 0)  # the rules follow the settings; stay on loopback
    mount_dashboard(server, public, bus)
    await server.start()
    try:
        for token in (None, "anything"):
            status, body, _ = await post_sql(server.url, {"sql": "SELECT 1"}, token=token)
            assert status == 403 and body["error"]["code"] == "forbidden"
            assert "sql_tokens" in body["error"]["message"]
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/dashboard") as r:
            assert r.status == 200
    finally:
        await server.stop()


def test_access_rules_follow_the_settings(settings: Settings) -> None:
    """No token is needed only on loopback with no sql_tokens and anonymous not denied."""
    def refusal(update: dict[str, Any], header: str | None) -> int | None:
        found = sql_access(settings.model_copy(update=update)).check(header)
        return None if found is None else found.status

    assert refusal({}, None) is None
    assert refusal({"host": "::1"}, None) is None
    assert refusal({"allow_anonymous": False}, None) == 403
    assert refusal({"host": "0.0.0.0", "allow_anonymous": True}, None) == 403
    assert refusal({"host": "0.0.0.0", "sql_tokens": ["t"]}, None) == 401
    assert refusal({"host": "0.0.0.0", "sql_tokens": ["t"]}, "Bearer t") is None
    assert refusal({"sql_tokens": ["t"]}, "bearer  t ") is None
