"""The `inv` command: invoke's own Program, with this project's config loading and one `error:` line for every
failure invoke would otherwise print as a Python traceback.

invoke raises plain Python errors for bad input it handles itself: a malformed or binary `-f` file (YAML or
decode errors), `-f` naming a list or `vm: null` (AmbiguousMergeError), `INVOKE_VM_CPUS=abc` and
`--timeout abc` (ValueError while casting), and it silently ignores a `-f` file that does not exist. Here:
- `ProjectInvokeConfig` reads every YAML config layer (invoke.yaml, -f, ~/.invoke.yaml) through
  `config.read_layer` (bounded read, file:line:column, shapes checked before invoke merges them), refuses a
  missing `-f` file, and names the INVOKE_* variable whose value does not fit its key;
- `Program` turns parse errors and domain errors into `error: ...` (exit 2 for a bad command line, the
  error's own code otherwise), and any other exception into one `error:` line too (the traceback only with
  INFRA_VERBOSE=1), so nothing reaches the user as a traceback.
The console script `inv` (pyproject.toml) runs `main()`; tasks.py stays the task namespace, found the way
invoke always finds it, and calls `adopt()` for the case where invoke's own `inv` script runs instead.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class _LazyMock:
    """What invoke's `invoke.context` gets as `unittest.mock.Mock` while this module imports invoke: a real
    Mock, made (and unittest.mock imported) only when called — by invoke's MockContext, a test helper."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from unittest.mock import Mock

        return Mock(*args, **kwargs)


# invoke imports `unittest.mock` at module level (invoke/context.py, for MockContext, which no task uses),
# and unittest.mock imports asyncio and ssl: about 50 ms of CPU on every `inv`, a quarter of `inv --list`
# (measured in a cgroup: 210 -> 155 ms). While invoke is imported here, a stand-in module answers that import;
# it is removed at once, so any later `import unittest.mock` (a test, a task) gets the real module.
_MOCK_STANDIN = types.ModuleType("unittest.mock")
_MOCK_STANDIN.Mock = _LazyMock  # type: ignore[attr-defined]
if "invoke" not in sys.modules:  # invoke's own `inv` / `python -m invoke` imported it before tasks.py
    sys.modules.setdefault("unittest.mock", _MOCK_STANDIN)
try:
    from invoke._version import __version__ as invoke_version
    from invoke.config import Config as InvokeConfig
    from invoke.env import Environment
    from invoke.exceptions import Exit, ParseError, UncastableEnvVar, UnexpectedExit
    from invoke.parser.argument import Argument
    from invoke.program import Program as InvokeProgram
finally:
    if sys.modules.get("unittest.mock") is _MOCK_STANDIN:
        del sys.modules["unittest.mock"]

from infra.core import config as config_mod
from infra.core import files
from infra.core.errors import ConfigError, InfraError, printable, redact_urls

USAGE_EXIT = 2
#: -f file types; invoke would also run a `.py` file as configuration, which we do not offer.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class _Environment(Environment):
    """invoke's INVOKE_* loader, naming the variable when its value does not fit the key's type."""

    def _path_set(self, key_path: Sequence[str], value: str) -> None:
        try:
            super()._path_set(key_path, value)
        except (ValueError, TypeError, UncastableEnvVar) as exc:
            var = f"{self._prefix}{'_'.join(key_path)}".upper()
            old = self._path_get(key_path)
            key = ".".join(key_path)
            if isinstance(old, int | float):
                message, hint = (
                    f"configuration key {key} must be a number",
                    f"unset {var} or give it a number",
                )
            else:
                message = f"configuration key {key} is a {type(old).__name__}, which invoke cannot read from the environment"
                hint = f"unset {var} and set {key} in a file: inv -f my.yaml ..."
            raise ConfigError(f"{var}={value!r}: {message}", hint=hint) from exc


