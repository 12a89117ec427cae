"""The app's dependency pins: one list (app/requirements.in), compiled into the image's hashed list."""

from __future__ import annotations

import re

from infra import ROOT


# ------------------------------------------------------------------------------------------------------
def test_app_requirements_are_compiled_from_the_one_list_of_pins() -> None:
    """app/requirements.in pins the app's dependencies once; app/requirements.txt (the image) and
    requirements/constraints.txt (these tests) carry the same versions, and every pin of the image has hashes."""
    pin = r"^([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([^\s\\;]+)"

    def norm(name: str) -> str:  # PEP 503 name
        return re.sub(r"[-_.]+", "-", name).lower()

    wanted = {norm(n): v for n, v in re.findall(pin, (ROOT / "app/requirements.in").read_text(), re.M)}
    image = (ROOT / "app/requirements.txt").read_text()
    image_pins = {norm(n): v for n, v in re.findall(pin, image, re.M)}
    constraints = {
        norm(n): v for n, v in re.findall(pin, (ROOT / "requirements/constraints.txt").read_text(), re.M)
    }
    assert set(wanted) == {"confluent-kafka", "psycopg", "waitress"}
    for name, version in wanted.items():
        assert image_pins.get(name) == version, name
        assert constraints.get(name) == version, name
    assert image_pins["psycopg-binary"] == wanted["psycopg"]  # the [binary] extra, same release
    assert "pyproject" not in image and "confluent" not in (ROOT / "pyproject.toml").read_text()
    for name in image_pins:  # every pin carries hashes: the Dockerfile installs with --require-hashes
        assert re.search(
            rf"^{re.escape(name)}==\S+ .*\\\n\s+--hash=sha256:[0-9a-f]{{64}}", image, re.M | re.I
        ), name
