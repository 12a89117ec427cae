"""Build the app image from `app/` (`inv deploy.app --build [--local]`); infra/compose/release.py ships it.

Tag: the git commit that last changed `app/` (12 hex digits), plus `-dirty-<8 hex>` when `app/` has
uncommitted changes, the 8 hex being a hash of the files' content. So
- only `app/` counts: the image is built from nothing else, and a commit elsewhere (infra/, nomad/) does
  not roll out a new version of an identical image;
- two builds of the same dirty tree get the same tag (and the second is a no-op), while any further edit
  gets a new one, so a stale image is never mistaken for the current tree.
Files: what git sees under `app/`: tracked plus untracked-not-ignored files (`.gitignore` applies), the same
set whose content makes the tag and goes into the build context (a deterministic tarball: sorted, mtime 0,
uid 0), so the tag names exactly what was built.

Where it is built:
- default: inside the VM's Docker over SSH (fabric): upload the context tarball, `docker build - < ctx.tar`;
  the image is then already where Nomad's docker driver looks for it;
- `--local`: the host's Docker (DOCKER_HOST applies) builds it, `docker save` writes it to a tarball that
  is uploaded and `docker load`ed in the VM.
Either way, an image that already exists in the VM under that tag is not built again.

This module makes images and names them; it does not deploy. infra/compose/release.py `ship` deploys the image
with the HCL variables `image` and `version` and reports the version now live.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shlex
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from infra.core import files, ui
from infra.core.config import Config
from infra.core.errors import BuildError, InfraError
from infra.core.state import StatePaths

APP_DIR = "app"
BUILD_TIMEOUT = 1800.0
TRANSFER_TIMEOUT = 900.0
#: Docker's reference grammar, loosely: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
IMAGE_REF = re.compile(
    # registry: a host with a dot or a port, or localhost (else the first part is a path component)
    r"(?:(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+(?::[0-9]+)?|[a-zA-Z0-9-]+:[0-9]+|localhost)/)?"
    r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


# ------------------------------------------------------------------------------------------- source --
@dataclass(frozen=True)
class Source:
    """What the image is built from, and the tag that names it."""

    root: Path  # the git work tree
    commit: str  # full sha of the last commit that changed app/ (HEAD when app/ has none)
    dirty: bool
    content_hash: str  # sha256 over the files (path, exec bit, content)
    files: tuple[str, ...]  # relative to app/

    @property
    def tag(self) -> str:
        short = self.commit[:12]
        return f"{short}-dirty-{self.content_hash[:8]}" if self.dirty else short


def _git(root: Path, *args: str) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError("git is not installed", hint="the image tag is the git commit; install git") from exc
    if result.returncode != 0:
        raise BuildError(
            f"`git {' '.join(args)}` failed in {root}: {result.stderr.strip() or result.returncode}",
            hint="`inv deploy.app --build` tags the image with the git commit: run it in a git clone with at "
            "least one commit, or deploy a ready image with --image REF",
        )
    return result.stdout


def source(root: Path) -> Source:
    """Commit, dirty flag, files and content hash of `<root>/app`."""
    app = root / APP_DIR
    if not (app / "Dockerfile").is_file():
        raise BuildError(f"{app / 'Dockerfile'} not found", hint="the app and its Dockerfile live in app/")
    top = Path(_git(root, "rev-parse", "--show-toplevel").strip())
    if top.resolve() != root.resolve():
        raise BuildError(f"{root} is not the top of its git work tree ({top})")
    commit = _git(root, "log", "-1", "--format=%H", "--", APP_DIR).strip()
    if not commit:
        commit = _git(root, "rev-parse", "--verify", "HEAD^{commit}").strip()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", APP_DIR)
    listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", APP_DIR)
    files = sorted({p for p in listed.split("\0") if p and (root / p).is_file()})
    digest = hashlib.sha256()
    rel: list[str] = []
    for path in files:
        name = path[len(APP_DIR) + 1 :]
        data = (root / path).read_bytes()
        executable = os.access(root / path, os.X_OK)
        digest.update(f"{name}\0{int(executable)}\0{len(data)}\0".encode())
        digest.update(data)
        rel.append(name)
    return Source(root, commit, bool(status.strip("\0").strip()), digest.hexdigest(), tuple(rel))


def context_tarball(src: Source, dest: Path) -> Path:
    """The build context: exactly `src.files`, reproducibly (same files -> same bytes)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in src.files:
            path = src.root / APP_DIR / name
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return dest


