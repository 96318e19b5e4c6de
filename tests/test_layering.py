"""The package's floors hold: every import (module level, inside functions, under TYPE_CHECKING) goes to the same
floor or a lower one, and no set of modules imports itself in a circle.

Floors, lowest first (README "Architecture"):

0. foundations: ``config`` (config errors and checks), ``_hydra`` (the conf/ tree), ``assets``, ``reward_http``
   (HTTP helpers shared by the reward server and its client);
1. ``data``: records, benchmark files, ShapesWorld, prompt sets and data modules;
2. ``policies``: generators, tokenizers, LoRA, released-checkpoint loaders; ``checkpoints`` (every checkpoint kind,
   loaded into a policy);
3. ``rewards`` and ``evaluation``: scorers and benchmark metrics;
4. ``algorithms`` and ``strategies`` (the FSDP / DeepSpeed plumbing the algorithms' clip-and-step calls);
5. ``callbacks``;
6. entry points: ``fit``, ``evaluate``, ``export``, ``generate``, ``serve``, ``prompts``, ``tiny_checkpoint``.

The graph is read from the source with ``ast`` (nothing is imported), so the test takes well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "htgrpo"

FLOORS: tuple[tuple[str, ...], ...] = (
    ("htgrpo.config", "htgrpo._hydra", "htgrpo.assets", "htgrpo.reward_http"),
    ("htgrpo.data",),
    ("htgrpo.policies", "htgrpo.checkpoints"),
    ("htgrpo.rewards", "htgrpo.evaluation"),
    ("htgrpo.algorithms", "htgrpo.strategies"),
    ("htgrpo.callbacks",),
    ("htgrpo.fit", "htgrpo.evaluate", "htgrpo.export", "htgrpo.generate", "htgrpo.serve", "htgrpo.prompts",
     "htgrpo.tiny_checkpoint"),
)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the htgrpo modules it imports (``from a.b import c`` counts as ``a.b.c`` when that is a module).
    The package root ``htgrpo`` itself is left out: it holds nothing."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "htgrpo"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "htgrpo":
                targets |= {owner(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}:{node.lineno}: relative import; htgrpo imports absolutely")
        graph[name] = targets - {name, "htgrpo"}
    graph.pop("htgrpo", None)
    return graph


def floor_of(module: str) -> int | None:
    for floor, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return floor
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_stands_on_a_floor(graph):
    homeless = sorted(m for m in graph if floor_of(m) is None)
    assert not homeless, f"{homeless}: add each to a floor in FLOORS (tests/test_layering.py) and README Architecture"


def test_no_import_runs_back_up_a_floor(graph):
    upward = [f"{m} (floor {floor_of(m)}) -> {t} (floor {floor_of(t)})"
              for m in sorted(graph) for t in sorted(graph[m]) if (floor_of(t) or 0) > (floor_of(m) or 0)]
    assert not upward, "imports from a lower floor to a higher one:\n" + "\n".join(upward)


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_the_checks_see_circles_and_upward_arrows(tmp_path):
    """The reader and the checks on a made-up package: a function-level import closing a circle and a TYPE_CHECKING
    import running up are both found."""
    pkg = tmp_path / "htgrpo"
    (pkg / "data").mkdir(parents=True)
    (pkg / "rewards").mkdir()
    for f in ("__init__.py", "data/__init__.py", "rewards/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "a.py").write_text("from htgrpo.data.b import thing\n")
    (pkg / "data" / "b.py").write_text("def thing():\n    from htgrpo.data import a\n    return a\n")
    (pkg / "data" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from htgrpo.rewards.r import R\n")
    (pkg / "rewards" / "r.py").write_text("import htgrpo.data.c\n")
    made_up = import_graph(pkg)
    assert made_up["htgrpo.data.b"] == {"htgrpo.data.a"} and made_up["htgrpo.data.c"] == {"htgrpo.rewards.r"}
    assert circles(made_up) == [["htgrpo.data.a", "htgrpo.data.b"], ["htgrpo.data.c", "htgrpo.rewards.r"]]
    assert floor_of("htgrpo.rewards.r") > floor_of("htgrpo.data.c")
