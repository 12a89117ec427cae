"""Base images: the pinned catalogue (vm/images.yaml) and the download cache.

`ensure(cfg, arch)` returns a verified local image path:
- `vm.image` set to a local path: that file (its digest checked when `vm.image_sha256` is given);
- `vm.image` set to an https URL: downloaded like a catalogue entry, `vm.image_sha256` required;
- otherwise the catalogue entry for `vm.distro` and the guest architecture.

Downloads go to <cache dir>/images/<algo>-<digest prefix>/<file name> (the XDG cache by default, config
`project.cache_dir`), shared by every checkout and kept by `vm.destroy`. A download is written to a `.part`
file that later attempts resume with an HTTP Range request; connection errors, 5xx answers and short
bodies are retried with backoff. The finished file is hashed before it is published under its final name:
a mismatch (corrupt or truncated download) deletes it and fetches it once more from scratch; a second
mismatch is an error. An unverified file is never returned, so it is never booted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from infra import ROOT
from infra.core import files, ui
from infra.core.config import Config
from infra.core.datafile import load_yaml
from infra.core.errors import ConfigError, ImageError, TemplateError, root_cause, unresolved_host

if TYPE_CHECKING:  # requests (~50 ms of CPU to import) only where an image is downloaded: not on `vm.run`
    import requests  # of a cached or local image, nor on the other tasks that read the catalogue

CATALOGUE = ROOT / "vm" / "images.yaml"
ALGOS = ("sha256", "sha512")
CHUNK = 1 << 16  # small enough that a cut connection loses little of what arrived
#: The most an image download writes (vm/images.yaml names no sizes; the pinned cloud images are < 1 GiB):
#: a body with no end, or a size declared beyond it, never fills the cache disk.
MAX_IMAGE = 16 * 2**30
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ImageSource:
    """Where an image comes from and what it must hash to."""

    name: str  # "ubuntu-24.04/x86_64", "vm.image"
    urls: tuple[str, ...] = ()  # primary first, then fallbacks; empty for a local file
    path: Path | None = None  # a local file
    algo: str = ""  # sha256 | sha512 | "" (local file without a digest)
    digest: str = ""

    @property
    def filename(self) -> str:
        return Path(urlparse(self.urls[0]).path).name or "image"


# ------------------------------------------------------------------------------------------- catalogue --


def load_catalogue(path: Path = CATALOGUE) -> dict[str, Any]:
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise TemplateError(f"{path}: expected a mapping with an `images:` mapping")
    return data


def catalogue_source(distro: str, arch: str, path: Path = CATALOGUE) -> ImageSource:
    images = load_catalogue(path)["images"]
    if distro not in images:
        raise ConfigError(
            f"configuration key vm.distro is {distro!r}; {path.name} has: {', '.join(images)}",
            hint="or set vm.image to a local image path or an https URL (with vm.image_sha256)",
        )
    entry = images[distro].get(arch)
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: no {arch} image for {distro} (has: {', '.join(images[distro])})")
    algos = [a for a in ALGOS if a in entry]
    if "url" not in entry or len(algos) != 1:
        raise TemplateError(
            f"{path}: images.{distro}.{arch} needs `url` and exactly one of {'/'.join(ALGOS)}"
        )
    urls = tuple(str(u) for u in (entry["url"], entry.get("archive")) if u)
    return ImageSource(
        f"{distro}/{arch}", urls=urls, algo=algos[0], digest=_hex(entry[algos[0]], algos[0], path)
    )


def _hex(value: object, algo: str, where: Path | str) -> str:
    digest = str(value).strip().lower()
    length = hashlib.new(algo).digest_size * 2
    if len(digest) != length or any(c not in "0123456789abcdef" for c in digest):
        raise TemplateError(f"{where}: {algo} digest must be {length} hex characters, got {value!r}")
    return digest


def source_for(cfg: Config, arch: str) -> ImageSource:
    image, sha = cfg.vm.image.strip(), cfg.vm.image_sha256.strip()
    if not image:
        if cfg.vm.distro == "local":
            raise ConfigError("configuration key vm.distro is 'local' but vm.image is empty")
        return catalogue_source(cfg.vm.distro, arch)
    digest = _hex(sha, "sha256", "configuration key vm.image_sha256") if sha else ""
    scheme = urlparse(image).scheme
    if scheme in ("http", "https"):
        if not digest:
            raise ConfigError(
                "configuration key vm.image is a URL but vm.image_sha256 is empty",
                hint="pin the image: set vm.image_sha256 to the digest its publisher lists (SHA256SUMS)",
            )
        if scheme == "http":
            ui.warn(f"vm.image {image} is plain http: the sha256 check is the only integrity protection")
        return ImageSource("vm.image", urls=(image,), algo="sha256", digest=digest)
    path = Path(os.path.expanduser(image))
    if not path.is_absolute():
        path = cfg.root / path
    if not path.is_file():
        raise ConfigError(f"configuration key vm.image: no such file: {path}")
    return ImageSource("vm.image", path=path, algo="sha256" if digest else "", digest=digest)


# ------------------------------------------------------------------------------------------------ cache --


def file_digest(path: Path, algo: str) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def cache_path(cache_dir: Path, source: ImageSource) -> Path:
    return cache_dir / "images" / f"{source.algo}-{source.digest[:16]}" / source.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, source: ImageSource) -> bool:
    """True when `path` was hashed to the expected digest and has not changed since (size + mtime)."""
    try:
        record = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return bool(record == {"algo": source.algo, "digest": source.digest, **_stat_key(path)})


def ensure(cfg: Config, arch: str, *, session: requests.Session | None = None) -> Path:
    """A local, verified image for the guest architecture `arch` (downloading it when needed)."""
    source = source_for(cfg, arch)
    if source.path is not None:
        if source.digest:
            _check_local(source.path, source)
        return source.path
    dest = cache_path(cfg.project.cache_dir, source)
    if dest.is_file():
        if _verified(dest, source):
            ui.skip(f"image {source.name}: cached {dest}")
            return dest
        with ui.live(f"verifying cached {dest.name} ({source.algo})"):
            actual = file_digest(dest, source.algo)
        if actual == source.digest:
            _write_marker(dest, source)
            return dest
        ui.warn(
            f"cached {dest} fails its {source.algo} check (got {actual[:16]}...): deleted, fetching again"
        )
        dest.unlink()
        _marker(dest).unlink(missing_ok=True)
    files.writable_dir(cfg.project.cache_dir, "project.cache_dir")  # before a download, not half-way
    return fetch(source, dest, session=session)


def _write_marker(dest: Path, source: ImageSource) -> None:
    """The `.verified` sidecar (size + mtime + digest), written without following a link (infra/core/files.py)."""
    data = json.dumps({"algo": source.algo, "digest": source.digest, **_stat_key(dest)})
    files.write_atomic(_marker(dest), data.encode(), "image verification record", error=ImageError)


def _check_local(path: Path, source: ImageSource) -> None:
    with ui.live(f"verifying {path.name} ({source.algo})"):
        actual = file_digest(path, source.algo)
    if actual != source.digest:
        raise ImageError(
            f"{path} does not match vm.image_sha256: expected {source.digest}, got {actual}",
            hint="the local file is not the image you pinned; fix vm.image or vm.image_sha256",
        )


def fetch(
    source: ImageSource,
    dest: Path,
    *,
    session: requests.Session | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    max_bytes: int = MAX_IMAGE,
) -> Path:
    """Download `source` to `dest` (resuming `<dest>.part`), verify it, publish it atomically.

    A checksum mismatch deletes the downloaded file and fetches once more from scratch; a second mismatch
    raises ImageError (nothing is left behind)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    import requests

    http = session or requests.Session()
    for round_ in (1, 2):
        _download(source, part, http, retries=retries, backoff=backoff, sleep=sleep, max_bytes=max_bytes)
        with ui.live(f"verifying {dest.name} ({source.algo})"):
            actual = file_digest(part, source.algo)
        if actual == source.digest:
            part.replace(dest)
            _write_marker(dest, source)
            ui.ok(f"image {source.name}: {dest} ({source.algo} verified)")
            return dest
        size = part.stat().st_size
        part.unlink()
        if round_ == 1:
            ui.warn(
                f"{dest.name}: {source.algo} mismatch after download ({size} bytes, got {actual[:16]}...): "
                "deleted; fetching again from scratch"
            )
    raise ImageError(
        f"{source.urls[0]} failed its {source.algo} check twice: expected {source.digest}, got {actual} "
        f"({size} bytes); the file was deleted",
        hint="the mirror serves a different file than the pinned digest (vm/images.yaml or vm.image_sha256): "
        "check the publisher's SHA256SUMS/SHA512SUMS; a proxy may be altering downloads",
    )


