"""Bad-input battery: task options out of range. Each is refused with one `error:` line and exit 2 before
anything is touched (no state dir is made, no Nomad request is sent: NOMAD_ADDR points at a closed port,
so a request would say "cannot reach Nomad" instead)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.badinput import assert_one_error, files_under

CASES = [
    (("nomad.wait", "--timeout", "-1"), "--timeout must be a positive number of seconds, not -1"),
    (("vm.stop", "--timeout", "-7"), "--timeout must be 0 (kill at once) or more seconds, not -7"),
    (("vm.logs", "--lines", "-5"), "--lines must be 0 or more, not -5"),
    (("purge", "-j", ""), "-j/--job needs a job name"),
    (("purge", "-j", "app", "-j", " "), "-j/--job needs a job name"),
    *[
        ((task, "--node", "nomad-4"), "--node 'nomad-4' is not a node of this configuration (vm.nodes is 1): "
         "known nodes are nomad-1")
        for task in ("vm.run", "vm.stop", "vm.ssh", "vm.logs", "vm.check", "vm.destroy", "vm.status")
    ],
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_option_out_of_range(
    run_inv: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
    args: tuple[str, ...],
    message: str,
) -> None:
    result = run_inv(*args, env={"NOMAD_ADDR": "http://127.0.0.1:9"})
    assert result.returncode == 2, result.stderr
    assert_one_error(result.stderr, message)
    assert files_under(tmp_path / "state") == []


def test_a_node_outside_the_cluster_and_follow_over_several_nodes(
    run_inv: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    env = {"NOMAD_ADDR": "http://127.0.0.1:9", "INVOKE_VM_NODES": "3"}
    result = run_inv("vm.destroy", "--node", "nomad-4", env=env)
    assert result.returncode == 2, result.stderr
    assert_one_error(result.stderr, "--node 'nomad-4' is not a node of this configuration (vm.nodes is 3): "
                     "known nodes are nomad-1, nomad-2, nomad-3")  # fmt: skip
    for name in ("nomad-1", "nomad-2", "nomad-3"):
        (tmp_path / "state" / "nodes" / name).mkdir(parents=True)
        (tmp_path / "state" / "nodes" / name / "serial.log").write_text(f"{name} console\n")
    result = run_inv("vm.logs", "--follow", env=env)
    assert result.returncode == 2, result.stderr
    assert_one_error(result.stderr, "--follow follows one node's log: add --node NAME")
    shown = run_inv("vm.logs", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"{n}| {n} console" for n in ("nomad-1", "nomad-2", "nomad-3")]


def test_two_nodes_are_refused_with_the_reason(
    run_inv: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    result = run_inv("vm.run", env={"INVOKE_VM_NODES": "2"})
    assert result.returncode != 0, result.stderr
    assert_one_error(result.stderr, "configuration key vm.nodes is 2: two Nomad servers cannot survive the loss "
                     "of one (Raft needs a majority, 2 of 2, to elect a leader)")  # fmt: skip
    assert "hint: use vm.nodes: 1 (one VM) or 3 or more" in result.stderr
    assert files_under(tmp_path / "state") == []
