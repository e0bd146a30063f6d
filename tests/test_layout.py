"""The package's layout (docs/design.md, "Module layout"): its import graph, read from the source with ``ast``, has
no cycle and respects the floors; no production module imports the test-support module; and nothing in the
repository cites a file outside it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "tucker_lora"
TEST_SUPPORT = f"{PACKAGE}.testing"
#: Floor of each top-level module: a module imports only modules of lower floors (docs/design.md).
FLOORS = {
    "tucker": 0,
    "errors": 0,
    "registry": 0,
    "triton_kernels": 0,
    "decomposition": 1,
    "functional": 1,
    "io": 1,
    "cli": 1,
    "card": 1,
    "layer": 2,
    "config": 2,
    "lowrank": 2,
    "targets": 3,
    "init": 3,
    "adapted": 3,
    "diffusers_api": 3,
    "model": 4,
    "ranks": 5,
    "export": 5,
    "resize": 5,
    "hotswap": 5,
    "__init__": 6,
}
#: Subpackages above the core, in order: a subpackage imports the core, itself and the ones before it.
SUBPACKAGES = ("video", "eval")


def module_names(src: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of ``package`` under ``src`` (a package is its __init__)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str], package: str) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its source (module level, inside
    functions, under ``TYPE_CHECKING``): ``import a.b``, ``from a.b import c`` and relative imports, where
    ``from . import x`` counts as importing the submodule ``x`` when there is one."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from a import b``: the submodule a.b where there is one, else the module a
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:  # ``import a.b.name``: the module a.b
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and (target == package or target.startswith(package + ".")):
                found.add(target)
    return found


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}`` for every module of ``package`` under ``src``."""
    modules = module_names(src, package)
    return {name: imported_modules(name, path, set(modules), package) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


# ---------------------------------------------------------------------------------------------- the reader
def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_reader_finds_every_kind_of_import_and_the_cycle_they_close(tmp_path):
    """A planted package: a cycle closed by a function-level relative import, edges of every import form."""
    src = write_package(
        tmp_path,
        {
            "__init__.py": "from .a import f\n",
            "a.py": "import pkg.b\n",
            "b.py": "from pkg.sub import c\n",
            "sub/__init__.py": "",
            "sub/c.py": "def g():\n    from ..a import f\n    from . import d\n",
            "sub/d.py": "from pkg import b as _b\nimport os\n",
        },
    )
    graph = import_graph(src, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": set(),
        "pkg.sub.c": {"pkg.a", "pkg.sub.d"},
        "pkg.sub.d": {"pkg.b"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) <= {"pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d"}
    for a, b in zip(cycle, cycle[1:], strict=False):
        assert b in graph[a], (a, b)
    graph["pkg.sub.c"] = {"pkg.sub.d"}  # drop the function-level import of a: no cycle left
    graph["pkg.sub.d"] = set()
    assert find_cycle(graph) is None


# ---------------------------------------------------------------------------------------------- the package
def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"tucker_lora.layer", "tucker_lora.init", "tucker_lora.decomposition"} <= set(graph)
    assert "tucker_lora.decomposition" in graph["tucker_lora.layer"]  # the reader sees the package's own imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_lower_floors_never_import_higher_ones():
    problems = []
    for name, edges in import_graph().items():
        parts = name.split(".")
        if len(parts) == 1 or parts[1] not in SUBPACKAGES:  # a core module (or the package itself)
            top = "__init__" if len(parts) == 1 else parts[1]
            if name == TEST_SUPPORT:
                continue
            assert top in FLOORS, f"{name} has no floor in FLOORS (docs/design.md, 'Module layout')"
            for edge in edges:
                other = edge.split(".")
                # within one package of the core (export/, resize/)
                if max(len(other), len(parts)) > 2 and other[:2] == parts[:2]:
                    continue
                if len(other) > 1 and other[1] in SUBPACKAGES or edge == TEST_SUPPORT:
                    problems.append(f"{name} imports {edge}")
                elif FLOORS["__init__" if len(other) == 1 else other[1]] >= FLOORS[top]:
                    problems.append(f"{name} (floor {FLOORS[top]}) imports {edge}")
        else:  # video/, eval/: the core, themselves and the subpackages before them
            allowed = SUBPACKAGES[: SUBPACKAGES.index(parts[1]) + 1]
            for edge in edges:
                other = edge.split(".")
                if len(other) > 1 and other[1] in SUBPACKAGES and other[1] not in allowed:
                    problems.append(f"{name} imports {edge}")
    assert not problems, "\n".join(problems)


def test_no_production_module_imports_the_test_support_module():
    graph = import_graph()
    assert TEST_SUPPORT in graph
    importers = sorted(name for name, edges in graph.items() if TEST_SUPPORT in edges)
    assert importers == [], f"production modules import {TEST_SUPPORT}: {importers}"


# ---------------------------------------------------------------------------------------------- references
#: Files outside the repository that must not be cited (written so that this file does not match itself).
OUTSIDE = re.compile(
    "|".join([r"DESIGN" + r"\.md", r"/work" + r"/", r"five-mode-tucker-lora" + r"\.txt", "layout-" + "sketch"])
)
SCANNED = ["src", "tests", "benchmarks", "examples", "docs", "tools"]


@pytest.mark.parametrize("folder", SCANNED)
def test_nothing_cites_a_file_outside_the_repository(folder):
    hits = []
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix not in (".py", ".md", ".sh", ".yaml", ".txt") or "egg-info" in str(path):
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


#: A citation of a section of the design page: its path, then one or more section titles in quotes.
SECTION_REFERENCE = re.compile(r"docs/design\.md[,\s(]*((?:[\"'][^\"']+[\"'][,\s]*)+)")


def test_references_to_design_sections_name_existing_headings():
    headings = {
        line[3:].strip() for line in (ROOT / "docs" / "design.md").read_text().splitlines() if line.startswith("## ")
    }
    cited, missing = 0, []
    for folder in ("src", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                for group in SECTION_REFERENCE.findall(line):
                    for title in re.findall(r"[\"']([^\"']+)[\"']", group):
                        cited += 1
                        if title not in headings:
                            missing.append(f"{path.relative_to(ROOT)}:{i}: {title!r}")
    assert cited >= 5  # the comments do point into the page
    assert not missing, f"sections not in docs/design.md ({sorted(headings)}):\n" + "\n".join(missing)
