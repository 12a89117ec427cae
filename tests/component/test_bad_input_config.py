"""Bad-input battery, configuration surface (issue 10, items 13-15): every bad config file, INVOKE_*
variable, command-line value and configuration key gets one `error:` line naming the file/key/flag, a
non-zero exit, and leaves nothing behind.

Each CLI case runs twice: through the installed `inv` script (infra/cli.py) and through invoke's own Program
(`python -m invoke`, which tasks.py adopts), because an installer that races on the `inv` script both wheels
ship (uv) may leave invoke's in place.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.badinput import (
    FIFO,
    PROGRAMS,
    assert_one_error,
    files_under,
    make_files,
    temp_leftovers,
    unwritable_dir,
)
from support.servers.common import processes_of

from infra.core.errors import ConfigError
from infra.vm import baseimages


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    phrase: str  # must appear in the one `error:` line
    code: int = 1
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # created in tmp_path; "{tmp}" in args/env
    state: str = ""  # "" | "file" | "under-file" | "unwritable": the shape of the state dir

    @property
    def invoke_level(self) -> bool:
        """Handled by invoke's machinery (file loading, env casting, argument parsing) rather than by
        infra/core/config.py: run through both programs."""
        return self.id.startswith(("f-", "env-", "flag-", "task-"))


YAML_FILE = ("-f", "{tmp}/my.yaml", "iso")

CASES = [
    # -- the -f file (item 13, 14)
    Case("f-missing", ("-f", "{tmp}/missing.yaml", "iso"), "config file {tmp}/missing.yaml (-f): no such file"),
    Case("f-missing-via-env", ("iso",), "missing.yaml (-f): no such file",
         env={"INVOKE_RUNTIME_CONFIG": "{tmp}/missing.yaml"}),
    Case("f-directory", ("-f", "{tmp}/dir.yaml", "iso"), "dir.yaml (-f): is a directory", files={"dir.yaml/x": b""}),
    Case("f-not-yaml-suffix", ("-f", "{tmp}/my.txt", "iso"), "expected a .yaml, .yml or .json file",
         files={"my.txt": b"vm: {}\n"}),
    Case("f-malformed", YAML_FILE, "my.yaml:2:1: malformed YAML", files={"my.yaml": b"vm: [\n"}),
    Case("f-binary", YAML_FILE, "my.yaml is binary (a NUL byte at offset 7)", files={"my.yaml": b"\x7fELF\x02\x01\x01\x00\x00"}),
    Case("f-not-utf8", YAML_FILE, "my.yaml is not UTF-8 text", files={"my.yaml": b"vm: {accel: t\xe9cg}\n"}),
    Case("f-huge", YAML_FILE, "my.yaml is larger than 1024 KiB", files={"my.yaml": b"# x\n" * 300_000}),
    Case("f-deep", YAML_FILE, "my.yaml: malformed YAML: nested too deeply",
         files={"my.yaml": b"vm: " + b"[" * 50_000 + b"]" * 50_000 + b"\n"}),
    # issue 23, item 9: a 472-byte alias bomb grew to 4.1 GB; a FIFO hung the read
    Case("f-alias-bomb", YAML_FILE, "my.yaml: refused YAML: its aliases expand to more than 100000 nodes",
         files={"my.yaml": b"a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                + b"".join(b"%c: &%c [" % (n, n) + b", ".join([b"*%c" % (n - 1)] * 9) + b"]\n" for n in b"bcdefghi")}),
    Case("f-alias-recursive", YAML_FILE, "my.yaml: refused YAML: an alias refers to a node that contains it",
         files={"my.yaml": b"vm: &a {x: *a}\n"}),
    Case("f-fifo", YAML_FILE, "config file {tmp}/my.yaml (-f): not a regular file", files={"my.yaml": FIFO}),
    Case("f-python-tag", YAML_FILE, "my.yaml:1:5: malformed YAML: could not determine a constructor",
         files={"my.yaml": b"vm: !!python/object/apply:os.system [true]\n"}),
    Case("f-number-key", YAML_FILE, "key 1 under vm. is not a name", files={"my.yaml": b"vm: {1: 2}\n"}),
    Case("f-list", YAML_FILE, "expected a mapping of configuration keys at the top level, got a list",
         files={"my.yaml": b"- vm\n- accel\n"}),
    Case("f-scalar", YAML_FILE, "at the top level, got a string", files={"my.yaml": b"just words\n"}),
    Case("f-section-null", YAML_FILE, "configuration key vm must be a mapping, got null", files={"my.yaml": b"vm: null\n"}),
    Case("f-section-list", YAML_FILE, "configuration key vm must be a mapping, got a list", files={"my.yaml": b"vm: [1]\n"}),
    Case("f-nested-null", YAML_FILE, "configuration key vm.ports.ssh must be a mapping, got null",
         files={"my.yaml": b"vm: {ports: {ssh: null}}\n"}),
    Case("f-leaf-mapping", YAML_FILE, "configuration key vm.cpus must be a number, got a mapping",
         files={"my.yaml": b"vm: {cpus: {n: 2}}\n"}),
    Case("f-unknown-key", YAML_FILE, "unknown configuration key vm.acel (did you mean vm.accel?)",
         files={"my.yaml": b"vm: {acel: tcg}\n"}),  # already worked before issue 10
    Case("f-wrong-type", YAML_FILE, "configuration key vm.accel is 'fast'; expected one of",
         files={"my.yaml": b"vm: {accel: fast}\n"}),  # already worked
    # -- INVOKE_* variables (item 13)
    Case("env-cpus-not-a-number", ("iso",), "INVOKE_VM_CPUS='abc': configuration key vm.cpus must be a number",
         env={"INVOKE_VM_CPUS": "abc"}),
    Case("env-port-not-a-number", ("iso",), "INVOKE_VM_PORTS_SSH_HOST='22x'", env={"INVOKE_VM_PORTS_SSH_HOST": "22x"}),
    Case("env-list", ("iso",), "provision.packages is a list, which invoke cannot read from the environment",
         env={"INVOKE_PROVISION_PACKAGES": "curl"}),
    Case("env-false-means-true", ("iso",), "INVOKE_PROVISION_NOMAD='false' would mean true",
         env={"INVOKE_PROVISION_NOMAD": "false"}),  # already worked
    # -- command-line values (item 13)
    Case("flag-timeout-abc", ("nomad.wait", "--timeout", "abc"), "--timeout of nomad.wait must be an integer, got 'abc'",
         code=2),
    Case("flag-timeout-equals", ("nomad.wait", "--timeout=1.5"), "--timeout of nomad.wait must be an integer", code=2),
    Case("flag-lines-abc", ("vm.logs", "--lines", "many"), "--lines of vm.logs must be an integer, got 'many'", code=2),
    Case("flag-unknown", ("iso", "--nope"), "No idea what '--nope' is!", code=2),
    Case("task-unknown", ("isoo",), "No idea what 'isoo' is!", code=2),
    # -- values the types alone do not catch (item 15)
    Case("cpus-zero", ("iso",), "vm.cpus must be a whole number >= 1, got 0", env={"INVOKE_VM_CPUS": "0"}),
    Case("cpus-negative", ("iso",), "vm.cpus must be a whole number >= 1, got -2", env={"INVOKE_VM_CPUS": "-2"}),
    Case("cpus-fraction", YAML_FILE, "vm.cpus must be a whole number >= 1, got 1.5", files={"my.yaml": b"vm: {cpus: 1.5}\n"}),
    Case("memory-zero", ("iso",), "vm.memory_mb must be a whole number >= 1, got 0", env={"INVOKE_VM_MEMORY_MB": "0"}),
    Case("disk-negative", ("iso",), "vm.disk_gb must be a whole number >= 1, got -5", env={"INVOKE_VM_DISK_GB": "-5"}),
    Case("retries-negative", ("iso",), "nomad.retries must be a whole number, got -1", env={"INVOKE_NOMAD_RETRIES": "-1"}),
    Case("timeout-zero", ("iso",), "nomad.read_timeout must be a number of seconds > 0", env={"INVOKE_NOMAD_READ_TIMEOUT": "0"}),
    Case("kafka-ports-differ", ("iso",), "vm.ports.kafka.host (19093) and vm.ports.kafka.guest (19092) must be equal",
         env={"INVOKE_VM_PORTS_KAFKA_HOST": "19093"}),
    Case("port-out-of-range", ("iso",), "vm.ports.nomad.host must be a port 1-65535, got 70000",
         env={"INVOKE_VM_PORTS_NOMAD_HOST": "70000"}),  # already worked
    Case("ports-taken-twice", ("iso",), "both use host port 2222", env={"INVOKE_VM_PORTS_NOMAD_HOST": "2222"}),  # worked
    Case("user-with-space", ("iso",), "ssh.user is 'my user': not a valid user name", env={"INVOKE_SSH_USER": "my user"}),
    Case("user-upper-case", ("iso",), "ssh.user is 'Ops': not a valid user name", env={"INVOKE_SSH_USER": "Ops"}),
    # issue 23, item 5: full matches: a trailing newline is not a valid value
    Case("user-trailing-newline", ("iso",), "ssh.user is 'ops\\n': not a valid user name", env={"INVOKE_SSH_USER": "ops\n"}),
    Case("hostname-trailing-newline", ("iso",), "provision.hostname is 'web-1\\n': not a valid host name",
         env={"INVOKE_PROVISION_HOSTNAME": "web-1\n"}),
    # issue 23, item 4: provision.packages are Debian package names (Policy 5.6.1), never apt options
    Case("packages-apt-option", YAML_FILE, "provision.packages[0] is '-s': not a Debian package name",
         files={"my.yaml": b'provision: {packages: ["-s", "jq"]}\n'}),
    Case("packages-apt-config", YAML_FILE,
         "provision.packages[1] is '-oAPT::Get::AllowUnauthenticated=true': not a Debian package name",
         files={"my.yaml": b'provision: {packages: ["jq", "-oAPT::Get::AllowUnauthenticated=true"]}\n'}),
    Case("packages-bad-version", YAML_FILE, "provision.packages[0] is 'jq=latest': not a Debian package name",
         files={"my.yaml": b'provision: {packages: ["jq=latest"]}\n'}),
    Case("packages-not-a-string", YAML_FILE, "provision.packages[0] is ['jq', '1.6']: not a Debian package name",
         files={"my.yaml": b'provision: {packages: [[jq, "1.6"]]}\n'}),
    Case("packages-trailing-newline", YAML_FILE, "provision.packages[0] is 'jq\\n': not a Debian package name",
         files={"my.yaml": b'provision: {packages: ["jq\\n"]}\n'}),
    Case("hostname-semicolon", ("iso",), "provision.hostname is 'nomad;reboot': not a valid host name",
         env={"INVOKE_PROVISION_HOSTNAME": "nomad;reboot"}),
    Case("hostname-empty", ("iso",), "provision.hostname is '': not a valid host name", env={"INVOKE_PROVISION_HOSTNAME": ""}),
    Case("state-dir-comma", ("iso",), "project.state_dir is '{tmp}/a,b': a comma is not allowed",
         env={"INVOKE_PROJECT_STATE_DIR": "{tmp}/a,b"}),
    Case("state-dir-is-a-file", ("iso",), "project.state_dir: {tmp}/state is not a directory", state="file"),
    Case("state-dir-under-a-file", ("iso",), "project.state_dir: {tmp}/state/sub is not writable (Not a directory)",
         state="under-file"),
    Case("state-dir-unwritable", ("iso",), "project.state_dir: {tmp}/state is not writable", state="unwritable"),
    Case("vm-run-state-dir-is-a-file", ("vm.run",), "{tmp}/state is not a directory", state="file",
         env={"INVOKE_VM_ACCEL": "tcg"}),  # before any image download
    Case("up-state-dir-unwritable", ("up",), "project.state_dir: {tmp}/state is not writable", state="unwritable"),
    # -- the Nomad address (item 13)
    Case("nomad-addr-bad-ipv6", ("nomad.wait", "--timeout", "1"), "Nomad address 'http://[::1' (NOMAD_ADDR) is not a valid URL",
         env={"NOMAD_ADDR": "http://[::1"}),
    Case("nomad-addr-port-range", ("nomad.wait", "--timeout", "1"), "Port out of range", env={"NOMAD_ADDR": "http://127.0.0.1:99999"}),
    Case("nomad-addr-config-key", ("nomad.wait", "--timeout", "1"), "Nomad address 'http://h:port' (config nomad.addr) is not a valid URL",
         env={"INVOKE_NOMAD_ADDR": "http://h:port"}),
    Case("nomad-addr-scheme", ("nomad.wait", "--timeout", "1"), "must start with http:// or https://",
         env={"NOMAD_ADDR": "ftp://127.0.0.1:4646"}),  # already worked
]  # fmt: skip


@contextlib.contextmanager
def state_shape(shape: str, state: Path) -> Iterator[None]:
    if shape in ("file", "under-file"):
        state.write_text("not a directory\n")
    if shape == "unwritable":
        with unwritable_dir(state):
            yield
        return
    yield


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


RUNS = [(c, p) for c in CASES for p in (sorted(PROGRAMS) if c.invoke_level else ["inv"])]


@pytest.mark.parametrize(("case", "program"), RUNS, ids=[f"{c.id}-{p}" for c, p in RUNS])
def test_bad_config_input_is_one_error_line(
    case: Case, program: str, run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    make_files(tmp_path, case.files)
    state = tmp_path / "state"
    env = {k: _fill(v, tmp_path) for k, v in case.env.items()}
    if case.state == "under-file":
        env["INVOKE_PROJECT_STATE_DIR"] = str(state / "sub")

    with state_shape(case.state, state):
        before = files_under(tmp_path)
        result = run_inv(
            *(_fill(a, tmp_path) for a in case.args), env=env, program=PROGRAMS[program], timeout=300
        )

        after = files_under(tmp_path)

    assert result.returncode == case.code, result.stderr
    assert_one_error(result.stderr, _fill(case.phrase, tmp_path))
    assert result.stdout == ""
    assert after == before  # no ISO, no key, no state of any kind
    assert temp_leftovers(tmp_path) == []
    assert processes_of(tmp_path) == []


def test_a_good_config_file_still_works(run_inv: Callable[..., Any], tmp_path: Path) -> None:
    """The control: the same path with a valid -f file builds the ISO with its values."""
    mine = tmp_path / "my.yaml"
    mine.write_text(
        "provision: {hostname: web-1, nomad: false, packages: [jq, 'libc6=2.36-9+deb12u4']}\n# comment\n"
    )
    result = run_inv("-f", str(mine), "iso")
    assert result.returncode == 0, result.stderr
    assert b"hostname: web-1" in (tmp_path / "state" / "user-data").read_bytes()
    assert b"- libc6=2.36-9+deb12u4" in (tmp_path / "state" / "user-data").read_bytes()


@pytest.mark.parametrize("shape", ["file", "unwritable"])
def test_cache_dir_that_cannot_hold_a_download_is_refused_before_downloading(
    shape: str, make_cfg: Callable[..., Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    digest = hashlib.sha256(b"image").hexdigest()
    cfg = make_cfg(vm={"image": "https://no-such-host.invalid/a.img", "image_sha256": digest})
    if shape == "file":
        cache.write_text("not a directory\n")
        with pytest.raises(ConfigError, match=r"project\.cache_dir: .*/cache is not a directory"):
            baseimages.ensure(cfg, "x86_64")
        assert cache.read_text() == "not a directory\n"
    else:
        with (
            unwritable_dir(cache),
            pytest.raises(ConfigError, match=r"project\.cache_dir: .* is not writable"),
        ):
            baseimages.ensure(cfg, "x86_64")
        assert files_under(cache) == []
    assert temp_leftovers(tmp_path) == []


def test_inv_is_the_projects_program(run_inv: Callable[..., Any]) -> None:
    """The installed `inv` is infra/cli.py's (pip installs it after invoke's script of the same name; nox
    reinstalls the project to the same effect under uv), so even invoke's earliest errors are one line."""
    result = run_inv("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("infra-lab (invoke) ")


@pytest.mark.parametrize(("content", "phrase"), [(b"vm: null\n", "configuration key vm must be a mapping, got null"),
                                                 (b"vm: [\n", ".invoke.yaml:2:1: malformed YAML")])  # fmt: skip
def test_a_bad_user_config_file_is_one_error_line(
    content: bytes, phrase: str, run_inv: Callable[..., Any], tmp_path: Path
) -> None:
    """~/.invoke.yaml is read before the task namespace is loaded: only the project's `inv` sees it."""
    (tmp_path / ".invoke.yaml").write_bytes(content)
    result = run_inv("iso", env={"HOME": str(tmp_path)})
    assert result.returncode == 1
    assert_one_error(result.stderr, phrase)
    assert files_under(tmp_path / "state") == []
