"""The ingress's TLS policy: what Traefik (nomad/ingress.nomad.hcl) is given besides its arguments.

- HTTPS on the `websecure` entrypoint with the project CA's certificate (infra/compose/tls.py) as Traefik's default
  certificate: `https://app.localhost:8443/`.
- `ingress.redirect_https`: a router on `web` that answers every plain HTTP request with a permanent
  redirect to the HTTPS port on the host (vm.ports.ingress_https).
- `ingress.acme.*` (Let's Encrypt, off while no domain is set): a router for the public names on
  `websecure`, whose certificate comes from the resolver of the chosen challenge.

All of it is Traefik dynamic configuration (YAML for its file provider), kept in the Nomad Variable
`nomad/jobs/<ingress job>` under `traefik_dynamic` and rendered by the job's template into the task's
secrets directory: the private key is never in an image, a job file or the seed ISO. The ACME resolvers
themselves are static configuration (job arguments) whose values come from HCL variables
(`acme_variables`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from infra.core.config import ACME_RESOLVERS, Config
from infra.core.state import StatePaths
from infra.nomad import rollout

# tls (cryptography) loads only where a certificate is made: `inv status` does not need it (test_startup)
if TYPE_CHECKING:
    from infra.compose import tls
    from infra.nomad.client import Client

#: Item of the ingress job's Nomad Variable that the job's template renders as Traefik's dynamic config.
DYNAMIC_KEY = "traefik_dynamic"
#: ingress.acme.challenge -> certificate resolver (defined in nomad/ingress.nomad.hcl's arguments).
RESOLVERS = ACME_RESOLVERS
#: The HTTPS entrypoint (nomad/ingress.nomad.hcl) and the Nomad service that serves the app.
HTTPS_ENTRYPOINT = "websecure"
HTTP_ENTRYPOINT = "web"
APP_SERVICE = "app@nomad"
#: Above the rule-length priority Traefik gives the app's routers, below the range it keeps for its own
#: (the ACME HTTP-01 challenge router has the highest priority, so a redirect never hides a challenge).
REDIRECT_PRIORITY = 10_000


def variable_path(cfg: Config) -> str:
    """Tasks read the variables of their own job through workload identity: nomad/jobs/<job>."""
    return f"nomad/jobs/{rollout.job_id_of(cfg.deploy.ingress_job)}"


def https_url(cfg: Config) -> str | None:
    port = cfg.vm.ports.get("ingress_https")
    return f"https://app.localhost:{port.host}/" if port else None


def dynamic_config(cfg: Config, bundle: tls.Bundle) -> dict[str, Any]:
    """Traefik's dynamic configuration for the ingress's TLS (see the module's docstring)."""
    conf: dict[str, Any] = {
        "tls": {
            # certFile/keyFile take a path or the PEM itself (traefik pkg/types FileOrContent)
            "stores": {
                "default": {"defaultCertificate": {"certFile": bundle.cert_pem, "keyFile": bundle.key_pem}}
            },
            "options": {"default": {"minVersion": "VersionTLS12", "sniStrict": False}},
        }
    }
    routers: dict[str, Any] = {}
    middlewares: dict[str, Any] = {}
    https_port = cfg.vm.ports.get("ingress_https")
    if cfg.ingress.redirect_https and https_port is not None:
        middlewares["redirect-to-https"] = {
            "redirectScheme": {"scheme": "https", "port": str(https_port.host), "permanent": True}
        }
        routers["redirect-to-https"] = {
            "entryPoints": [HTTP_ENTRYPOINT],
            "rule": "PathPrefix(`/`)",
            "priority": REDIRECT_PRIORITY,
            "middlewares": ["redirect-to-https"],
            "service": "noop@internal",
        }
    acme = cfg.ingress.acme
    if acme.enabled:
        routers["public"] = {
            "entryPoints": [HTTPS_ENTRYPOINT],
            "rule": " || ".join(f"Host(`{name}`)" for name in acme.domains),
            "service": APP_SERVICE,
            "tls": {
                "certResolver": RESOLVERS[acme.challenge],
                "domains": [{"main": acme.domains[0], "sans": acme.domains[1:]}],
            },
        }
    if routers:
        conf["http"] = {"routers": routers}
        if middlewares:
            conf["http"]["middlewares"] = middlewares
    return conf


class _BlockDumper(yaml.SafeDumper):
    """PEM blocks as YAML literal blocks (`|`), as one would write them by hand."""


_BlockDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def dynamic_yaml(cfg: Config, bundle: tls.Bundle) -> str:
    return yaml.dump(
        dynamic_config(cfg, bundle), Dumper=_BlockDumper, sort_keys=True, default_flow_style=False
    )


def acme_variables(cfg: Config) -> dict[str, str]:
    """HCL variables of nomad/ingress.nomad.hcl for the resolvers' static settings."""
    return {"acme_email": cfg.ingress.acme.email, "acme_ca_server": cfg.ingress.acme.ca_server}


def certificate(cfg: Config) -> tls.Bundle:
    """The project CA and the leaf, re-issued when fewer than 30 days remain (infra/compose/tls.py)."""
    from infra.compose import tls

    return tls.ensure(StatePaths.of(cfg))


def publish(cfg: Config, client: Client) -> tls.Bundle:
    """Certificate made or renewed, then the dynamic configuration written to the job's Nomad Variable
    (check-and-set; unchanged content is not written again)."""
    bundle = certificate(cfg)
    rollout.ensure_secret(client, variable_path(cfg), DYNAMIC_KEY, value=dynamic_yaml(cfg, bundle))
    return bundle


def ca_path(cfg: Config) -> Path:
    return StatePaths.of(cfg).tls_ca
