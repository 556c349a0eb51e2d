"""The package's layers import only downwards, never in a circle, and every entry point is a wrapper of cli.

library (config, data, model, loss, ...) -> step / evaluation / checkpoint -> trainer -> outputs / hub / sweep /
wise_ft -> cli. Read from the source (every import statement, those inside functions too), so a lazy import that
points upwards fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clip_accel"
LAYERS = (
    # "" is clip_accel/__init__.py (the version)
    {
        "",
        "config",
        "options",
        "tokenizer",
        "model",
        "open_clip_format",
        "open_clip_source",
        "text_positions",
        "open_clip_export",
        "loss",
        "metrics",
        "clip_benchmark",
        "zero_shot",
        "plots",
        "results",
        "early_stopping",
        "data",
        "augment",
        "lora",
        "optim",
        "ema",
        "onnx_export",
    },
    {"step", "evaluation", "mining", "checkpoint", "best_model", "launch", "preemption"},
    {"trainer", "startup", "reporting"},
    {"outputs", "hub", "export", "sweep", "wise_ft", "embedding", "search", "environment"},
    {"cli", "__main__"},
)
# Below the trainer nothing may know the Hub exists (huggingface_hub is for hub.py alone).
HUB_FREE = set().union(*LAYERS[:3])


def module_name(path: Path) -> str:
    """clip_accel/data/loader.py -> data.loader; clip_accel/data/__init__.py -> data."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, top-level names of other packages it imports)."""
    own, external = set(), set()
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [".".join(target)] if node.module else [".".join([*target, alias.name]) for alias in node.names]
            own.update(name for name in names if name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            (
                own.add(node.module.removeprefix("clip_accel."))
                if node.module.startswith("clip_accel.")
                else external.add(node.module.split(".")[0])
            )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clip_accel."):
                    own.add(alias.name.removeprefix("clip_accel."))
                else:
                    external.add(alias.name.split(".")[0])
    return own, external


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"clip_accel.{module} is in no layer: add it to LAYERS in {__file__}")


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        own, _ = imports_of(path)
        known = {module_name(p) for p in PACKAGE.rglob("*.py")}
        # `from .data import loader` names a module; `from .data import build_pair_datasets` names a function.
        targets = {name if name in known else name.rpartition(".")[0] for name in own}
        graph[module_name(path)] = targets - {module_name(path)}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"clip_accel.{module} (layer {layer_of(module)}) imports clip_accel.{target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, found by a depth-first search from each module."""
    found = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycle = path[path.index(target) :]
                if min(cycle) == cycle[0] and cycle not in found:  # each cycle once, from its smallest name
                    found.append(cycle)
            else:
                visit(target, [*path, target])

    for module in sorted(graph):
        visit(module, [module])
    return found


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checker_sees_an_upward_import_and_a_circle():
    graph = {**import_graph(), "loss": {"trainer"}, "trainer": {"loss"}}
    assert upward_imports(graph) == ["clip_accel.loss (layer 0) imports clip_accel.trainer (layer 2)"]
    assert ["loss", "trainer"] in circles(graph)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: module_name(path) or "clip_accel")
def test_only_hub_py_and_above_talk_to_the_hub(path):
    _, external = imports_of(path)
    if module_name(path).split(".")[0] in HUB_FREE:
        assert "huggingface_hub" not in external


def test_scripts_and_console_scripts_only_wrap_cli():
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
        assert [(node.module, len(node.names)) for node in imports] == [("clip_accel.cli", 1)], script.name
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        assert len(calls) == 1, f"{script.name}: one call, the cli function"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts and all(target.startswith("clip_accel.cli:") for target in scripts.values()), scripts
