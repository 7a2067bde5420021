"""The package's imports point one way: kernels <- ops <- tuner <- workflow <- demo <- cli, io a leaf, no cycles.

Read from the source (every ``import`` statement, at module level or inside a function), not from ``sys.modules``,
so a lazy import against the direction counts too. ``python tests/test_layering.py [ROOT]`` prints the module
list and the import graph of a checkout (ROOT: the repository, default this one).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# wing -> rank: a module may import its own wing and wings of lower rank; io may be imported by all, imports none
RANKS = {"kernels": 0, "ops": 1, "tuner": 2, "workflow": 3, "demo": 4, "cli": 5}
# third-party packages a wing must not import (ops and kernels are torch only; io stays free of torch and PEFT)
FORBIDDEN = {
    "kernels": {"peft", "transformers", "safetensors", "huggingface_hub", "peft_routing"},
    "ops": {"peft", "transformers", "safetensors", "huggingface_hub", "triton"},
    "io": {"torch", "peft", "transformers", "triton"},
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package."""
    files = {}
    folder = root / "peft_routing"
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(["peft_routing", *parts])] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of ours, top-level third-party names) that the file imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub where there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "peft_routing":
                ours.add(_module_of(target, known))
            elif target != "__future__":
                others.add(target.split(".")[0])
    ours.discard(name)
    return ours, others


def _module_of(target: str, known: set[str]) -> str:
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def wing_of(module: str) -> str:
    """The wing of a module: the first part below peft_routing (``cli`` for cli.py, ``api`` for the package root)."""
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def import_graph(root: Path = REPO) -> dict[str, tuple[set[str], set[str]]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def violations(graph: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    """Every import against the direction, of a forbidden package, or into the package root."""
    found = []
    for module, (ours, others) in sorted(graph.items()):
        wing = wing_of(module)
        for target in sorted(ours):
            goal = wing_of(target)
            if goal == "api" and wing != "api":
                found.append(f"{module} -> {target}: only users import the package root")
            elif wing == "io" and goal != "io":
                found.append(f"{module} -> {target}: io is a leaf and imports no other wing")
            elif goal in RANKS and wing in RANKS and RANKS[goal] > RANKS[wing]:
                found.append(f"{module} -> {target}: {wing} may not import {goal} (kernels <- ops <- tuner <- "
                             "workflow <- demo <- cli)")
        for package in sorted(others & FORBIDDEN.get(wing, set())):
            found.append(f"{module} imports {package}, which the {wing} wing may not use")
    return found


def cycles(graph: dict[str, tuple[set[str], set[str]]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted lists."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, (set(), set()))[0]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_imports_point_one_way_and_form_no_cycle():
    graph = import_graph()
    assert {wing_of(m) for m in graph} == set(RANKS) | {"io", "api"}
    assert violations(graph) == []
    assert cycles(graph) == []


def test_the_checks_catch_an_import_against_the_direction_and_a_cycle():
    graph = import_graph()
    graph["peft_routing.ops.routing"][0].add("peft_routing.tuner.config")  # ops -> tuner: against the direction
    graph["peft_routing.io.atomic"][0].add("peft_routing.ops.settings")  # io is a leaf
    graph["peft_routing.ops.settings"][1].add("peft")  # ops is torch only
    graph["peft_routing.kernels.launch"][0].add("peft_routing.kernels.route")
    graph["peft_routing.kernels.route"][0].add("peft_routing.kernels.launch")  # a cycle inside one wing
    found = violations(graph)
    assert any("ops.routing -> peft_routing.tuner.config" in v for v in found)
    assert any("io.atomic -> peft_routing.ops.settings" in v for v in found)
    assert any("ops.settings imports peft" in v for v in found)
    assert ["peft_routing.kernels.launch", "peft_routing.kernels.route"] in cycles(graph)


def test_relative_imports_resolve_to_their_modules(tmp_path):
    package = tmp_path / "peft_routing"
    (package / "ops").mkdir(parents=True)
    (package / "kernels").mkdir()
    (package / "__init__.py").write_text("from .ops import routing\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "routing.py").write_text("from ..kernels import launch\nfrom . import settings\n")
    (package / "tuner").mkdir()
    (package / "tuner" / "__init__.py").write_text("")
    (package / "tuner" / "config.py").write_text("")
    (package / "ops" / "settings.py").write_text("def f():\n    from ..tuner import config\n")
    (package / "kernels" / "__init__.py").write_text("")
    (package / "kernels" / "launch.py").write_text("import torch\n")
    graph = import_graph(tmp_path)
    assert graph["peft_routing"][0] == {"peft_routing.ops.routing"}
    assert graph["peft_routing.ops.routing"][0] == {"peft_routing.kernels.launch", "peft_routing.ops.settings"}
    assert graph["peft_routing.ops.settings"][0] == {"peft_routing.tuner.config"}  # a lazy import counts too
    assert violations(graph) == ["peft_routing.ops.settings -> peft_routing.tuner.config: ops may not import tuner "
                                 "(kernels <- ops <- tuner <- workflow <- demo <- cli)"]
    assert graph["peft_routing.kernels.launch"] == (set(), {"torch"})


@pytest.mark.parametrize("wing", ["ops", "tuner", "workflow", "demo"])
def test_no_module_imports_a_private_name_of_another(wing):
    """``from x import _name`` across modules reaches into another module's internals."""
    reached = []
    for path in sorted((REPO / "peft_routing" / wing).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("", "peft_routing"):
                reached += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert reached == []


def main(root: Path) -> None:
    graph = import_graph(root)
    print(f"{len(graph)} modules")
    for module, (ours, _) in sorted(graph.items()):
        short = lambda m: m.removeprefix("peft_routing.")  # noqa: E731
        print(f"  {short(module):<32} -> {', '.join(sorted(map(short, ours))) or '-'}")
    print("cycles:", cycles(graph) or "none")
    print("against the direction:", violations(graph) or "none")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
