"""The demo app: a small HTTP service that proves the data path HTTP -> Postgres and Kafka.

    GET  /healthz   200 when Postgres and Kafka both answer, else 503 naming what is down
    POST /events    store a JSON object in Postgres and produce it to the Kafka topic (201); 400 naming the
                    field for what jsonb cannot hold (NUL, lone surrogates, NaN/Infinity, too deep)
    GET  /events    the newest stored events (?limit=N, 1..500, default 50), newest first, in at most
                    MAX_RESPONSE bytes: when the events asked for do not fit, the answer carries the newest
                    that do and says "truncated": true

Limits (what one client can make the app hold; the job gives it 256 MB): an event (the POST body) is at most
MAX_BODY bytes (413 naming the limit), GET /events answers at most MAX_RESPONSE bytes (the rows are sized
and cut in Postgres, their JSON text passed through, never parsed into Python objects), `limit` at most
MAX_LIMIT (400). waitress (WAITRESS below) accepts CONNECTION_LIMIT connections, drops one idle for
CHANNEL_TIMEOUT seconds, and refuses request headers over 16 KiB and bodies over 2 x MAX_BODY before the
app reads them.

Configuration comes only from environment variables (the Nomad template renders them from service
discovery):

    DATABASE_URL                 a libpq URL/conninfo; when unset, libpq's own PGHOST, PGPORT, PGUSER,
                                 PGPASSWORD, PGDATABASE (and every other PG* variable) apply
    KAFKA_BOOTSTRAP_SERVERS      host:port[,host:port]   (required)
    KAFKA_TOPIC                  topic to produce to     (default: events)
    KAFKA_TOPIC_PARTITIONS       partitions when the app creates the topic (default: 1)
    KAFKA_REPLICATION_FACTOR     replication factor when the app creates the topic (default: 1)
    HOST / PORT                  listen address          (default: 0.0.0.0 / 3000)
    APP_VERSION                  reported by /healthz    (the image sets it to its tag)
    STARTUP_TIMEOUT              seconds to keep retrying schema/topic setup at start (default: 60)
    CHECK_TIMEOUT                seconds each health check may take (default: 2)
    KAFKA_DELIVERY_TIMEOUT       seconds a POST waits for Kafka's acknowledgement (default: 10)
    LOG_LEVEL                    DEBUG, INFO, ... (default: INFO)

On start the app creates its table and topic if they are missing (idempotent; it tolerates both already
existing and several replicas starting at once), retrying until STARTUP_TIMEOUT while Postgres or Kafka
are not yet reachable. Postgres that never answers makes it exit 1 naming it; Kafka that never answers does
not: the app serves, /healthz and POST /events answer 503 naming kafka, and the health check creates the
topic once the broker is back (a Kafka restart must not take the app down). Logs are JSON lines on stdout.

A POST is written in a transaction that commits only after Kafka acknowledged the event, so a stored row
always has its event on the topic (an event can still reach the topic without its row if the commit fails
after the acknowledgement: at-least-once towards Kafka).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import waitress
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg.types.json import Jsonb

log = logging.getLogger("events_service")

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS events (
    id          bigserial   PRIMARY KEY,
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
)
"""
#: Serialises concurrent `CREATE TABLE IF NOT EXISTS` of several replicas starting together (two racing
#: creators can otherwise fail on the pg_type unique index).
SCHEMA_LOCK_KEY = 0x6576656E7473  # "events"
MAX_BODY = 64 * 1024
MAX_LIMIT = 500
#: Largest GET /events answer, in bytes (about 16 events of MAX_BODY; a 500-row answer of 60 KB events
#: built as Python objects peaked at 309 MB of RSS).
MAX_RESPONSE = 1024 * 1024
#: Bytes of JSON around each event's payload in GET /events ({"id": ..., "payload": ..., "created_at": ...}).
EVENT_OVERHEAD = 100
#: Connections waitress serves at once (its default, 100, let ~100 idle half-open connections stall
#: /healthz: past the limit it stops accepting until its cleanup drops one, CHANNEL_TIMEOUT later).
CONNECTION_LIMIT = 1000
#: Seconds a connection may sit idle (no byte received or sent) before waitress closes it (default 120).
CHANNEL_TIMEOUT = 30
#: waitress's settings, set deliberately (waitress/adjustments.py names each): poll(), not select(),
#: which cannot watch file descriptors past 1024; the idle cleanup every 10 s (default 30).
WAITRESS: dict[str, Any] = {
    "threads": 8,
    "connection_limit": CONNECTION_LIMIT,
    "channel_timeout": CHANNEL_TIMEOUT,
    "cleanup_interval": 10,
    "asyncore_use_poll": True,
    "backlog": 1024,
    "max_request_header_size": 16 * 1024,
    "max_request_body_size": 2 * MAX_BODY,
}
#: Deepest nesting of arrays/objects accepted in an event (deeper is a 400, not a RecursionError).
MAX_DEPTH = 100
_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII digits only: "²".isdigit() is True but int("²") fails


