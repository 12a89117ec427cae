"""Every message the README quotes is one the tools really print.

A quoted message is a code span starting with `error:` or `warning:`. Each must have a producer here that
brings about the situation it describes and returns what the real `inv` CLI printed; the quote and the
output are compared with numbers and process names normalised. A new quote without a producer fails.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from infra import ROOT

QUOTE = re.compile(r"`((?:error|warning): [^`]+)`")
DOCS = ("README.md", "ARCHITECTURE.md")


def normalise(text: str) -> str:
    text = re.sub(r"\bpid \d+ \([^)]*\)", "pid N (PROCESS)", text)
    text = re.sub(r"\d+", "N", text)
    return " ".join(text.split())


def quotes() -> list[tuple[str, str]]:
    found = []
    for name in DOCS:
        # a code span may wrap across lines in the Markdown source
        text = " ".join((ROOT / name).read_text(encoding="utf-8").split())
        found += [(name, q) for q in QUOTE.findall(text)]
    return found


Run = Callable[..., subprocess.CompletedProcess[str]]


def port_taken(run_inv: Run, tmp_path: Path) -> str:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg_file = tmp_path / "ports.yaml"
        cfg_file.write_text(json.dumps({"vm": {"accel": "tcg", "ports": {"nomad": {"host": port}}}}))
        result = run_inv("-f", str(cfg_file), "vm.run")
    assert result.returncode != 0
    return result.stderr


PRODUCERS: dict[str, Callable[[Run, Path], str]] = {
    "error: host port": port_taken,
}


def test_the_readme_quotes_at_least_one_message() -> None:
    assert quotes(), "no quoted messages found: the QUOTE pattern no longer matches the docs"


def test_every_quoted_message_is_what_the_tool_prints(run_inv: Run, tmp_path: Path) -> None:
    for doc, quote in quotes():
        producer = next((p for prefix, p in PRODUCERS.items() if quote.startswith(prefix)), None)
        assert producer is not None, f"{doc} quotes {quote!r}, which no producer in {__file__} reproduces"
        printed = normalise(producer(run_inv, tmp_path))
        assert normalise(quote) in printed, f"{doc} quotes {quote!r}; the tool printed:\n{printed}"
