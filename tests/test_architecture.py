"""The house stays easy to see (docs/architecture.md): dependencies point one way, functions fit on a screen,
one package per world, and reading a config imports no heavy library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cmalign"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(module: str, node: ast.AST, is_package: bool) -> set[str]:
    """The cmalign modules an import statement names (a `from pkg import sub` names pkg.sub when it is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")[: len(module.split(".")) - (node.level - 1) - (0 if is_package else 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the cmalign modules it imports, every import statement counted (nested ones included)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(module, node, path.name == "__init__.py")
        graph[module] = edges - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_any_two_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_every_digits_module_lives_in_the_digits_package():
    outside = [str(p.relative_to(SRC)) for p in PACKAGE.rglob("*.py") if "digits" in p.stem
               and PACKAGE / "worlds" / "digits" not in p.parents]
    assert outside == []


def test_worlds_name_no_method_and_the_mathematics_imports_no_layer_above_it():
    graph = import_graph()
    worlds = [m for m in graph if m.startswith("cmalign.worlds")]
    # a world names no method and never assembles or runs a training (its CLI commands may use the run-directory safety)
    assert not [(m, t) for m in worlds for t in graph[m]
                if t.startswith(("cmalign.methods", "cmalign.training")) and t != "cmalign.training.run_dir"]
    for core in ("cmalign.schedule", "cmalign.divergences"):
        assert not [t for t in graph[core] if t not in ("cmalign.errors",)], core


def test_reading_a_config_imports_neither_torch_nor_diffusers():
    code = ("import sys; from cmalign.config import TrainConfig, load_preset; c = load_preset('lcm-sdxl'); "
            "print(c.lcm.model, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:] == ["False", "False"], out.stdout
