"""The layers of the house, read from the source: ``sae_core`` imports neither torch nor JAX nor any
other package of the project; the JAX side (``jax_sae``, ``discovery``) never imports the torch
side (``extractor``) or torch, except through ``jax_sae/torch_side.py``'s lazy door."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH = {"torch", "transformers", "tokenizers"}
JAX = {"jax", "jaxlib", "flax", "optax", "orbax"}
DOOR = REPO / "jax_sae" / "torch_side.py"


def imported(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, at any depth of its code: import statements (relative ones
    resolved against its package) and import_module/__import__ calls with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if base else alias.name for alias in node.names} | ({base} - {""})
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("sae_core"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_stands_alone(path):
    bad = {name for name in imported(path)
           if _top(name) in TORCH | JAX | {"extractor", "jax_sae", "discovery", "launch", "bench"}}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _modules("jax_sae", "discovery"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_jax_side_never_imports_the_torch_side(path):
    if path == DOOR:
        return
    bad = {name for name in imported(path) if _top(name) in TORCH | {"extractor"}}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; reach the torch side through jax_sae.torch_side"


def test_the_walker_sees_every_kind_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch.nn\nfrom extractor import render\nfrom .. import extractor\n"
                     "def f():\n    from extractor.steer import steer\n    importlib.import_module('extractor.effects')\n")
    found = imported(probe, package="jax_sae")
    assert {"torch.nn", "extractor.render", "extractor.steer", "extractor.effects", "extractor"} <= found


def _module_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (anywhere in its code)."""
    files = {}
    for package in ("sae_core", "extractor", "jax_sae", "discovery", "launch"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    return {name: {found for imp in imported(path) if (found := owner(imp)) not in (None, name)}
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_others():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds one
    assert not cycles(_module_graph())
