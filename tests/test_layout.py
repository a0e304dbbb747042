"""The package's layout rules (ARCHITECTURE.md section 1), checked on the source: no import cycle (counting
imports inside functions too), no import that runs up a floor, no module over 500 lines."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dcam_jax", "eval", "checkpoints_convert")

# Floors, lowest first: a module may import modules of its own floor or of a lower one. Every module belongs to the
# first prefix in this table that it starts with.
FLOORS = (
    ("dcam_jax.fileio", 0), ("dcam_jax.tool", 0), ("dcam_jax.ops", 0),
    ("dcam_jax.models", 1), ("dcam_jax.metrics", 1), ("dcam_jax.viz", 1), ("dcam_jax.data", 1),
    ("dcam_jax.processing", 2), ("dcam_jax.checkpoint", 2), ("dcam_jax.viewer", 2),
    ("dcam_jax.sampling", 3), ("dcam_jax.sharding", 3),
    ("dcam_jax.cam", 4),
    ("dcam_jax.api", 5),
    ("dcam_jax.cli", 6), ("dcam_jax.toy", 6), ("checkpoints_convert", 6),
    ("dcam_jax", 5),  # the package __init__: the public API
    ("eval", 7),
)


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for base in PACKAGES:
        for path in (ROOT / base).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (top level or inside functions)."""

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = owner(name)
                if target and target != m:
                    graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def floor(module: str) -> int:
    for prefix, level in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


@pytest.fixture(scope="module")
def graph():
    # Parsed in a fresh interpreter: Python 3.11's ast.parse keeps a process-wide recursion counter that a test
    # worker's leftover threads can disturb ("AST constructor recursion depth mismatch").
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return {m: set(targets) for m, targets in json.loads(r.stdout).items()}


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_import_runs_up_a_floor(graph):
    up = sorted(f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
                for m, targets in graph.items() for t in targets if floor(t) > floor(m))
    assert up == []


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for base in ("dcam_jax", "eval") for p in (ROOT / base).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


if __name__ == "__main__":  # the graph fixture's subprocess
    print(json.dumps({m: sorted(t) for m, t in import_graph(_modules()).items()}))
