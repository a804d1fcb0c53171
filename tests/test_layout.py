"""The packages' import arrows run one way: every `import` statement of the project (module level or inside a
function, `if TYPE_CHECKING:` blocks aside) read from the source, resolved to the module it names."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attribution", "unlearning", "pipelines")
# pipelines' layers, lowest first: a module may import its own layer's modules and those of lower layers only.
LAYERS = ("pipelines.config", "pipelines.tasks", "pipelines.rundir", "pipelines.engine", "pipelines.report",
          "pipelines.stages", "pipelines.interchange", "pipelines.api", "pipelines.cli", "pipelines")


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = module_names()


def source_path(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@functools.cache
def imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement of `module` outside TYPE_CHECKING."""
    tree = ast.parse(source_path(module).read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module if not node.level else importlib.util.resolve_name(
                "." * node.level + (node.module or ""), module if source_path(module).name == "__init__.py"
                else module.rpartition(".")[0])
            for alias in node.names:  # `from package import module` is an arrow to that module
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return [(name, taken) for name, taken in found if name.split(".")[0] in PACKAGES]


@functools.cache
def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target != m} for m in MODULES}


def layer(module: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def test_the_walk_sees_the_project():
    edges = graph()
    assert len(MODULES) > 40
    assert "pipelines.rundir.layout" in edges["pipelines.stages.unlearn"]
    assert "pipelines.stages.context" in edges["pipelines.stages"]


def test_no_import_circle():
    edges, state, path = graph(), {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for target in sorted(edges.get(m, ())):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("pipelines")])
def test_pipelines_imports_only_its_own_and_lower_layers(module):
    upward = [t for t in graph()[module] if t.startswith("pipelines") and layer(t) > layer(module)]
    assert not upward, f"{module} (layer {LAYERS[layer(module)]}) imports higher layers: {upward}"


def test_report_never_imports_a_stage():
    for m in MODULES:
        if m.startswith("pipelines.report"):
            assert not [t for t in graph()[m] if t.startswith("pipelines.stages")], m


@pytest.mark.parametrize("package", ["attribution", "unlearning"])
def test_attribution_and_unlearning_stand_alone(package):
    for m in MODULES:
        if m.startswith(package):
            other = [t for t in graph()[m] if t.split(".")[0] != package]
            assert not other, f"{m} imports {other}"


def test_no_private_name_is_imported_across_modules():
    private = [(m, target, name) for m in MODULES for target, taken in imports(m) for name in taken
               if name.startswith("_") and target != m]
    assert not private, private