class ConfigurationError(Exception):
    pass


@dataclass(frozen=True)
class Settings:
    database_url: str
    kafka_bootstrap: str
    kafka_topic: str
    topic_partitions: int
    replication_factor: int
    host: str
    port: int
    version: str
    startup_timeout: float
    check_timeout: float
    delivery_timeout: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def number(name: str, default: str, kind: Callable[[str], Any] = int) -> Any:
            raw = env.get(name, "").strip() or default
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigurationError(f"environment variable {name}={raw!r} is not a number") from None
            if value <= 0:
                raise ConfigurationError(f"environment variable {name}={raw!r} must be positive")
            return value

        bootstrap = env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        if not bootstrap:
            raise ConfigurationError("environment variable KAFKA_BOOTSTRAP_SERVERS is not set (host:port)")
        port = number("PORT", "3000")
        if port > 65535:
            raise ConfigurationError(f"environment variable PORT={port} is not a port number")
        return cls(
            database_url=env.get("DATABASE_URL", "").strip(),
            kafka_bootstrap=bootstrap,
            kafka_topic=env.get("KAFKA_TOPIC", "").strip() or "events",
            topic_partitions=number("KAFKA_TOPIC_PARTITIONS", "1"),
            replication_factor=number("KAFKA_REPLICATION_FACTOR", "1"),
            host=env.get("HOST", "").strip() or "0.0.0.0",  # noqa: S104 - a container listens on all addresses
            port=port,
            version=env.get("APP_VERSION", "").strip() or "unknown",
            startup_timeout=number("STARTUP_TIMEOUT", "60", float),
            check_timeout=number("CHECK_TIMEOUT", "2", float),
            delivery_timeout=number("KAFKA_DELIVERY_TIMEOUT", "10", float),
        )

    def postgres_target(self) -> str:
        """Where Postgres is, for logs and errors (never the password)."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.database_url)
        except psycopg.ProgrammingError:
            return "(unparsable DATABASE_URL)"
        host = info.get("host") or os.environ.get("PGHOST") or "local socket"
        port = info.get("port") or os.environ.get("PGPORT") or "5432"
        db = info.get("dbname") or os.environ.get("PGDATABASE") or "(default)"
        return f"{host}:{port}/{db}"


# --------------------------------------------------------------------------------------------- logging --
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every `extra=` field."""

    _std = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._std and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")


