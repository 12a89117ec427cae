"""infra/nomad.py and infra/cluster.py against the STATEFUL Nomad API double (tests/doubles/nomad_api.py).

Scenarios: connection refused while the VM boots, 500 "No cluster leader", ACL 403 with a bad token,
TLS (and mutual TLS) to an https double, blocking queries, and `nomad.wait`'s timeout message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme

from infra.errors import NomadError
from infra.nomad import settings


# ------------------------------------------------------------------------------------------------ TLS --
@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


# ------------------------------------------------------------------------------------------- settings --
def test_settings_config_overrides_env_and_env_fills_the_rest(make_cfg: Any, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = make_cfg(nomad={"addr": "https://nomad.example:4646", "namespace": "prod"})
    env = {
        "NOMAD_ADDR": "http://ignored:1",
        "NOMAD_TOKEN": "t0k",
        "NOMAD_CACERT": str(ca),
        "NOMAD_NAMESPACE": "ignored",
        "NOMAD_REGION": "eu",
    }
    s = settings(cfg, env)
    assert (s.addr, s.token, s.cacert, s.namespace, s.region) == (
        "https://nomad.example:4646", "t0k", str(ca), "prod", "eu",
    )  # fmt: skip
    assert s.tls and s.source == "config nomad.addr"


def test_settings_default_is_the_vm_forward(make_cfg: Any) -> None:
    cfg = make_cfg(vm={"ports": {"nomad": {"host": 14646, "guest": 4646}}})
    s = settings(cfg, {})
    assert s.addr == "http://127.0.0.1:14646"
    assert settings(cfg, {"NOMAD_ADDR": "10.1.2.3:4646"}).addr == "http://10.1.2.3:4646"


def test_settings_reject_half_a_client_cert_and_missing_files(make_cfg: Any) -> None:
    cfg = make_cfg()
    with pytest.raises(NomadError, match="NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY"):
        settings(cfg, {"NOMAD_CLIENT_CERT": "/etc/hostname"})
    with pytest.raises(NomadError, match=r"NOMAD_CACERT / nomad\.cacert: file not found: /nonexistent"):
        settings(cfg, {"NOMAD_CACERT": "/nonexistent"})
    with pytest.raises(NomadError, match="must start with http"):
        settings(cfg, {"NOMAD_ADDR": "ftp://x"})
