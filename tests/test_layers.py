"""The package's import graph: imports point down the layers and no module imports one that imports it.

Layers, bottom to top (README "Layout"): the floor (config, math, atomic writes, devices, data, reports, test
support) -> kernels, policies, envs, engine -> the StepNFT loop -> experiment drivers -> doctor, errors, train -> cli.
Imports inside functions count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastnft"

LAYERS: list[set[str]] = [
    {"fastnft", "fastnft.atomic", "fastnft.chunks", "fastnft.config", "fastnft.devices", "fastnft.metrics",
     "fastnft.nft", "fastnft.profiling", "fastnft.report", "fastnft.sde", "fastnft.testing"},
    {"fastnft.kernels", "fastnft.policies", "fastnft.envs", "fastnft.engine"},
    {"fastnft.loop"},
    {"fastnft.experiments"},
    {"fastnft.doctor", "fastnft.errors", "fastnft.train"},
    {"fastnft.cli"},
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastnft"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in mods else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fastnft"))
    return {m for m in out if m in mods}


def _rank(module: str) -> int:
    # The longest layer entry that is the module or one of its packages decides.
    best, rank = "", None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > len(best):
                best, rank = entry, i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and the README layout")
    return rank


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, mods) - {name} for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        _rank(module)


def test_imports_point_down(graph):
    upward = [f"{a} (layer {_rank(a)}) imports {b} (layer {_rank(b)})"
              for a, targets in graph.items() for b in targets
              # a package's __init__ may re-export its own submodules
              if _rank(b) > _rank(a) and not b.startswith(a + ".")]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_circles(graph):
    # Tarjan's strongly connected components; a component with more than one module is a circle.
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    circles = [sorted(c) for c in comps if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_the_check_sees_an_upward_import(graph):
    # The graph must be real: a known downward arrow is present, so an empty graph cannot pass the tests above.
    assert "fastnft.loop.rollout" in graph["fastnft.loop.trainer"]
    assert _rank("fastnft.envs.bandit") < _rank("fastnft.experiments.demos")
