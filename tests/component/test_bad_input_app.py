"""Bad-input battery, the app's HTTP surface (app/events_service.py; issue 10, item 20), against a REAL
PostgreSQL and a REAL Kafka-protocol broker (tests/conftest.py's `pg` and `kafka`).

A client's bad data is a 400 naming the field, never a 503 blaming Postgres (which, before, is what NUL
characters, lone surrogates, NaN and 1e999 got: jsonb refused them and the app reported Postgres down) nor a
500 (a 10,000-deep body, `?limit=²`). After each case: /healthz still says nothing is down, no row was
stored by it, and the app logged no failed request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from support.servers import tansu
from support.servers.app import AppProcess, app_env, count_rows, new_database
from support.servers.postgres import PostgresServer

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    phrase: str
    field: str | None = None  # the `field` of the 400 answer, when one field is to blame


def deep(levels: int) -> bytes:
    return b'{"a": ' + b"[" * levels + b"]" * levels + b"}"


CASES = [
    Case("nul-in-string", "POST", "/events", rb'{"a": "x\u0000y"}', 400, "field $.a: the string contains a NUL character", "$.a"),
    Case("nul-in-key", "POST", "/events", rb'{"k\u0000": 1}', 400, "its name contains a NUL character", '$["k\\u0000"]'),
    Case("lone-high-surrogate", "POST", "/events", rb'{"a": "\ud800"}', 400, "field $.a: the string contains a lone surrogate", "$.a"),
    Case("lone-low-surrogate-nested", "POST", "/events", rb'{"a": {"b": [1, "x\udc00"]}}', 400, "lone surrogate", "$.a.b[1]"),
    Case("nan", "POST", "/events", b'{"n": NaN}', 400, "field $.n: nan is not a finite number", "$.n"),
    Case("infinity", "POST", "/events", b'{"n": [-Infinity]}', 400, "-inf is not a finite number", "$.n[0]"),
    Case("1e999", "POST", "/events", b'{"n": 1e999}', 400, "field $.n: inf is not a finite number", "$.n"),
    Case("10000-deep", "POST", "/events", deep(10_000), 400, "nested deeper than 100 levels"),
    Case("150-deep", "POST", "/events", deep(150), 400, "nested deeper than 100 levels", "$.a" + "[0]" * 100),
    Case("invalid-utf8", "POST", "/events", b'{"a": "\xff"}', 400, "not valid JSON"),
    Case("not-json", "POST", "/events", b"{nope", 400, "not valid JSON"),  # already worked
    Case("not-an-object", "POST", "/events", b"[1, 2]", 400, "must be a JSON object"),  # already worked
    Case("too-big", "POST", "/events", b'{"x": "' + b"y" * 70_000 + b'"}', 413, "larger than"),  # already worked
    Case("limit-superscript-two", "GET", "/events?limit=%C2%B2", None, 400, "limit must be an integer 1..500, got '²'"),
    Case("limit-arabic-digit", "GET", "/events?limit=%D9%A3", None, 400, "limit must be an integer"),
    Case("limit-huge", "GET", "/events?limit=" + "9" * 5000, None, 400, "limit must be an integer"),
    Case("limit-zero", "GET", "/events?limit=0", None, 400, "limit must be an integer"),  # already worked
    Case("limit-word", "GET", "/events?limit=ten", None, 400, "limit must be an integer"),  # already worked
]  # fmt: skip


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, pg: PostgresServer, kafka: tansu.TansuBroker
) -> Iterator[AppProcess]:
    """One app for the whole table (its own database and topic); stopped by PID at the end."""
    log = Path(tmp_path_factory.mktemp("bad-input-app")) / "app.log"
    process = AppProcess(log=log, env=app_env(pg, kafka, new_database(pg)))
    process.start()
    yield process
    process.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_is_a_400_naming_the_field_and_touches_no_dependency(
    case: Case, app: AppProcess, pg: PostgresServer
) -> None:
    rows = count_rows(pg, app.env["PGDATABASE"])
    logged = len(app.logs())
    if case.method == "POST":
        response = app.post(case.path, data=case.body, headers=JSON)
    else:
        response = app.get(case.path)

    assert response.status_code == case.status, response.text
    body = response.json()
    assert case.phrase in body["error"], body
    assert "down" not in body  # no dependency blamed
    if case.field is not None:
        assert body["field"] == case.field
    health = app.get("/healthz")
    assert health.status_code == 200 and health.json()["down"] == [], health.text
    assert count_rows(pg, app.env["PGDATABASE"]) == rows  # nothing stored
    new_lines = app.logs()[logged:]
    failed = [e for e in new_lines if e.get("msg") == "request failed" or e.get("status") in (500, 503)]
    assert failed == []


def test_good_events_are_still_stored_after_the_bad_ones(app: AppProcess, pg: PostgresServer) -> None:
    """The control: unicode, deep-enough nesting and big finite numbers are fine."""
    payload = {"name": "café ☕ 𝄞", "nested": [[[[{"ok": True}]]]], "big": 1e308, "neg": -0.0, "null": None}
    created = app.post("/events", json=payload)
    assert created.status_code == 201, created.text
    assert created.json()["payload"]["name"] == "café ☕ 𝄞"
    assert app.get("/events?limit=500").json()["events"][0]["payload"]["nested"] == [[[[{"ok": True}]]]]
    with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/" + app.env["PGDATABASE"]) as conn:
        row = conn.execute("SELECT payload->>'name' FROM events").fetchone()
    assert row == ("café ☕ 𝄞",)
