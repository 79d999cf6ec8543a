"""The package's shape: no import cycles, small modules, each saying its one job.

Imports are read from the source (every `import` statement, at any depth,
including those inside functions), so a cycle cannot hide behind a lazy import.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "poltergust"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's own modules that `name` imports (a package import counts as its __init__)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import logs` imports the submodule; `from .layout import Location`, the module.
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package importing its own submodules is how a package exposes them, not a cycle, unless
    # a submodule imports the package back; so edges package -> own submodule are kept as they are.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_modules_are_small_and_say_their_job() -> None:
    problems = []
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_LINES})")
        if not ast.get_docstring(ast.parse(path.read_text())) and path.name != "__main__.py":
            problems.append(f"{name}: no opening docstring saying its job")
    assert problems == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """The checker itself: two modules importing each other are reported."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    modules = {"p.a": tmp_path / "a.py", "p.b": tmp_path / "b.py"}
    assert _imports("p.a", modules["p.a"], modules) == {"p.b"}
    assert _imports("p.b", modules["p.b"], modules) == {"p.a"}


def test_declared_dependencies_cover_what_the_code_uses() -> None:
    """`uvloop.run`, which the entry point uses, exists from uvloop 0.18 on."""
    import configparser

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    requirements = config["options"]["install_requires"].split()
    assert "uvloop>=0.18" in requirements
    assert "uvloop.run(" in (PACKAGE / "async_worker.py").read_text()


def _package_map() -> str:
    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("### Inside the package")
    return readme[start: readme.index("\n### ", start + 1)]


def _mapped_modules(package_map: str) -> set[str]:
    return {line.split()[0] for line in package_map.splitlines() if line.split() and line.split()[0].endswith(".py")}


def test_the_readme_maps_every_module() -> None:
    """The README's package map names every module with code (a room's docstring-only __init__ needs none)."""
    mapped = _mapped_modules(_package_map())
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        docstring_only = len(tree.body) == 1 and ast.get_docstring(tree) is not None
        if path.name == "__main__.py" or (path.name == "__init__.py" and (docstring_only or relative == "__init__.py")):
            continue
        if relative not in mapped:
            missing.append(relative)
    assert missing == [], f"modules missing from the README's 'Inside the package' map: {missing}"
    assert not mapped - {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")}, \
        "the map names modules that do not exist"


def test_the_map_check_sees_a_missing_module() -> None:
    """The checker itself: a map without a module's line does not list it."""
    package_map = _package_map()
    assert "run/execute.py" in _mapped_modules(package_map)
    assert "run/execute.py" not in _mapped_modules(package_map.replace("run/execute.py", "run/other"))


def test_every_imported_package_is_declared() -> None:
    """A third-party import must come from a distribution setup.cfg declares (directly, not by luck).

    Optional tools import from an extra (the dashboard's screenshot script: selenium, in `screenshot`).
    """
    import configparser
    import re
    import sys
    from importlib.metadata import packages_distributions

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    lines = [*config["options"]["install_requires"].split("\n"),
             *(line for extra in config["options.extras_require"].values() for line in extra.split("\n"))]
    declared = {re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-")
                for line in lines if line.strip()}
    distributions = packages_distributions()
    undeclared = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "poltergust":
                    continue
                owners = {dist.lower().replace("_", "-") for dist in distributions.get(top, [top])}
                if not owners & declared:
                    undeclared.add(f"{path.relative_to(PACKAGE)}: {name} ({', '.join(sorted(owners))})")
    assert sorted(undeclared) == []


def test_every_test_the_readme_cites_exists() -> None:
    """A guarantee whose test was renamed or removed must not go on citing it."""
    readme = (PACKAGE.parent / "README.md").read_text()
    cited = re.findall(r"(test_\w+\.py)`?::`?(test_\w+)", readme)
    assert len(cited) > 20
    tests = PACKAGE.parent / "tests"
    missing = [f"{module}::{name}" for module, name in sorted(set(cited))
               if not re.search(rf"^(async )?def {name}\(", (tests / module).read_text(), re.MULTILINE)]
    assert missing == [], f"the README cites tests that do not exist: {missing}"