# ----------------------------------------------------------------------------------------- the service --
class Service:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        kafka_common = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "client.id": f"events-service-{settings.version}",
            "socket.connection.setup.timeout.ms": int(settings.check_timeout * 1000) + 1000,
            "reconnect.backoff.ms": 500,
            "reconnect.backoff.max.ms": 2000,
        }
        # librdkafka's own log lines go through the JSON logger (served by poll()), not raw to stderr
        kafka_log = logging.getLogger("kafka")
        self.producer = Producer(
            {
                **kafka_common,
                "acks": "all",
                "message.timeout.ms": int(settings.delivery_timeout * 1000),
                "linger.ms": 0,
            },
            logger=kafka_log,
        )
        self.admin = AdminClient(kafka_common, logger=kafka_log)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="check")

    # -- dependencies
    def connect(self, timeout: float | None = None) -> psycopg.Connection[Any]:
        seconds = max(2, round(timeout or self.s.check_timeout))  # libpq's minimum is 2 s
        return psycopg.connect(self.s.database_url, connect_timeout=seconds, autocommit=False)

    def ensure_schema(self) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            conn.execute(TABLE_DDL)  # type: ignore[arg-type]  # a literal, no parameters

    def ensure_topic(self) -> None:
        topic = NewTopic(
            self.s.kafka_topic,
            num_partitions=self.s.topic_partitions,
            replication_factor=self.s.replication_factor,
        )
        future = self.admin.create_topics([topic], operation_timeout=10, request_timeout=10)[
            self.s.kafka_topic
        ]
        try:
            future.result(timeout=15)
            log.info("created topic", extra={"topic": self.s.kafka_topic})
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            log.info("topic exists", extra={"topic": self.s.kafka_topic})

    def initialise(self) -> None:
        """Create table and topic, retrying while the dependencies are not reachable yet. Without Postgres
        the app cannot answer anything (RuntimeError); without Kafka it starts all the same (a warning):
        check_kafka creates the topic once the broker answers."""
        steps: list[tuple[str, Callable[[], None], bool]] = [
            ("postgres", self.ensure_schema, True),
            ("kafka", self.ensure_topic, False),
        ]
        deadline = time.monotonic() + self.s.startup_timeout
        for name, step, required in steps:
            attempt = 0
            while True:
                attempt += 1
                try:
                    step()
                    log.info("dependency ready", extra={"dependency": name, "attempts": attempt})
                    break
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        if not required:
                            log.warning(
                                "dependency not ready; serving without it (/healthz reports it down)",
                                extra={"dependency": name, "attempts": attempt, "error": str(exc)},
                            )
                            break
                        raise RuntimeError(
                            f"{name} not ready after {self.s.startup_timeout:.0f}s: {exc}"
                        ) from exc
                    log.warning(
                        "dependency not ready, retrying",
                        extra={"dependency": name, "attempt": attempt, "error": str(exc)},
                    )
                    time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    # -- checks
    def check_postgres(self) -> None:
        with self.connect() as conn:
            conn.execute("SELECT 1 FROM events LIMIT 1")

    def check_kafka(self) -> None:
        self.admin.poll(0)  # serve queued client log lines
        self.producer.poll(0)
        metadata = self.admin.list_topics(topic=self.s.kafka_topic, timeout=self.s.check_timeout)
        if not metadata.brokers:
            raise RuntimeError("no broker in the cluster metadata")
        topic = metadata.topics.get(self.s.kafka_topic)
        if topic is not None and topic.error is not None and topic.error.code() in _TOPIC_MISSING:
            # the broker answers but lost the topic (a new, empty cluster): create it again
            log.warning("topic missing, creating it", extra={"topic": self.s.kafka_topic})
            self.ensure_topic()
            return
        if topic is None or topic.error is not None:
            raise RuntimeError(f"topic {self.s.kafka_topic}: {topic.error if topic else 'missing'}")

    def health(self) -> tuple[bool, dict[str, Any]]:
        checks = {"postgres": self.check_postgres, "kafka": self.check_kafka}
        futures = {name: self._pool.submit(_timed, fn) for name, fn in checks.items()}
        results: dict[str, Any] = {}
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=self.s.check_timeout + 3)
            except Exception as exc:  # the check itself hung past its own timeout
                results[name] = {"ok": False, "error": f"check did not finish: {exc!r}"}
        down = sorted(name for name, r in results.items() if not r["ok"])
        body = {
            "status": "ok" if not down else "unavailable",
            "version": self.s.version,
            "down": down,
            "checks": results,
        }
        return not down, body

    # -- events
    def store(self, payload: dict[str, Any]) -> dict[str, Any]:
        with self.connect() as conn:
            row = conn.execute(
                "INSERT INTO events (payload) VALUES (%s) RETURNING id, created_at", (Jsonb(payload),)
            ).fetchone()
            assert row is not None  # noqa: S101 - RETURNING always yields the row
            event = {"id": row[0], "created_at": row[1].isoformat(), "payload": payload}
            delivered = self._produce(str(row[0]).encode(), json.dumps(event).encode())
            # leaving the block commits; an exception from _produce rolls the row back
        return {**event, "topic": self.s.kafka_topic, **delivered}

    def _produce(self, key: bytes, value: bytes) -> dict[str, Any]:
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Any) -> None:
            if err is not None:
                outcome["error"] = err
            else:
                outcome.update(partition=msg.partition(), offset=msg.offset())
            done.set()

        self.producer.produce(self.s.kafka_topic, key=key, value=value, on_delivery=on_delivery)
        # a little past message.timeout.ms: librdkafka normally reports the failure itself first
        deadline = time.monotonic() + self.s.delivery_timeout + 2
        while not done.is_set() and time.monotonic() < deadline:
            self.producer.poll(0.05)
        if not done.is_set():
            raise KafkaDeliveryError("no delivery report from Kafka")
        if "error" in outcome:
            raise KafkaDeliveryError(str(outcome["error"]))
        return outcome

    def recent(self, limit: int, budget: int = MAX_RESPONSE) -> tuple[bytes, int, bool]:
        """The newest `limit` events as the JSON text of a list, cut to `budget` bytes: (JSON, count,
        truncated). Postgres sizes each payload and sends the text of those that fit (a prefix, newest
        first) and NULL for the rest, so the app never holds more than about `budget` of event data."""
        with self.connect() as conn:
            rows = conn.execute(
                """
                SELECT id, CASE WHEN total <= %(budget)s THEN payload::text END, created_at
                FROM (
                    SELECT id, payload, created_at,
                           sum(octet_length(payload::text) + %(overhead)s) OVER (ORDER BY id DESC) AS total
                    FROM (SELECT id, payload, created_at FROM events ORDER BY id DESC LIMIT %(limit)s) newest
                ) sized
                ORDER BY id DESC
                """,
                {"budget": budget, "overhead": EVENT_OVERHEAD, "limit": limit},
            ).fetchall()
        parts = [
            f'{{"id": {r[0]}, "payload": {r[1]}, "created_at": {json.dumps(r[2].isoformat())}}}'.encode()
            for r in rows
            if r[1] is not None
        ]
        return b"[" + b", ".join(parts) + b"]", len(parts), len(parts) < len(rows)

    def close(self) -> None:
        remaining = self.producer.flush(5)
        if remaining:
            log.warning("unflushed events at shutdown", extra={"count": remaining})
        self._pool.shutdown(wait=False, cancel_futures=True)


