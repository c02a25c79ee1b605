"""No import cycle in nsruntime/ or supervisor/: each module reads from its dependencies only.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is still a
dependency, only a later one) and under ``if TYPE_CHECKING:`` (a type from a module is a
dependency on what that module means). An import of a package's name reaches its __init__; of a
submodule, that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nsruntime", "supervisor")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of these packages it imports."""
    files = {_module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    deps.add(sub if sub in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d]
            if d not in state and (found := visit(d)) is not None:
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def test_no_module_of_nsruntime_or_supervisor_imports_itself_back() -> None:
    cycle = find_cycle(import_graph(REPO))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "nsruntime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert find_cycle(import_graph(tmp_path, ("nsruntime",))) == ["nsruntime.a", "nsruntime.b", "nsruntime.a"]


@pytest.mark.parametrize("module", ["nsruntime.spawn", "nsruntime.creator", "supervisor.process"])
def test_the_graph_knows_the_modules_of_both_packages(module: str) -> None:
    assert module in import_graph(REPO)


@pytest.mark.parametrize(("module", "absent"), [
    ("supervisor.machine", ["_ctypes", "trio", "structlog", "nsruntime.config"]),  # pure: no I/O, no clock
    ("supervisor.config", ["_ctypes", "trio", "structlog"]),  # nsinitctl and --check read it: keep it light
])
def test_a_pure_module_loads_nothing_heavy(module: str, absent: list[str]) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stderr, out.stdout.strip()) == (0, "", "")
