"""infra/compose/ingress.py and the ingress.* configuration: what Traefik's dynamic configuration holds for each
setting, and one error naming the key for each bad value. Traefik itself runs in
tests/component/test_ingress.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.compose import ingress, stack, tls
from infra.core import hcl
from infra.core.config import ACME_RESOLVERS, Config
from infra.core.errors import ConfigError
from infra.core.state import StatePaths
from infra.nomad import speclint


@pytest.fixture
def bundle(tmp_path: Path) -> tls.Bundle:
    return tls.ensure(StatePaths(tmp_path / "tls-state"))


def dynamic(cfg: Config, bundle: tls.Bundle) -> dict[str, Any]:
    parsed = yaml.safe_load(ingress.dynamic_yaml(cfg, bundle))
    assert isinstance(parsed, dict)
    return parsed


def test_by_default_only_the_project_certificate(make_cfg: Callable[..., Config], bundle: tls.Bundle) -> None:
    conf = dynamic(make_cfg(), bundle)
    assert set(conf) == {"tls"}
    default = conf["tls"]["stores"]["default"]["defaultCertificate"]
    assert default == {"certFile": bundle.cert_pem, "keyFile": bundle.key_pem}


def test_redirect_https_routes_all_of_web_to_the_https_host_port(
    make_cfg: Callable[..., Config], bundle: tls.Bundle
) -> None:
    cfg = make_cfg(
        ingress={"redirect_https": True}, vm={"ports": {"ingress_https": {"host": 9443, "guest": 8443}}}
    )
    http = dynamic(cfg, bundle)["http"]
    assert http["routers"]["redirect-to-https"]["entryPoints"] == ["web"]
    assert http["middlewares"]["redirect-to-https"]["redirectScheme"] == {
        "scheme": "https",
        "port": "9443",
        "permanent": True,
    }


@pytest.mark.parametrize("challenge", sorted(ACME_RESOLVERS))
def test_acme_routes_the_public_names_with_the_resolver_of_the_challenge(
    make_cfg: Callable[..., Config], bundle: tls.Bundle, challenge: str
) -> None:
    acme = {
        "email": "ops@example.org",
        "domains": ["app.example.org", "www.example.org"],
        "challenge": challenge,
    }
    cfg = make_cfg(ingress={"acme": acme})
    router = dynamic(cfg, bundle)["http"]["routers"]["public"]
    assert router["rule"] == "Host(`app.example.org`) || Host(`www.example.org`)"
    assert router["tls"] == {"certResolver": ACME_RESOLVERS[challenge],
                             "domains": [{"main": "app.example.org", "sans": ["www.example.org"]}]}  # fmt: skip
    assert router["entryPoints"] == ["websecure"] and router["service"] == "app@nomad"
    assert ingress.acme_variables(cfg) == {"acme_email": "ops@example.org",
                                           "acme_ca_server": "https://acme-v02.api.letsencrypt.org/directory"}  # fmt: skip


def test_the_resolvers_the_policy_names_are_defined_in_the_job() -> None:
    root = hcl.parse((speclint.SPEC_DIR / "ingress.nomad.hcl").read_text())
    task = root.children("job")[0].children("group")[0].children("task")[0]
    config = task.child("config")
    assert config is not None
    args = " ".join(config.get("args"))
    for resolver in ACME_RESOLVERS.values():
        assert f"--certificatesresolvers.{resolver}.acme.storage=" in args


def test_status_lists_the_https_url_and_the_ca(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg()
    lines = stack.url_lines(cfg)
    assert any("https://app.localhost:8443/" in line and str(ingress.ca_path(cfg)) in line for line in lines)


@pytest.mark.parametrize(
    ("acme", "message"),
    [
        ({"domains": ["app.example.org"]},
         "configuration key ingress.acme.email is empty, but ingress.acme.domains is set"),
        ({"email": "ops@example.org", "domains": ["*.example.org"]},
         "configuration key ingress.acme.domains[0] is '*.example.org': not a public DNS name"),
        ({"email": "ops@example.org", "domains": ["app.example.org", "localhost"]},
         "configuration key ingress.acme.domains[1] is 'localhost': not a public DNS name"),
        ({"email": "ops@example.org", "domains": ["app.example.org", 7]},
         "configuration key ingress.acme.domains[1] is 7: not a public DNS name"),
        ({"email": "not-an-address"}, "configuration key ingress.acme.email is 'not-an-address': not an e-mail address"),
        ({"ca_server": "http://acme.example.org/dir"},
         "configuration key ingress.acme.ca_server is 'http://acme.example.org/dir': not an https:// URL"),
        ({"challenge": "dns"}, "configuration key ingress.acme.challenge is 'dns'; expected one of: tlsalpn, http"),
        ({"domains": "app.example.org"}, "configuration key ingress.acme.domains must be a list, got 'app.example.org'"),
    ],
)  # fmt: skip
def test_bad_acme_settings_are_one_error_naming_the_key(
    make_cfg: Callable[..., Config], acme: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        make_cfg(ingress={"acme": acme})
    assert err.value.message == message


def test_an_unknown_ingress_key_is_named(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown configuration key ingress\.acme\.emial \(did you mean ingress\.acme\.email\?\)",
    ):
        make_cfg(ingress={"acme": {"emial": "x"}})
