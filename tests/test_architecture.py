"""The layout docs/architecture.md describes: no import circle, methods never import the
engine, and the files a method author reads stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("task", "strategies", "pflower")
TOP = ("server_app", "client_app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in TOP}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere (lazy imports too; TYPE_CHECKING ones not)."""
    tree = ast.parse(path.read_text())
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports. A package whose ``__init__`` imports its
    modules by name (``import_module``, the method registry) imports every one of them."""
    modules = project_modules()
    known = set(modules)
    graph = {name: imports_of(name, path, known) for name, path in modules.items()}
    for name, path in modules.items():
        if path.name == "__init__.py" and "import_module(" in path.read_text():
            graph[name] |= {m for m in known if m.rpartition(".")[0] == name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_methods_never_import_the_engine():
    graph = import_graph()
    offenders = {m: sorted(i for i in deps if i.startswith("task.engine"))
                 for m, deps in graph.items() if m.startswith("strategies")}
    assert not {m: d for m, d in offenders.items() if d}


def test_the_method_base_and_the_engine_stay_small():
    assert len((ROOT / "strategies/base.py").read_text().splitlines()) < 200
    for path in (ROOT / "task/engine").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path


def test_the_documented_template_is_a_working_method():
    """docs/architecture.md's template method, loaded as a module: its client half trains
    exactly as FedProx's (the same objective), its server half aggregates as FedAvg's."""
    import re
    import sys
    import types

    import torch

    from task.engine.rounds import Engine

    from .fake_grid import FakeGrid
    from .helpers import TINY, client, tiny_cfg

    text = (ROOT / "docs/architecture.md").read_text()
    code = re.search(r"`strategies/mymethod.py`:\n\n```python\n(.*?)```", text, re.S).group(1)
    module = types.ModuleType("strategies._doc_template")
    module.__package__ = "strategies"
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    cfg = tiny_cfg("strategy=fedprox strategy.mu=0.5")
    prox = client(cfg, 0)
    state = prox.state
    mine = module.MyMethodClient(cfg, 0, prox.federation, state, torch.device("cpu"))
    received = prox.initial_state()
    want = prox.train(received, {"server-round": 1})
    got = mine.train(received, {"server-round": 1})
    assert got.num_examples == want.num_examples and set(got.upload) == set(want.upload)
    assert all(torch.equal(got.upload[k], want.upload[k]) for k in want.upload)
    sizes = [(c.num_train, c.num_test) for c in prox.federation.clients]
    method = module.MyMethod.from_model(cfg, prox.model("main", received), sizes)
    rows: list[dict] = []
    Engine(method).start(FakeGrid(4, f"{TINY} strategy=fedprox strategy.mu=0.5"), num_rounds=1,
                         timeout=30, on_round=rows.append)
    assert rows[0]["rejected_replies"] == 0 and rows[0]["personalized_accuracy"]["mean"] > 0.1
