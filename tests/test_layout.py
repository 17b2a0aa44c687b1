"""The package's layout is its pipeline: every module imports only modules below it.

``ORDER`` lists every module of symconv from the bottom up (a package stands for its
``__init__``).  A module may import, at the top or inside a function, only modules
listed before it; a new module must be placed in the list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import symconv

ROOT = Path(symconv.__file__).resolve().parent

ORDER = [
    "kernel", "_version", "progress", "errors", "spec",
    "symbolic.affine", "symbolic.ir", "symbolic.batch", "symbolic.lowering", "symbolic.printing",
    "symbolic.interpreter", "symbolic.derive", "symbolic.define.op", "symbolic.define.conv",
    "symbolic.define.expression", "symbolic.define.gradient", "symbolic.define", "symbolic",
    "codegen.schedule", "codegen.c", "codegen.isa", "codegen.vector", "codegen.channels",
    "codegen.emit", "codegen",
    "package.targets", "package.build", "package", "tune",
    "compiler", "check", "autodiff", "binding",
    "graph.engine", "graph.ops", "graph.compiled", "graph.nn", "graph.optim", "graph.gradcheck",
    "graph",
    "torch", "jax", "dask", "explain", "report", "cli", "__main__", "",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, name: str, is_package: bool) -> set[str]:
    """The symconv modules a module's source imports, as names relative to the package."""
    own = name.split(".") if name else []
    package = own if is_package else own[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "symconv":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:      # `from . import ops` imports the module ops
                module = ".".join(target + [alias.name])
                found.add(module if module in ORDER else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "symconv":
                    found.add(".".join(alias.name.split(".")[1:]))
    return found


def upward_imports(name: str, targets: set[str]) -> list[str]:
    rank = {module: i for i, module in enumerate(ORDER)}
    return [f"{name or 'symconv'} imports {target or 'symconv'}" for target in sorted(targets)
            if target != name and rank[target] >= rank[name]]


def test_every_module_is_placed():
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    assert modules == set(ORDER), (sorted(modules - set(ORDER)), sorted(set(ORDER) - modules))


def test_imports_flow_one_way():
    upward = []
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        upward += upward_imports(name, imported(path.read_text(), name,
                                                path.name == "__init__.py"))
    assert not upward, upward


def test_the_check_reports_an_upward_import():
    source = "from ..errors import IRError\nfrom ..graph import engine\nfrom . import derive\n"
    targets = imported(source, "symbolic.ir", False)
    assert targets == {"errors", "graph.engine", "symbolic.derive"}
    assert upward_imports("symbolic.ir", targets) == ["symbolic.ir imports graph.engine",
                                                      "symbolic.ir imports symbolic.derive"]
    assert imported("import symconv.torch as st\n", "report", False) == {"torch"}
