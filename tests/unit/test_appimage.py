"""Build-and-deploy orchestration (infra/compose/appimage.py): tags from a REAL temporary git repository, dirty
detection, the build context, and `ship` (build -> deploy -> report) against the STATEFUL NOMAD API DOUBLE
(tests/support/doubles/nomad_api.py: registrations, canary deployments, promotion, failing tasks, auto-revert).

The Docker engine here is `RecordingEngine`, a TEST DOUBLE that only remembers which tags it holds: real
builds with a real dockerd are tests/component/test_appimage.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from infra.compose import appimage
from infra.core.errors import BuildError


@pytest.mark.parametrize(
    ("ref", "version"),
    [
        ("infra-lab/app:0123456789ab", "0123456789ab"),
        ("ghcr.io/me/app:1.2.3", "1.2.3"),
        ("localhost:5000/app", "latest"),
        ("localhost:5000/app@sha256:" + "a" * 64, "aaaaaaaaaaaa"),
    ],
)
def test_image_references_and_their_versions(ref: str, version: str) -> None:
    assert appimage.check_ref(ref) == ref
    assert appimage.version_of(ref) == version


@pytest.mark.parametrize("ref", ["", "UPPER/app:1", "app:bad tag", "app:-x", "a//b"])
def test_bad_image_references_are_rejected(ref: str) -> None:
    with pytest.raises(BuildError, match="invalid image reference"):
        appimage.check_ref(ref)


def test_build_log_sink_shows_steps_only(tmp_path: Path) -> None:
    shown: list[str] = []

    class Line:
        def update(self, text: str) -> None:
            shown.append(text)

    out = io.StringIO()
    sink = appimage._LogSink(out, Line(), "building x")  # type: ignore[arg-type]
    sink.write("Sending build context\nStep 1/3 : FROM base\n ---> abc\nStep 2/3 : RU")
    sink.write("N pip install\nnoise\n")

    assert shown == ["building x: Step 1/3 : FROM base", "building x: Step 2/3 : RUN pip install"]
    assert out.getvalue().count("\n") == 5