class ProjectInvokeConfig(InvokeConfig):
    """invoke's Config, reading YAML layers through config.read_layer and refusing a missing -f file."""

    def load_runtime(self, merge: bool = True) -> None:
        path = self._runtime_path
        if path is not None and self._runtime_found is None:
            file = Path(os.path.expanduser(path))
            if file.suffix not in CONFIG_SUFFIXES:
                raise ConfigError(
                    f"config file {file} (-f): expected a .yaml, .yml or .json file",
                    hint="the file holds only the keys you change, in the shape of invoke.yaml",
                )
            if not file.is_file():
                raise ConfigError(
                    f"config file {file} (-f): "
                    + (
                        "is a directory"
                        if file.is_dir()
                        else "not a regular file"
                        if file.exists()
                        else "no such file"
                    ),
                    hint="check the path; without -f the defaults of invoke.yaml apply",
                )
        super().load_runtime(merge=merge)

    def _load_yaml(self, path: os.PathLike[Any]) -> Any:
        if not os.path.exists(path):  # invoke skips a missing system/user/project file on ENOENT
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return config_mod.read_layer(Path(path))

    _load_yml = _load_yaml
    _load_json = _load_yaml  # JSON is YAML; one loader, the same errors

    def load_shell_env(self) -> None:
        # as invoke.Config.load_shell_env (invoke 2.2.1), with the loader that names a bad variable
        self.merge()
        self._set(_env=_Environment(config=self._config, prefix=self._env_prefix).load())
        self.merge()


def _bad_value(exc: BaseException) -> str | None:
    """For a ValueError raised while invoke cast a flag's value: `--timeout of nomad.wait must be int`."""
    argument: Argument | None = None
    context_name = ""
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, Argument):
            argument = owner
        elif hasattr(owner, "context") and hasattr(owner, "flag"):  # invoke's ParseMachine
            context_name = getattr(getattr(owner, "context", None), "name", "") or ""
        tb = tb.tb_next
    if argument is None:
        return None
    name = argument.name or "?"
    flag = ("-" if len(name) == 1 else "--") + name.replace("_", "-")
    kind = getattr(argument.kind, "__name__", "a value")
    where = f" of {context_name}" if context_name else ""
    shown = argument.raw_value if isinstance(argument.raw_value, str) else str(argument.raw_value)
    return f"{flag}{where} must be {'an integer' if kind == 'int' else kind}, got {shown!r}"


