"""The helper package's layout: one concern per module, layers, no cycles, owner-side code without syft."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools.book import series

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
PACKAGE = TUTORIALS / "secure_ai"
LAYERS = {  # as the package docstring lists them
    0: ["quiet", "runtime", "memory"],
    1: ["data", "training", "plots", "privacy", "dp_sgd", "features", "attacks", "membership", "costs",
        "imprint", "secret_sharing", "encryption"],
    2: ["syft_servers", "syft_patches", "review", "datasites", "remote"],
    3: ["pointers", "federated", "dp_fedavg", "secagg", "aggregator", "scale"],
}
LAYER = {module: layer for layer, modules in LAYERS.items() for module in modules}
# What code that runs on a datasite may import: nothing here imports syft when it is imported.
OWNER_SIDE = [*LAYERS[0], *LAYERS[1], "dp_fedavg", "secagg"]


def tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text())


def imported_modules(node: ast.AST, module: str) -> list[str]:
    """The package's modules ``node`` imports: ``from . import x``, ``from .x import y``, ``secure_ai.x``."""
    found = []
    for item in ast.walk(node):
        if isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level == 1 or base == "secure_ai" or base.startswith("secure_ai."):
                base = base.removeprefix("secure_ai").lstrip(".")
                found += [base.split(".")[0]] if base else [alias.name for alias in item.names]
        elif isinstance(item, ast.Import):
            found += [a.name.split(".")[1] for a in item.names if a.name.startswith("secure_ai.")]
    return [name for name in found if name in LAYER and name != module]


def test_every_module_is_listed_in_a_layer():
    assert sorted(LAYER) == sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    docstring = ast.get_docstring(tree("__init__"))
    assert all(f":mod:`secure_ai.{module}`" in docstring for module in LAYER)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_one_concern_per_module_stated_first_and_at_most_450_lines(module):
    lines = (PACKAGE / f"{module}.py").read_text().splitlines()
    assert len(lines) <= 450, f"{module}.py has {len(lines)} lines"
    first = (ast.get_docstring(tree(module)) or "").splitlines()
    assert first and len(first[0]) > 20 and first[0].endswith("."), first[:1]


def test_no_import_runs_up_a_layer_or_in_a_circle():
    """Every import counts, those inside functions too."""
    graph = {module: set(imported_modules(tree(module), module)) for module in LAYER}
    upward = [f"{m} (L{LAYER[m]}) -> {t} (L{LAYER[t]})" for m, targets in graph.items() for t in targets
              if LAYER[t] > LAYER[m]]
    assert upward == []
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join([*path, target])}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_private_name_is_used_across_modules():
    """``from .x import _y``, ``x._y`` on a module, or ``obj._y`` where only another module defines ``_y``."""
    defined = {}
    for module in LAYER:
        names = set()
        for item in ast.walk(tree(module)):
            if isinstance(item, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                names.add(item.name)
            elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store):
                names.add(item.attr)
            elif isinstance(item, ast.Name) and isinstance(item.ctx, ast.Store):
                names.add(item.id)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names.add(item.target.id)
        defined[module] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    found = []
    for module in LAYER:
        for item in ast.walk(tree(module)):
            if isinstance(item, ast.ImportFrom) and imported_modules(item, module):
                found += [f"{module}: imports {a.name}" for a in item.names if a.name.startswith("_")]
            private = isinstance(item, ast.Attribute) and item.attr.startswith("_")
            if private and not item.attr.startswith("__"):
                others = [m for m in LAYER if m != module and item.attr in defined[m]]
                if others and item.attr not in defined[module]:
                    found.append(f"{module}: .{item.attr} of {others}")
    assert found == []


GATEWAY = {"datasites", "remote", "federated"}  # importing any of these imports syft through datasites


def imports_syft(item) -> bool:
    names = [item.module or ""] if isinstance(item, ast.ImportFrom) else [a.name for a in item.names]
    return any(n == "syft" or n.startswith("syft.") for n in names)


def test_syft_is_imported_only_through_the_gateway():
    """Only L2 and L3 import syft, and only after secure_ai.datasites: in the module or in the function."""
    found = []
    for module in LAYER:
        module_tree = tree(module)
        top = [item for item in module_tree.body if isinstance(item, ast.Import | ast.ImportFrom)]
        top_gateway = any(GATEWAY & set(imported_modules(item, module)) for item in top)
        for scope in [module_tree, *(f for f in ast.walk(module_tree) if isinstance(f, ast.FunctionDef))]:
            in_function = scope is not module_tree
            gateway = module in ("datasites", "syft_patches", "syft_servers") or (in_function and top_gateway)
            imports = sorted((i for i in ast.walk(scope) if isinstance(i, ast.Import | ast.ImportFrom)),
                             key=lambda i: i.lineno) if in_function else top
            for item in imports:
                gateway = gateway or bool(GATEWAY & set(imported_modules(item, module)))
                if imports_syft(item) and (LAYER[module] < 2 or not gateway):
                    found.append(f"{module}.{getattr(scope, 'name', '<module>')}, line {item.lineno}")
    assert found == []


def test_owner_side_modules_import_no_syft():
    """What runs on a datasite (approved code) imports these modules there: none may bring in syft or the
    gateway, with its import-time side effects and its atexit hook."""
    code = (f"import sys\nfor m in {OWNER_SIDE!r}:\n    __import__('secure_ai.' + m)\n"
            "print(__import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'syft'"
            " or m == 'secure_ai.datasites')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=TUTORIALS, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def owner_side_functions():
    """Functions that import the package in their body: code sent to a datasite (it imports what it uses)."""
    sources = {f"{m}.py": (PACKAGE / f"{m}.py").read_text() for m in LAYER}
    for path in series(TUTORIALS):   # the chapters and the appendices
        cells = nbformat.read(path, as_version=4).cells
        sources[path.name] = "\n".join(c.source for c in cells if c.cell_type == "code"
                                       and not c.source.lstrip().startswith(("%", "!")))
    for name, source in sources.items():
        for function in ast.walk(ast.parse(source)):
            if isinstance(function, ast.FunctionDef):
                body = ast.Module(body=function.body, type_ignores=[])
                used = [i for i in ast.walk(body) if isinstance(i, ast.Import | ast.ImportFrom)
                        and getattr(i, "level", 0) == 0 and any(n.startswith("secure_ai") for n in
                                                                [getattr(i, "module", None) or ""]
                                                                + [a.name for a in i.names])]
                if used:
                    yield f"{name}:{function.name}", imported_modules(body, "")


def test_owner_side_code_imports_only_owner_side_modules():
    functions = dict(owner_side_functions())
    assert "scale.py:train_local_epoch" in functions and "dp_fedavg.py:dp_train" in functions
    assert any(name.startswith("Part-02") for name in functions)
    wrong = {name: sorted(set(modules) - set(OWNER_SIDE)) for name, modules in functions.items()
             if set(modules) - set(OWNER_SIDE)}
    assert wrong == {}