class _Retry(Exception):
    """A transient download failure (connection, 5xx, short body): try again, resuming."""


class _Unresolvable(Exception):
    """The URL's host name does not resolve (DNS): retrying the same URL will not help."""


def _download(
    source: ImageSource,
    part: Path,
    http: requests.Session,
    *,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
    max_bytes: int,
) -> None:
    errors: list[str] = []
    for attempt in range(1, retries + 1):
        unresolved: list[str] = []
        for url in source.urls:
            try:
                if _download_once(url, part, http, max_bytes):
                    return
                errors.append(f"{url}: 404 not found")
            except _Unresolvable as exc:  # another mirror may resolve; this one will not by waiting
                unresolved.append(str(exc))
                errors.append(f"{url}: cannot resolve host {exc} (DNS name resolution failed)")
            except _Retry as exc:
                errors.append(f"attempt {attempt}: {url}: {exc}")
                break  # a transient failure: retry the same mirror after a pause
        else:
            if len(unresolved) == len(source.urls):
                raise ImageError(
                    f"downloading image {source.name}: cannot resolve {', '.join(unresolved)} "
                    "(DNS name resolution failed)",
                    details=errors,
                    hint="check this machine's DNS and network (/etc/resolv.conf, a proxy in HTTPS_PROXY); "
                    + _partial_note(part),
                )
            raise ImageError(
                f"image {source.name} not found at any of its URLs",
                details=errors,
                hint="the dated release directory may have been pruned; pin a newer image in vm/images.yaml",
            )
        if attempt < retries:
            delay = backoff * min(2 ** (attempt - 1), 16)
            ui.warn(f"download interrupted ({errors[-1]}); retry {attempt}/{retries - 1} in {delay:.0f}s")
            sleep(delay)
    raise ImageError(
        f"downloading image {source.name} failed after {retries} attempts",
        details=errors[-5:],
        hint=f"check the network; {_partial_note(part)}",
    )