class KafkaDeliveryError(Exception):
    pass


_TOPIC_MISSING = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC)


def _timed(fn: Callable[[], None]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return {"ok": False, "error": _one_line(exc), "ms": round((time.monotonic() - start) * 1000)}
    return {"ok": True, "ms": round((time.monotonic() - start) * 1000)}


class BadEvent(ValueError):
    """A client's event that JSON parsed but Postgres' jsonb cannot store: a 400 naming the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field}: {problem}")
        self.field = field


def check_event(payload: Any) -> None:
    """Refuse what jsonb cannot hold, naming the field: NUL characters and lone surrogates in strings or
    keys, NaN/Infinity (also 1e999, which parses to infinity), nesting deeper than MAX_DEPTH. Iterative, so
    no input can exhaust the stack."""
    todo: list[tuple[Any, str, int]] = [(payload, "$", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise BadEvent(path, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else (
                    f"{path}[{json.dumps(key)}]"
                )  # fmt: skip
                _check_text(key, child, "its name")
                todo.append((item, child, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path, "the string")
        elif isinstance(value, float) and not math.isfinite(value):
            raise BadEvent(path, f"{value} is not a finite number (JSON has no NaN or Infinity)")


def _check_text(text: str, path: str, what: str) -> None:
    if "\x00" in text:
        raise BadEvent(path, f"{what} contains a NUL character (\\u0000), which Postgres cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadEvent(
            path, f"{what} contains a lone surrogate ({text[exc.start]!a}), which is not valid Unicode"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


# ----------------------------------------------------------------------------------------------- WSGI --
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}  # fmt: skip


def make_wsgi(service: Service) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    def respond(
        start: StartResponse, status: int, body: Any, extra: Iterable[tuple[str, str]] = ()
    ) -> list[bytes]:
        data = (json.dumps(body, default=str) + "\n").encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra]
        start(f"{status} {REASONS[status]}", headers)
        return [data]

    def handle(environ: dict[str, Any], start: StartResponse) -> tuple[int, list[bytes]]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if path == "/healthz":
            if method not in ("GET", "HEAD"):
                return 405, respond(start, 405, {"error": "use GET"}, [("Allow", "GET, HEAD")])
            healthy, body = service.health()
            if not healthy:
                log.warning("unhealthy", extra={"down": body["down"]})
            return (200 if healthy else 503), respond(start, 200 if healthy else 503, body)
        if path == "/events":
            if method == "GET":
                return get_events(environ, start)
            if method == "POST":
                return post_event(environ, start)
            return 405, respond(start, 405, {"error": "use GET or POST"}, [("Allow", "GET, POST")])
        return 404, respond(start, 404, {"error": f"no such path: {path}"})

    def get_events(environ: dict[str, Any], start: StartResponse) -> tuple[int, list[bytes]]:
        from urllib.parse import parse_qs

        query = parse_qs(environ.get("QUERY_STRING", ""))
        raw = query.get("limit", ["50"])[-1]
        if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= MAX_LIMIT:
            return 400, respond(
                start, 400, {"error": f"limit must be an integer 1..{MAX_LIMIT}, got {raw!r}"}
            )
        try:
            events, count, truncated = service.recent(int(raw))
        except psycopg.Error as exc:
            return 503, respond(start, 503, {"error": f"postgres: {_one_line(exc)}", "down": ["postgres"]})
        # the events' JSON text as Postgres gave it, never parsed: the answer is built around it
        data = (
            b'{"events": '
            + events
            + (
                f', "count": {count}, "truncated": {json.dumps(truncated)}, "max_bytes": {MAX_RESPONSE}}}\n'
            ).encode()
        )
        start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return 200, [data]

    def post_event(environ: dict[str, Any], start: StartResponse) -> tuple[int, list[bytes]]:
        length_raw = environ.get("CONTENT_LENGTH") or ""
        if not _DIGITS.fullmatch(length_raw):
            return 411, respond(start, 411, {"error": "a Content-Length header is required"})
        length = int(length_raw)
        if length > MAX_BODY:
            return 413, respond(
                start,
                413,
                {"error": f"body is larger than {MAX_BODY} bytes (an event's limit)", "max_bytes": MAX_BODY},
            )
        try:
            payload = json.loads(environ["wsgi.input"].read(length) or b"null")
        except ValueError as exc:
            return 400, respond(start, 400, {"error": f"body is not valid JSON: {exc}"})
        except RecursionError:
            return 400, respond(start, 400, {"error": f"body is nested deeper than {MAX_DEPTH} levels"})
        if not isinstance(payload, dict):
            return 400, respond(start, 400, {"error": "body must be a JSON object"})
        try:
            check_event(payload)
        except BadEvent as exc:
            return 400, respond(start, 400, {"error": str(exc), "field": exc.field})
        try:
            event = service.store(payload)
        except psycopg.DataError as exc:  # the event's data (class 22), not Postgres' health
            return 400, respond(start, 400, {"error": f"Postgres refused the event: {_one_line(exc)}"})
        except psycopg.Error as exc:
            return 503, respond(start, 503, {"error": f"postgres: {_one_line(exc)}", "down": ["postgres"]})
        except (KafkaException, KafkaDeliveryError, BufferError) as exc:
            return 503, respond(
                start, 503, {"error": f"kafka: {_one_line(exc)} (event not stored)", "down": ["kafka"]}
            )
        log.info("event stored", extra={"id": event["id"], "partition": event.get("partition"),
                                         "offset": event.get("offset")})  # fmt: skip
        return 201, respond(start, 201, event)

    def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        began = time.monotonic()
        try:
            status, body = handle(environ, start)
        except Exception:
            log.exception("request failed")
            status, body = 500, respond(start, 500, {"error": "internal error (see the app log)"})
        log.info(
            "request",
            extra={
                "method": environ["REQUEST_METHOD"],
                "path": environ.get("PATH_INFO", ""),
                "status": status,
                "ms": round((time.monotonic() - began) * 1000, 1),
            },
        )
        return body

    return app


# ----------------------------------------------------------------------------------------------- main --
def main(env: Mapping[str, str] = os.environ) -> int:
    setup_logging(env.get("LOG_LEVEL", "INFO"))
    try:
        settings = Settings.from_env(env)
    except ConfigurationError as exc:
        log.error("bad configuration", extra={"error": str(exc)})
        return 2
    log.info(
        "starting",
        extra={
            "version": settings.version,
            "postgres": settings.postgres_target(),
            "kafka": settings.kafka_bootstrap,
            "topic": settings.kafka_topic,
            "port": settings.port,
        },
    )
    service = Service(settings)
    try:
        service.initialise()
    except RuntimeError as exc:
        log.error("startup failed", extra={"error": str(exc)})
        return 1

    server = waitress.create_server(make_wsgi(service), host=settings.host, port=settings.port, **WAITRESS)

    def stop(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening", extra={"host": settings.host, "port": settings.port})
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        server.close()
        service.close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
