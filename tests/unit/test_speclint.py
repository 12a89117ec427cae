"""infra/nomad/speclint.py: the real specs pass; every rule fires, with its exact message, on a broken copy.

Broken copies are made from the real specs by targeted text edits (each edit must match exactly once,
so a test cannot silently stop testing anything when a spec changes) and written into tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra import ROOT
from infra.core import hcl
from infra.nomad import speclint

SPECS = ROOT / "nomad"

DATA = "datastorage.nomad.hcl"

APP = "service.nomad.hcl"

INGRESS = "ingress.nomad.hcl"

PG_IMAGE = "postgres:17.11-bookworm@sha256:051f7b7b3abdd564d5d1bd1e8c4b9c1b6e77087d1dd22020ede611c096a272e0"

TRAEFIK_IMAGE = "traefik:v3.7.14@sha256:575fa15b135078fe5e50aa847987d96dbddd7b093c172429618404df73f3fa7c"

PG_CHECK = """      check {
        name     = "postgres-tcp"
        type     = "tcp"
        interval = "10s"
        timeout  = "3s"
      }
"""

TRAEFIK_RESOURCES = """      resources {
        cpu    = 200
        memory = 128
      }
"""


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Findings name files relative to the working directory: work in tmp_path."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def broken(tmp_path: Path, name: str, *edits: tuple[str, str]) -> tuple[Path, str]:
    """Copy nomad/<name> into tmp_path with each (old, new) edit applied exactly once."""
    text = (SPECS / name).read_text(encoding="utf-8")
    for old, new in edits:
        assert text.count(old) == 1, f"edit target must occur exactly once in {name}: {old!r}"
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path, text


def line_of(text: str, needle: str) -> int:
    """1-based line of the only occurrence of `needle`."""
    assert text.count(needle) == 1, f"needle must be unique: {needle!r}"
    return text[: text.index(needle)].count("\n") + 1


def lint(path: Path, **kwargs: object) -> list[str]:
    return [str(f) for f in speclint.check_files([path], **kwargs)]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    """One rule firing on a broken copy of a real file: the edits, the line it must name (the only
    occurrence of `needle`, plus `offset`), where, and the exact message."""

    rule: str
    file: str
    edits: tuple[tuple[str, str], ...]
    needle: str
    where: str
    message: str
    offset: int = 0


def _ids(cases: list[Any]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for case in cases:
        seen[case.rule] = seen.get(case.rule, 0) + 1
        ids.append(f"{case.rule}-{seen[case.rule]}")
    return ids


PG_SHUTDOWN = (
    '(nomad/structs/structs.go). Short: it adds to the gap a redeploy leaves.\n    shutdown_delay = "5s"'
)
WHY_DELAY = (
    " (Nomad warns on every submit); set shutdown_delay so the service is deregistered, and Traefik stops "
    "routing to it, before the task is killed"
)
CANARY_WHY = (
    "Traefik would send traffic to a canary before it is healthy (from before its prestart tasks run); set "
    "canary_tags without traefik.enable=true"
)
TRAEFIK_API_SERVICE = """      service {
        name     = "traefik-api"
        provider = "nomad"
        port     = "dashboard"

        check {
          type     = "http"
          path     = "/ping"
          interval = "10s"
          timeout  = "3s"
        }
      }