def _partial_note(part: Path) -> str:
    """What the next run starts from: the partial download only when there is one."""
    if part.is_file() and part.stat().st_size:
        return f"the partial download {part} is kept and the next run resumes it"
    return "nothing was downloaded"


def _download_once(url: str, part: Path, http: requests.Session, max_bytes: int = 0) -> bool:
    """One request, resuming `part`. False on 404; raises _Retry on transient failures. At most `max_bytes`
    (MAX_IMAGE by default) are written: a body that goes on, or a size declared beyond it or beyond the free
    space, is an ImageError and leaves no partial file past the cap; so is a full disk."""
    import requests

    max_bytes = max_bytes or MAX_IMAGE
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = http.get(url, headers=headers, stream=True, timeout=(15, 60))
    except (requests.ConnectionError, requests.Timeout) as exc:
        host = unresolved_host(exc)
        if host:
            raise _Unresolvable(host) from exc
        raise _Retry(root_cause(exc)) from exc
    with resp:
        if resp.status_code == 404:
            return False
        if resp.status_code == 416 and have:
            return True  # the part file is already complete (or too long): the checksum decides
        if resp.status_code in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {resp.status_code}")
        if resp.status_code not in (200, 206):
            raise ImageError(f"downloading {url}: HTTP {resp.status_code} {resp.reason}")
        if resp.status_code == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                raise _Retry(f"server resumed at byte {start}, expected {have}")
            mode = "ab"
        else:  # 200: a fresh start (the server ignored or we sent no Range)
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        _check_room(url, part, have, total, max_bytes)
        written = have
        with ui.download_progress() as progress, part.open(mode) as f:
            task = progress.add_task(part.name.removesuffix(".part"), total=total, completed=have)
            try:
                for chunk in resp.iter_content(CHUNK):
                    if written + len(chunk) > max_bytes:
                        f.close()
                        part.unlink(missing_ok=True)
                        raise ImageError(
                            f"downloading {url}: the body goes on past {max_bytes} bytes (the cap for an "
                            "image); the partial download was deleted",
                            hint="the server does not serve the image the URL names; check vm.image",
                        )
                    try:
                        f.write(chunk)
                    except OSError as exc:
                        f.close()
                        part.unlink(missing_ok=True)
                        raise ImageError(
                            files.failed(f"downloading {url} to {part}", exc)
                            + "; the partial download was deleted",
                            hint="free space where project.cache_dir lives, or point it elsewhere",
                        ) from None
                    written += len(chunk)
                    progress.update(task, completed=written)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                raise _Retry(f"connection lost at byte {written}") from exc
        if total is not None and written < total:
            raise _Retry(f"short body: {written} of {total} bytes")
    return True


def _check_room(url: str, part: Path, have: int, total: int | None, max_bytes: int) -> None:
    """Before writing: a declared size within the cap and the free space (nothing is written otherwise)."""
    if total is None:
        return
    if total > max_bytes:
        raise ImageError(
            f"downloading {url}: the server declares {total} bytes, more than the cap for an image "
            f"({max_bytes} bytes); nothing was written",
            hint="the server does not serve the image the URL names; check vm.image",
        )
    free = shutil.disk_usage(part.parent).free
    if total - have > free:
        raise ImageError(
            f"disk full: {part.parent} has {free // 2**20} MiB free, the image needs {(total - have) // 2**20} MiB "
            f"more ({url})",
            hint="free space where project.cache_dir lives, or point it elsewhere; nothing was written",
        )


def _content_range(header: str) -> tuple[int, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL)."""
    try:
        _unit, spec = header.split(" ", 1)
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total == "*" else int(total))
    except ValueError:
        raise _Retry(f"bad Content-Range {header!r}") from None
