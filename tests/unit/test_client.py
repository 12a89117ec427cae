"""infra/nomad/client.py and infra/nomad/cluster.py against the STATEFUL Nomad API double (tests/support/doubles/nomad_api.py).

Scenarios: connection refused while the VM boots, 500 "No cluster leader", ACL 403 with a bad token,
TLS (and mutual TLS) to an https double, blocking queries, and `nomad.wait`'s timeout message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.core.errors import NomadError
from infra.nomad.client import seconds, settings

# ------------------------------------------------------------------------------------------------ TLS --


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


# ------------------------------------------------------------------------------------------------ the token --
@pytest.mark.parametrize(
    "token", ["tok-secret\n", "tok-secret\r\n", "tok secret", "tok\x1b[2Jsecret", " tok-secret"]
)
def test_a_malformed_token_is_a_clean_error_without_the_token(make_cfg: Any, token: str) -> None:
    from infra.nomad.client import Client, Settings

    with pytest.raises(NomadError) as info:
        settings(make_cfg(), {"NOMAD_TOKEN": token})
    assert "NOMAD_TOKEN (or nomad.token) contains" in str(info.value)
    assert "secret" not in str(info.value) and "tok" not in str(info.value).split("token")[0]
    with pytest.raises(NomadError):
        Client(Settings(addr="http://127.0.0.1:1", token=token))


def test_token_over_plain_http_to_a_remote_host_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    from infra.nomad.client import Client, Settings

    for addr in (
        "http://127.0.0.1:4646",
        "http://localhost:4646",
        "http://[::1]:4646",
        "https://10.1.2.3:4646",
    ):
        Client(Settings(addr=addr, token="t"))
        Client(Settings(addr=addr.replace("127.0.0.1", "10.1.2.3") if addr.startswith("https") else addr))
    assert "plain http" not in capsys.readouterr().err
    Client(Settings(addr="http://10.1.2.3:4646", token="t"))
    Client(Settings(addr="http://nomad.example:4646", token="t"))
    err = capsys.readouterr().err
    assert err.count("NOMAD_TOKEN goes to http://") == 2 and "over plain http" in err
    Client(Settings(addr="http://10.1.2.3:4646"))  # no token, nothing to leak
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("http://[::1", "is not a valid URL"),
        ("http://127.0.0.1:99999", "is not a valid URL"),
        ("ftp://x", "must start with http"),
    ],
)
def test_bad_addresses_are_clean_errors(make_cfg: Any, addr: str, message: str) -> None:
    with pytest.raises(NomadError, match=message):
        settings(make_cfg(), {"NOMAD_ADDR": addr})


def test_printable_escapes_control_characters_keeps_newlines_and_tabs() -> None:
    from infra.core.errors import printable

    assert printable("a\x00b\x1b[31mc\r\n\td\x7f\x9b") == "a\\x00b\\x1b[31mc\\x0d\n\td\\x7f\\x9b"
    assert printable("x" * 10, limit=4) == "xxxx…"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.5, "0.5s"), (0.04, "0s"), (3.0, "3s"), (2.96, "3s"), (9.4, "9.4s"), (125.4, "125s")],
)
def test_a_limit_under_a_second_is_not_shown_as_0s(value: float, shown: str) -> None:
    assert seconds(value) == shown
