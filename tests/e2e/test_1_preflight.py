"""The prerequisites, checked concurrently before anything starts; one message lists every missing one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from e2e.conftest import Preflight

pytestmark = pytest.mark.preflight


def test_prerequisites(
    preflight: Preflight, record_testsuite_property: Callable[[str, object], None]
) -> None:
    """every prerequisite present"""
    for f in preflight.findings:  # every check in the JUnit file, met or not
        record_testsuite_property(f"preflight: {f.name}", ("ok: " if f.ok else "MISSING: ") + f.detail)
    if preflight.failure is not None:
        pytest.fail(str(preflight.failure), pytrace=False)
    assert all(f.ok for f in preflight.findings), preflight.findings
