"""Bad-input battery: task options out of range. Each is refused with one `error:` line and exit 2 before
anything is touched (no state dir is made, no Nomad request is sent: NOMAD_ADDR points at a closed port,
so a request would say "cannot reach Nomad" instead)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from badinput import assert_one_error, files_under

CASES = [
    (("nomad.wait", "--timeout", "-1"), "--timeout must be a positive number of seconds, not -1"),
    (("vm.stop", "--timeout", "0"), "--timeout must be a positive number of seconds, not 0"),
    (("vm.stop", "--timeout", "-7"), "--timeout must be a positive number of seconds, not -7"),
    (("vm.logs", "--lines", "-5"), "--lines must be 0 or more, not -5"),
    (("purge", "-j", ""), "-j/--job needs a job name"),
    (("purge", "-j", "app", "-j", " "), "-j/--job needs a job name"),
]


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
