"""The layout is the architecture (STYLE.md): the method below the applications, the command line on top.

Imports are read from the source (every ``import``, inside functions too, since a lazy import
is still a dependency), so these tests need nothing installed beyond the standard library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sharelora"
APPLICATIONS = ("sources", "tasks", "training", "runs", "bench", "serve", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the sharelora modules it imports} for every module under src/sharelora."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # "from . import x" may name a module x or a name in the package: take the module if it exists
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t.startswith("sharelora") and t != name:
                    found.add(t)
        out[name] = found
    return out


IMPORTS = _imports()


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _entry_point(module: str) -> bool:
    return module.endswith("__main__")


def test_the_layout_is_read_from_the_whole_package():
    assert {"sharelora.method.layers", "sharelora.training.loop", "sharelora.cli.train"} <= set(IMPORTS)
    assert "sharelora.method.plan" in IMPORTS["sharelora.method.layers"]


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _floor(m) == "method"))
def test_the_method_imports_no_application(module):
    bad = sorted(t for t in IMPORTS[module] if _floor(t) in APPLICATIONS)
    assert not bad, f"{module} imports application modules {bad}"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _floor(m) in ("tasks", "sources")))
def test_data_and_tasks_import_neither_training_nor_the_command_line(module):
    bad = sorted(t for t in IMPORTS[module] if _floor(t) in ("training", "runs", "cli", "bench", "serve"))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _floor(m) == "training"))
def test_training_does_not_import_what_reads_its_finished_runs(module):
    """runs/ (eval, export-peft, compress of run directories) sits above training/, which writes them."""
    bad = sorted(t for t in IMPORTS[module] if _floor(t) == "runs")
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _floor(m) not in ("cli", "") and not _entry_point(m)))
def test_only_the_command_line_and_entry_points_import_the_command_line(module):
    bad = sorted(t for t in IMPORTS[module] if _floor(t) == "cli")
    assert not bad, f"{module} imports the command line {bad}"


def test_no_two_modules_import_each_other():
    pairs = sorted({tuple(sorted((a, b))) for a, targets in IMPORTS.items() for b in targets
                    if a in IMPORTS.get(b, ()) and not (a.startswith(b) or b.startswith(a))})
    assert not pairs, f"modules that import each other: {pairs}"


def _source(module: str) -> str:
    parts = module.split(".")
    path = SRC.parent.joinpath(*parts)
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text(encoding="utf-8")


def test_one_module_takes_optimizer_steps():
    """The training engine's ``optimizer_step`` is the one ``step()`` of an optimizer: train, multitask, the
    studies and the benchmarks all step through it."""
    stepping = sorted(m for m in IMPORTS if re.search(r"optimi[sz]er\w*\.step\(\)", _source(m)))
    assert stepping == ["sharelora.training.engine"], stepping


@pytest.mark.parametrize("module", sorted(m for m in IMPORTS if _floor(m) != "cli" and not _entry_point(m)))
def test_no_library_module_runs_the_command_line(module):
    """Parallel runs start a library entry point (a function), never ``python -m sharelora[.cli] ...``."""
    text = _source(module)
    assert not re.search(r"""["']sharelora\.cli["']|["']-m["']\s*,\s*["']sharelora["']""", text), module
