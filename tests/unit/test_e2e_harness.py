"""tests/e2e/harness.py: the preflight's messages (through infra's qemu, images and vm), the teardown
guarantee of `running` (a failing bring-up, a failing check, --keep, an exception, Ctrl-C), the timing table,
and the step tagging of the Nomad API recording.

The full e2e itself (tests/e2e) needs KVM and the internet; it runs in GitHub Actions (`nox -s e2e`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from e2e import harness as e2e

from infra.core import state
from infra.core.config import Config
from infra.vm import baseimages


# ================================================================================================= driver ==
class FakeInv:
    """Stands in for the `inv` subprocesses: records the commands, fails those named in `fail`."""

    def __init__(self, calls: list[str], fail: Sequence[str] = ()) -> None:
        self.calls, self.fail = calls, set(fail)

    def __call__(self, args: Sequence[str], *, timeout: float) -> e2e.InvResult:
        self.calls.append(f"inv {' '.join(args)}")
        if args[0] in self.fail:
            raise e2e.InvCommandFailed(f"`inv {' '.join(args)}` exited 1")
        lines = [(0.0, "==> iso"), (0.1, "--  seed ISO up to date"), (0.2, "==> vm.run"), (5.0, "ok  booted")]
        return e2e.InvResult(list(args), 0, 7.5, lines)


UP = [e2e.Action("inv up (from nothing)", ["up"], lambda cfg: 60, phases="inv up")]
DOWN = [e2e.Action("inv down", ["down"], lambda cfg: 60)]


def run(
    cfg: Config,
    body: Callable[[e2e.Stack], object] = lambda stack: None,
    *,
    fail: Sequence[str] = (),
    keep: bool = False,
    failed: bool = False,
    recorder: Any = None,
    calls: list[str] | None = None,
) -> tuple[list[str], e2e.Stack]:
    """The bring-up, `body` (the tests), the teardown; returns what happened (into `calls`), in order."""
    calls = [] if calls is None else calls
    stack = e2e.Stack(cfg, FakeInv(calls, fail), e2e.Smoke(cfg), e2e.Timings(), recorder)
    with e2e.running(
        stack, UP, DOWN, keep=keep, failed=lambda: failed,
        diagnose=lambda: calls.append("diagnostics"), verify_down=lambda: calls.append("nothing left"),
    ):  # fmt: skip
        body(stack)
    return calls, stack


# ============================================================================================== preflight ==
def test_qemu_missing_from_path_is_named(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"arch": "x86_64"})
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    found = e2e.check_qemu(cfg, path=str(empty))
    assert not found.ok
    assert (
        found.detail == "qemu binary 'qemu-system-x86_64' not found on PATH"
    )  # infra.vm.qemu.find_qemu's words
    assert "apt-get install qemu-system-x86" in found.hint


def test_qemu_found_on_path(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg(vm={"arch": "aarch64"})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    found = e2e.check_qemu(cfg, path=str(bindir))
    assert found.ok and found.detail == str(fake)


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


def test_a_failed_kvm_verdict_of_inv_vm_run_fails_the_preflight(
    make_cfg: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict `inv vm.run` cached for this host boot, read through infra.vm.qemu (not its file format)."""
    from infra.vm import qemu

    cfg = make_cfg(vm={"accel": "kvm"})
    monkeypatch.setattr(e2e, "kvm_problem", lambda device: None)  # as if /dev/kvm worked
    verdicts = iter([(False, "no guest kernel progress within 20s"), None])
    seen: list[Path] = []

    def cached(cache: Path) -> tuple[bool, str] | None:
        seen.append(cache)
        return next(verdicts)

    monkeypatch.setattr(qemu, "cached_kvm_verdict", cached)
    found = e2e.check_accel(cfg, system="Linux")
    assert not found.ok
    assert found.detail == (
        "KVM unusable: a probe boot of `inv vm.run` on this host failed: no guest kernel progress within 20s"
    )
    assert seen == [cfg.project.cache_dir / state.KVM_PROBE_CACHE]
    assert e2e.check_accel(cfg, system="Linux").ok  # no verdict cached (and no qemu to probe with)


def test_hvf_requested_on_linux(make_cfg: Callable[..., Config]) -> None:
    found = e2e.check_accel(make_cfg(vm={"accel": "hvf"}), system="Linux")
    assert not found.ok and "hvf" in found.detail


def test_image_source_is_the_one_vm_run_uses(make_cfg: Callable[..., Config]) -> None:
    url, digest = "https://example.invalid/a/noble.img", "ab" * 32
    cfg = make_cfg(vm={"image": url, "image_sha256": digest, "arch": "x86_64"})
    src = e2e.image_source(cfg)
    assert src == baseimages.source_for(cfg, "x86_64")
    assert src.urls == (url,) and (src.algo, src.digest) == ("sha256", digest)
    path = e2e.image_path(cfg, src)
    assert path == baseimages.cache_path(cfg.project.cache_dir, src)
    assert path.is_relative_to(cfg.project.cache_dir / "images")
    assert e2e.image_cache_key(src) == f"vm-image-sha256-{digest}"


