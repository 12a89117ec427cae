"""tasks.py wiring: the namespaces and their help, seen through the real `inv` CLI."""

from __future__ import annotations

import re

EXPECTED = {
    "iso.build (iso)",
    "vm.run", "vm.stop", "vm.status", "vm.ssh", "vm.logs", "vm.check", "vm.destroy",
    "nomad.wait",
    "deploy.data", "deploy.app", "deploy.ingress",
    "up", "down", "status", "purge",
}  # fmt: skip


def test_inv_list_shows_every_task_with_help(run_inv) -> None:  # type: ignore[no-untyped-def]
    result = run_inv("--list")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^  (\S+(?: \(\w+\))?)\s{2,}(\S.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert set(rows) >= EXPECTED, f"missing: {EXPECTED - set(rows)}"
    assert all(len(help_text) > 10 for help_text in rows.values())
