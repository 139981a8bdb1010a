"""The package's import graph: no cycles, and every import goes down the layers (module-level imports and
those inside functions alike), so any module can be read, tested and imported without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import levante

ROOT = Path(levante.__file__).resolve().parent

# lowest first; a module may import its own layer and the ones below. Prefixes cover subpackages.
LAYERS: list[tuple[str, ...]] = [
    ("levante.errors", "levante.transfer"),
    ("levante.config", "levante.rope", "levante.kv", "levante.tokenizer", "levante.sampling", "levante.shard"),
    # structured output, tool calls, chat formats; weight formats and kernels
    ("levante.grammar", "levante.toolcalls", "levante.chat", "levante.quant", "levante.cuda"),
    ("levante.formats",),  # file readers
    ("levante.model",),
    ("levante.loader", "levante.speculative", "levante.generate", "levante.parallel"),
    ("levante.api", "levante.hf", "levante.engine"),
    ("levante.tools",),  # quantize, compress, awq calibration, quality, bench
    ("levante.server", "levante.cli", "levante.__main__", "levante"),
]


def module_names() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """levante modules imported anywhere in the file (top level, functions, TYPE_CHECKING blocks)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod; `from pkg import name` takes name from pkg's module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # `from pkg import name`: the module, else its package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer_of(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {n: imports_of(n, p, modules) for n, p in modules.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        path.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_go_down_the_layers():
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, deps in sorted(graph().items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
    """The walker itself: relative, absolute and in-function imports all count."""
    pkg = tmp_path / "levante"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    import levante.c\n")
    (pkg / "c.py").write_text("from . import a\nfrom levante.sub.b import f\n")
    modules = {"levante": pkg / "__init__.py", "levante.sub": pkg / "sub" / "__init__.py",
               "levante.a": pkg / "a.py", "levante.sub.b": pkg / "sub" / "b.py", "levante.c": pkg / "c.py"}
    assert imports_of("levante.a", modules["levante.a"], modules) == {"levante.sub.b"}
    assert imports_of("levante.sub.b", modules["levante.sub.b"], modules) == {"levante.c"}
    assert imports_of("levante.c", modules["levante.c"], modules) == {"levante.a", "levante.sub.b"}
    g = {n: imports_of(n, p, modules) for n, p in modules.items()}
    assert find_cycle(g) == ["levante.a", "levante.sub.b", "levante.c", "levante.a"]
    g["levante.sub.b"] = set()
    assert find_cycle(g) is None
