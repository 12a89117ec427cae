"""Bad input and faults at the Nomad client surface, table-driven.

Each case runs the real `inv` CLI against the Nomad API double (or a hostile server) and asserts: the exit
code, the one `error: ...` line (no traceback, no token in the output, server bytes made printable), that
an error waiting cannot heal stopped the command at once (counted: the requests the double saw, not
seconds), and that nothing was left behind (no job registered, no temp or record files in the state dir).
No case measures time: a deadline's own behaviour is tested on a fake clock (tests/unit/test_waits.py,
tests/component/test_client.py); here a broken deadline would hang the `inv` run until its generous
subprocess timeout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from support.doubles.nomad_api import NomadAPIDouble
from support.http import DribblingServer
from support.servers.common import free_port

TOKEN = "tok-0123-secret"

JOB = """
job "web" {
  group "frontend" {
    task "server" {
      driver = "docker"
      config {
        image = "web:1"
      }
    }
  }
}
"""


@dataclass
class World:
    """What a case may set up: the double (ready), a job file, extra servers (stopped afterwards)."""

    tmp: Path
    double: NomadAPIDouble
    job: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    doubles: list[NomadAPIDouble] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOMAD_ADDR": self.double.url, "NOMAD_TOKEN": "", "NOMAD_CACERT": "", "NOMAD_REGION": "",
                "NOMAD_NAMESPACE": "", "INVOKE_DEPLOY_INGRESS_JOB": str(self.job),
                # generous: a request's limit only ends a hang (the double's HCL parse is slow on a busy machine)
                "INVOKE_NOMAD_READ_TIMEOUT": "300", **extra}  # fmt: skip

    def another_double(self, **kw: Any) -> NomadAPIDouble:
        d = NomadAPIDouble(**kw).ready_now().start()
        self.doubles.append(d)
        return d

    def http_server(self) -> HTTPServer:
        server = HTTPServer(host="127.0.0.1")
        server.start()
        self.cleanups.append(server.stop)
        return server

    def dribbling_server(self) -> str:
        """Headers at once, then one byte of body a second (every read succeeds)."""
        server = DribblingServer(500)
        self.cleanups.append(server.stop)
        return server.start()


def redirecting(w: World) -> dict[str, str]:
    other = w.http_server()
    other.expect_request(re.compile(".*")).respond_with_json({})
    first = w.http_server()
    first.expect_request(re.compile(".*")).respond_with_data(
        "", status=307, headers={"Location": other.url_for("/v1/agent/self")}
    )
    w.cleanups.insert(0, lambda: _assert_untouched(other))
    return w.env(NOMAD_ADDR=first.url_for("").rstrip("/"), NOMAD_TOKEN=TOKEN)


def _assert_untouched(server: HTTPServer) -> None:
    assert server.log == [], "the redirect target was contacted (with the token)"


def raw_bytes(w: World) -> dict[str, str]:
    server = w.http_server()
    server.expect_request(re.compile(".*")).respond_with_data(
        b"boom\x00\xff\x1b[2J\x1b]0;pwned\x07", status=500, content_type="text/plain"
    )
    return w.env(NOMAD_ADDR=server.url_for("").rstrip("/"))


def html(w: World) -> dict[str, str]:
    server = w.http_server()
    server.expect_request(re.compile(".*")).respond_with_data("<html>login</html>", content_type="text/html")
    return w.env(NOMAD_ADDR=server.url_for("").rstrip("/"))


def acl(w: World) -> dict[str, str]:
    return w.env(NOMAD_ADDR=w.another_double(acl_token=TOKEN).url)


def parse_no_leader(w: World) -> dict[str, str]:
    w.double.fail_next.append(("^/v1/jobs/parse$", 500, "No cluster leader"))
    return w.env()


def bad_hcl(w: World) -> dict[str, str]:
    w.job.write_text('job "web" {\n  group "g" {\n    count = \n  }\n}\n')
    return w.env()


def binary_job(w: World) -> dict[str, str]:
    w.job.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 50)
    return w.env()


def state_under_a_file(w: World) -> dict[str, str]:
    (w.tmp / "afile").write_text("")
    return w.env(INVOKE_DEPLOY_APP_JOB=str(w.job), INVOKE_PROJECT_STATE_DIR=str(w.tmp / "afile" / "state"))


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    env: Callable[[World], dict[str, str]]
    code: int
    message: str  # regex for the one `error: ...` line (or, code 0, for stderr)
    # "stopped at once": exactly this many requests per path regex reached the world's double (no retry,
    # no waiting on an error that waiting cannot heal)
    requests: tuple[tuple[str, int], ...] = ()
    stdout_json: Callable[[Any], bool] | None = None
    output_has: tuple[str, ...] = ()
    output_lacks: tuple[str, ...] = ()


CASES = [
    Case("token-with-newline", ("nomad.wait", "--timeout", "5"), lambda w: w.env(NOMAD_TOKEN=TOKEN + "\n"), 1,
         r"^error: NOMAD_TOKEN \(or nomad\.token\) contains a newline; .*\(16 characters given, not shown\)$"),
    Case("token-with-escape", ("deploy.ingress",), lambda w: w.env(NOMAD_TOKEN="tok\x1b[2Jsecret"), 1,
         r"^error: NOMAD_TOKEN \(or nomad\.token\) contains whitespace or a control character"),
    Case("addr-unclosed-bracket", ("nomad.wait",), lambda w: w.env(NOMAD_ADDR="http://[::1"), 1,
         r"^error: Nomad address 'http://\[::1' \(NOMAD_ADDR\) is not a valid URL"),
    Case("addr-port-out-of-range", ("status",), lambda w: w.env(NOMAD_ADDR="http://127.0.0.1:99999"), 1,
         r"^error: Nomad address 'http://127\.0\.0\.1:99999' \(NOMAD_ADDR\) is not a valid URL"),
    Case("addr-not-http", ("purge",), lambda w: w.env(NOMAD_ADDR="ftp://nomad"), 1,
         r"^error: Nomad address 'ftp://nomad' \(NOMAD_ADDR\) must start with http:// or https://$"),
    Case("redirect-not-followed", ("nomad.wait", "--timeout", "60"), redirecting, 1,
         r"^error: Nomad at http://127\.0\.0\.1:\d+ answered GET /v1/agent/self with HTTP 307, a redirect to "
         r"http://127\.0\.0\.1:\d+/v1/agent/self; redirects are not followed"),
    # deploy.ingress's first Nomad call: the read of its Nomad Variable (infra/compose/ingress.py publish)
    Case("server-bytes-made-printable", ("deploy.ingress",), raw_bytes, 1,
         r"^error: Nomad API GET /v1/var/nomad/jobs/web: HTTP 500: boom\\x00\ufffd\\x1b\[2J\\x1b\]0;pwned\\x07$"),
    Case("region-without-servers", ("nomad.wait", "--timeout", "60"), lambda w: w.env(NOMAD_REGION="mars"), 1,
         r"^error: Nomad API GET /v1/nodes: HTTP 500: No path to region$",
         output_has=("hint: Nomad knows no servers for region 'mars'",), requests=(("^/v1/nodes$", 1),)),
    Case("namespace-nonexistent", ("deploy.ingress",), lambda w: w.env(NOMAD_NAMESPACE="nope"), 1,
         r'^error: Nomad API POST /v1/job/web/plan: HTTP 500: job "web" is in nonexistent namespace "nope"$',
         output_has=("NOMAD_NAMESPACE",), requests=(("^/v1/job/web/plan$", 1), ("^/v1/jobs$", 0))),
    Case("token-missing-403", ("nomad.wait", "--timeout", "60"), acl, 1,
         r"^error: Nomad API GET /v1/nodes: HTTP 403: Permission denied$",
         output_has=("no token is set",)),
    Case("token-wrong-403", ("deploy.ingress",), lambda w: {**acl(w), "NOMAD_TOKEN": "wrong-" + TOKEN}, 1,
         r"^error: Nomad API GET /v1/var/nomad/jobs/web: HTTP 403: ACL token not found$"),
    Case("parse-no-leader-is-not-a-parse-error", ("deploy.ingress",), parse_no_leader, 1,
         r"^error: Nomad API POST /v1/jobs/parse: HTTP 500: No cluster leader$",
         output_has=("inv nomad.wait",), output_lacks=("could not parse",)),
    Case("parse-400-names-the-file", ("deploy.ingress",), bad_hcl, 1,
         r"^error: .*/web\.nomad\.hcl: Nomad could not parse the job: Failed to parse job: .*/web\.nomad\.hcl:3"),
    Case("job-file-missing", ("deploy.ingress",), lambda w: w.env(INVOKE_DEPLOY_INGRESS_JOB="/nonexistent/x.hcl"),
         1, r"^error: job file not found: /nonexistent/x\.hcl$"),
    Case("job-file-binary", ("deploy.ingress",), binary_job, 1,
         r"^error: job file .*/web\.nomad\.hcl is not UTF-8 text"),
    Case("status-json-403", ("status", "--json"), acl, 1, r"^error: Nomad API GET /v1/nodes: HTTP 403: Permission denied$",
         stdout_json=lambda r: r["nomad"]["error"].endswith("HTTP 403: Permission denied") and r["error"]),
    Case("status-json-not-nomad", ("status", "--json"), html, 1,
         r"^error: Nomad API GET /v1/agent/self: expected JSON, got text/html: '<html>login</html>'$",
         stdout_json=lambda r: "expected JSON" in r["nomad"]["error"]),
    Case("status-json-bad-address", ("status", "--json"), lambda w: w.env(NOMAD_ADDR="http://[::1"), 1,
         r"^error: Nomad address 'http://\[::1' \(NOMAD_ADDR\) is not a valid URL",
         stdout_json=lambda r: "is not a valid URL" in r["error"] and r["nomad"]["reachable"] is False),
    Case("status-json-token-with-newline", ("status", "--json"), lambda w: w.env(NOMAD_TOKEN=TOKEN + "\n"), 1,
         r"^error: NOMAD_TOKEN \(or nomad\.token\) contains a newline",
         stdout_json=lambda r: "contains a newline" in r["error"]),
    Case("status-json-unreachable-is-not-an-error", ("status", "--json"),
         lambda w: w.env(NOMAD_ADDR=f"http://127.0.0.1:{free_port()}"), 0, r"Nomad  http://127\.0\.0\.1:\d+: unreachable",
         stdout_json=lambda r: r["nomad"]["reachable"] is False and "error" not in r),
    Case("dribbling-server-keeps-the-deadline", ("nomad.wait", "--timeout", "3"),
         lambda w: w.env(NOMAD_ADDR=w.dribbling_server()), 2,
         r"^error: timed out after 3s waiting for Nomad at http://127\.0\.0\.1:\d+ .*: no answer from Nomad at "
         r"http://127\.0\.0\.1:\d+ within 3s"),
    Case("connection-refused-times-out", ("nomad.wait", "--timeout", "2"),
         lambda w: w.env(NOMAD_ADDR=f"http://127.0.0.1:{free_port()}"), 2,
         r"^error: timed out after 2s waiting for Nomad at .*: no answer from Nomad at http://127\.0\.0\.1:\d+ "
         r"within 2s \(Nomad API not answering \(.*[Cc]onnection refused"),
    Case("deploy-app-state-dir-not-a-directory", ("deploy.app", "--image", "web:2"), state_under_a_file, 1,
         r"^error: cannot write .*/afile/state/deployed\.json \(the record of the deployed image\): Not a directory$",
         output_has=("nothing was deployed",)),
    Case("logs-of-an-unknown-job", ("logs", "nope"), lambda w: w.env(), 1, r"^error: job nope is not registered$"),
    # issue 23, item 2: a password inside NOMAD_ADDR is never printed (errors, live lines, `inv status`)
    Case("addr-password-not-in-the-error", ("nomad.wait", "--timeout", "2"),
         lambda w: w.env(NOMAD_ADDR=f"http://ops:hunter2-secret@127.0.0.1:{free_port()}"), 2,
         r"^error: timed out after 2s waiting for Nomad .*http://ops:<redacted>@127\.0\.0\.1:\d+"),
    Case("addr-password-not-in-status", ("status",),
         lambda w: w.env(NOMAD_ADDR=f"http://ops:hunter2-secret@127.0.0.1:{free_port()}"), 0,
         r"Nomad  http://ops:<redacted>@127\.0\.0\.1:\d+: unreachable"),
    Case("addr-password-not-in-status-json", ("status", "--json"),
         lambda w: w.env(NOMAD_ADDR=f"http://ops:hunter2-secret@127.0.0.1:{free_port()}"), 0, r"",
         stdout_json=lambda r: r["nomad"]["reachable"] is False),
    Case("addr-password-with-an-at-sign", ("nomad.wait", "--timeout", "2"),
         lambda w: w.env(NOMAD_ADDR=f"http://ops:p@ss-secret@127.0.0.1:{free_port()}"), 2,
         r"^error: timed out after 2s .*http://ops:<redacted>@127\.0\.0\.1:\d+"),
    Case("basic-auth-over-plain-http-warns", ("nomad.wait", "--timeout", "2"),
         lambda w: w.env(NOMAD_ADDR="http://ops:hunter2-secret@nomad.invalid:4646"), 2, r"^error: ",
         output_has=("warning: the user name and password in http://ops:<redacted>@nomad.invalid:4646 go to "
                     "Nomad as HTTP Basic auth over plain http",)),
    Case("purge-of-an-unknown-job-is-fine", ("purge", "-j", "nope"), lambda w: w.env(), 0, r"nope: not registered"),
]  # fmt: skip


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    d = NomadAPIDouble(rpc_hold=0.2).ready_now().start()
    job = tmp_path / "web.nomad.hcl"
    job.write_text(JOB)
    w = World(tmp_path, d, job)
    w.doubles.append(d)
    yield w
    for fn in w.cleanups:
        fn()
    for x in w.doubles:
        x.stop()
        assert not x.errors, x.errors


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, run_inv: Any) -> None:
    env = case.env(world)
    result = run_inv(*case.args, env=env, timeout=120)  # only ends a hang (a deadline not kept)
    out = result.stdout + result.stderr
    assert result.returncode == case.code, out
    for path, count in case.requests:
        assert world.double.count(path) == count, (path, [(r.method, r.path) for r in world.double.requests])
    assert "Traceback" not in out and "Exception" not in out
    assert TOKEN not in out and "secret" not in out
    assert not any(ch in out for ch in "\x00\x1b\x07"), repr(out)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if case.code:
        assert len(errors) == 1, result.stderr
        assert re.search(case.message, errors[0]), errors[0]
    else:
        assert not errors and re.search(case.message, result.stderr, re.MULTILINE), result.stderr
    for text in case.output_has:
        assert text in result.stderr, result.stderr
    for text in case.output_lacks:
        assert text not in result.stderr, result.stderr
    if case.stdout_json is not None:
        assert case.stdout_json(json.loads(result.stdout)), result.stdout
    # nothing left behind: no job registered anywhere, no temp/record files
    for d in world.doubles:
        assert d.jobs == {}, sorted(d.jobs)
    state = world.tmp / "state"
    leftovers = [p.name for p in state.rglob("*")] if state.exists() else []
    assert not [n for n in leftovers if n.endswith((".tmp", ".part")) or n == "deployed.json"], leftovers


def test_a_job_id_with_terminal_escapes_and_markup_is_printed_literally(world: World, run_inv: Any) -> None:
    """Issue 23, item 3: the job ID comes back from /v1/jobs/parse and is printed on every line of the deploy
    ("deploying", live lines, "ok"): escape sequences never reach the terminal raw, rich markup in it is
    printed as written (no MarkupError, no colour), and so is a state dir whose name looks like markup."""
    evil = "web\x1b[2J\x1b]0;pwned\x1b\\[red]x"  # no "/": Nomad's HTTP router would take it for a path
    world.job.write_text(JOB.replace('job "web"', f'job "{evil}"'))
    state = world.tmp / "st[/x]"
    result = run_inv("deploy.ingress", env=world.env(INVOKE_PROJECT_STATE_DIR=str(state)), timeout=60)
    assert result.returncode == 0, result.stderr
    assert evil in world.double.jobs  # the double registered the job under that very ID
    out = result.stdout + result.stderr
    assert "\x1b" not in out, repr(out)
    assert "MarkupError" not in out and "Traceback" not in out
    shown = "web\\x1b[2J\\x1b]0;pwned\\x1b\\[red]x"
    lines = [line for line in result.stderr.splitlines() if shown in line]
    assert len(lines) >= 2, result.stderr  # the deploy's lines name the job, each made printable, literally


def test_purge_of_a_job_named_like_markup_prints_it_literally(world: World, run_inv: Any) -> None:
    """`inv purge -j 'web[/x]'`: a name the user gave, printed as given (it once raised MarkupError)."""
    result = run_inv("purge", "-j", "web[/x]", "-j", "[red]", env=world.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "web[/x]: not registered" in result.stderr and "[red]: not registered" in result.stderr
