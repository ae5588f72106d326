"""The import structure of the loss ops (from the source text, nothing imported): layers, no cycles.

    grkernels.ops.losses -> ops.fused_linear -> ops.custom_ops -> grkernels.kernels;  ops.spec is a leaf.

- ``grkernels/kernels/`` holds kernels: it imports neither the op surface, the registration, nor the GR-step
  backends above it;
- the specification imports nothing from grkernels; registration never imports the op surface;
- no sibling import is placed inside a function in these modules (an import moved into a function to dodge a
  cycle is still a cycle);
- no import cycle anywhere in the package (module- and function-level imports both count).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "grkernels"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported grkernels module, inside a function?) for every import of ``module`` (TYPE_CHECKING excluded).

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    skip: set[int] = set()
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                base_parts = base_parts[: len(base_parts) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out += [(t, id(node) in inner) for t in targets if t in MODULES and t != module]
    return out


LOSS_OP_MODULES = [
    "grkernels.ops",
    "grkernels.ops.losses",
    "grkernels.ops.fused_linear",
    "grkernels.ops.custom_ops",
    "grkernels.ops.spec",
    "grkernels.library",
    "grkernels.kernels",
    "grkernels.kernels.logprob",
    "grkernels.kernels.policy_loss",
    "grkernels.kernels.cpp_losses",
    "grkernels.demo.experiment",
    "grkernels.demo.frontier",
    "grkernels.demo.smoothing",
]


def test_loss_op_layers_import_only_downwards():
    for module in LOSS_OP_MODULES:
        assert module in MODULES, module
    kernels = [m for m in MODULES if m == "grkernels.kernels" or m.startswith("grkernels.kernels.")]
    above = ("grkernels.ops", "grkernels.library", "grkernels.backends", "grkernels.optim", "grkernels.engine")
    for module in kernels:
        bad = [t for t, _ in _imports(module) if t.startswith(above)]
        assert not bad, f"{module} (a kernel module) imports {bad}"
    assert _imports("grkernels.ops.spec") == [], "the specification must not depend on the rest of grkernels"
    for module, forbidden in (
        ("grkernels.ops.custom_ops", ("grkernels.ops.losses", "grkernels.ops.fused_linear", "grkernels.library")),
        ("grkernels.ops.fused_linear", ("grkernels.ops.losses", "grkernels.library")),
        ("grkernels.library", ("grkernels.ops",)),
    ):
        bad = [t for t, _ in _imports(module) if t.startswith(forbidden)]
        assert not bad, f"{module} imports {bad} (a layer above it)"


def test_no_function_level_sibling_imports_in_the_loss_op_modules():
    for module in LOSS_OP_MODULES:
        inner = [t for t, in_fn in _imports(module) if in_fn]
        assert not inner, f"{module} imports {inner} inside a function"


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over all imports."""
    graph = {m: {t for t, _ in _imports(m)} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles_in_the_package():
    # a package's __init__ importing its own submodules is not a cycle unless a submodule imports it back
    assert _cycles() == []
