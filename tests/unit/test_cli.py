"""infra/cli.py pieces that need no process: what an unexpected error may print."""

from __future__ import annotations

import pytest

from infra import cli


def test_unexpected_error_text_hides_the_token_and_control_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOMAD_TOKEN", "s3cr3t-token\n")
    exc = ValueError("bad header value: 's3cr3t-token\\n' from \x1b[31mred\x1b[0m server")
    text = cli._printable(exc)
    assert "s3cr3t" not in text
    assert "<redacted>" in text
    assert "\x1b" not in text and "\ufffd[31mred" in text


def test_unexpected_error_text_is_one_bounded_line() -> None:
    text = cli._printable(RuntimeError("line one\nline two " + "x" * 1000))
    assert "\n" not in text and text.startswith("line one line two") and len(text) == 500
    assert cli._printable(RuntimeError()) == "RuntimeError"
