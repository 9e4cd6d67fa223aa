"""The package's import graph has no cycles (counting imports inside functions too)."""

import ast
from pathlib import Path

import ldnbench

PACKAGE = Path(ldnbench.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the ldnbench modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # a package's __init__ is not charged to its submodules (it is their namespace)
                if t and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_ldnbench():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


#: The README's architecture table, lowest layer first: a module may import only its own layer and below.
LAYERS = [
    ["errors", "fileio", "train_config", "runtime", "__init__"],
    ["models"],
    ["data"],
    ["checkpoints", "convert"],
    ["metrics", "losses", "kernels", "inference"],
    ["report"],
    ["deploy"],
    ["evaluate", "score", "predict", "train", "launch"],
    ["studies", "bench", "demo", "report.gallery"],
    ["cli", "__main__"],
]


def _layer(module: str) -> int:
    rel = module.split(".", 1)[1] if "." in module else "__init__"
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (rel == n or rel.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, f"{module} is in no layer of the README's table"
    return best[0]


def test_modules_import_only_their_layer_and_below():
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
              if d != "ldnbench" and _layer(d) > _layer(m)]
    assert not upward, upward
