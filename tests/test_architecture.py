"""The import directions of docs/architecture.md, enforced by walking every module's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtlxray"

# package -> packages it must never import (directly or inside a function)
FORBIDDEN = {
    "model": {"train", "report", "launch", "data", "bench", "cli", "demo", "hardware"},
    "data": {"train", "report", "launch", "model", "bench", "cli", "demo"},
    "report": {"train", "launch", "bench", "demo"},
    "train": {"launch", "report", "bench", "demo"},
    "launch": {"report", "bench", "demo"},
    "eval": {"train", "report", "launch", "bench", "cli", "demo"},
}
SHARED = {"config", "errors", "io", "dist", "paper", "checkpoint", "provenance", "resources", "overlays"}
"""Modules neither side owns; they import nothing from train, report or launch."""


def _imports(path: Path) -> set[str]:
    """mtlxray subpackages/modules imported by a file (absolute imports, any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mtlxray" and len(parts) > 1:
                found.add(parts[1])
    return found


def _files(package: str) -> list[Path]:
    root = PACKAGE / package
    return sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{package}.py"]


def test_every_package_imports_only_in_the_allowed_directions():
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in _files(package):
            for target in _imports(path) & forbidden:
                violations.append(f"{path.relative_to(PACKAGE.parent)} imports mtlxray.{target}")
    assert violations == []


def test_shared_modules_import_no_layer_above_them():
    violations = []
    for name in SHARED:
        for target in _imports(PACKAGE / f"{name}.py") & {"train", "report", "launch", "bench", "cli", "demo"}:
            violations.append(f"mtlxray/{name}.py imports mtlxray.{target}")
    assert violations == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from mtlxray.train.trainer import Trainer\n    import mtlxray.report.evaluate\n")
    assert _imports(sample) == {"train", "report"}
