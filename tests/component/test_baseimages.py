"""infra.vm.baseimages: catalogue, download cache, resume, retries and checksum failures.

Downloads go to a real HTTP server on 127.0.0.1 (started by the `image_server` fixture, stopped after
each test) that can serve a corrupt body, cut the connection mid-body, ignore Range, or answer 404/503 —
the failures a mirror or a flaky network produce. The image is random bytes with a known sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.badinput import small_filesystem

from infra.core import config
from infra.core.errors import ImageError
from infra.vm import baseimages

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)

SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """What the server does with each request to /image.qcow2 (a queue of modes, then `default`)."""

    modes: list[str] = field(default_factory=list)
    default: str = "ok"
    requests: list[dict[str, str]] = field(default_factory=list)

    def next(self) -> str:
        return self.modes.pop(0) if self.modes else self.default


class Handler(http.server.BaseHTTPRequestHandler):
    behaviour: Behaviour

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        b = self.behaviour
        b.requests.append({"path": self.path, "range": self.headers.get("Range", "")})
        if self.path != "/image.qcow2":
            self.send_error(404)
            return
        mode = b.next()
        if mode == "503":
            self.send_error(503)
            return
        if mode == "endless":  # no Content-Length, a body that never ends (until the client hangs up)
            self.send_response(200)
            self.end_headers()
            self.close_connection = True
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(b"\0" * 65536)
            return
        if mode == "declares-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.wfile.write(PAYLOAD)
            return
        body = PAYLOAD
        if mode == "corrupt":
            body = bytes([PAYLOAD[0] ^ 0xFF]) + PAYLOAD[1:]
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and mode != "ignore-range":
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "truncate":  # promise the whole body, send a third, drop the connection
            self.wfile.write(body[start : start + (len(body) - start) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@dataclass
class ImageServer:
    url: str
    behaviour: Behaviour


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    behaviour = Behaviour()
    handler = type("BoundHandler", (Handler,), {"behaviour": behaviour})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ImageServer(f"http://127.0.0.1:{server.server_address[1]}", behaviour)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def source(
    server: ImageServer, *, digest: str = SHA256, urls: tuple[str, ...] = ()
) -> baseimages.ImageSource:
    return baseimages.ImageSource(
        "test/x86_64", urls=urls or (f"{server.url}/image.qcow2",), algo="sha256", digest=digest
    )


def fetch(src: baseimages.ImageSource, dest: Path, **kw: object) -> Path:
    return baseimages.fetch(src, dest, retries=4, backoff=0, sleep=lambda s: None, **kw)  # type: ignore[arg-type]


@pytest.fixture
def url_cfg(make_cfg: Callable[..., config.Config], image_server: ImageServer) -> config.Config:
    return make_cfg(vm={"image": f"{image_server.url}/image.qcow2", "image_sha256": SHA256})


def test_download_verifies_and_publishes(image_server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "images" / "image.qcow2"
    assert fetch(source(image_server), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dest.with_name("image.qcow2.part").exists()
    assert [r["range"] for r in image_server.behaviour.requests] == [""]


def test_corrupt_download_is_deleted_and_fetched_again(
    image_server: ImageServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_server.behaviour.modes = ["corrupt"]
    dest = tmp_path / "image.qcow2"
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD
    assert len(image_server.behaviour.requests) == 2  # the corrupt copy was not resumed, but re-fetched
    assert image_server.behaviour.requests[1]["range"] == ""
    assert "mismatch" in capsys.readouterr().err


def test_persistently_corrupt_download_fails_and_leaves_nothing(
    image_server: ImageServer, tmp_path: Path
) -> None:
    image_server.behaviour.default = "corrupt"
    dest = tmp_path / "image.qcow2"
    with pytest.raises(ImageError) as err:
        fetch(source(image_server), dest)
    message = str(err.value)
    assert "failed its sha256 check twice" in message and SHA256 in message
    assert "deleted" in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part to boot by mistake


def test_truncated_download_resumes_with_range(image_server: ImageServer, tmp_path: Path) -> None:
    image_server.behaviour.modes = ["truncate", "truncate"]
    dest = tmp_path / "image.qcow2"
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD
    ranges = [r["range"] for r in image_server.behaviour.requests]
    assert ranges[0] == ""
    # resumed where the first attempt was cut (up to the last whole chunk received), not from zero
    first_cut = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < first_cut <= len(PAYLOAD) // 3
    assert len(ranges) == 3
    assert int(ranges[2].removeprefix("bytes=").rstrip("-")) > first_cut


def test_existing_part_file_is_resumed(image_server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "image.qcow2"
    half = len(PAYLOAD) // 2
    dest.with_name("image.qcow2.part").write_bytes(PAYLOAD[:half])
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in image_server.behaviour.requests] == [f"bytes={half}-"]


def test_server_ignoring_range_restarts_from_zero(image_server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "image.qcow2"
    dest.with_name("image.qcow2.part").write_bytes(PAYLOAD[:1000])
    image_server.behaviour.modes = ["ignore-range"]
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD  # not 1000 stale bytes + the whole file


def test_complete_part_file_with_416_is_verified(image_server: ImageServer, tmp_path: Path) -> None:
    dest = tmp_path / "image.qcow2"
    dest.with_name("image.qcow2.part").write_bytes(PAYLOAD)
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD


def test_transient_503_is_retried(image_server: ImageServer, tmp_path: Path) -> None:
    image_server.behaviour.modes = ["503", "503"]
    dest = tmp_path / "image.qcow2"
    fetch(source(image_server), dest)
    assert dest.read_bytes() == PAYLOAD
    assert len(image_server.behaviour.requests) == 3


def test_gives_up_after_retries_keeping_the_part(image_server: ImageServer, tmp_path: Path) -> None:
    image_server.behaviour.default = "503"
    dest = tmp_path / "image.qcow2"
    with pytest.raises(ImageError, match="failed after 4 attempts"):
        fetch(source(image_server), dest)
    assert not dest.exists()


def test_404_falls_back_to_the_archive_url(image_server: ImageServer, tmp_path: Path) -> None:
    src = source(image_server, urls=(f"{image_server.url}/pruned.qcow2", f"{image_server.url}/image.qcow2"))
    dest = tmp_path / "image.qcow2"
    fetch(src, dest)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(ImageError, match="not found at any of its URLs"):
        fetch(source(image_server, urls=(f"{image_server.url}/gone.qcow2",)), tmp_path / "other.qcow2")


def test_ensure_downloads_once_into_the_cache(url_cfg: config.Config, image_server: ImageServer) -> None:
    path = baseimages.ensure(url_cfg, "x86_64")
    assert path.is_relative_to(url_cfg.project.cache_dir / "images")
    assert path.read_bytes() == PAYLOAD
    assert baseimages.ensure(url_cfg, "x86_64") == path
    assert len(image_server.behaviour.requests) == 1  # the second call used the cache


def test_ensure_detects_a_cached_file_corrupted_later(
    url_cfg: config.Config, image_server: ImageServer
) -> None:
    path = baseimages.ensure(url_cfg, "x86_64")
    with path.open("r+b") as f:  # bit rot / a tampered cache: same size, different bytes
        f.write(b"\xff\xff")
    again = baseimages.ensure(url_cfg, "x86_64")
    assert again.read_bytes() == PAYLOAD
    assert len(image_server.behaviour.requests) == 2


# ----------------------------------------------------------------- DNS failures (issue 10, item 19) --
UNRESOLVABLE = "https://no-such-host.invalid/image.qcow2"  # .invalid never resolves (RFC 6761)


def test_dns_failure_is_named_at_once_not_retried_as_an_interrupted_download(tmp_path: Path) -> None:
    src = baseimages.ImageSource("test/x86_64", urls=(UNRESOLVABLE,), algo="sha256", digest=SHA256)
    dest = tmp_path / "images" / "image.qcow2"
    pauses: list[float] = []

    with pytest.raises(ImageError) as failed:
        baseimages.fetch(src, dest, retries=5, backoff=1, sleep=pauses.append)

    assert failed.value.message == (
        "downloading image test/x86_64: cannot resolve no-such-host.invalid (DNS name resolution failed)"
    )
    assert pauses == []  # no "download interrupted; retry 1/4 in 1s" for a name that does not resolve
    assert "interrupted" not in str(failed.value)
    assert failed.value.hint is not None and "nothing was downloaded" in failed.value.hint
    assert ".part" not in str(failed.value)  # the hint names no .part file, since none exists
    assert list(dest.parent.iterdir()) == []


def test_dns_failure_keeps_naming_an_existing_partial_download(tmp_path: Path) -> None:
    src = baseimages.ImageSource("test/x86_64", urls=(UNRESOLVABLE,), algo="sha256", digest=SHA256)
    dest = tmp_path / "image.qcow2"
    part = dest.with_name("image.qcow2.part")
    part.write_bytes(PAYLOAD[:1000])  # from an earlier, interrupted run

    with pytest.raises(ImageError, match="DNS name resolution failed") as failed:
        baseimages.fetch(src, dest, retries=5, backoff=0, sleep=lambda s: None)

    assert failed.value.hint is not None and f"the partial download {part} is kept" in failed.value.hint
    assert part.read_bytes() == PAYLOAD[:1000]


def test_unresolvable_primary_falls_back_to_the_archive_url(
    image_server: ImageServer, tmp_path: Path
) -> None:
    src = source(image_server, urls=(UNRESOLVABLE, f"{image_server.url}/image.qcow2"))
    dest = tmp_path / "image.qcow2"
    assert fetch(src, dest) == dest
    assert dest.read_bytes() == PAYLOAD


def test_interrupted_download_hint_names_the_part_only_when_it_exists(
    image_server: ImageServer, tmp_path: Path
) -> None:
    image_server.behaviour.default = "503"  # never any byte
    with pytest.raises(ImageError, match="failed after 4 attempts") as failed:
        fetch(source(image_server), tmp_path / "image.qcow2")
    assert failed.value.hint == "check the network; nothing was downloaded"
    assert not (tmp_path / "image.qcow2.part").exists()


# -- issue 23, item 12: a download never fills the disk, and a full disk is named ------------------------------
def test_a_body_without_end_is_cut_at_the_cap_and_leaves_no_part(
    image_server: ImageServer, tmp_path: Path
) -> None:
    image_server.behaviour.default = "endless"
    with pytest.raises(
        ImageError, match=r"the body goes on past 1048576 bytes .*; the partial download was deleted"
    ):
        fetch(source(image_server), tmp_path / "image.qcow2", max_bytes=1 << 20)
    assert list(tmp_path.iterdir()) == []
    assert len(image_server.behaviour.requests) == 1  # not retried: the cap is not a transient failure


def test_a_size_declared_beyond_the_cap_writes_nothing(image_server: ImageServer, tmp_path: Path) -> None:
    image_server.behaviour.default = "declares-huge"
    with pytest.raises(
        ImageError, match=r"declares 1099511627776 bytes, more than the cap .*nothing was written"
    ):
        fetch(source(image_server), tmp_path / "image.qcow2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tools("mount")
def test_a_size_beyond_the_free_space_is_disk_full_before_writing(
    image_server: ImageServer, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "cache", "1m") as cache:
        with pytest.raises(
            ImageError, match=r"^disk full: .*/cache has 1 MiB free, the image needs 3 MiB more"
        ):
            fetch(source(image_server), cache / "image.qcow2")
        assert list(cache.iterdir()) == []


@pytest.mark.tools("mount")
def test_a_disk_filling_up_mid_download_is_disk_full_and_leaves_no_part(
    image_server: ImageServer, tmp_path: Path
) -> None:
    image_server.behaviour.default = "endless"  # no size declared: the disk fills while writing
    with small_filesystem(tmp_path / "cache", "1m") as cache:
        with pytest.raises(
            ImageError, match=r"^disk full: downloading .* to .*/image\.qcow2\.part .*deleted"
        ):
            fetch(source(image_server), cache / "image.qcow2")
        assert list(cache.iterdir()) == []
