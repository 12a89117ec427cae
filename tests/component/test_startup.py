"""What `inv` loads before it works: each task imports only the heavy modules it uses (SSH: fabric and
paramiko; HCL: hcl2 and lark; the seed: jsonschema, pycdlib, cryptography; HTTP: requests; output: rich;
processes: psutil; none: unittest.mock and asyncio). Seen from the real CLI run as a subprocess with
`python -X importtime`, whose report names every module imported; the assertions are on those names, never
on time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.servers.common import blank_vm_settings, processes_of

INV = str(Path(sys.executable).with_name("inv"))  # the installed `inv` script (as tests/conftest.py runs it)

#: unittest (its mock) and asyncio: what invoke's own modules would import for MockContext (infra/cli.py).
HEAVY = {"fabric", "paramiko", "hcl2", "lark", "jsonschema", "pycdlib", "cryptography", "requests", "rich",
         "psutil", "unittest", "asyncio"}  # fmt: skip

_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +([\w.]+)$", re.M)


def imported(stderr: str) -> set[str]:
    """The top-level packages in `python -X importtime`'s report."""
    return {name.split(".")[0] for name in _IMPORTED.findall(stderr)}


def heavy_imports(run: subprocess.CompletedProcess[str]) -> set[str]:
    found = imported(run.stderr)
    assert "invoke" in found, run.stderr[-2000:]  # the report was read
    return found & HEAVY


def with_importtime(run_inv: Callable[..., subprocess.CompletedProcess[str]], *args: str,
                    env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return run_inv(*args, program=(sys.executable, "-X", "importtime", INV), env=env)


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (("--list",), set()),
        (("vm.status",), {"rich", "psutil"}),  # no VM: nothing to ask over SSH or HTTP
        (("vm.status", "--json"), {"rich", "psutil"}),
        (("status",), {"rich", "psutil", "requests"}),  # Nomad's API, the VM's process
        (("iso",), {"rich", "jsonschema", "pycdlib", "cryptography", "hcl2", "lark"}),  # renders + validates
    ],
)
def test_a_task_imports_only_what_it_uses(
    run_inv: Callable[..., subprocess.CompletedProcess[str]], args: tuple[str, ...], allowed: set[str]
) -> None:
    # Nomad refuses at once (port 9 on loopback: discard, nothing listens), no retries
    result = with_importtime(
        run_inv, *args, env={"NOMAD_ADDR": "http://127.0.0.1:9", "INVOKE_NOMAD_RETRIES": "0"}
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert heavy_imports(result) <= allowed, (
        f"inv {' '.join(args)} imported {heavy_imports(result) - allowed}"
    )


def test_an_unchanged_seed_is_not_validated_again(
    run_inv: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """The first `inv iso` checks the user-data against cloud-init's schema (jsonschema); a second one that
    renders the very bytes written last time keeps the verdict and does not even import jsonschema."""
    first = with_importtime(run_inv, "iso")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "jsonschema" in heavy_imports(first)
    second = with_importtime(run_inv, "iso")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "seed ISO unchanged" in second.stderr
    assert "jsonschema" not in heavy_imports(second)


@pytest.mark.tools("qemu-system-x86_64", "qemu-img")
def test_vm_run_of_a_local_image_imports_no_http_and_no_hcl(
    run_inv: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """`inv vm.run` of a local image, without Nomad in the seed: requests only comes with a download
    (infra/vm/baseimages.py), python-hcl2 only with job specs to read (infra/vm/bakecache.py)."""
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        json.dumps({"provision": {"nomad": False, "docker": False}, "vm": blank_vm_settings(tmp_path)})
    )
    try:
        result = with_importtime(run_inv, "-f", str(lab), "vm.run")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "VM started: pid" in result.stderr
        allowed = {"rich", "psutil", "jsonschema", "pycdlib", "cryptography"}  # output, the qemu, the seed
        assert heavy_imports(result) <= allowed, f"inv vm.run imported {heavy_imports(result) - allowed}"
    finally:
        stopped = run_inv("-f", str(lab), "vm.stop", "--timeout", "0")
    assert stopped.returncode == 0, stopped.stderr
    assert processes_of(tmp_path) == []
