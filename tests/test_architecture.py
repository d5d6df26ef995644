"""The tree is the architecture: these tests keep it so (docs/architecture.md, "The rules").

- no import cycle between any two modules of daemon/ and actors/ (type-checking imports count);
- the import contract in pyproject.toml (`[tool.importlinter]`) holds: the runtime imports actors
  only where it assembles them, nothing but the command line imports `daemon.cli`, the store is
  the bottom layer, no cycles between sibling packages;
- every runtime dependency in pyproject.toml is declared once and imported (or listed in
  `LOADED_BY_ANOTHER` with what loads it);
- SQL lives in `daemon/store/` only. The modules that still hold SQL elsewhere are listed in
  `SQL_OUTSIDE_THE_STORE`; the list may only shrink (a module leaving it must be removed from it);
- no module in daemon/ or actors/ is over 500 lines;
- the store is reached through its interface (`daemon.store.api.Outbox`): outside
  `daemon/store/` nothing imports `sqlite3` or a `Connection`, nor runs a function in the
  store's transaction (`store.call(...)`, `call_until_committed(...)`).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent

# Modules outside daemon/store/ allowed to hold SQL: none (the store interface took the last two).
SQL_OUTSIDE_THE_STORE: dict[str, str] = {}

# A string is SQL when it starts with a statement keyword and goes on like a statement (upper-case
# keywords, as ferry writes its SQL), so prose and log messages do not match.
_STATEMENT = re.compile(
    r"^\s*(?:SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|REPLACE|WITH)\b[\s\S]*"
    r"\b(?:FROM|INTO|SET|TABLE|INDEX|WHERE|VALUES|AS)\b"
    r"|^\s*(?:BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|VACUUM|ANALYZE|PRAGMA)\b"
)
_CALLS = {"execute", "executemany", "executescript"}


def _modules() -> list[Path]:
    return sorted(p for top in ("daemon", "actors") for p in (ROOT / top).rglob("*.py"))


def sql_in(path: Path) -> list[str]:
    """Where `path` holds an SQL statement or runs one: `LINE: text` for each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _STATEMENT.search(node.value):
            found.append(f"{node.lineno}: {' '.join(node.value.split())[:70]}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _CALLS:
            found.append(f"{node.lineno}: .{node.func.attr}(...)")
    return found


def test_sql_lives_in_the_store() -> None:
    outside = {}
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("daemon/store/"):
            continue
        if found := sql_in(path):
            outside[rel] = found
    new = {rel: lines for rel, lines in outside.items() if rel not in SQL_OUTSIDE_THE_STORE}
    assert not new, f"SQL outside daemon/store/ (move it into the store): {new}"
    gone = set(SQL_OUTSIDE_THE_STORE) - set(outside)
    assert not gone, f"no SQL left in {sorted(gone)}: remove them from SQL_OUTSIDE_THE_STORE"


def store_internals_in(path: Path) -> list[str]:
    """Where `path` reaches under the store interface: `LINE: what` for each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(alias.name == "sqlite3" for alias in node.names):
            found.append(f"{node.lineno}: import sqlite3")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("daemon.store"):
            if any(alias.name == "Connection" for alias in node.names):
                found.append(f"{node.lineno}: imports a Connection")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (
                node.func.attr == "call_until_committed"
                or (node.func.attr == "call" and "store" in ast.unparse(node.func.value))
            )
        ):
            found.append(f"{node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_the_store_is_reached_through_its_interface() -> None:
    outside = {}
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("daemon/store/") and (found := store_internals_in(path)):
            outside[rel] = found
    assert not outside, f"use the store's domain operations (daemon/store/api.py): {outside}"


def test_the_interface_check_is_not_blind() -> None:
    assert store_internals_in(ROOT / "daemon/store/operations.py")
    assert store_internals_in(ROOT / "tests/actors/sink/test_sink_commit.py")


def test_the_sql_check_sees_the_store_sql() -> None:
    """The check is not blind: the store's own modules are found to hold SQL."""
    assert sql_in(ROOT / "daemon/store/outbox.py")
    assert sql_in(ROOT / "daemon/store/schema.py")
    assert not sql_in(ROOT / "daemon/supervisor.py")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("daemon", "actors", exclude_type_checking_imports=False)
    edges = {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    assert _cycles(edges) == []


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_contract_holds() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Declared, never imported by name: what loads them, and why they are declared.
LOADED_BY_ANOTHER = {
    "rfc3339-validator": "jsonschema's FormatChecker checks `date-time` with it when installed",
}


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_runtime_dependency_is_declared_once_and_imported() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [_requirement_name(requirement) for requirement in project["dependencies"]]
    assert sorted(name for name in set(declared) if declared.count(name) > 1) == []
    imported: set[str] = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.partition(".")[0])
    providers = importlib.metadata.packages_distributions()
    used = {dist.lower().replace("_", "-") for name in imported for dist in providers.get(name, [])}
    unused = sorted(name for name in declared if name not in used and name not in LOADED_BY_ANOTHER)
    assert unused == []


def _unit_test_folders() -> list[Path]:
    tests = ROOT / "tests"
    return sorted(
        path.parent.relative_to(tests)
        for top in ("actors", "daemon")
        for path in (tests / top).rglob("test_*.py")
    )


def test_unit_tests_mirror_the_tree() -> None:
    """tests/actors/sink/ tests actors/sink/, and so on: a test is found in one guess (STYLE.md 11)."""
    orphans = {str(folder) for folder in _unit_test_folders() if not (ROOT / folder).is_dir()}
    assert not orphans, f"test folders with no package of that name: {sorted(orphans)}"
    loose = sorted(p.name for p in (ROOT / "tests/actors").glob("test_*.py"))
    assert not loose, f"actor tests outside their kind's folder: {loose}"


def test_the_mirror_check_is_not_blind() -> None:
    assert Path("actors/sink") in _unit_test_folders()
    assert not (ROOT / "actors/nosuchkind").is_dir()


MAX_LINES = 500


def _long_modules(limit: int = MAX_LINES) -> dict[str, int]:
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in _modules()}
    return {rel: lines for rel, lines in lengths.items() if lines > limit}


def test_no_module_over_500_lines() -> None:
    """A module is one concept, read in one sitting (STYLE.md 13): split a longer one by concern."""
    long = _long_modules()
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_the_length_check_is_not_blind() -> None:
    assert "daemon/control/server.py" in _long_modules(300)
    assert "daemon/control/server.py" not in _long_modules()