def test_local_image_is_checked_in_place(make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    local = tmp_path / "my.img"
    local.write_bytes(b"qcow2 bytes")
    cfg = make_cfg(vm={"image": str(local)})
    assert e2e.image_path(cfg, e2e.image_source(cfg)) == local
    assert e2e.check_image(cfg).detail == f"local file {local} (no checksum configured)"


def test_image_source_errors_become_preflight_errors(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(e2e.PreflightError, match=r"vm\.image is a URL but vm\.image_sha256 is empty"):
        e2e.image_source(make_cfg(vm={"image": "https://example.invalid/x.img"}))
    found = e2e.check_image(make_cfg(vm={"distro": "plan9"}))
    assert not found.ok and "vm.distro is 'plan9'" in found.detail


def test_the_repository_catalogue_resolves(make_cfg: Callable[..., Config]) -> None:
    for arch in ("x86_64", "aarch64"):
        src = e2e.image_source(make_cfg(vm={"arch": arch}))
        assert src.urls and src.urls[0].startswith("https://") and len(src.digest) in (64, 128)


def test_teardown_runs_after_a_failing_check(make_cfg: Callable[..., Config]) -> None:
    calls, stack = run(make_cfg(), lambda stack: calls_so_far(stack), failed=True)
    assert calls == ["inv up", "checks", "diagnostics", "inv down", "nothing left"]
    rows = [name for name, _ in stack.timings.rows]
    assert rows == [
        "inv up (from nothing)",
        "inv up: iso",
        "inv up: vm.run",
        "inv down",
        "nothing left after inv down",
    ]
    assert dict(stack.timings.rows)["inv up: vm.run"] == pytest.approx(7.3)


def calls_so_far(stack: e2e.Stack) -> None:
    stack.inv.calls.append("checks")  # type: ignore[attr-defined]


def test_teardown_runs_after_a_failing_bring_up_and_the_error_goes_on(
    make_cfg: Callable[..., Config],
) -> None:
    calls: list[str] = []
    with pytest.raises(e2e.InvCommandFailed, match="`inv up` exited 1"):
        run(make_cfg(), calls_so_far, fail=["up"], calls=calls)
    assert calls == ["inv up", "diagnostics", "inv down", "nothing left"]  # no checks


def test_keep_skips_teardown_even_on_failure(make_cfg: Callable[..., Config]) -> None:
    calls, _ = run(make_cfg(), keep=True, failed=True)
    assert calls == ["inv up", "diagnostics"]


@pytest.mark.parametrize("interruption", [RuntimeError("bug in a check"), KeyboardInterrupt("SIGTERM")])
def test_teardown_runs_after_an_exception_or_ctrl_c_and_keeps_going(
    make_cfg: Callable[..., Config], interruption: BaseException
) -> None:
    def boom(stack: e2e.Stack) -> None:
        stack.inv.calls.append("checks")  # type: ignore[attr-defined]
        raise interruption

    calls: list[str] = []
    with pytest.raises(type(interruption)):  # the interruption carries on, not the teardown's error
        run(make_cfg(), boom, fail=["down"], calls=calls)
    # a failing teardown step does not stop the check after it
    assert calls == ["inv up", "checks", "diagnostics", "inv down", "nothing left"]


def test_a_teardown_error_fails_a_run_whose_checks_passed(make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(e2e.InvCommandFailed, match="`inv down` exited 1"):
        run(make_cfg(), fail=["down"])


def test_all_passing_run_tears_down_without_diagnostics(make_cfg: Callable[..., Config]) -> None:
    calls, _ = run(make_cfg())
    assert calls == ["inv up", "inv down", "nothing left"]


# ================================================================================================= report ==
def test_timing_table_round_trip(tmp_path: Path) -> None:
    timings = e2e.Timings()
    for row in [
        ("preflight", 3.25),
        ("inv up: boot", 35.5),
        ("inv up: cloud-init", 120.0),
        ("inv up: deploy.data", 90.25),
    ]:
        timings.add(*row)
    table = timings.write(tmp_path / "r")
    text = table.read_text()
    assert text.splitlines()[0].startswith("| phase")
    assert re.search(r"\| inv up: cloud-init\s+\|\s+120\.0 \|", text)
    assert json.loads((tmp_path / "r" / "timings.json").read_text())[3] == {
        "phase": "inv up: deploy.data",
        "seconds": 90.25,
    }


def test_each_action_records_its_nomad_exchanges_under_its_name(
    make_cfg: Callable[..., Config], tmp_path: Path
) -> None:
    from e2e.nomad_recording import Recorder

    recorder = Recorder(tmp_path / "rec.jsonl")
    seen: list[str] = []

    def inv(args: Sequence[str], *, timeout: float) -> e2e.InvResult:
        seen.append(recorder.scenario)
        return e2e.InvResult(list(args), 0, 1.0, [])

    stack = e2e.Stack(make_cfg(), inv, e2e.Smoke(make_cfg()), e2e.Timings(), recorder)
    bake = e2e.Action("bake", call=lambda stack: seen.append(f"python step under {recorder.scenario}"))
    for action in (bake, *UP, *DOWN):
        e2e.run_action(stack, action)
    assert seen == ["python step under bake", "inv up (from nothing)", "inv down"]
    assert [name for name, _ in stack.timings.rows] == ["bake", "inv up (from nothing)", "inv down"]
    recorder.close()
