"""The layering of infra/, read from its source (the `import` statements, module level and inside functions):
no import cycle anywhere; the deploy engine (infra/nomad/deploy.py) knows Nomad and nothing of the project, the
release policy (infra/compose/release.py) calls the engine and the image build, nothing below calls back up; the VM
layer flows one way (infra/vm/machine.py over vm, seed, remote); only tasks.py writes to stdout."""

from __future__ import annotations

import ast
import re

import pytest

from infra import ROOT

PACKAGE = ROOT / "infra"

#: module name -> its file (module names are unique across the packages of infra/)
FILES = {path.stem: path for path in PACKAGE.rglob("*.py") if path.stem != "__init__"}
MODULES = sorted(FILES)
PACKAGES = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}


def imports_of(module: str) -> set[str]:
    """The infra modules `module` imports, wherever the import statement stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(FILES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "infra":
            parts = str(node.module).split(".")[1:]
            names |= {alias.name for alias in node.names} | set(parts)
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[-1] for a in node.names if a.name.startswith("infra.")}
    return {n for n in names if n in FILES} - {module}


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_engine_imports_only_the_nomad_client_and_generic_helpers() -> None:
    assert imports_of("deploy") <= {"errors", "files", "client", "ui", "waits"}


@pytest.mark.parametrize("module", ["deploy", "build", "client", "cluster"])
def test_nothing_below_the_release_policy_reaches_up_to_it(module: str) -> None:
    assert not reachable(module) & {"release", "stack"}


def test_the_release_policy_calls_the_engine_and_the_build() -> None:
    assert {"deploy", "build"} <= imports_of("release")
    assert "build" not in imports_of("deploy") and "deploy" not in imports_of("build")


@pytest.mark.parametrize("module", ["deploy", "release", "build", "stack"])
def test_no_import_cycle_through_the_deploy_modules(module: str) -> None:
    assert module not in reachable(module)


# ----------------------------------------------------------------------------------------- no cycles --
def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> the modules it imports) as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            cycle = visit(dep, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_anywhere_in_infra() -> None:
    """Over every module of infra/, imports inside functions included: a lazy import is still a dependency."""
    graph = {module: imports_of(module) for module in MODULES}
    assert {"lifecycle", "remote", "machine", "host", "qmp", "console"} <= set(graph)
    assert find_cycle(graph) is None


def test_the_vm_layer_flows_one_way() -> None:
    """vm (lifecycle) and remote (SSH) do not know each other, vm does not make the seed; machine composes them."""
    assert not imports_of("lifecycle") & {"remote", "seed", "machine", "stack"}
    assert not reachable("remote") & {"lifecycle", "machine", "seed"}
    assert {"lifecycle", "remote", "seed"} <= imports_of("machine")
    for low in ("host", "qmp", "console"):
        assert not reachable(low) & {"lifecycle", "remote", "machine", "seed", "stack"}, low


# ------------------------------------------------------------------------------ stdout: tasks.py only --
#: Where writing to stdout is the point: ui.out is the one writer tasks.py calls; speclint's `main` is the
#: entry point of `python -m infra.nomad.speclint` (a command of its own, run by `nox -s lint`), whose findings
#: are its output.
STDOUT_ALLOWED = {("ui", "out"), ("speclint", "main")}


def stdout_writes(source: str) -> list[tuple[str, int, str]]:
    """(enclosing function, line, call) for every write to stdout in `source`: `ui.out(...)`, `out(...)`
    imported from infra.core.ui, `print(...)` without `file=` (or with file=sys.stdout), `sys.stdout.write`."""
    tree = ast.parse(source)
    out_names = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "infra.core.ui"
        for alias in node.names
        if alias.name == "out"
    }
    found: list[tuple[str, int, str]] = []

    def scan(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                scan(child, child.name if function == "<module>" else function)
                continue
            if isinstance(child, ast.Call):
                text = ast.unparse(child.func)
                to_stdout = any(
                    k.arg == "file" and ast.unparse(k.value) == "sys.stdout" for k in child.keywords
                ) or not any(k.arg == "file" for k in child.keywords)
                if (
                    text in {"ui.out", "sys.stdout.write", "sys.stdout.buffer.write", "sys.stdout.writelines"}
                    or text in out_names
                    or (text == "print" and to_stdout)
                ):
                    found.append((function, child.lineno, text))
            scan(child, function)

    scan(tree, "<module>")
    return found


def test_the_stdout_check_sees_every_kind_of_write() -> None:
    source = (
        "import sys\nfrom infra.core import ui\nfrom infra.core.ui import out as emit\n"
        "def f():\n    ui.out('a')\n    print('b')\n    print('c', file=sys.stderr)\n"
        "    def inner():\n        sys.stdout.write('d')\n    emit('e')\n"
    )
    assert stdout_writes(source) == [("f", 5, "ui.out"), ("f", 6, "print"), ("f", 9, "sys.stdout.write"),
                                     ("f", 10, "emit")]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_only_tasks_py_writes_to_stdout(module: str) -> None:
    """Library code returns values; tasks.py prints them (infra/core/ui.py's `out` is the writer it calls)."""
    writes = stdout_writes(FILES[module].read_text())
    assert [w for w in writes if (module, w[0]) not in STDOUT_ALLOWED] == []


def test_tasks_py_prints_the_values() -> None:
    """The check above is not vacuous: tasks.py is where the values are printed."""
    writes = stdout_writes((ROOT / "tasks.py").read_text())
    assert {"vm_run", "vm_check", "vm_status", "iso_build", "up", "deploy_app", "image_bake"} <= {
        w[0] for w in writes
    }


# ------------------------------------------------------------------- ARCHITECTURE.md's module table --
def table_order() -> list[str]:
    """The modules of ARCHITECTURE.md's module table ("| `name.py` | owns | must not |"), top to bottom."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text[text.index("## Modules") :]
    section = section[: section.index("\n## ", 1)]
    return [m.group(1) for m in re.finditer(r"^\| `(\w+)\.py` \| [^|]+ \| [^|]+ \|$", section, re.M)]


def test_the_module_table_lists_every_module_once_with_owns_and_must_not() -> None:
    assert sorted(table_order()) == MODULES


def test_each_module_imports_only_modules_above_it_in_the_table() -> None:
    order = table_order()
    upward = {m: sorted(imports_of(m) - set(order[: order.index(m)])) for m in order}
    assert {m: deps for m, deps in upward.items() if deps} == {}
