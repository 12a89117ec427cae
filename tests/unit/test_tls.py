"""infra/compose/tls.py: the project CA and the leaf, their files and modes, and the 30-day renewal rule with an
injected clock (no waiting for time to pass)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from infra.compose import tls
from infra.core.errors import ConfigError
from infra.core.state import StatePaths


@pytest.fixture
def state(tmp_path: Path) -> StatePaths:
    return StatePaths(tmp_path / "state")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_makes_a_ca_and_a_leaf_for_the_local_names_with_private_modes(state: StatePaths) -> None:
    bundle = tls.ensure(state)
    assert bundle.issued == ["ca", "certificate"]
    files = tls.paths(state)
    assert mode(state.tls_dir) == 0o700
    assert mode(files[tls.CA_KEY]) == 0o600 and mode(files[tls.KEY]) == 0o600
    assert mode(files[tls.CA_CERT]) == 0o644
    leaf = x509.load_pem_x509_certificate(bundle.cert_pem.encode())
    ca = x509.load_pem_x509_certificate(bundle.ca_pem.encode())
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "*.localhost", "app.localhost"}
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert [p.name for p in state.tls_dir.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_second_use_changes_nothing(state: StatePaths) -> None:
    first = tls.ensure(state)
    before = {p.name: p.read_bytes() for p in state.tls_dir.iterdir()}
    again = tls.ensure(state)
    assert again.issued == [] and again.cert_pem == first.cert_pem
    assert {p.name: p.read_bytes() for p in state.tls_dir.iterdir()} == before


def test_the_leaf_is_reissued_when_fewer_than_30_days_remain(state: StatePaths) -> None:
    first = tls.ensure(state)
    kept = tls.ensure(state, now=lambda: first.not_after - dt.timedelta(days=30, minutes=1))
    assert kept.issued == [] and kept.cert_pem == first.cert_pem
    renewed = tls.ensure(state, now=lambda: first.not_after - dt.timedelta(days=29, hours=23))
    assert renewed.issued == ["certificate"]
    assert renewed.ca_pem == first.ca_pem  # same CA: clients keep trusting it
    assert renewed.not_after > first.not_after
    assert renewed.cert_pem != first.cert_pem


def test_a_ca_near_its_end_is_replaced_and_the_leaf_with_it(state: StatePaths) -> None:
    first = tls.ensure(state)
    ca = x509.load_pem_x509_certificate(first.ca_pem.encode())
    later = tls.ensure(state, now=lambda: ca.not_valid_after_utc - dt.timedelta(days=10))
    assert later.issued == ["ca", "certificate"]
    assert x509.load_pem_x509_certificate(later.cert_pem.encode()).issuer != ca.subject


def test_a_leaf_from_another_ca_or_a_broken_file_is_reissued(state: StatePaths, tmp_path: Path) -> None:
    tls.ensure(state)
    other = tls.ensure(StatePaths(tmp_path / "other"))
    files = tls.paths(state)
    files[tls.CERT].write_text(other.cert_pem)
    files[tls.KEY].write_text(other.key_pem)
    assert tls.ensure(state).issued == ["certificate"]
    files[tls.KEY].write_text("garbage")
    assert tls.ensure(state).issued == ["certificate"]
    files[tls.CA_CERT].write_text("")
    assert tls.ensure(state).issued == ["ca", "certificate"]


def test_loosened_key_modes_are_tightened_again(state: StatePaths) -> None:
    tls.ensure(state)
    files = tls.paths(state)
    os.chmod(files[tls.CA_KEY], 0o644)
    os.chmod(files[tls.KEY], 0o666)  # noqa: S103 - loosened on purpose
    os.chmod(state.tls_dir, 0o755)  # noqa: S103 - loosened on purpose
    assert tls.ensure(state).issued == []
    assert mode(files[tls.CA_KEY]) == 0o600 and mode(files[tls.KEY]) == 0o600 and mode(state.tls_dir) == 0o700


def test_concurrent_first_uses_make_one_ca(state: StatePaths) -> None:
    results: list[tls.Bundle] = []
    threads = [threading.Thread(target=lambda: results.append(tls.ensure(state))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({b.ca_pem for b in results}) == 1 and len({b.cert_pem for b in results}) == 1
    assert sum(1 for b in results if "ca" in b.issued) == 1


def test_a_state_dir_that_is_a_file_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a dir")
    with pytest.raises(
        ConfigError, match=r"configuration key project\.state_dir: .*/state is not a directory"
    ):
        tls.ensure(
            StatePaths(tmp_path / "state")
        )  # checked as the tool's own state dir (infra/core/state.py)


def test_trust_instructions_name_every_client(tmp_path: Path) -> None:
    text = "\n".join(tls.trust_instructions(tmp_path / "ca.pem"))
    for needle in ("curl --cacert", "update-ca-certificates", "security add-trusted-cert", "Firefox"):
        assert needle in text
