"""The package's import graph has no cycle: every import of one jaxnets module by another,
at module level or inside a function, read from the source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxnets"


def imports_of(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
            module = f"jaxnets.{node.module}" if node.module else "jaxnets"
            node = ast.ImportFrom(module=module, names=node.names, level=0)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxnets"):
            if node.module == "jaxnets":
                found |= {f"jaxnets.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jaxnets.")}
    return {m for m in found if (PACKAGE / (m.split(".", 1)[1] + ".py")).exists()}


def test_no_import_cycle_in_jaxnets():
    graph = {f"jaxnets.{p.stem}": imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(stack + [module, dep])
            if dep not in state:
                visit(dep, stack + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["jaxnets.training"].isdisjoint({"jaxnets.sweep"})
