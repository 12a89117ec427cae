"""infra/e2e.py: the preflight's messages (each missing prerequisite made real: an empty PATH, a bound
socket, a closed port, a TLS server that never answers), the teardown guarantee of the driver (a failing
step, --keep, SIGTERM), the `inv` subprocess runner, the JUnit/timing report, and the workflows' shape.

The full e2e itself needs KVM and the internet; it runs in GitHub Actions (`nox -s e2e`).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import ROOT, e2e
from infra.config import Config


# ================================================================================================= driver ==
class Calls:
    def __init__(self) -> None:
        self.names: list[str] = []

    def step(self, name: str, fail: bool = False) -> e2e.Step:
        def run() -> str:
            self.names.append(name)
            if fail:
                raise e2e.SmokeFailed(f"{name}: the app answered HTTP 502")
            return name

        return e2e.Step(name, run, "test")


# ============================================================================================== workflows ==
WORKFLOWS = ROOT / ".github" / "workflows"


def load_workflow(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict)
    return data


def run_lines(job: dict[str, Any]) -> list[str]:
    return [line.strip() for step in job["steps"] if "run" in step for line in str(step["run"]).splitlines()]


# ============================================================================================== preflight ==
def test_qemu_missing_from_path_is_named(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"arch": "x86_64"})
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    found = e2e.check_qemu(cfg, path=str(empty))
    assert not found.ok
    assert "qemu-system-x86_64 not found (PATH)" in found.detail
    assert "apt-get install qemu-system-x86" in found.hint


def test_qemu_found_on_path(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"arch": "aarch64"})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    found = e2e.check_qemu(cfg, path=str(bindir))
    assert found.ok and str(fake) in found.detail


def test_configured_qemu_binary_missing(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"qemu": str(tmp_path / "no-such-qemu")})
    found = e2e.check_qemu(cfg)
    assert not found.ok and "(vm.qemu)" in found.detail


def test_tcg_is_refused_unless_allowed(make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(vm={"accel": "tcg"})
    refused = e2e.check_accel(cfg)
    assert not refused.ok and "vm.accel is tcg" in refused.detail and "--allow-tcg" in refused.hint
    assert e2e.check_accel(cfg, allow_tcg=True).ok


def test_kvm_device_missing(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"accel": "kvm"})
    found = e2e.check_accel(cfg, kvm_device=tmp_path / "kvm", system="Linux")
    assert not found.ok and "does not exist" in found.detail
    assert 'KERNEL=="kvm"' in found.hint  # tells CI how to enable it


def test_kvm_device_that_is_not_kvm(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    cfg = make_cfg(vm={"accel": "auto"})
    found = e2e.check_accel(cfg, kvm_device=fake, system="Linux")
    assert not found.ok and "KVM ioctl" in found.detail
    # auto + --allow-tcg: the run may fall back to TCG, and says why
    allowed = e2e.check_accel(cfg, kvm_device=fake, system="Linux", allow_tcg=True)
    assert allowed.ok and allowed.detail.startswith("tcg (allowed by --allow-tcg; KVM:")


def test_hvf_requested_on_linux(make_cfg: Callable[..., Config]) -> None:
    found = e2e.check_accel(make_cfg(vm={"accel": "hvf"}), system="Linux")
    assert not found.ok and "hvf" in found.detail


def test_image_source_is_the_one_vm_run_uses(make_cfg: Callable[..., Config]) -> None:
    from infra import images

    url, digest = "https://example.invalid/a/noble.img", "ab" * 32
    cfg = make_cfg(vm={"image": url, "image_sha256": digest})
    src = e2e.image_source(cfg)
    assert src.urls == (url,) and (src.algo, src.digest) == ("sha256", digest)
    assert src.path == images.cache_path(cfg.project.cache_dir, images.source_for(cfg, "x86_64"))
    assert src.path.is_relative_to(cfg.project.cache_dir / "images")
    assert src.cache_key == f"vm-image-sha256-{digest}"


def test_image_source_errors_become_preflight_errors(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(e2e.PreflightError, match=r"vm\.image is a URL but vm\.image_sha256 is empty"):
        e2e.image_source(make_cfg(vm={"image": "https://example.invalid/x.img"}))
    found = e2e.check_image(make_cfg(vm={"distro": "plan9"}))
    assert not found.ok and "vm.distro is 'plan9'" in found.detail


def test_the_repository_catalogue_resolves(make_cfg: Callable[..., Config]) -> None:
    for arch in ("x86_64", "aarch64"):
        src = e2e.image_source(make_cfg(vm={"arch": arch}))
        assert src.urls and src.urls[0].startswith("https://") and len(src.digest) in (64, 128)


def test_teardown_runs_after_a_failing_smoke_step() -> None:
    calls, report = Calls(), e2e.Report()
    ok = e2e.run_plan(
        [calls.step("inv up"), calls.step("smoke", fail=True), calls.step("never")],
        [calls.step("inv down")],
        report,
        on_failure=lambda: calls.names.append("diagnostics"),
    )
    assert not ok
    assert calls.names == ["inv up", "smoke", "diagnostics", "inv down"]
    assert [(r.name, r.status) for r in report.records] == [
        ("inv up", "passed"), ("smoke", "failed"), ("inv down", "passed"),
    ]  # fmt: skip
    assert report.records[1].message == "smoke: the app answered HTTP 502"


def test_keep_skips_teardown_even_on_failure() -> None:
    calls, report = Calls(), e2e.Report()
    assert not e2e.run_plan([calls.step("smoke", fail=True)], [calls.step("inv down")], report, keep=True)
    assert calls.names == ["smoke"]


def test_teardown_runs_after_an_unexpected_exception_and_keeps_going() -> None:
    calls, report = Calls(), e2e.Report()

    def boom() -> None:
        raise RuntimeError("bug in a check")

    ok = e2e.run_plan(
        [e2e.Step("buggy", boom)], [calls.step("inv down", fail=True), calls.step("nothing left")], report
    )
    assert not ok
    assert calls.names == ["inv down", "nothing left"]  # a failing teardown step does not stop the next
    assert report.records[0].status == "error" and "RuntimeError: bug in a check" in report.records[0].message


def test_all_passing_plan_tears_down_and_reports_ok() -> None:
    calls, report = Calls(), e2e.Report()
    assert e2e.run_plan([calls.step("a"), calls.step("b")], [calls.step("inv down")], report)
    assert calls.names == ["a", "b", "inv down"] and not report.failed


# ================================================================================================= report ==
def test_junit_and_timing_table_round_trip(tmp_path: Path) -> None:
    report = e2e.Report()
    report.add_findings(
        [
            e2e.Finding("qemu", True, "found", seconds=0.01),
            e2e.Finding("registry", False, "unreachable", "use CI", 3.0),
        ]
    )
    report.add(
        e2e.StepRecord("inv up (from nothing)", "bring-up", 412.5, "passed", output="==> boot\x1b[0m\x07")
    )
    report.add(
        e2e.StepRecord("event on the Kafka topic", "smoke", 20.25, "failed", "not found at events/0@3\nmore")
    )
    report.add(e2e.StepRecord("interrupted", "smoke", 1.0, "error", "interrupted (SIGTERM)"))
    report.timings += [("inv up: boot", 35.5), ("inv up: cloud-init", 120.0), ("inv up: deploy.data", 90.25)]
    junit, table = report.write(tmp_path / "r")

    root = ET.parse(junit).getroot()  # noqa: S314 - our own file
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "2", "1")
    assert float(suite.get("time", "0")) == pytest.approx(0.01 + 3.0 + 412.5 + 20.25 + 1.0, abs=0.01)
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == [
        "preflight: qemu", "preflight: registry", "inv up (from nothing)", "event on the Kafka topic", "interrupted",
    ]  # fmt: skip
    assert cases["inv up (from nothing)"].get("time") == "412.500"
    assert cases["inv up (from nothing)"].get("classname") == "e2e.bring-up"
    failure = cases["event on the Kafka topic"].find("failure")
    assert failure is not None and failure.get("message") == "not found at events/0@3"
    assert failure.text == "not found at events/0@3\nmore"
    assert cases["interrupted"].find("error") is not None
    reg = cases["preflight: registry"]
    assert reg.find("failure") is not None and "hint: use CI" in (reg.findtext("system-out") or "")
    assert cases["inv up (from nothing)"].findtext("system-out") == "==> boot"  # control chars gone
    assert cases["preflight: qemu"].find("failure") is None

    text = table.read_text()
    assert re.search(r"\| inv up: cloud-init\s+\|\s+120\.0 \|", text)
    assert text.splitlines()[0].startswith("| phase")
    assert json.loads((tmp_path / "r" / "timings.json").read_text())[2] == {
        "phase": "inv up: deploy.data",
        "seconds": 90.25,
    }


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
    test = next(
        line for block in blocks for line in block.splitlines() if line.startswith(".venv/bin/nox -s lint")
    )
    return setup.split("#")[0].strip(), test.strip()


def test_ci_runs_exactly_the_readme_commands() -> None:
    setup, test = readme_commands()
    assert setup == "./scripts/setup --system --dev" and test == ".venv/bin/nox -s lint unit component vm"
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
    cache = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/cache@")]
    assert cache and "steps.image.outputs.key" in cache[0]["with"]["key"]
    # the baked image, cached by infra.bake's content key (python -m infra.e2e bake-cache)
    assert len(cache) == 2 and cache[1]["with"] == {
        "path": "${{ steps.bake.outputs.path }}",
        "key": "${{ steps.bake.outputs.key }}",
    }
    assert '.venv/bin/python -m infra.e2e bake-cache >> "$GITHUB_OUTPUT"' in lines
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert upload and "failure()" in upload[0]["if"]
    for path in ("serial.log", "e2e"):
        assert path in upload[0]["with"]["path"]
    # The Nomad API recording is uploaded on every run, passed or not: the replay data from a real Nomad.
    (recording,) = [s for s in upload if "nomad-exchanges" in str(s["with"]["path"])]
    assert recording["if"] == "always()"
    assert recording["with"]["path"] == f".state/e2e/{e2e.RECORDING_NAME}"


def test_cd_builds_pushes_and_deploys_with_minimal_permissions() -> None:
    cd = load_workflow("cd.yml")
    assert cd[True]["push"]["branches"] == ["main"]
    assert cd["permissions"] == {"contents": "read", "packages": "write"}
    text = (WORKFLOWS / "cd.yml").read_text()
    assert "ghcr.io/${{ github.repository }}/app" in text or "IMAGE: ghcr.io/" in text
    assert "inv deploy.app --image" in text
    for secret in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_CACERT"):
        assert f"secrets.{secret}" in text


def test_each_step_records_its_nomad_exchanges_under_its_name(make_cfg: Any, tmp_path: Path) -> None:
    from infra.nomad_recording import Recorder

    recorder = Recorder(tmp_path / "rec.jsonl")
    runner = e2e.E2E(
        make_cfg(), lambda args, *, timeout: None, e2e.Options(), e2e.Report(), recorder=recorder
    )  # type: ignore[arg-type,return-value]
    seen: list[str] = []
    steps = [
        e2e.Step(name, lambda: seen.append(recorder.scenario)) for name in ("inv up (from nothing)", "smoke")
    ]
    teardown = [e2e.Step("inv down", lambda: seen.append(recorder.scenario))]
    assert e2e.run_plan(
        [runner._tagged(s) for s in steps], [runner._tagged(s) for s in teardown], e2e.Report()
    )
    assert seen == ["inv up (from nothing)", "smoke", "inv down"]
    untagged = e2e.E2E(make_cfg(), lambda args, *, timeout: None, e2e.Options(), e2e.Report())  # type: ignore[arg-type,return-value]
    assert untagged._tagged(steps[0]) is steps[0]  # --no-record: steps run as they are
    recorder.close()
