"""The import graph of ``tenslora`` has no circles (static, via ``ast``), and ``plus/`` works without ``train/``.

Imports inside functions count too: a lazy import is still a dependency. Nodes are the package's
sub-packages (``tenslora.plus``, ``tenslora.train``, ...) and top-level modules (``tenslora.config``, ...).
"""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tenslora"


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package (packages by their ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(path: Path) -> set[str]:
    """Every ``tenslora...`` name imported anywhere in the file (``from a import b`` gives ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "tenslora" or n.startswith("tenslora.")}


def unit(name: str) -> str:
    """The graph node of a module: its sub-package (``tenslora.plus.optim`` -> ``tenslora.plus``)."""
    return ".".join(name.split(".")[:2])


def unit_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{node: nodes it imports}`` (``from tenslora import X`` is an edge to the root ``tenslora``)."""
    def owner(target: str) -> str:
        while target not in mods:
            target = target.rpartition(".")[0]
        return target

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        src = unit(name)
        graph.setdefault(src, set()).update(unit(owner(t)) for t in imported_names(path))
        graph[src].discard(src)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (depth-first search, deterministic)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_is_read():
    graph = unit_graph(modules())
    assert "tenslora.plus" in graph["tenslora.train"]  # train builds TensLoRA+ optimizer groups
    assert "tenslora.train" in graph["tenslora.cli"]


def test_no_import_cycle_between_subpackages_and_modules():
    cycle = find_cycle(unit_graph(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The README's flow, top layers: each may import the ones before it (and the core), never one after it.
LAYERS = ("tenslora.plus", "tenslora.train", "tenslora.export", "tenslora.sweep", "tenslora.repro", "tenslora.cli")


def test_imports_follow_the_layers():
    graph = unit_graph(modules())
    rank = {u: LAYERS.index(u) if u in LAYERS else -1 for u in graph}  # -1: the core modules
    rank.update({"tenslora": len(LAYERS), "tenslora.__main__": len(LAYERS)})  # the package's front doors
    upward = sorted(f"{u} -> {t}" for u, targets in graph.items() for t in targets if rank[t] > rank[u])
    assert not upward


def test_plus_never_imports_train():
    offenders = {name: sorted(t for t in imported_names(path) if unit(t) == "tenslora.train")
                 for name, path in modules().items() if unit(name) == "tenslora.plus"}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("blocked", ["tenslora.train"])
def test_plus_imports_and_allocates_with_train_blocked(blocked):
    plus = sorted(n for n in modules() if unit(n) == "tenslora.plus")
    code = textwrap.dedent(f"""
        import importlib, math, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {blocked!r} or name.startswith({blocked!r} + "."):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        for name in {plus!r}:
            importlib.import_module(name)
        from tenslora.plus.allocate import allocate_from_metrics, format_record
        from tenslora.targets import ModelShape
        shape = ModelShape(projections=("query", "key", "value"), layers=tuple(range(6)), d_in=384,
                           d_out=(384,) * 3, head_dim=32)
        metrics = {{m: {{"effective_rank": e, "entropy": math.log(e)}}
                   for m, e in dict(input=2.0, output=3.0, qkv=1.5, layers=4.0).items()}}
        record = allocate_from_metrics(metrics, "qkv_depth", shape, "lora:2")
        format_record(record)
        assert not any(m == {blocked!r} or m.startswith({blocked!r} + ".") for m in sys.modules)
        print("ok", record["ranks_string"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
