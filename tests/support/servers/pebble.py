"""Pebble, Let's Encrypt's ACME test server (Debian's `pebble`, /usr/bin/pebble), on free loopback ports.

Its own HTTPS listener gets a certificate from a throwaway CA (trustme), which the ACME client must trust
(Traefik: LEGO_CA_CERTIFICATES). `PEBBLE_VA_ALWAYS_VALID=1` makes its validation authority accept every
challenge without connecting back (our Traefik listens on a random loopback port, not 443);
`PEBBLE_WFE_NONCEREJECT=0` turns off the random bad-nonce rejections Pebble adds by default, so an order
count is not blurred by retries. The root that signs the issued certificates is served on the management
port, `/roots/0` (Pebble prints that URL at start). Every order Pebble creates is logged
(`Added order "<id>" to the db`), every issuance too; the tests count them from the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import requests
import trustme

from . import common
from .common import ServerProcess, free_ports, port_open

PEBBLE = "pebble"


@dataclass
class Pebble(ServerProcess):
    name: ClassVar[str] = "pebble"
    acme_port: int = 0
    management_port: int = 0

    @property
    def tls_ca(self) -> Path:
        """The CA of Pebble's own HTTPS listener (not of the certificates it issues)."""
        return self.root / "listener-ca.pem"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    def start(self) -> None:
        authority = trustme.CA()
        authority.cert_pem.write_to_path(str(self.tls_ca))
        leaf = authority.issue_cert("127.0.0.1", "localhost")
        leaf.cert_chain_pems[0].write_to_path(str(self.root / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(self.root / "key.pem"))
        self.acme_port, self.management_port, http_port, tls_port = free_ports(4)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.acme_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.root / "cert.pem"),
                "privateKey": str(self.root / "key.pem"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.root / "pebble-config.json").write_text(json.dumps(config))
        env = {"PEBBLE_VA_ALWAYS_VALID": "1", "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self.launch([PEBBLE, "-config", str(self.root / "pebble-config.json")], env=env,
                    ready=lambda: port_open(self.acme_port) and port_open(self.management_port),
                    what=f"pebble on {self.directory}", timeout=30)  # fmt: skip

    def root_pem(self) -> str:
        """The root that signs the certificates Pebble issues (management API /roots/0)."""
        resp = requests.get(
            f"https://127.0.0.1:{self.management_port}/roots/0", verify=str(self.tls_ca), timeout=10
        )
        resp.raise_for_status()
        return resp.text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def started() -> Pebble:
    return common.started(Pebble)
