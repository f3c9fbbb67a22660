"""The house's layers (docs/architecture.md, "Packages and what each may import"), checked on the source.

An AST walk over every module collects what it imports, at the top and inside
functions alike, and each package is held to its rule. A second check starts
the command line in a fresh interpreter: it must not load torch or prefect
before a command needs them (``mocoplus --help`` stays instant, ``serve`` and
``search`` run where neither is installed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mocoplus", "artifacts", "pipeline", "serving", "flows", "benchmarks", "tests")

# package → top-level modules it must never import
FORBIDDEN = {
    "mocoplus": {"artifacts", "pipeline", "serving", "flows"},  # the method: pure PyTorch, no I/O, no stages
    "artifacts": {"torch", "torchvision", "mocoplus", "pipeline", "serving", "flows", "prefect"},  # the contracts
    "serving": {"torch", "torchvision", "mocoplus", "pipeline", "flows", "prefect"},  # the HTTP app
    "pipeline": {"serving", "flows"},  # the stages read artifacts, never the service or their drivers
    "benchmarks": {"flows"},
}
MAY_IMPORT_FLOWS = {"flows", "tests"}


def modules_of(package: str) -> list[Path]:
    return sorted(path for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts)


def imported(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, dotted (``a.b.c`` also yields ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = [node.module]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: end + 1]) for end in range(len(parts)))
    return names


def breaches(package: str, forbidden: set[str]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules_of(package)
        for name in sorted(imported(path))
        if name in forbidden
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_layer_allows(package: str) -> None:
    assert breaches(package, FORBIDDEN[package]) == []


def test_nothing_imports_the_flows_but_the_flows_and_the_tests() -> None:
    found = [
        breach for package in PACKAGES if package not in MAY_IMPORT_FLOWS for breach in breaches(package, {"flows"})
    ]
    assert found == []


# the stage folders of pipeline/ and the folders each may import (docs/architecture.md): one direction only, so
# a change to a later stage never reaches an earlier one; what two stages share sits below them (pipeline/*.py)
STAGE_IMPORTS = {
    "data": set(),
    "pictures": set(),
    "train": {"data", "pictures"},
    "evaluate": {"data", "train", "embed"},
    "export": {"data", "train"},
    "embed": {"data"},
    "index": set(),
}


def stage_folders_imported(stage: str) -> set[str]:
    """The other stage folders that any module of ``pipeline/<stage>/`` imports."""
    return {
        name.split(".")[1]
        for path in (ROOT / "pipeline" / stage).rglob("*.py")
        for name in imported(path)
        if name.count(".") >= 1 and name.startswith("pipeline.") and name.split(".")[1] in STAGE_IMPORTS
    } - {stage}


@pytest.mark.parametrize("stage", sorted(STAGE_IMPORTS))
def test_a_stage_folder_imports_only_the_stages_before_it(stage: str) -> None:
    assert stage_folders_imported(stage) <= STAGE_IMPORTS[stage]


def test_the_stage_rule_has_no_loop_and_covers_every_folder() -> None:
    folders = {path.name for path in (ROOT / "pipeline").iterdir() if (path / "__init__.py").exists()}
    assert folders == set(STAGE_IMPORTS)
    reachable = {stage: set(allowed) for stage, allowed in STAGE_IMPORTS.items()}
    for _ in STAGE_IMPORTS:  # transitive closure
        for stage in reachable:
            reachable[stage] |= {far for near in reachable[stage] for far in reachable[near]}
    assert not [stage for stage, seen in reachable.items() if stage in seen]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports by name (``from a import b`` counts ``a.b`` when it is a module, else
    ``a``), whether at the top, inside functions or under ``TYPE_CHECKING``: a loop of knowledge either way."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    return found & modules


def import_loops(paths: list[Path]) -> list[list[str]]:
    """The groups of modules that reach each other through imports (strongly connected, more than one)."""
    modules = {module_name(path): path for path in paths}
    graph = {name: module_imports(path, set(modules)) - {name} for name, path in modules.items()}
    order, low, stack, loops = {}, {}, [], []

    def visit(name: str) -> None:  # Tarjan's algorithm
        order[name] = low[name] = len(order)
        stack.append(name)
        for other in graph[name]:
            if other not in order:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in stack:
                low[name] = min(low[name], order[other])
        if low[name] == order[name]:
            group = stack[stack.index(name) :]
            del stack[stack.index(name) :]
            if len(group) > 1:
                loops.append(sorted(group))

    for name in graph:
        if name not in order:
            visit(name)
    return loops


def test_no_two_modules_import_each_other() -> None:
    paths = [path for package in PACKAGES if package != "tests" for path in modules_of(package)]
    assert import_loops(paths) == []


def test_the_loop_finder_sees_a_loop_through_type_checking(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (package / "c.py").write_text("from pkg import a, b\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_loops(sorted(package.glob("*.py"))) == [["pkg.a", "pkg.b"]]


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import os\n\ndef run():\n    from pipeline.train.trainer import train\n    import torch.nn\n")
    assert {"os", "pipeline", "pipeline.train.trainer", "torch", "torch.nn"} <= imported(module)


def test_starting_the_command_line_and_searching_load_neither_torch_nor_prefect() -> None:
    """The stage configs the CLI reads its defaults from, and the offline search, are torch-free all the way down.

    At start the CLI loads none of what the serving image leaves out (Dockerfile, target ``serve``).
    """
    probe = (
        "import sys\n"
        "import flows.cli.main\n"
        "heavy = ('torch', 'torchvision', 'prefect', 'faiss', 'fastapi', 'webdataset', 'braceexpand')\n"
        "at_start = [m for m in heavy if m in sys.modules]\n"
        "import pipeline.search\n"
        "searching = [m for m in ('torch', 'torchvision', 'prefect') if m in sys.modules]\n"
        "print(at_start, searching)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[] []"
