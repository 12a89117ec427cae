"""The project's certificate authority and Traefik's certificate for `localhost` (mkcert's model).

`ensure(state)` keeps, in <state_dir>/tls/ (0700):

    ca.pem        the CA certificate: what a client trusts (`inv tls.ca` says how)      0644
    ca-key.pem    the CA's private key, never leaves this host                          0600
    cert.pem      the leaf for localhost, *.localhost, 127.0.0.1, ::1, signed by the CA   0644
    key.pem       the leaf's private key (Traefik gets it through Nomad Variables)      0600

Both are made with `cryptography` (ECDSA P-256, SHA-256) on first use and re-issued when fewer than
`RENEW_BEFORE` (30 days) remain, when the leaf no longer matches the CA (a new CA) or its names differ. A new
CA is made only when the old one is missing, unreadable or itself near its end; clients must then trust
the new one. Writes are atomic (temp file + rename, mode set before the rename) and happen under an flock
on the directory, so two commands at once make one CA, never a key with another's certificate.

The clock is a parameter (`now`), so the renewal rule is tested without waiting for time to pass.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from infra.core import files
from infra.core.errors import InfraError
from infra.core.state import TLS_CA, StatePaths

#: The names the leaf serves: every `*.localhost` resolves to loopback in browsers and curl (RFC 6761).
#: `app.localhost` is named as well: OpenSSL (so curl and Python) and browsers do not match a wildcard
#: directly under a single-label name (`*.localhost`, like `*.com`), so the wildcard alone serves no client.
DNS_NAMES = ("localhost", "*.localhost", "app.localhost")
IP_ADDRESSES = ("127.0.0.1", "::1")
#: Re-issue when fewer than this remain (`inv up`, `inv deploy.ingress`).
RENEW_BEFORE = dt.timedelta(days=30)
#: Leaf lifetime: under the 398 days browsers accept for a server certificate.
LEAF_DAYS = 397
CA_DAYS = 10 * 365
CA_NAME = "infra-lab local CA"

CA_CERT = TLS_CA
CA_KEY = "ca-key.pem"
CERT = "cert.pem"
KEY = "key.pem"

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TLSError(InfraError):
    """The CA or the certificate cannot be made or kept."""


@dataclass(frozen=True)
class Bundle:
    ca_path: Path
    ca_pem: str
    cert_pem: str
    key_pem: str
    not_after: dt.datetime  # the leaf's
    issued: list[str]  # what this call made: "ca", "certificate" (empty: both were current)


def paths(state: StatePaths) -> dict[str, Path]:
    return {name: state.tls_dir / name for name in (CA_CERT, CA_KEY, CERT, KEY)}


def ca_path(state: StatePaths) -> Path:
    return state.tls_ca


def ensure(state: StatePaths, *, now: Clock = utcnow) -> Bundle:
    """The CA and the leaf, made or re-issued as needed (see the module's docstring)."""
    directory = state.tls_dir
    state.claim()  # the tool's own state dir (infra/core/state.py)
    files.make_dir(directory, "project CA directory", mode=0o700, error=TLSError)  # never through a link
    dir_fd = files.open_dir(directory, "project CA directory", error=TLSError, create=False)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        return _ensure(directory, now())
    except OSError as exc:
        raise TLSError(f"cannot write the project CA in {directory}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)  # releases the flock


def _ensure(directory: Path, at: dt.datetime) -> Bundle:
    issued: list[str] = []
    ca = _load_pair(directory / CA_CERT, directory / CA_KEY)
    if ca is None or _expiring(ca[0], at):
        ca = _new_ca(at)
        _write(directory / CA_KEY, _key_pem(ca[1]), 0o600)
        _write(directory / CA_CERT, ca[0].public_bytes(serialization.Encoding.PEM), 0o644)
        issued.append("ca")
    ca_cert, ca_key = ca
    leaf = _load_pair(directory / CERT, directory / KEY)
    if leaf is None or "ca" in issued or _expiring(leaf[0], at) or not _matches(leaf[0], ca_cert):
        leaf = _new_leaf(ca_cert, ca_key, at)
        _write(directory / KEY, _key_pem(leaf[1]), 0o600)
        _write(directory / CERT, leaf[0].public_bytes(serialization.Encoding.PEM), 0o644)
        issued.append("certificate")
    for name in (CA_KEY, KEY):  # a key someone loosened: tightened again on every use (fchmod, no link)
        files.tighten(directory / name, 0o600, "project CA key", error=TLSError)
    return Bundle(
        ca_path=directory / CA_CERT,
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        cert_pem=leaf[0].public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=_key_pem(leaf[1]).decode(),
        not_after=leaf[0].not_valid_after_utc,
        issued=issued,
    )


def _expiring(cert: x509.Certificate, at: dt.datetime) -> bool:
    return cert.not_valid_after_utc - at < RENEW_BEFORE or cert.not_valid_before_utc > at


def _matches(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    """Signed by this CA and naming exactly DNS_NAMES + IP_ADDRESSES."""
    if leaf.issuer != ca.subject:
        return False
    try:
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    names = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names == set(DNS_NAMES) and ips == set(IP_ADDRESSES)


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """A certificate and its key, or None when either is missing, unreadable or they do not belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage with only `allowed` set."""
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _new_ca(at: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME} {at:%Y-%m-%d %H:%M:%S}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - dt.timedelta(hours=1))
        .not_valid_after(at + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_leaf(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, at: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in DNS_NAMES] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DNS_NAMES[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - dt.timedelta(hours=1))
        .not_valid_after(min(at + dt.timedelta(days=LEAF_DAYS), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    """A fresh temp file of an unpredictable name (mode set on the fd) renamed over `path`, never through a
    link (infra/core/files.py); removed on any failure."""
    files.write_atomic(path, data, path.name, mode=mode, error=TLSError)


def trust_instructions(ca: Path) -> list[str]:
    """How to trust the CA: curl, Debian/Ubuntu, macOS, Firefox (`inv tls.ca`)."""
    return [
        f"curl:          curl --cacert {ca} https://app.localhost:<port>/",
        f"Python:        requests.get(url, verify='{ca}')",
        f"Debian/Ubuntu: sudo cp {ca} /usr/local/share/ca-certificates/infra-lab.crt && "
        "sudo update-ca-certificates",
        f"macOS:         sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {ca}",
        "Firefox:       Settings > Privacy & Security > Certificates > View Certificates > Authorities > "
        f"Import {ca}, tick 'Trust this CA to identify websites'",
        "Remove the trust again when you delete the state dir (`inv vm.destroy` makes a new CA next time).",
    ]
