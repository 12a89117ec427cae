"""Bad-input battery, deploy surface (`inv deploy.*` input cases; issue 10, items 13, 16, 19): an empty or
invalid --image, a state dir the deploy record cannot be written to, binary/huge/missing job files. Each
case runs the real `inv` against the stateful Nomad API double (tests/support/doubles/nomad_api.py) and checks the
exit code, the one `error:` line, and that nothing was left behind: no job registered (no POST /v1/jobs),
no Nomad Variable created, no deploy record, no temp file, no process.

Before issue 10, `--image ''` deployed the job file's default image, and an unwritable state dir failed
with a traceback AFTER the job was registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.badinput import (
    assert_one_error,
    files_under,
    temp_leftovers,
    unwritable_dir,
)
from support.doubles.nomad_api import NomadAPIDouble
from support.jobs import web_job
from support.servers.common import processes_of

#: A job in the double's HCL subset, declaring the variables deploy.app passes (image, version).
WEB_JOB = web_job(version_variable=True)


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    phrase: str
    code: int = 1
    jobs: dict[str, bytes | None] = field(default_factory=dict)  # data/app/ingress -> content (None: a dir)
    state: str = ""  # "" | "file" | "unwritable" | "record-dir"
    env: dict[str, str] = field(default_factory=dict)


APP = ("deploy.app", "--image", "web:2", "--detach")
CASES = [
    Case("image-empty", ("deploy.app", "--image", ""), "invalid image reference ''"),
    Case("image-flag-without-value", ("deploy.app", "--image"), "Flag --image needed value and was not given one", code=2),
    Case("image-blank", ("deploy.app", "--image", "  "), "invalid image reference ''"),
    Case("image-invalid", ("deploy.app", "--image", "Web App:latest"), "invalid image reference 'Web App:latest'"),  # worked
    Case("build-and-image", ("deploy.app", "--build", "--image", "web:2"), "--build and --image exclude each other"),  # worked
    Case("local-without-build", ("deploy.app", "--local"), "--local only applies with --build"),  # worked
    Case("state-dir-unwritable", APP, "cannot write {tmp}/state/deployed.json (the record of the deployed image): ", state="unwritable"),
    Case("state-dir-is-a-file", APP, "cannot write {tmp}/state/deployed.json (the record of the deployed image): Not a directory", state="file"),
    Case("record-is-a-directory", APP, "deployed.json (the record of the deployed image): it is not a file",
         state="record-dir"),
    Case("app-job-binary", APP, "job file {tmp}/jobs/app.nomad.hcl is binary (a NUL byte at offset 0)", jobs={"app": b"\x00\x01\x02HCL"}),
    Case("app-job-not-utf8", APP, "app.nomad.hcl is not UTF-8 text", jobs={"app": b'job "w\xe9b" {}\n'}),
    Case("app-job-huge", APP, "app.nomad.hcl is larger than 1024 KiB", jobs={"app": b"# padding\n" * 120_000}),
    Case("app-job-directory", APP, "app.nomad.hcl is a directory", jobs={"app": None}),
    Case("app-job-missing", APP, "job file not found: {tmp}/jobs/missing.nomad.hcl",
         env={"INVOKE_DEPLOY_APP_JOB": "{tmp}/jobs/missing.nomad.hcl"}),  # worked
    Case("app-job-empty", APP, "job file is empty", jobs={"app": b"\n\n"}),  # worked
    Case("data-job-binary", ("deploy.data", "--detach"), "datastorage.nomad.hcl is binary",
         jobs={"data": b"\x7fELF\x00"}),  # and no Postgres password variable created
    Case("ingress-job-binary", ("deploy.ingress", "--detach"), "ingress.nomad.hcl is not UTF-8 text",
         jobs={"ingress": b"\xff\xfe\x00"}),
    Case("nomad-addr-invalid", APP, "Nomad address 'http://[::1' (NOMAD_ADDR) is not a valid URL",
         env={"NOMAD_ADDR": "http://[::1"}),
]  # fmt: skip

JOB_NAMES = {"data": "datastorage.nomad.hcl", "app": "app.nomad.hcl", "ingress": "ingress.nomad.hcl"}


def deploy_env(tmp: Path, double: NomadAPIDouble, jobs: dict[str, bytes | None]) -> dict[str, str]:
    """Job files in tmp/jobs (WEB_JOB unless the case gives one), NOMAD_ADDR pointing at the double."""
    env = {"NOMAD_ADDR": double.url, "NOMAD_TOKEN": ""}
    for key, name in JOB_NAMES.items():
        path = tmp / "jobs" / name
        path.parent.mkdir(exist_ok=True)
        content = jobs.get(key, WEB_JOB.encode())
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        env[f"INVOKE_DEPLOY_{key.upper()}_JOB"] = str(path)
    return env


@contextlib.contextmanager
def state_shape(shape: str, state: Path) -> Iterator[None]:
    if shape == "file":
        state.write_text("not a directory\n")
    elif shape == "record-dir":
        (state / "deployed.json").mkdir(parents=True)
    if shape == "unwritable":
        with unwritable_dir(state):
            yield
        return
    yield


def nothing_registered(double: NomadAPIDouble) -> None:
    assert double.count(r"^/v1/jobs$", "POST") == 0, [r.path for r in double.requests]
    assert double.jobs == {}
    assert double.vars == {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_deploy_input_registers_nothing(
    case: Case, double: NomadAPIDouble, run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    env = deploy_env(tmp_path, double, case.jobs)
    env.update({k: v.replace("{tmp}", str(tmp_path)) for k, v in case.env.items()})
    state = tmp_path / "state"

    with state_shape(case.state, state):
        before = files_under(state)
        result = run_inv(*case.args, env=env, timeout=300)
        after = files_under(state)

    assert result.returncode == case.code, result.stderr
    assert_one_error(result.stderr, case.phrase.replace("{tmp}", str(tmp_path)))
    nothing_registered(double)
    assert after == before  # no deployed.json, nothing else
    assert temp_leftovers(tmp_path) == []
    assert processes_of(tmp_path) == []


def test_the_same_deploy_with_good_input_registers_the_job(
    double: NomadAPIDouble, run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    """The control: what the cases above break, intact, registers the job with the image given."""
    env = deploy_env(tmp_path, double, {})
    result = run_inv(*APP, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "web:2"
    assert double.count(r"^/v1/jobs$", "POST") == 1
    task = double.jobs["web"]["TaskGroups"][0]["Tasks"][0]
    assert task["Config"]["image"] == "web:2"
    assert temp_leftovers(tmp_path) == []
