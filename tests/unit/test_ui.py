"""infra/core/ui.py and the redaction it applies (infra/core/errors.py): every line printed is made printable, hides
passwords inside URLs and is never parsed as rich markup (issue 23, items 2 and 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from infra.core import ui
from infra.core.errors import REDACTED, printable, redact_urls, url_secrets
from infra.vm import baseimages


@pytest.mark.parametrize(
    ("text", "shown", "secrets"),
    [
        ("http://user:pw@127.0.0.1:4646", f"http://user:{REDACTED}@127.0.0.1:4646", ["pw"]),
        ("at https://TOKEN123@github.com/x.git", f"at https://{REDACTED}@github.com/x.git", ["TOKEN123"]),
        (
            "http://u:p@ss@h:1/v1?q=a@b",
            f"http://u:{REDACTED}@h:1/v1?q=a@b",
            ["p@ss"],
        ),  # a raw @ in the password
        (
            "postgresql://app:s3cr3t@10.0.2.15:5432/app",
            f"postgresql://app:{REDACTED}@10.0.2.15:5432/app",
            ["s3cr3t"],
        ),
        ("'http://a:b@c' and ftp://d:e@f", f"'http://a:{REDACTED}@c' and ftp://d:{REDACTED}@f", ["b", "e"]),
        ("http://127.0.0.1:4646/v1/jobs", "http://127.0.0.1:4646/v1/jobs", []),  # no userinfo: unchanged
        ("mail ops@example.com", "mail ops@example.com", []),  # not a URL
        ("http://host/path@x", "http://host/path@x", []),  # the @ is in the path, not the authority
    ],
)
def test_redact_urls_hides_every_userinfo_password(text: str, shown: str, secrets: list[str]) -> None:
    assert redact_urls(text) == shown
    assert url_secrets(text) == secrets
    assert printable(text) == shown  # what every message passes through


def _captured(fn: Callable[[], object]) -> str:
    with ui.console.capture() as cap:
        fn()
    return cap.get()


@pytest.mark.parametrize("emit", [ui.info, ui.step, ui.ok, ui.skip, ui.warn])
def test_every_line_is_printable_literal_and_redacted(emit: Callable[[str], None]) -> None:
    text = "job web\x1b[2J\x1b]0;pwned\x1b\\ in /tmp/st[/x] [red]x[/red] :smile: at http://u:hunter2@h:1 \\"
    out = _captured(lambda: emit(text))
    assert "\x1b" not in out
    assert "hunter2" not in out and f"http://u:{REDACTED}@h:1" in out
    assert "web\\x1b[2J\\x1b]0;pwned\\x1b\\ in /tmp/st[/x] [red]x[/red] :smile: at" in out
    assert out.rstrip("\n").endswith(" \\")  # a trailing backslash printed once, as given


def test_the_live_line_and_stdout_values_too(capsys: pytest.CaptureFixture[str]) -> None:
    def live() -> None:
        with ui.live("deploying [bold]web\x07") as line:
            line.update("job [/x] at http://u:pw@h", "3s")

    out = _captured(live)
    assert "deploying [bold]web\\x07" in out and f"job [/x] at http://u:{REDACTED}@h 3s" in out
    ui.out("http://u:pw@h \x1b[31m")
    assert capsys.readouterr().out == f"http://u:{REDACTED}@h \\x1b[31m\n"


def test_the_plain_http_warning_of_vm_image_hides_its_password(make_cfg: Callable[..., Any]) -> None:
    """Issue 23, item 2: the warning named the URL with its password."""
    cfg = make_cfg(vm={"image": "http://mirror:hunter2@images.example/x.img", "image_sha256": "0" * 64})
    out = _captured(lambda: baseimages.source_for(cfg, "x86_64"))
    assert (
        "hunter2" not in out
        and f"vm.image http://mirror:{REDACTED}@images.example/x.img is plain http" in out
    )
