"""The workflows' shape (.github/workflows: actions pinned by SHA, CI runs exactly the README's commands, the
e2e job, CD) and the README commands they run."""

from __future__ import annotations

import re
from typing import Any

import yaml
from e2e.harness import RECORDING_NAME

from infra import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"


def load_workflow(name: str) -> dict[str | bool, Any]:
    """A workflow as YAML 1.1 reads it: the key `on` becomes True."""
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict)
    return data


def run_lines(job: dict[str, Any]) -> list[str]:
    return [line.strip() for step in job["steps"] if "run" in step for line in str(step["run"]).splitlines()]


def test_every_action_is_pinned_by_commit_sha() -> None:
    for wf in sorted(WORKFLOWS.glob("*.yml")):
        uses = re.findall(r"uses:\s*(\S+)", wf.read_text())
        assert uses, wf
        for ref in uses:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{wf.name}: {ref} not pinned by SHA"


def readme_commands() -> tuple[str, str]:
    """The README's two commands: the setup line of the quick start and the test command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    setup = next(
        line for block in blocks for line in block.splitlines() if line.startswith("./scripts/setup")
    )
    test = next(line for block in blocks for line in block.splitlines() if line.startswith("./scripts/test"))
    return setup.split("#")[0].strip(), test.strip()


def test_ci_runs_exactly_the_readme_commands() -> None:
    setup, test = readme_commands()
    assert setup == "./scripts/setup --system --dev" and test == "./scripts/test"
    ci_run = (ROOT / ".ci" / "run").read_text()
    commands = [
        line for line in ci_run.splitlines() if line and not line.startswith(("#", "set ", "cd ", "#!"))
    ]
    assert commands == [setup, test]
    ci = load_workflow("ci.yml")
    assert set(ci[True]) >= {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    assert run_lines(ci["jobs"]["test"])[-2:] == [setup, test]


def test_ci_e2e_job_enables_kvm_caches_the_image_runs_nox_and_uploads_logs() -> None:
    job = load_workflow("ci.yml")["jobs"]["e2e"]
    assert job["runs-on"] == "ubuntu-latest"
    assert 30 <= job["timeout-minutes"] <= 60
    text = yaml.safe_dump(job)
    assert (
        'KERNEL==\\"kvm\\", GROUP=\\"kvm\\", MODE=\\"0666\\"' in text
        or 'KERNEL=="kvm", GROUP="kvm", MODE="0666"' in text
    )
    assert "udevadm trigger" in text
    lines = run_lines(job)
    assert ".venv/bin/nox -s e2e" in lines
    (image,) = [s for s in job["steps"] if s.get("id") == "image"]  # the cache key's source, a real file
    script = str(image["run"]).split()[1]
    assert script == "tests/e2e/harness.py" and (ROOT / script).is_file()
    cache = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache@")]
    assert cache and "steps.image.outputs.key" in cache[0]["with"]["key"]
    # the baked image, cached by infra.compose.bake's content key (tests/e2e/harness.py bake-cache)
    bake = next(s for s in job["steps"] if s.get("id") == "bake")
    assert str(bake["run"]).split()[1:3] == ["tests/e2e/harness.py", "bake-cache"]
    assert len(cache) == 2 and cache[1]["with"] == {
        "path": "${{ steps.bake.outputs.path }}",
        "key": "${{ steps.bake.outputs.key }}",
    }
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert upload and "failure()" in upload[0]["if"]
    for path in ("serial.log", "e2e"):
        assert path in upload[0]["with"]["path"]
    # The Nomad API recording is uploaded on every run, passed or not: the replay data from a real Nomad.
    (recording,) = [s for s in upload if "nomad-exchanges" in str(s["with"]["path"])]
    assert recording["if"] == "always()"
    assert recording["with"]["path"] == f".state/e2e/{RECORDING_NAME}"


def test_cd_builds_pushes_and_deploys_with_minimal_permissions() -> None:
    cd = load_workflow("cd.yml")
    assert cd[True]["push"]["branches"] == ["main"]
    assert cd["permissions"] == {"contents": "read", "packages": "write"}
    text = (WORKFLOWS / "cd.yml").read_text()
    assert "ghcr.io/${{ github.repository }}/app" in text or "IMAGE: ghcr.io/" in text
    assert "inv deploy.app --image" in text
    for secret in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_CACERT"):
        assert f"secrets.{secret}" in text