def _stage(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one stage of Program.run: every failure becomes `Exit("error: ...")`, which invoke prints."""

    def wrapper(self: Program, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (Exit, UnexpectedExit):
            raise
        except ParseError as exc:
            where = getattr(getattr(exc, "context", None), "name", "") or ""
            hint = f"inv --help {where}" if where else "inv --list"
            # invoke names a flag by its repr: "Flag <Argument: image (i)> needed value..."
            text = re.sub(
                r"<Argument: ([\w-]+)[^>]*>", lambda m: "--" + m.group(1).replace("_", "-"), str(exc)
            )
            raise Exit(f"error: {text}\nhint: {hint} shows what it accepts", code=USAGE_EXIT) from None
        except InfraError as exc:
            raise Exit(f"error: {printable(str(exc))}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None
        except BrokenPipeError:  # `inv --list | head`: the reader left; say nothing more on that pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise Exit(code=141) from None
        except Exception as exc:
            if isinstance(exc, OSError) and files.disk_full(exc):  # wherever a write hit a full disk
                where = exc.filename or "a write failed (No space left on device)"
                raise Exit(f"error: {printable(f'disk full: {where}')}", code=1) from None
            message = _bad_value(exc) if isinstance(exc, ValueError) else None
            if message:
                raise Exit(f"error: {message}\nhint: inv --help shows the options", code=USAGE_EXIT) from None
            if os.environ.get("INFRA_VERBOSE", "") not in ("", "0"):
                traceback.print_exc()
            raise Exit(
                f"error: unexpected {type(exc).__name__}: {_printable(exc)}\n"
                "hint: this is a bug in infra-lab; INFRA_VERBOSE=1 shows the traceback",
                code=1,
            ) from None

    return wrapper


#: Variables whose values must never be printed, even inside an unexpected error's text.
SECRET_VARIABLES = ("NOMAD_TOKEN", "INVOKE_NOMAD_TOKEN")


def _printable(exc: BaseException) -> str:
    """An unexpected error's text for one line: no secret values, no control characters (terminal escapes),
    at most 500 characters."""
    text = redact_urls(" ".join(str(exc).split())) or type(exc).__name__
    for var in SECRET_VARIABLES:
        secret = os.environ.get(var, "").strip()
        if secret:
            text = text.replace(secret, "<redacted>").replace(repr(secret)[1:-1], "<redacted>")
    return "".join(c if c.isprintable() else "\ufffd" for c in text)[:500]


_staged_parse_collection = _stage(InvokeProgram.parse_collection)


class Program(InvokeProgram):
    """invoke.Program whose every stage reports failures as one `error:` line (see the module docstring)."""

    create_config = _stage(InvokeProgram.create_config)
    parse_core = _stage(InvokeProgram.parse_core)
    parse_tasks = _stage(InvokeProgram.parse_tasks)
    parse_cleanup = _stage(InvokeProgram.parse_cleanup)
    update_config = _stage(InvokeProgram.update_config)
    execute = _stage(InvokeProgram.execute)

    def parse_collection(self) -> None:
        # invoke has just turned .pyc writing off (invoke/program.py parse_core: `sys.dont_write_bytecode =
        # not --write-pyc`), to keep a tasks.py directory clean; then every `inv` compiles the infra modules
        # its task imports from source. The interpreter's own setting (-B, PYTHONDONTWRITEBYTECODE) decides.
        if not sys.flags.dont_write_bytecode:
            sys.dont_write_bytecode = False
        _staged_parse_collection(self)


program = Program(
    name="infra-lab (invoke)",
    binary="inv",
    binary_names=["inv", "invoke"],
    version=invoke_version,
    config_class=ProjectInvokeConfig,
)


def _unraisable(info: Any) -> None:
    """A Ctrl-C that lands inside a callback Python cannot raise from (a weakref callback of the import
    system's module locks, while a module is imported lazily) is "ignored" with a traceback printed: give
    it back to the main thread as a fresh SIGINT instead, so it interrupts the command at the next bytecode
    boundary, as any other Ctrl-C does, and nothing is printed. Anything else keeps Python's own report."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        return
    sys.__unraisablehook__(info)


def main() -> None:
    sys.unraisablehook = _unraisable
    outcome: list[str | int | None] = []  # the exit code, once the command has one
    try:
        try:
            program.run()
            outcome.append(0)
        except SystemExit as done:
            outcome.append(done.code)
            raise
        finally:
            # The command has finished and its outcome is decided: a Ctrl-C from here on could only
            # interrupt the interpreter's shutdown (threading joins its threads) and print a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        # ... or one that arrived in the instant before that line took effect: the outcome stands.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(outcome[0] if outcome else 130)


def adopt() -> None:
    """Called by tasks.py on import: when invoke's own `inv` script is the one running (an installer that
    installs wheels in parallel, like uv, may leave invoke's script of the same name in place of ours), give
    its Program and Config this module's behaviour for every stage still ahead: parsing the task arguments,
    the -f file, INVOKE_* variables, execution. A no-op under our own `inv`."""
    running = getattr(sys.modules.get("invoke.main"), "program", None)
    if type(running) is InvokeProgram:
        running.__class__ = Program
        if type(running.config) is InvokeConfig:
            running.config.__class__ = ProjectInvokeConfig


__all__ = ["Program", "ProjectInvokeConfig", "main", "program"]