"""

#: Every spec rule, each firing alone on a broken copy of a real spec.
SPEC_CASES = [
    Case("service-check", DATA, (("\n" + PG_CHECK, ""),), 'name     = "postgres"', "datastorage/postgres",
         'service "postgres" has no check block; Nomad would call it healthy as soon as it is registered', -1),
    Case("service-provider", APP, (('      name     = "app"\n      provider = "nomad"\n', '      name     = "app"\n'),),
         'name     = "app"', "app/app",
         'service "app" does not set provider; set provider = "nomad" (the default, consul, does not run here)', -1),
    Case("service-provider", INGRESS,
         (('      name     = "traefik"\n      provider = "nomad"', '      name     = "traefik"\n      provider = "consul"'),),
         'provider = "consul"', "ingress/traefik",
         'service "traefik" has provider = "consul"; set provider = "nomad" (the default, consul, does not run here)'),
    Case("volume-declared", DATA,
         (('    volume "data" {\n      type      = "host"\n      source    = "postgres-data"',
           '    volume "pgdata" {\n      type      = "host"\n      source    = "postgres-data"'),),
         'destination = "/var/lib/postgresql/data"', "datastorage/postgres/postgres",
         'volume_mount names volume "data", which the group does not declare (declared: pgdata)', -1),
    Case("host-volume-exists", DATA, (('source    = "postgres-data"', 'source    = "postgres-dat"'),),
         'source    = "postgres-dat"', "datastorage/postgres",
         'host volume "data" has source "postgres-dat", which the agent config cloud-init/files/nomad/zz-infra-lab.hcl '
         "does not declare as a host_volume (declared: kafka-data, postgres-data, traefik-acme)"),
    Case("resources-set", INGRESS, (("\n" + TRAEFIK_RESOURCES, ""),), 'task "traefik"', "ingress/traefik/traefik",
         "task has no resources block; Nomad's defaults (100 MHz CPU, 300 MB memory) OOM-kill anything JVM-sized"),
    Case("resources-set", DATA, (("        cpu    = 1000\n        memory = 1024\n", "        cpu    = 1000\n"),),
         "        cpu    = 1000", "datastorage/kafka/kafka", "resources sets no memory; set cpu and memory explicitly",
         -1),
    Case("update-auto-revert", INGRESS, (("    auto_revert       = true\n", ""),), 'group "traefik"',
         "ingress/traefik", "no update block with auto_revert = true (job or group level); a failed deployment "
         "would stay on the broken version"),
    Case("update-auto-revert", APP, (("    auto_revert       = true\n", "    auto_revert       = false\n"),),
         "auto_revert       = false", "app/app", "update.auto_revert = false; a service job must set auto_revert = "
         "true so a failed deployment goes back to the last good version"),
    Case("variable-description", INGRESS,
         (('  description = "Port of the Nomad HTTP API on the node Traefik runs on."\n', ""),),
         'variable "nomad_api_port"', "variable nomad_api_port", 'variable "nomad_api_port" has no description'),
    Case("shutdown-delay", APP, (('    shutdown_delay = "10s"\n', ""),), 'group "app"', "app/app",
         'group "app" defines services, but neither the group nor any of its tasks have shutdown_delay set'
         + WHY_DELAY),
    Case("shutdown-delay", DATA, ((PG_SHUTDOWN, PG_SHUTDOWN.replace('"5s"', '"0s"')),), 'shutdown_delay = "0s"',
         "datastorage/postgres", 'group "postgres" defines services, but neither the group nor any of its tasks '
         "have shutdown_delay set" + WHY_DELAY),
    Case("shutdown-delay", INGRESS,
         (('  task "traefik" {\n      driver = "docker"\n\n', '  task "traefik" {\n      driver = "docker"\n\n'
           + TRAEFIK_API_SERVICE),),
         'task "traefik"', "ingress/traefik/traefik",
         'task "traefik" in group "traefik" defines services, but has no shutdown_delay set' + WHY_DELAY),
    Case("canary-routing", APP, (('      canary_tags = ["canary"]\n', ""),), 'name     = "app"', "app/app",
         'service "app" is routed by Traefik and the group rolls out canaries, but it has no canary_tags, so a '
         "canary registers with the same tags: " + CANARY_WHY, -1),
    Case("canary-routing", APP, (('canary_tags = ["canary"]', 'canary_tags = ["canary", "traefik.enable=true"]'),),
         'canary_tags = ["canary", "traefik.enable=true"]', "app/app",
         'service "app" is routed by Traefik and the group rolls out canaries, but it has traefik.enable=true in its '
         "canary_tags: " + CANARY_WHY),
    Case("restart-mode", APP, (('      mode     = "delay"\n', '      mode     = "fail"\n'),), 'mode     = "fail"',
         "app/app", 'restart.mode = "fail"; set mode = "delay" so a task that exits while a dependency is away is '
         "restarted after a pause instead of failing the allocation"),
    Case("restart-mode", INGRESS,
         (('    restart {\n      attempts = 3\n      interval = "5m"\n      delay    = "10s"\n      mode     = "delay"\n'
           "    }\n", ""),),
         'group "traefik"', "ingress/traefik", 'no restart block; Nomad\'s default for service jobs (2 attempts in '
         '30m, mode "fail") fails the allocation when a dependency is away for a while; set restart { mode = '
         '"delay" }'),
    Case("restart-mode", INGRESS,
         (('  task "traefik" {\n      driver = "docker"\n', '  task "traefik" {\n      driver = "docker"\n\n'
           '      restart {\n        mode = "fail"\n      }\n'),),
         'mode = "fail"', "ingress/traefik/traefik",
         'restart.mode = "fail" overrides the group\'s; set mode = "delay" or leave it to the group'),
    Case("host-volume-owner", DATA, (('      user = "1000:1000"\n', ""),), 'volume      = "data"\n        destination = "/var/lib/kafka',
         "datastorage/kafka/kafka",
         'mounts host volume "kafka-data", whose directory cloud-init creates for uid 1000 '
         "(cloud-init/files/nomad/host-volumes), but the task sets user = (unset): the image's default user is "
         'an assumption; set user = "1000:1000"', -1),
    Case("host-volume-owner", DATA, (('user = "1000:1000"', 'user = "appuser"'),), 'user = "appuser"',
         "datastorage/kafka/kafka",
         'mounts host volume "kafka-data", whose directory cloud-init creates for uid 1000 '
         "(cloud-init/files/nomad/host-volumes), but the task sets user = \"appuser\": the image's default user "
         'is an assumption; set user = "1000:1000"'),
    Case("network-mode", DATA, (('    network {\n      port "db" {', '    network {\n      mode = "bridge"\n\n      port "db" {'),),
         'mode = "bridge"', "datastorage/postgres",
         'network mode "bridge" needs CNI plugins, which the VM does not install (and the agent config sets no '
         'cni_path); use Docker\'s own port mapping (mode "host", the default) like the other jobs'),
    # The TLS parts of the Traefik task (nomad/ingress.nomad.hcl's args; findings name the args line).
    Case("tls-entrypoint", INGRESS, (('          "--entrypoints.websecure.address=:8443",\n', ""),),
         "args = [", "ingress/traefik/traefik",
         '--entrypoints.websecure.http.tls names entrypoint "websecure", which no --entrypoints.<name>.address '
         "defines (defined: app, traefik, web)"),
    Case("tls-entrypoint", INGRESS,
         (('ports              = ["app", "web", "dashboard", "websecure"]',
           'ports              = ["app", "web", "dashboard"]'),),
         "args = [", "ingress/traefik/traefik",
         'entrypoint "websecure" listens on ":8443", a port the task does not publish (config.ports maps container '
         "ports: 3000, 8080, 8081)"),
    Case("tls-entrypoint", INGRESS,
         (("acme-http.acme.httpchallenge.entrypoint=web", "acme-http.acme.httpchallenge.entrypoint=plain"),),
         "args = [", "ingress/traefik/traefik",
         "--certificatesresolvers.acme-http.acme.httpchallenge.entrypoint names entrypoint \"plain\", which no "
         "--entrypoints.<name>.address defines (defined: app, traefik, web, websecure)"),
    Case("acme-resolver", INGRESS,
         (('          "--certificatesresolvers.acme-http.acme.email=${var.acme_email}",\n'
           '          "--certificatesresolvers.acme-http.acme.caserver=${var.acme_ca_server}",\n'
           '          "--certificatesresolvers.acme-http.acme.storage=/acme/acme.json",\n'
           '          "--certificatesresolvers.acme-http.acme.httpchallenge.entrypoint=web",\n', ""),),
         "args = [", "ingress/traefik/traefik",
         'certificate resolver "acme-http" (named by infra/compose/ingress.py (ingress.acme.challenge)) is not defined: '
         "no --certificatesresolvers.acme-http.acme.* argument (defined: acme-tlsalpn)"),
    Case("acme-resolver", INGRESS,
         (('"--certificatesresolvers.acme-tlsalpn.acme.tlschallenge=true",\n',
           '"--certificatesresolvers.acme-tlsalpn.acme.tlschallenge=true",\n'
           '          "--certificatesresolvers.acme-tlsalpn.acme.httpchallenge.entrypoint=web",\n'),),
         "args = [", "ingress/traefik/traefik",
         'certificate resolver "acme-tlsalpn" has 2 challenges (httpchallenge, tlschallenge); set exactly one'),
    Case("acme-storage", INGRESS,
         (("acme-tlsalpn.acme.storage=/acme/acme.json", "acme-tlsalpn.acme.storage=/etc/traefik/acme.json"),),
         "args = [", "ingress/traefik/traefik",
         'certificate resolver "acme-tlsalpn" keeps "/etc/traefik/acme.json" outside every host volume mount of '
         "the task: a restart would lose the account and certificates and order again (Let's Encrypt rate "
         "limits); mount a host volume there"),
]  # fmt: skip


@pytest.mark.parametrize("case", SPEC_CASES, ids=_ids(SPEC_CASES))
def test_each_spec_rule_fires_alone_with_its_line_and_message(case: Case, tmp_path: Path) -> None:
    path, text = broken(tmp_path, case.file, *case.edits)
    line = line_of(text, case.needle) + case.offset
    assert lint(path) == [f"{case.file}:{line}: {case.where}: {case.rule}: {case.message}"]


def test_the_table_covers_every_spec_rule() -> None:
    agent_rules = {c.rule for c in AGENT_CASES}
    other = {
        "hcl-syntax",
        "image-pinned",
        "port-declared",
        *speclint.NOMAD_RULES,
    }  # tested on their own below
    assert {c.rule for c in SPEC_CASES} | agent_rules | other == set(speclint.RULES)


def test_rules_that_must_not_fire(tmp_path: Path) -> None:
    # No canaries: the service's tags may carry traefik.enable=true with no canary_tags.
    path, _ = broken(
        tmp_path,
        APP,
        ("canary            = 1", "canary            = 0"),
        ('      canary_tags = ["canary"]\n', ""),
    )
    assert lint(path) == []
    # A task's shutdown_delay covers the group's services (nomad/structs/structs.go).
    path, _ = broken(
        tmp_path,
        INGRESS,
        ('    shutdown_delay = "5s"\n', ""),
        (
            '  task "traefik" {\n      driver = "docker"\n',
            '  task "traefik" {\n      driver = "docker"\n      shutdown_delay = "5s"\n',
        ),
    )
    assert lint(path) == []
    # Batch jobs: Nomad's batch default restarts with mode "fail" on purpose; not this rule's business.
    path, _ = broken(
        tmp_path,
        INGRESS,
        ("    auto_revert       = true\n", ""),
        ('  type = "service"', '  type = "batch"'),
        ('      mode     = "delay"\n', '      mode     = "fail"\n'),
    )
    assert lint(path) == []


# --------------------------------------------------------------------------------------- agent config --
AGENT_NAME = "zz-infra-lab.hcl"
GC_OFF = "    gc {\n      image = false\n    }\n"


def broken_agent(
    tmp_path: Path,
    agent_edits: tuple[tuple[str, str], ...] = (),
    part_edits: tuple[tuple[str, str, str], ...] = (),
) -> tuple[Path, Path, Path]:
    """Copies of the agent config and of every cloud-init part under tmp_path/cloud-init, edited (each edit
    exactly once). Returns (agent config, parts dir, files dir)."""
    files, parts = tmp_path / "cloud-init" / "files", tmp_path / "cloud-init" / "parts"
    (files / "nomad").mkdir(parents=True)
    parts.mkdir(parents=True)
    text = hcl.AGENT_CONFIG.read_text(encoding="utf-8")
    for old, new in agent_edits:
        assert text.count(old) == 1, f"edit target must occur exactly once in the agent config: {old!r}"
        text = text.replace(old, new)
    agent = files / "nomad" / AGENT_NAME
    agent.write_text(text, encoding="utf-8")
    for part in speclint.PARTS_DIR.glob("*.yaml"):
        (parts / part.name).write_text(part.read_text(encoding="utf-8"), encoding="utf-8")
    for name, old, new in part_edits:
        part_text = (parts / name).read_text(encoding="utf-8")
        assert part_text.count(old) == 1, f"edit target must occur exactly once in {name}: {old!r}"
        (parts / name).write_text(part_text.replace(old, new), encoding="utf-8")
    return agent, parts, files


def lint_agent(agent: Path, parts: Path, files: Path) -> list[str]:
    return [str(f) for f in speclint.check_agent_config(agent, parts_dir=parts, files_dir=files)]


@dataclass(frozen=True)
class AgentCase:
    """An agent-config rule firing on broken copies: `in_file` is the file the finding names."""

    rule: str
    agent_edits: tuple[tuple[str, str], ...]
    part_edits: tuple[tuple[str, str, str], ...]
    in_file: str
    needle: str
    where: str
    message: str
    offset: int = 0


AGENT = f"cloud-init/files/nomad/{AGENT_NAME}"
NOMAD_PART = "cloud-init/parts/nomad.yaml"
GC_WHY = (
    '(default true, image_delay "3m"): the docker driver deletes an image 3 minutes after its last task stops, '
    "the locally built app image included, which no registry can give back; set gc { image = false }"
)
PULL_WHY = (
    '(default "2m"): the docker driver cancels an image pull that shows no progress for that long, and a job\'s '
    'image_pull_timeout does not extend it; set pull_activity_timeout = "10m" or more'
)
ORDER_WHY = (
    "which sorts before nomad.hcl: Nomad merges /etc/nomad.d/*.hcl in name order and the later file wins, so the "
    "package's nomad.hcl would override it; name it to sort after nomad.hcl (e.g. zz-infra-lab.hcl; digits sort "
    "before letters)"
)

AGENT_CASES = [
    AgentCase("docker-gc-image", ((GC_OFF, ""),), (), AGENT, "  config {", 'plugin "docker"',
              "gc.image = (unset) " + GC_WHY),
    AgentCase("docker-gc-image", (("image = false", "image = true"),), (), AGENT, "image = true", 'plugin "docker"',
              "gc.image = true " + GC_WHY),
    AgentCase("docker-volumes", (("    allow_privileged", "    volumes {\n      enabled = true\n    }\n    allow_privileged"),),
              (), AGENT, "    volumes {\n", 'plugin "docker"',
              "volumes.enabled = true lets any job bind-mount any host path (/ included) through config.volumes or "
              "mount, and nothing here needs it: templates render into the task's own directories and host volumes "
              "are Nomad volumes; remove the volumes block", 1),
    AgentCase("docker-pull-activity", (('    pull_activity_timeout = "10m"\n', ""),), (), AGENT, "  config {",
              'plugin "docker"', "pull_activity_timeout = (unset) " + PULL_WHY),
    AgentCase("docker-pull-activity", (('pull_activity_timeout = "10m"', 'pull_activity_timeout = "5m"'),), (),
              AGENT, 'pull_activity_timeout = "5m"', 'plugin "docker"', 'pull_activity_timeout = "5m" ' + PULL_WHY),
    AgentCase("cni-path", (("client {\n  enabled = true\n", 'client {\n  enabled = true\n  cni_path = "/usr/lib/cni"\n'),),
              (), AGENT, "\n  cni_path =", "client",
              'cni_path = "/usr/lib/cni", but no cloud-init part installs CNI plugins (containernetworking-plugins); '
              "remove it (no job uses bridge networking) or install the package", 1),
    AgentCase("agent-config-order", (), (("nomad.yaml", f"/etc/nomad.d/{AGENT_NAME}", "/etc/nomad.d/99-infra-lab.hcl"),),
              NOMAD_PART, "/etc/nomad.d/99-infra-lab.hcl", "write_files",
              f"{AGENT} is installed as /etc/nomad.d/99-infra-lab.hcl, " + ORDER_WHY),
    AgentCase("agent-config-order", (), (("nomad.yaml", f"/etc/nomad.d/{AGENT_NAME}", "/etc/nomad.d/10-project.hcl"),),
              NOMAD_PART, "/etc/nomad.d/10-project.hcl", "write_files",
              f"{AGENT} is installed as /etc/nomad.d/10-project.hcl, " + ORDER_WHY),
    AgentCase("agent-config-order", (), (("nomad.yaml", f"/etc/nomad.d/{AGENT_NAME}", "/etc/nomad/zz-infra-lab.hcl"),),
              NOMAD_PART, "/etc/nomad/zz-infra-lab.hcl", "write_files",
              f"{AGENT} is installed as /etc/nomad/zz-infra-lab.hcl, which Nomad never reads; install it as "
              "/etc/nomad.d/<name>.hcl"),
]  # fmt: skip


@pytest.mark.parametrize("case", AGENT_CASES, ids=_ids(AGENT_CASES))
def test_each_agent_config_rule_fires_alone_with_its_line_and_message(
    case: AgentCase, tmp_path: Path
) -> None:
    agent, parts, files = broken_agent(tmp_path, case.agent_edits, case.part_edits)
    text = (tmp_path / case.in_file).read_text(encoding="utf-8")
    line = line_of(text, case.needle) + case.offset
    assert lint_agent(agent, parts, files) == [
        f"{case.in_file}:{line}: {case.where}: {case.rule}: {case.message}"
    ]


def test_the_real_agent_config_passes_and_lands_after_nomad_hcl() -> None:
    assert speclint.check_agent_config() == []
    assert AGENT_NAME > "nomad.hcl"  # Go's sort.Strings is byte order, like Python's str comparison here


def test_cni_path_is_fine_when_a_part_installs_the_plugins(tmp_path: Path) -> None:
    agent, parts, files = broken_agent(
        tmp_path,
        (("client {\n  enabled = true\n", 'client {\n  enabled = true\n  cni_path = "/usr/lib/cni"\n'),),
        (("docker.yaml", "  - docker.io\n", "  - docker.io\n  - containernetworking-plugins\n"),),
    )
    assert lint_agent(agent, parts, files) == []


def test_an_agent_config_no_part_ships_is_reported(tmp_path: Path) -> None:
    elsewhere = tmp_path / "agent.hcl"
    elsewhere.write_text(hcl.AGENT_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    assert [str(f) for f in speclint.check_agent_config(elsewhere)] == [
        "agent.hcl: agent-config-order: no cloud-init part ships this file (write_files from_file under "
        f"{hcl.display_path(speclint.FILES_DIR)}); cannot tell where it lands in /etc/nomad.d"
    ]


# --------------------------------------------------------------------------------------- the real specs --
def test_the_real_specs_pass_every_rule() -> None:
    specs = speclint.default_specs()
    assert [p.name for p in specs] == [DATA, INGRESS, APP]
    assert speclint.check_files(specs) == []


def test_the_agent_config_declares_the_host_volumes_the_specs_use() -> None:
    assert speclint.agent_host_volumes() == {"postgres-data", "kafka-data", "traefik-acme"}


def test_cli_passes_on_main_and_says_nomad_was_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nomad binary here
    assert speclint.main([]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert speclint.NOMAD_SKIPPED in err.splitlines()
    assert "speclint: ok (3 spec(s)" in err


# --------------------------------------------------------------------------------------- image-pinned --
def test_an_image_without_digest_is_reported_with_its_variable(tmp_path: Path) -> None:
    path, text = broken(tmp_path, DATA, (PG_IMAGE, "postgres:17.11-bookworm"))
    line = line_of(text, "image              = var.postgres_image")
    var_line = line_of(text, 'default     = "postgres:17.11-bookworm"')
    assert lint(path) == [
        f"{DATA}:{line}: datastorage/postgres/postgres: image-pinned: image "
        f'"postgres:17.11-bookworm" (default of variable "postgres_image", line {var_line}) has no digest; '
        "pin it as postgres:17.11-bookworm@sha256:<digest> (a tag can be re-pushed)"
    ]


def test_an_unpinned_literal_image_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path, INGRESS, ("image              = var.traefik_image", 'image = "traefik:latest"')
    )
    line = line_of(text, 'image = "traefik:latest"')
    where = f"{INGRESS}:{line}: ingress/traefik/traefik: image-pinned: "
    assert lint(path) == [
        where + 'image "traefik:latest" uses the moving tag "latest"; pin a version tag and its digest',
        where + 'image "traefik:latest" has no digest; pin it as traefik:latest@sha256:<digest> '
        "(a tag can be re-pushed)",
    ]


def test_an_image_without_tag_is_reported_even_with_a_digest(tmp_path: Path) -> None:
    digest = TRAEFIK_IMAGE.split("@", 1)[1]
    path, text = broken(tmp_path, INGRESS, (TRAEFIK_IMAGE, f"traefik@{digest}"))
    line = line_of(text, "image              = var.traefik_image")
    var_line = line_of(text, f'default     = "traefik@{digest}"')
    assert lint(path) == [
        f"{INGRESS}:{line}: ingress/traefik/traefik: image-pinned: image "
        f'"traefik@{digest}" (default of variable "traefik_image", line {var_line}) has no tag; '
        "pin it as name:tag@sha256:<digest>"
    ]


def test_a_malformed_digest_is_reported(tmp_path: Path) -> None:
    path, _ = broken(tmp_path, INGRESS, (TRAEFIK_IMAGE, "traefik:v3.7.14@sha256:575fa15b"))
    (finding,) = lint(path)
    assert finding.endswith('has a malformed digest "sha256:575fa15b"; expected sha256:<64 hex digits>')


def test_the_locally_built_app_image_needs_a_tag_but_no_digest(tmp_path: Path) -> None:
    # app.image from invoke.yaml (infra-lab/app) is built on the node: no registry digest exists for it.
    assert speclint.check_files([SPECS / APP]) == []
    path, text = broken(
        tmp_path, APP, ('default     = "infra-lab/app:dev"', 'default     = "infra-lab/app:latest"')
    )
    line = line_of(text, "image = var.image")
    var_line = line_of(text, 'default     = "infra-lab/app:latest"')
    assert lint(path) == [
        f"{APP}:{line}: app/app/app: image-pinned: image "
        f'"infra-lab/app:latest" (default of variable "image", line {var_line}) uses the moving tag '
        '"latest"; pin a version tag and its digest'
    ]
    # Not declared local: the same image needs a digest like any other.
    (finding,) = lint(SPECS / APP, local_images=())
    var_line = line_of((SPECS / APP).read_text(encoding="utf-8"), 'default     = "infra-lab/app:dev"')
    assert finding.endswith(
        f'"infra-lab/app:dev" (default of variable "image", line {var_line}) has no digest; '
        "pin it as infra-lab/app:dev@sha256:<digest> (a tag can be re-pushed)"
    )


def test_an_image_composed_from_two_variables_is_resolved(tmp_path: Path) -> None:
    tag_variable = (
        'variable "traefik_tag" {\n  description = "Traefik tag."\n  default     = "v3.7.14"\n}\n\n'
    )
    edits = (
        ('variable "nomad_api_port" {', tag_variable + 'variable "nomad_api_port" {'),
        (TRAEFIK_IMAGE, "traefik"),
        ("image              = var.traefik_image", 'image = "${var.traefik_image}:${var.traefik_tag}"'),
    )
    path, text = broken(tmp_path, INGRESS, *edits)
    line = line_of(text, 'image = "${var.traefik_image}:${var.traefik_tag}"')
    image_line = line_of(text, 'default     = "traefik"')
    tag_line = line_of(text, 'default     = "v3.7.14"')
    assert lint(path) == [
        f'{INGRESS}:{line}: ingress/traefik/traefik: image-pinned: image "traefik:v3.7.14" (default of variable '
        f'"traefik_image", line {image_line}, default of variable "traefik_tag", line {tag_line}) has no digest; '
        "pin it as traefik:v3.7.14@sha256:<digest> (a tag can be re-pushed)"
    ]


def test_an_image_that_cannot_be_resolved_statically_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path,
        INGRESS,
        ("image              = var.traefik_image", 'image = "${NOMAD_META_image}"'),
    )
    line = line_of(text, 'image = "${NOMAD_META_image}"')
    assert lint(path) == [
        f"{INGRESS}:{line}: ingress/traefik/traefik: image-pinned: image "
        '"${NOMAD_META_image}": has an interpolation that cannot be resolved before run time'
    ]


def test_an_image_from_a_variable_without_default_is_reported(tmp_path: Path) -> None:
    path, text = broken(tmp_path, INGRESS, (f'  default     = "{TRAEFIK_IMAGE}"\n', ""))
    line = line_of(text, "image              = var.traefik_image")
    assert lint(path) == [
        f"{INGRESS}:{line}: ingress/traefik/traefik: image-pinned: image "
        '"${var.traefik_image}": comes from variable "traefik_image", which has no default to check'
    ]


@pytest.mark.parametrize(
    ("image", "problems"),
    [
        (TRAEFIK_IMAGE, []),
        ("registry.example:5000/team/app:1.2@sha256:" + "a" * 64, []),
        (
            "registry.example:5000/team/app@sha256:" + "a" * 64,
            ["has no tag; pin it as name:tag@sha256:<digest>"],
        ),
        (
            "registry.example:5000/team/app",
            [
                "has no tag; pin it as name:tag@sha256:<digest>",
                "has no digest; pin it as registry.example:5000/team/app@sha256:<digest> (a tag can be re-pushed)",
            ],
        ),
    ],
)
def test_image_references_with_registry_ports_are_split_correctly(image: str, problems: list[str]) -> None:
    assert speclint.image_problems(image) == problems


# ---------------------------------------------------------------------------------- host-volume-exists --
def test_the_host_volumes_are_read_from_the_agent_config(tmp_path: Path) -> None:
    agent_text = hcl.AGENT_CONFIG.read_text(encoding="utf-8")
    kafka_volume = (
        'host_volume "kafka-data" {\n    path      = "/opt/nomad/volumes/kafka"\n    read_only = false\n  }\n'
    )
    assert agent_text.count(kafka_volume) == 1
    agent = tmp_path / "agent.hcl"
    agent.write_text(agent_text.replace(kafka_volume, ""), encoding="utf-8")
    text = (SPECS / DATA).read_text(encoding="utf-8")
    findings = speclint.check_files([SPECS / DATA], agent_config=agent)
    assert [(f.line, f.where, f.rule) for f in findings] == [
        (line_of(text, 'source    = "kafka-data"'), "datastorage/kafka", "host-volume-exists")
    ]
    assert findings[0].message == (
        'host volume "data" has source "kafka-data", which the agent config agent.hcl does not declare as a '
        "host_volume (declared: postgres-data, traefik-acme)"
    )


def test_a_broken_agent_config_is_reported_with_its_line(tmp_path: Path) -> None:
    agent = tmp_path / "agent.hcl"
    agent.write_text('client {\n  host_volume "x" {\n', encoding="utf-8")
    (finding,) = speclint.check_files([SPECS / DATA], agent_config=agent)
    assert (finding.file, finding.line, finding.rule) == ("agent.hcl", 3, "hcl-syntax")


# -------------------------------------------------------------------------------- update-auto-revert --


def test_a_group_auto_revert_overrides_the_jobs(tmp_path: Path) -> None:
    path, _ = broken(
        tmp_path,
        APP,
        ("    auto_revert       = true\n", "    auto_revert       = false\n"),
        (
            '  group "app" {\n    count = 1\n',
            '  group "app" {\n    count = 1\n\n    update {\n      auto_revert = true\n    }\n',
        ),
    )
    assert lint(path) == []


def test_batch_jobs_need_no_auto_revert(tmp_path: Path) -> None:
    path, _ = broken(
        tmp_path, INGRESS, ("    auto_revert       = true\n", ""), ('  type = "service"', '  type = "batch"')
    )
    assert lint(path) == []


# ------------------------------------------------------------------------------------- port-declared --
def test_ports_named_by_service_check_and_config_must_be_declared(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path,
        APP,
        ('      port     = "http"\n', '      port     = "htp"\n'),
        ('        ports = ["http"]', '        ports = ["http", "metrics"]'),
        ('        path     = "/healthz"\n', '        path     = "/healthz"\n        port     = "health"\n'),
    )
    service_line = line_of(text, 'port     = "htp"')
    check_line = line_of(text, 'port     = "health"')
    config_line = line_of(text, 'ports = ["http", "metrics"]')
    assert lint(path) == [
        f'{APP}:{service_line}: app/app: port-declared: service "app" uses port "htp", '
        "which the group's network does not declare (declared: http)",
        f'{APP}:{check_line}: app/app: port-declared: check "app-healthz" of service "app" uses port '
        '"health", which the group\'s network does not declare (declared: http)',
        f'{APP}:{config_line}: app/app/app: port-declared: config.ports names port "metrics", which the '
        "group's network does not declare (declared: http)",
    ]


# ---------------------------------------------------------------------------------------- hcl-syntax --
def test_a_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, text = broken(
        tmp_path, DATA, ('      source    = "kafka-data"', '      source    = = "kafka-data"')
    )
    line = line_of(text, 'source    = = "kafka-data"')
    (finding,) = speclint.check_files([path])
    assert (finding.file, finding.line, finding.rule) == (DATA, line, "hcl-syntax")
    assert str(finding) == (
        f"{DATA}:{line}: hcl-syntax: unexpected '= ' at column 19 "
        '(expected one of: !, ", (, -, <<-EOT, <<EOT, [, a name, a number, a string, {)'
    )

    assert speclint.main(["--no-nomad", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(finding)]
    assert f"speclint: 1 problem(s) in {DATA}" in err


def test_an_unclosed_block_names_the_end_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.nomad.hcl"
    text = (SPECS / INGRESS).read_text(encoding="utf-8")
    path.write_text(text[: text.index('  group "traefik"')], encoding="utf-8")
    (finding,) = speclint.check_files([path])
    assert finding.rule == "hcl-syntax"
    assert finding.line == text[: text.index('  group "traefik"')].count("\n") + 1
    assert "unexpected end of file" in finding.message


# ------------------------------------------------------------------------------------------- the CLI --
def test_cli_exits_non_zero_and_prints_every_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = broken(
        tmp_path, DATA, ('source    = "kafka-data"', 'source    = "kafka"'), ("\n" + PG_CHECK, "")
    )
    assert speclint.main(["--no-nomad", str(path)]) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[2] for line in out.splitlines()] == ["service-check", "host-volume-exists"]
    assert "skipped: nomad fmt/validate (--no-nomad)" in err


def test_cli_accepts_a_directory_and_rejects_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert speclint.main(["--no-nomad", str(SPECS)]) == 0
    assert speclint.main(["--no-nomad", str(tmp_path / "nope.nomad.hcl")]) == 2
    assert "nope.nomad.hcl: no such file" in capsys.readouterr().err


def test_without_nomad_the_skip_is_said_not_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert speclint.nomad_checks([SPECS / APP]) == ([], [speclint.NOMAD_SKIPPED])


def test_kafka_keeps_one_address_and_the_app_never_renders_an_empty_bootstrap() -> None:
    """Issue 23/14, read from the real specs: Kafka's listener for other jobs is on a static port (a
    replacement registers the same address), the app job names the same port, and the app's env template
    renders KAFKA_BOOTSTRAP_SERVERS with or without the kafka service (its `else`: node address + that
    port), so a Kafka restart changes no byte of it and Nomad does not restart the app."""
    data = hcl.parse((ROOT / "nomad" / "datastorage.nomad.hcl").read_text())
    app = hcl.parse((ROOT / "nomad" / "service.nomad.hcl").read_text())
    port = {v.name: v.get("default") for v in data.children("variable")}["kafka_internal_port"]
    assert port == {v.name: v.get("default") for v in app.children("variable")}["kafka_internal_port"]
    (job,) = data.children("job")
    kafka = next(g for g in job.children("group") if g.name == "kafka")
    network = kafka.child("network")
    assert network is not None
    listener = next(p for p in network.children("port") if p.name == "kafka")
    assert listener.get("static") == "${var.kafka_internal_port}", listener.attrs
    (app_job,) = app.children("job")
    task = next(t for g in app_job.children("group") for t in g.children("task") if t.name == "app")
    env_templates = [t for t in task.children("template") if t.get("env") is True]
    (line,) = [ln for t in env_templates for ln in str(t.get("data")).splitlines() if "KAFKA_BOOTSTRAP" in ln]
    assert line.strip().startswith('KAFKA_BOOTSTRAP_SERVERS={{ with nomadService "kafka" }}')
    assert '{{ else }}{{ env "attr.unique.network.ip-address" }}:${var.kafka_internal_port}{{ end }}' in line
