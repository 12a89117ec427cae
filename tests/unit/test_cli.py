"""infra/cli.py pieces that need no process: what an unexpected error may print."""

from __future__ import annotations

import signal
import sys
import types

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


def test_a_ctrl_c_python_could_not_raise_is_given_back_not_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A KeyboardInterrupt inside a callback Python cannot raise from (seen: the import system's module-lock
    weakref callback during a lazy import) reaches sys.unraisablehook, whose default prints "Exception
    ignored ... Traceback" and drops the Ctrl-C. cli's hook prints nothing and delivers a new SIGINT."""
    info = types.SimpleNamespace(
        exc_type=KeyboardInterrupt,
        exc_value=KeyboardInterrupt(),
        exc_traceback=None,
        err_msg=None,
        object=None,
    )
    # Python's own SIGINT handler, whatever this process inherited: a test run started in the background
    # from a non-interactive shell inherits SIGINT ignored, and Python then installs no handler at all
    # (seen: this test failed when the test command ran under `nohup ... &`).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            cli._unraisable(info)
            for _ in range(1000):  # the signal handler runs at the next bytecode boundary of the main thread
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == ""


def test_other_unraisable_exceptions_keep_pythons_report(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    monkeypatch.setattr(sys, "__unraisablehook__", seen.append)
    info = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("boom"))
    cli._unraisable(info)
    assert seen == [info]
