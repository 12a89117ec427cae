"""The layering of infra/, read from its source (the `import` statements, module level and inside functions).

Per package: a package imports only the packages ARCHITECTURE.md's package table says it may (those above
it in the table), and the table lists every module of every package. Finer: no import cycle anywhere; the
deploy engine (infra/nomad/rollout.py) knows Nomad and nothing of the project, the release policy
(infra/compose/release.py) calls the engine and the app image, nothing below calls back up; the VM layer flows
one way (infra/vm/verbs.py over lifecycle, seed, ssh); only tasks.py writes to stdout."""

from __future__ import annotations

import ast
import re

import pytest

from infra import ROOT

PACKAGE = ROOT / "infra"

#: "package.module" (or "module" for infra/<module>.py: cli) -> its file
FILES = {
    ".".join(path.relative_to(PACKAGE).with_suffix("").parts): path
    for path in PACKAGE.rglob("*.py")
    if path.stem != "__init__"
}
MODULES = sorted(FILES)
PACKAGES = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))


def imports_in(source: str) -> set[str]:
    """The infra modules ("package.module") that `source` imports, wherever the import statement stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").split(".")[0] == "infra"
            and not node.level
        ):
            base = str(node.module).split(".")[1:]
            names.add(".".join(base))
            names |= {".".join([*base, alias.name]) for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("infra.") for a in node.names if a.name.startswith("infra.")}
    return {n for n in names if n in FILES}


def imports_of(module: str) -> set[str]:
    """The infra modules `module` ("package.module") imports."""
    return imports_in(FILES[module].read_text()) - {module}


def package_of(module: str) -> str:
    return module.split(".")[0] if "." in module else ""


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_imports_are_read_from_every_kind_of_import_statement() -> None:
    source = (
        "from infra import ROOT, cli\nfrom infra.core import ui, errors as e\nfrom infra.vm.lock import state_lock\n"
        "import infra.guest.seed\ndef f():\n    from infra.nomad import rollout\n"
    )
    assert imports_in(source) == {"cli", "core.ui", "core.errors", "vm.lock", "guest.seed", "nomad.rollout"}


# ------------------------------------------------------------------ ARCHITECTURE.md's package table --
def package_table() -> dict[str, tuple[list[str], list[str]]]:
    """ARCHITECTURE.md's package table, top to bottom: package -> (its modules, the packages it may import).
    A row: | `core/` | `errors` `ui` ... | what it holds | `-` or `core` `guest` ... |"""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    section = text[text.index("## Packages") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.finditer(r"^\| `(\w+)/` \| ([^|]+) \| [^|]+ \| ([^|]+) \|$", section, re.M)
    return {
        m.group(1): (re.findall(r"`(\w+)`", m.group(2)), re.findall(r"`(\w+)`", m.group(3))) for m in rows
    }


def test_the_package_table_lists_every_package_and_module_once() -> None:
    table = package_table()
    assert sorted(table) == PACKAGES
    listed = sorted(f"{package}.{module}" for package, (modules, _) in table.items() for module in modules)
    assert listed == [m for m in MODULES if package_of(m)]


def test_each_package_may_import_only_packages_above_it_in_the_table() -> None:
    order = list(package_table())
    assert {
        p: sorted(set(may) - set(order[: order.index(p)])) for p, (_, may) in package_table().items()
    } == {p: [] for p in order}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_itself_and_the_packages_below_it(package: str) -> None:
    """The rule the folders show, per package: its modules' imports (those inside functions included) stay in
    the package and the packages its row of the table names."""
    allowed = {package, *package_table()[package][1]}
    found = {
        module: sorted(dep for dep in imports_of(module) if package_of(dep) not in allowed)
        for module in MODULES
        if package_of(module) == package
    }
    assert {m: deps for m, deps in found.items() if deps} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_folder_holds_more_than_twelve_modules(package: str) -> None:
    assert len([m for m in MODULES if package_of(m) == package]) <= 12


def test_the_entry_point_knows_only_the_core() -> None:
    """infra/cli.py (the `inv` program) loads the configuration and prints errors; the tasks do the rest."""
    assert {package_of(dep) for dep in imports_of("cli")} <= {"core"}


def test_the_vm_and_nomad_branches_do_not_know_each_other() -> None:
    """Two independent branches over the core, joined only by the composers (infra/compose/)."""
    for module in MODULES:
        deps = {package_of(dep) for dep in imports_of(module)}
        if package_of(module) in {"guest", "vm"}:
            assert "nomad" not in deps, module
        if package_of(module) == "nomad":
            assert not deps & {"guest", "vm"}, module


# ------------------------------------------------------------------------- engine and policy, one way --
def test_the_engine_imports_only_the_nomad_client_and_generic_helpers() -> None:
    assert imports_of("nomad.rollout") <= {
        "core.errors",
        "core.files",
        "nomad.client",
        "core.ui",
        "core.waits",
    }


@pytest.mark.parametrize("module", ["nomad.rollout", "compose.appimage", "nomad.client", "nomad.cluster"])
def test_nothing_below_the_release_policy_reaches_up_to_it(module: str) -> None:
    assert not reachable(module) & {"compose.release", "compose.stack"}


def test_the_release_policy_calls_the_engine_and_the_app_image() -> None:
    assert {"nomad.rollout", "compose.appimage"} <= imports_of("compose.release")
    assert "compose.appimage" not in imports_of("nomad.rollout")
    assert "nomad.rollout" not in imports_of("compose.appimage")


@pytest.mark.parametrize("module", ["nomad.rollout", "compose.release", "compose.appimage", "compose.stack"])
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
    assert {"vm.lifecycle", "guest.ssh", "vm.verbs", "vm.host", "vm.qmp", "guest.console"} <= set(graph)
    assert find_cycle(graph) is None


def test_the_vm_layer_flows_one_way() -> None:
    """lifecycle and ssh (the guest over SSH) do not know each other, the lifecycle does not make the seed;
    the verbs compose them."""
    assert not imports_of("vm.lifecycle") & {"guest.ssh", "guest.seed", "vm.verbs", "compose.stack"}
    assert not reachable("guest.ssh") & {"vm.lifecycle", "vm.verbs", "guest.seed"}
    assert {"vm.lifecycle", "guest.ssh", "guest.seed"} <= imports_of("vm.verbs")
    for low in ("vm.host", "vm.qmp", "guest.console"):
        assert not reachable(low) & {
            "vm.lifecycle",
            "guest.ssh",
            "vm.verbs",
            "guest.seed",
            "compose.stack",
        }, low


# ------------------------------------------------------------------------------ stdout: tasks.py only --
#: Where writing to stdout is the point: ui.out is the one writer tasks.py calls; speclint's `main` is the
#: entry point of `python -m infra.nomad.speclint` (a command of its own, run by `nox -s lint`), whose findings
#: are its output.
STDOUT_ALLOWED = {("core.ui", "out"), ("nomad.speclint", "main")}


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
