"""The house's rule: imports point down the layers of docs/architecture.md, "How the code is laid out", and no
modules import each other in a loop. ``python -m tests.test_layout`` prints every import edge."""

from __future__ import annotations

import ast
import sys

from tests.helpers import REPO

SRC = REPO / "src"
# Lower number = lower layer; a module may import its own layer's package or any layer below.
LAYERS = {"simfreeze.errors": 0, "simfreeze.paths": 0, "simfreeze.data": 1, "simfreeze.networks": 1, "simfreeze.method": 2,
          "simfreeze.speed": 2, "simfreeze.config": 3, "simfreeze.reports": 3, "simfreeze.runs": 4,
          "simfreeze.analysis": 5, "simfreeze.bench": 5, "simfreeze.jobs": 5, "train": 6}


def module_name(path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def box(module: str) -> str | None:
    """The layer entry a module belongs to (its package, or itself)."""
    return max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len, default=None)


def import_edges() -> dict[str, set[str]]:
    """Module → the project modules it imports (at the top or inside a function)."""
    modules = {module_name(path): path for path in SRC.rglob("*.py") if "egg-info" not in str(path)}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from simfreeze.speed import precision` imports a module, `from x import name` a name of x
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                candidates = submodules if any(c in modules for c in submodules) else [node.module]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        edges[name] = targets
    return edges


def test_every_module_has_a_layer():
    assert [m for m in import_edges() if box(m) is None and m != "simfreeze"] == []


def test_imports_point_down():
    upward = [(a, b) for a, targets in import_edges().items() for b in targets if box(a) and box(b)
              and (LAYERS[box(b)] > LAYERS[box(a)] or (LAYERS[box(b)] == LAYERS[box(a)] and box(b) != box(a)))]
    assert upward == []


def test_no_import_cycles():
    edges = import_edges()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


if __name__ == "__main__":
    for module, targets in sorted(import_edges().items(), key=lambda item: (-LAYERS.get(box(item[0]) or "", 0), item[0])):
        print(f"{module}  →  {', '.join(sorted(targets)) or '–'}")
    sys.exit(0)
