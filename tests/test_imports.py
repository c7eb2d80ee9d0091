"""Import direction is architecture: no cycles, no upward imports, light modules light.

The graph is read from the source (every ``import`` statement, module-level and inside
functions), so a cycle hidden behind a function-level import still counts.
"""

import ast
import subprocess
import sys

import pytest

from conftest import REPO

# Where each top-level folder installs (pyproject's package-dir).
ROOTS = {"bt_fast": REPO / "bt_fast", "bt_fast.pipelines": REPO / "pipelines",
         "bt_fast.kernels": REPO / "kernels"}


def modules() -> dict:
    """{module name: path} for every .py file of the package."""
    out = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports_of(name: str, path, known: set, typing_too: bool = False) -> set:
    """Package modules that ``name`` imports (relative imports resolved); with
    ``typing_too``, also those under ``if TYPE_CHECKING:``."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    # `if TYPE_CHECKING:` imports exist for annotations only; they never run.
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing_too:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            # `from pkg import sub` imports the submodule sub when it is one.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def parents(name: str) -> set:
    """Packages whose __init__ runs before ``name`` (an edge to a parent is not a cycle)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None (iterative three-colour DFS)."""
    state = {}
    for start in graph:
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start] - parents(start))))]
        state[start], path = "open", [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph[child] - parents(child)))))
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_even_through_type_checking_imports():
    """An annotation-only import still points the dependency the wrong way (the circle
    config -> methods -> backbone -> config's ModelConfig was the last one)."""
    mods = modules()
    typed = {name: imports_of(name, path, set(mods), typing_too=True) for name, path in mods.items()}
    cycle = find_cycle(typed)
    assert cycle is None, "import cycle (TYPE_CHECKING included): " + " -> ".join(cycle)


def test_libraries_never_import_the_cli(graph):
    offenders = sorted(m for m, deps in graph.items() if "bt_fast.cli" in deps and m != "bt_fast.__main__")
    assert not offenders, f"import bt_fast.cli from the command line only: {offenders}"


@pytest.mark.parametrize("floor", ["bt_fast.kernels", "bt_fast.pipelines"])
def test_kernels_and_pipelines_import_nothing_above_them(graph, floor):
    """The libraries stand alone: they import only themselves (bt_fast uses them)."""
    allowed = lambda dep: dep.startswith(floor)  # noqa: E731
    bad = {m: sorted(d for d in deps if not allowed(d)) for m, deps in graph.items() if m.startswith(floor)}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.slow  # a fresh interpreter
def test_light_modules_do_not_load_dali():
    """config, eval, export and the model must work where DALI is not installed."""
    code = ("import sys, bt_fast.config, bt_fast.eval, bt_fast.checkpoint, bt_fast.errors, "
            "bt_fast.pipelines; "
            "print(sorted(m for m in sys.modules if m.startswith('nvidia.dali')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_package_is_installed_by_pyproject():
    """A non-editable install (Docker) ships only the packages pyproject lists."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found == listed, f"add to pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
