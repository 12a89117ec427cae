"""Rewrite app/requirements.txt's `--hash` lines from PyPI's simple index (PEP 691 JSON).

The Dockerfile installs with `pip --require-hashes --only-binary=:all:`, so every pin needs the sha256 of
each wheel pip may choose on the image's platforms: Linux x86_64 / aarch64 (manylinux), CPython 3.11
(Debian bookworm's python3, the locally made base) to 3.13, plus pure-Python wheels. Run after changing a
pin:  python app/lock_requirements.py
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
PYTHONS = ("cp311", "cp312", "cp313")
ARCHES = ("x86_64", "aarch64")
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)")


def wanted(filename: str) -> bool:
    if not filename.endswith(".whl"):
        return False
    python, abi, platform = filename[:-4].split("-")[-3:]
    if platform == "any":
        return python.startswith("py3") or python.startswith("py2.py3")
    return (python in PYTHONS or abi == "abi3") and "manylinux" in platform and platform.endswith(ARCHES)


def hashes(name: str, version: str) -> list[str]:
    request = urllib.request.Request(
        f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - a fixed https URL
        files = json.load(response)["files"]
    norm = re.sub(r"[-_.]+", "_", name).lower()
    out = sorted(
        f["hashes"]["sha256"]
        for f in files
        if f["filename"].lower().startswith(f"{norm}-{version}-") and wanted(f["filename"])
    )
    if not out:
        sys.exit(f"{name}=={version}: no matching wheel on PyPI for {PYTHONS} / {ARCHES}")
    return out


def main() -> None:
    lines: list[str] = []
    for line in REQUIREMENTS.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("--hash") or stripped == "\\":
            continue
        match = PIN.match(stripped)
        if not match:
            lines.append(line)
            continue
        requirement = stripped.split("#")[0].strip().rstrip("\\").strip()
        digests = hashes(*match.groups())
        lines.append(requirement + " \\")
        lines.extend(f"    --hash=sha256:{d}" + (" \\" if i < len(digests) - 1 else "")
                     for i, d in enumerate(digests))  # fmt: skip
        print(f"{requirement}: {len(digests)} wheels", file=sys.stderr)
    REQUIREMENTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
