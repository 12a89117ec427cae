"""infra/nomad/client.py against the STATEFUL Nomad API double (tests/support/doubles/nomad_api.py); the wait
built on it (infra/nomad/cluster.py) is tested in test_cluster.py.

Scenarios: connection refused while the VM boots, 500 "No cluster leader", ACL 403 with a bad token,
TLS (and mutual TLS) to an https double, blocking queries, and `nomad.wait`'s timeout message.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.http import DribblingServer
from support.nomad_client import TimeoutRecorder, client_for
from support.servers.common import free_port

from infra.core.errors import NomadError, WaitTimeout
from infra.nomad import cluster
from infra.nomad.client import Client, NomadAPIError, NomadNotFound, NomadUnreachable, Settings

# ------------------------------------------------------------------------------------------------ TLS --


def server_ctx(authority: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    if require_client_cert:
        authority.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -------------------------------------------------------------------------------- transport behaviour --
def test_connection_refused_is_retried_with_backoff_then_succeeds(nomad_doubles: Any) -> None:
    d = nomad_doubles().ready_now().start(after=0.6)  # the VM's port refuses connections while it boots
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(s)

    c = Client(Settings(addr=d.url, retries=5), sleep=sleep)
    assert c.leader() == "10.0.2.15:4647"
    assert sleeps and sleeps == [0.5 * 2**i for i in range(len(sleeps))]  # exponential backoff
    assert d.count("/v1/status/leader") == 1


def test_connection_refused_after_retries_names_the_address_and_where_to_look() -> None:
    port = free_port()
    c = Client(Settings(addr=f"http://127.0.0.1:{port}", retries=2), sleep=lambda s: None)
    with pytest.raises(NomadUnreachable) as info:
        c.leader()
    text = str(info.value)
    assert f"cannot reach Nomad at http://127.0.0.1:{port}" in text and "connection refused" in text
    assert "inv vm.status" in text and "NOMAD_ADDR" in text
    assert c.requests_made == 3


def test_http_errors_are_not_retried_and_nomads_body_is_surfaced(nomad_doubles: Any) -> None:
    d = nomad_doubles().ready_now().start()
    d.fail_next.append(("/v1/nodes", 500, "rpc error: eval broker disabled"))
    c = client_for(d, retries=5)
    with pytest.raises(NomadAPIError) as info:
        c.nodes()
    assert info.value.status == 500 and "rpc error: eval broker disabled" in str(info.value)
    assert d.count("/v1/nodes") == 1
    with pytest.raises(NomadNotFound, match="job not found"):
        c.get("/v1/job/nope")
    assert c.job("nope") is None


# ------------------------------------------------------------------------------------------------ ACL --
def test_acl_bad_token_is_403_with_a_hint_and_the_wait_stops_at_once(nomad_doubles: Any) -> None:
    d = nomad_doubles(acl_token="good-token").ready_now().start()
    with pytest.raises(NomadAPIError) as info:
        cluster.wait_ready(client_for(d, token="bad-token"), timeout=60)
    assert info.value.status == 403 and "ACL token not found" in str(info.value)
    assert "NOMAD_TOKEN" in str(info.value) and "a token is set" in str(info.value)
    with pytest.raises(NomadAPIError, match="Permission denied") as info2:
        client_for(d).nodes()
    assert "no token is set" in str(info2.value)
    assert cluster.wait_ready(client_for(d, token="good-token"), timeout=60).ready


def test_token_namespace_and_region_are_sent(nomad_doubles: Any) -> None:
    d = nomad_doubles(acl_token="tok", region="eu", namespaces=("prod",)).ready_now().start()
    client_for(d, token="tok", namespace="prod", region="eu").nodes()
    r = d.requests[-1]
    assert r.query == {"namespace": "prod", "region": "eu"}


def test_tls_verified_with_nomad_cacert(nomad_doubles: Any, ca: Any, make_cfg: Any) -> None:
    authority, ca_path = ca
    d = nomad_doubles(ssl_context=server_ctx(authority)).ready_now().start()
    assert d.url.startswith("https://")
    c = Client.from_config(make_cfg(), env={"NOMAD_ADDR": d.url, "NOMAD_CACERT": str(ca_path)})
    assert cluster.wait_ready(c, timeout=60).ready


def test_tls_verification_fails_without_the_ca_and_is_not_retried(
    nomad_doubles: Any, make_cfg: Any, ca: Any
) -> None:
    authority, _ = ca
    d = nomad_doubles(ssl_context=server_ctx(authority)).ready_now().start()
    c = Client.from_config(make_cfg(), env={"NOMAD_ADDR": d.url})
    with pytest.raises(NomadUnreachable) as info:
        c.leader()
    text = str(info.value)
    assert "TLS to https://127.0.0.1" in text and "certificate verify failed" in text
    assert "NOMAD_CACERT" in text
    assert c.requests_made == 1
    assert c.session.verify is True  # the system bundle, never False


def test_mutual_tls_sends_the_client_certificate(
    nomad_doubles: Any, make_cfg: Any, ca: Any, tmp_path: Path
) -> None:
    authority, ca_path = ca
    d = nomad_doubles(ssl_context=server_ctx(authority, require_client_cert=True)).ready_now().start()
    leaf = authority.issue_cert("infra-lab-client")
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    env = {"NOMAD_ADDR": d.url, "NOMAD_CACERT": str(ca_path)}
    with pytest.raises(NomadUnreachable):
        Client.from_config(make_cfg(), env=env).leader()
    env |= {"NOMAD_CLIENT_CERT": str(cert), "NOMAD_CLIENT_KEY": str(key)}
    assert Client.from_config(make_cfg(), env=env).leader() == "10.0.2.15:4647"


# --------------------------------------------------------------------------------------- misc shapes --
def test_not_json_is_reported_as_not_nomad(nomad_doubles: Any) -> None:
    d = nomad_doubles().ready_now().start()
    d.server.expect_oneshot_request("/v1/status/leader").respond_with_data("<html>", content_type="text/html")
    with pytest.raises(NomadError, match=r"expected JSON, got text/html"):
        client_for(d).leader()


def test_agent_health_returns_the_body_of_a_500(nomad_doubles: Any) -> None:
    d = nomad_doubles().start()
    health = client_for(d).agent_health()
    assert health["server"] == {"ok": False, "message": "No cluster leader"}


# -------------------------------------------------------------------------------------------- the transport --
def test_token_is_never_sent_across_a_redirect() -> None:
    """A Nomad address answering 307 to another origin must not get X-Nomad-Token sent there (requests
    strips only Authorization on redirects)."""
    from pytest_httpserver import HTTPServer

    with HTTPServer(host="127.0.0.1") as first, HTTPServer(host="127.0.0.1") as other:
        other.expect_request("/v1/status/leader").respond_with_json("10.0.0.9:4647")
        first.expect_request("/v1/status/leader").respond_with_data(
            "", status=307, headers={"Location": other.url_for("/v1/status/leader")}
        )
        c = Client(Settings(addr=first.url_for("").rstrip("/"), token="s3cr3t-token", retries=0))
        with pytest.raises(NomadError) as info:
            c.leader()
        assert "HTTP 307, a redirect to http://127.0.0.1:" in str(info.value)
        assert "not followed" in str(info.value) and "s3cr3t-token" not in str(info.value)
        assert other.log == []  # the other origin saw nothing, so no token
        assert first.log[0][0].headers.get("X-Nomad-Token") == "s3cr3t-token"


def test_the_deadline_bounds_the_whole_request_not_each_read() -> None:
    """Headers at once, then one byte a second: every read succeeds, so per-read timeouts never fire."""
    server = DribblingServer(200)
    url = server.start()
    try:
        session = TimeoutRecorder()
        client = Client(Settings(addr=url, read_timeout=30.0, retries=0), session=session)
        # the server would dribble for 200 s: only the call's own deadline (3 s) ends it, with this message
        with pytest.raises(NomadUnreachable) as info:
            client.request("GET", "/v1/status/leader", timeout=3)
        assert "did not finish answering GET /v1/status/leader within 3s" in str(info.value)
        assert session.timeouts == [(3, 3)]
        patient = Client(Settings(addr=url, retries=3), sleep=lambda s: None)
        with pytest.raises(NomadUnreachable):
            patient.request("GET", "/v1/status/leader", timeout=1)
        assert patient.requests_made == 1  # a slow server stays slow: a timed-out read is not retried
        with pytest.raises(WaitTimeout) as waited:
            cluster.wait_ready(client, timeout=3)
        assert "no answer from Nomad at" in str(waited.value) and "within 3s" in str(waited.value)
        assert all(max(t) <= 3 for t in session.timeouts), session.timeouts
    finally:
        server.stop()


def test_raw_server_bytes_are_made_printable_in_errors() -> None:
    from pytest_httpserver import HTTPServer

    with HTTPServer(host="127.0.0.1") as server:
        server.expect_request("/v1/status/leader").respond_with_data(
            b"boom\x00\xff\x1b[2J\x1b]0;pwned\x07\rend", status=500, content_type="text/plain"
        )
        with pytest.raises(NomadAPIError) as info:
            Client(Settings(addr=server.url_for("").rstrip("/"), retries=0)).leader()
    text = str(info.value)
    assert not any(ch in text for ch in "\x00\x1b\x07\r")
    assert "boom\\x00\ufffd\\x1b[2J\\x1b]0;pwned\\x07\\x0dend" in text
