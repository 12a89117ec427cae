"""infra/speclint.py: the real specs pass; every rule fires, with its exact message, on a broken copy.

Broken copies are made from the real specs by targeted text edits (each edit must match exactly once,
so a test cannot silently stop testing anything when a spec changes) and written into tmp_path.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import ROOT, speclint

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


# --------------------------------------------------------------------------------------- the real specs --
def test_the_real_specs_pass_every_rule() -> None:
    specs = speclint.default_specs()
    assert [p.name for p in specs] == [DATA, INGRESS, APP]
    assert speclint.check_files(specs) == []


def test_the_agent_config_declares_the_host_volumes_the_specs_use() -> None:
    assert speclint.agent_host_volumes() == {"postgres-data", "kafka-data"}


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


# -------------------------------------------------------------------------------------- service-check --
def test_a_service_without_check_is_reported(tmp_path: Path) -> None:
    path, text = broken(tmp_path, DATA, ("\n" + PG_CHECK, ""))
    line = line_of(text, 'name     = "postgres"') - 1
    assert lint(path) == [
        f'{DATA}:{line}: datastorage/postgres: service-check: service "postgres" has no check block; '
        "Nomad would call it healthy as soon as it is registered"
    ]


# ----------------------------------------------------------------------------------- service-provider --
def test_a_service_without_nomad_provider_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path, APP, ('      name     = "app"\n      provider = "nomad"\n', '      name     = "app"\n')
    )
    line = line_of(text, 'name     = "app"') - 1
    assert lint(path) == [
        f'{APP}:{line}: app/app: service-provider: service "app" does not set provider; '
        'set provider = "nomad" (the default, consul, does not run here)'
    ]


def test_a_consul_service_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path,
        INGRESS,
        (
            '      name     = "traefik"\n      provider = "nomad"',
            '      name     = "traefik"\n      provider = "consul"',
        ),
    )
    line = line_of(text, 'provider = "consul"')
    assert lint(path) == [
        f'{INGRESS}:{line}: ingress/traefik: service-provider: service "traefik" has provider = "consul"; '
        'set provider = "nomad" (the default, consul, does not run here)'
    ]


# ------------------------------------------------------------------------------------- volume-declared --
def test_a_volume_mount_without_group_volume_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path,
        DATA,
        (
            '    volume "data" {\n      type      = "host"\n      source    = "postgres-data"',
            '    volume "pgdata" {\n      type      = "host"\n      source    = "postgres-data"',
        ),
    )
    line = line_of(text, 'destination = "/var/lib/postgresql/data"') - 1
    assert lint(path) == [
        f'{DATA}:{line}: datastorage/postgres/postgres: volume-declared: volume_mount names volume "data", '
        "which the group does not declare (declared: pgdata)"
    ]


# ---------------------------------------------------------------------------------- host-volume-exists --
def test_a_host_volume_missing_from_the_agent_config_is_reported(tmp_path: Path) -> None:
    path, text = broken(tmp_path, DATA, ('source    = "postgres-data"', 'source    = "postgres-dat"'))
    line = line_of(text, 'source    = "postgres-dat"')
    assert lint(path) == [
        f'{DATA}:{line}: datastorage/postgres: host-volume-exists: host volume "data" has source '
        '"postgres-dat", which the agent config cloud-init/files/nomad/zz-infra-lab.hcl does not declare as a '
        "host_volume (declared: kafka-data, postgres-data)"
    ]


def test_the_host_volumes_are_read_from_the_agent_config(tmp_path: Path) -> None:
    agent_text = speclint.AGENT_CONFIG.read_text(encoding="utf-8")
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
        "host_volume (declared: postgres-data)"
    )


def test_a_broken_agent_config_is_reported_with_its_line(tmp_path: Path) -> None:
    agent = tmp_path / "agent.hcl"
    agent.write_text('client {\n  host_volume "x" {\n', encoding="utf-8")
    (finding,) = speclint.check_files([SPECS / DATA], agent_config=agent)
    assert (finding.file, finding.line, finding.rule) == ("agent.hcl", 3, "hcl-syntax")


# ------------------------------------------------------------------------------------- resources-set --
def test_a_task_without_resources_is_reported(tmp_path: Path) -> None:
    path, text = broken(tmp_path, INGRESS, ("\n" + TRAEFIK_RESOURCES, ""))
    line = line_of(text, 'task "traefik"')
    assert lint(path) == [
        f"{INGRESS}:{line}: ingress/traefik/traefik: resources-set: task has no resources block; Nomad's "
        "defaults (100 MHz CPU, 300 MB memory) OOM-kill anything JVM-sized"
    ]


def test_a_task_without_memory_is_reported(tmp_path: Path) -> None:
    path, text = broken(
        tmp_path, DATA, ("        cpu    = 1000\n        memory = 1024\n", "        cpu    = 1000\n")
    )
    line = line_of(text, "        cpu    = 1000") - 1
    assert lint(path) == [
        f"{DATA}:{line}: datastorage/kafka/kafka: resources-set: resources sets no memory; "
        "set cpu and memory explicitly"
    ]


# -------------------------------------------------------------------------------- update-auto-revert --
def test_a_service_job_without_auto_revert_is_reported(tmp_path: Path) -> None:
    path, text = broken(tmp_path, INGRESS, ("    auto_revert       = true\n", ""))
    line = line_of(text, 'group "traefik"')
    assert lint(path) == [
        f"{INGRESS}:{line}: ingress/traefik: update-auto-revert: no update block with auto_revert = true "
        "(job or group level); a failed deployment would stay on the broken version"
    ]


def test_auto_revert_false_is_reported_and_a_group_override_counts(tmp_path: Path) -> None:
    path, text = broken(tmp_path, APP, ("    auto_revert       = true\n", "    auto_revert       = false\n"))
    line = line_of(text, "auto_revert       = false")
    assert lint(path) == [
        f"{APP}:{line}: app/app: update-auto-revert: update.auto_revert = false; a service job must set "
        "auto_revert = true so a failed deployment goes back to the last good version"
    ]
    # The group's own update block overrides the job's field.
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


# ------------------------------------------------------------------------------ variable-description --
def test_a_variable_without_description_is_reported(tmp_path: Path) -> None:
    old = '  description = "Port of the Nomad HTTP API on the node Traefik runs on."\n'
    path, text = broken(tmp_path, INGRESS, (old, ""))
    line = line_of(text, 'variable "nomad_api_port"')
    assert lint(path) == [
        f'{INGRESS}:{line}: variable nomad_api_port: variable-description: variable "nomad_api_port" has no '
        "description"
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