def _open_log(log: Path) -> IO[str]:
    """The build log, truncated, opened without following a link (infra/core/files.py)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    return os.fdopen(files.open_nofollow(log, "build log", flags, error=BuildError), "w")


def check_ref(ref: str) -> str:
    ref = ref.strip()
    if not ref or not IMAGE_REF.fullmatch(ref):
        raise BuildError(
            f"invalid image reference {ref!r}",
            hint="expected [registry/]name[:tag][@sha256:digest], e.g. ghcr.io/me/app:1.2.3",
        )
    return ref


def version_of(ref: str) -> str:
    """The version to report/deploy for an image reference: its tag, else the digest's first 12 hex."""
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        return last.split(":", 1)[1]
    return digest.removeprefix("sha256:")[:12] if digest else "latest"


# ------------------------------------------------------------------------------------------ engines --
class _LogSink:
    """File-like: every chunk goes to the log file; build steps ("Step 3/14 : ...", BuildKit's "#5 [2/6]
    ...") show on the live line."""

    STEP = re.compile(r"^(Step \d+/\d+ : |#\d+ \[)")

    def __init__(self, log: IO[str], line: ui.LiveLine, prefix: str) -> None:
        self.log, self.line, self.prefix, self._buf = log, line, prefix, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self._buf += text
        *complete, self._buf = self._buf.split("\n")
        for entry in complete:
            if self.STEP.match(entry.strip()):
                self.line.update(f"{self.prefix}: {entry.strip()[:100]}")
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def _build_args(build_args: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in build_args.items():
        out += ["--build-arg", f"{key}={value}"]
    return out


def _tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


@dataclass
class LocalDocker:
    """The host's Docker CLI (`docker`, honouring DOCKER_HOST), as subprocesses."""

    host: str = ""  # a daemon socket (unix:///...) overriding DOCKER_HOST; empty: the CLI's default
    network: str = ""  # `docker build --network`; tests use "host" (their engine runs without a bridge)
    docker: str = "docker"
    where: str = "the host's Docker"
    _env: dict[str, str] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        if self._env is None:
            env = dict(os.environ)
            if self.host:
                env["DOCKER_HOST"] = self.host
            # Without the buildx plugin, a current CLI refuses to build with BuildKit: use the classic
            # builder then (Debian's docker.io 20.10 has no buildx; it builds classic by default).
            probe = self.run(["buildx", "version"], env=env, check=False, timeout=30)
            if probe.returncode != 0:
                env["DOCKER_BUILDKIT"] = "0"
            self._env = env
        return self._env

    def run(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
        try:
            result = subprocess.run(
                [self.docker, *args], env=dict(env or self.env()), capture_output=True, text=True,
                timeout=timeout, check=False, **kw,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise BuildError(f"{self.docker} not found", hint="install Docker (Debian: docker.io)") from exc
        if check and result.returncode != 0:
            raise BuildError(
                f"`docker {' '.join(args[:2])}` on {self.where} failed ({result.returncode})",
                details=(result.stderr or result.stdout).strip().splitlines()[-15:],
                hint="is the Docker daemon running and reachable (DOCKER_HOST)?",
            )
        return result

    def has_image(self, ref: str) -> bool:
        return self.run(["image", "inspect", "--format", "{{.Id}}", ref], check=False).returncode == 0

    def build(self, context: Path, ref: str, build_args: Mapping[str, str], log: Path) -> None:
        args = [self.docker, "build", "--tag", ref, *_build_args(build_args)]
        if self.network:
            args += ["--network", self.network]
        args.append("-")  # the context is the tarball on stdin
        with _open_log(log) as out, context.open("rb") as ctx, ui.live(f"building {ref}") as line:
            sink = _LogSink(out, line, f"building {ref}")
            proc = subprocess.Popen(args, env=self.env(), stdin=ctx, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
            if proc.stdout is None:  # pragma: no cover - stdout=PIPE always gives one
                raise BuildError("docker build: no output pipe")
            deadline = time.monotonic() + BUILD_TIMEOUT
            for text in proc.stdout:
                sink.write(text)
                if time.monotonic() > deadline:
                    proc.kill()
                    break
            code = proc.wait()
        if code != 0:
            raise BuildError(f"docker build of {ref} on {self.where} failed (exit {code})",
                             details=_tail(log), log=log)  # fmt: skip

    def save(self, ref: str, dest: Path) -> None:
        self.run(["image", "save", "--output", str(dest), ref], timeout=TRANSFER_TIMEOUT)

    def load(self, tarball: Path) -> None:
        self.run(["image", "load", "--input", str(tarball)], timeout=TRANSFER_TIMEOUT)


class RemoteDocker:
    """Docker inside the VM, over SSH (fabric). Uses `docker`, or `sudo -n docker` if the login user is not
    (yet) in the docker group."""

    def __init__(
        self, conn: Any, *, where: str = "the VM's Docker", docker: str = "", network: str = ""
    ) -> None:
        self.conn = conn
        self.where = where
        self.network = network  # `docker build --network`; empty: the engine's default
        self._docker = docker
        self._buildkit_off = False

    def _sh(self, command: str, timeout: float = 120, **kw: Any) -> Any:
        from invoke.exceptions import CommandTimedOut

        try:
            return self.conn.run(command, hide=True, warn=True, timeout=timeout, in_stream=False, **kw)
        except CommandTimedOut as exc:
            raise BuildError(
                f"`{command[:80]}` in {self.where} did not finish within {timeout:.0f}s"
            ) from exc

    @property
    def docker(self) -> str:
        if not self._docker:
            for candidate in ("docker", "sudo -n docker"):
                if self._sh(f"{candidate} info --format '{{{{.ServerVersion}}}}'", timeout=60).exited == 0:
                    self._docker = candidate
                    break
            else:
                result = self._sh("docker info 2>&1 | tail -n 5", timeout=60)
                raise BuildError(
                    f"Docker does not answer in {self.where}",
                    details=result.stdout.strip().splitlines(),
                    hint="`inv vm.check` shows whether docker.service is active (provision.docker must be true)",
                )
            self._buildkit_off = self._sh(f"{self._docker} buildx version", timeout=60).exited != 0
        return self._docker

    def has_image(self, ref: str) -> bool:
        return bool(
            self._sh(f"{self.docker} image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}").exited == 0
        )

    def _upload(self, local: Path, remote: str, what: str) -> None:
        size = local.stat().st_size
        with ui.download_progress() as progress:
            task = progress.add_task(f"upload {what}", total=size)
            sftp = self.conn.sftp()
            sftp.put(str(local), remote, callback=lambda done, _total: progress.update(task, completed=done))

    def _tmpname(self, suffix: str) -> str:
        result = self._sh(f"mktemp --tmpdir infra-lab-XXXXXXXX{suffix}")
        if result.exited != 0:
            raise BuildError(f"cannot create a temporary file in {self.where}: {result.stderr.strip()}")
        return str(result.stdout.strip())

    def build(self, context: Path, ref: str, build_args: Mapping[str, str], log: Path) -> None:
        docker = self.docker
        remote = self._tmpname(".tar")
        try:
            self._upload(context, remote, "build context")
            env = "DOCKER_BUILDKIT=0 " if self._buildkit_off and not docker.startswith("sudo") else ""
            if self._buildkit_off and docker.startswith("sudo"):
                docker = docker.replace("sudo -n docker", "sudo -n env DOCKER_BUILDKIT=0 docker")
            net = ["--network", self.network] if self.network else []
            args = " ".join(shlex.quote(a) for a in ["--tag", ref, *_build_args(build_args), *net])
            command = f"{env}{docker} build {args} - < {shlex.quote(remote)}"
            with _open_log(log) as out, ui.live(f"building {ref} in the VM") as line:
                sink = _LogSink(out, line, f"building {ref}")
                result = self._sh(command, timeout=BUILD_TIMEOUT, out_stream=sink, err_stream=sink)
        finally:
            self._sh(f"rm -f {shlex.quote(remote)}")
        if result.exited != 0:
            raise BuildError(f"docker build of {ref} in {self.where} failed (exit {result.exited})",
                             details=_tail(log), log=log)  # fmt: skip

    def load(self, tarball: Path, ref: str) -> None:
        remote = self._tmpname(".tar")
        try:
            self._upload(tarball, remote, ref)
            with ui.live(f"loading {ref} into {self.where}"):
                result = self._sh(f"{self.docker} image load --input {shlex.quote(remote)}",
                                  timeout=TRANSFER_TIMEOUT)  # fmt: skip
        finally:
            self._sh(f"rm -f {shlex.quote(remote)}")
        if result.exited != 0:
            raise BuildError(f"docker load of {ref} in {self.where} failed",
                             details=(result.stderr or result.stdout).strip().splitlines()[-10:])  # fmt: skip


# ------------------------------------------------------------------------------------------- build --
@dataclass(frozen=True)
class BuildResult:
    ref: str
    tag: str
    built: bool  # False: the target already had this tag
    seconds: float


def build_args(cfg: Config, src: Source) -> dict[str, str]:
    args = {"APP_VERSION": src.tag}
    if cfg.app.base_image:
        args["BASE_IMAGE"] = cfg.app.base_image
    return args


def build(
    cfg: Config,
    target: Any,
    *,
    builder: LocalDocker | None = None,
    root: Path | None = None,
) -> BuildResult:
    """Make `<app.image>:<tag>` exist in `target` (the VM's engine): built there, or (with `builder`, the
    host's engine) built on the host and loaded into the target. A tag the target has is not rebuilt."""
    started = time.monotonic()
    src = source(root or cfg.root)
    ref = f"{cfg.app.image}:{src.tag}"
    check_ref(ref)
    state = StatePaths.of(cfg).claim()
    log = state.build_log
    if src.dirty:
        ui.warn(f"app/ has uncommitted changes: building {ref} from the work tree")
    if target.has_image(ref):
        ui.skip(f"{ref} is already in {target.where}: not rebuilding")
        return BuildResult(ref, src.tag, False, time.monotonic() - started)
    with tempfile.TemporaryDirectory(prefix="infra-lab-build-") as tmp:
        context = context_tarball(src, Path(tmp) / "context.tar")
        if builder is None:
            ui.step(f"building {ref} in {target.where} ({len(src.files)} files from app/)")
            target.build(context, ref, build_args(cfg, src), log)
        else:
            ui.step(f"building {ref} with {builder.where}, then loading it into {target.where}")
            if not builder.has_image(ref):
                builder.build(context, ref, build_args(cfg, src), log)
            image_tar = Path(tmp) / "image.tar"
            builder.save(ref, image_tar)
            target.load(image_tar, ref)
    if not target.has_image(ref):
        raise BuildError(f"{ref} is still missing in {target.where} after the build", log=log)
    seconds = time.monotonic() - started
    ui.ok(f"built {ref} ({seconds:.0f}s; log: {log})")
    return BuildResult(ref, src.tag, True, seconds)


# ------------------------------------------------------------------------------------- build for the VM --
@contextlib.contextmanager
def _vm_engine(cfg: Config) -> Iterator[RemoteDocker]:
    from infra.guest import ssh

    conn = ssh.connection(cfg)
    where = f"{cfg.ssh.user}@127.0.0.1:{cfg.vm.ports['ssh'].host}"
    try:
        conn.open()
    except InfraError:
        raise
    except Exception as exc:
        conn.close()
        raise BuildError(
            f"cannot reach the VM over SSH ({where}) to build there: {type(exc).__name__}: {exc}",
            hint="is the VM up? `inv vm.status`, `inv vm.run`; or build elsewhere and deploy with --image REF",
        ) from exc
    try:
        yield RemoteDocker(conn, network=cfg.app.build_network)
    finally:
        conn.close()


def for_vm(
    cfg: Config,
    *,
    local: bool = False,
    engine: Callable[[Config], contextlib.AbstractContextManager[Any]] | None = None,
    builder: LocalDocker | None = None,
) -> BuildResult:
    """The app image from app/ where the VM's Nomad runs it: built in the VM's Docker, or (`local`) with the
    host's Docker and loaded into the VM. `engine` opens the VM's engine (default: over SSH)."""
    with (engine or _vm_engine)(cfg) as target:
        host = builder or LocalDocker(network=cfg.app.build_network)
        return build(cfg, target, builder=host if local else None)
