"""The import directions of docs/architecture.md, enforced by walking every module's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtlxray"

# package (or top-level module) -> packages and modules it must never import (directly or inside a function).
# Bottom to top: the shared modules; model and data; checkpoint (reads a saved model); eval; train and report;
# launch; the commands (cli, demo, doctor, bench).
FORBIDDEN = {
    "model": {"data", "checkpoint", "eval", "train", "report", "launch", "bench", "cli", "demo", "doctor", "hardware"},
    "data": {"model", "checkpoint", "eval", "train", "report", "launch", "bench", "cli", "demo", "doctor"},
    "checkpoint": {"data", "eval", "train", "report", "launch", "bench", "cli", "demo", "doctor"},
    "eval": {"train", "report", "launch", "bench", "cli", "demo", "doctor"},
    "train": {"report", "launch", "bench", "cli", "demo", "doctor"},
    "report": {"train", "launch", "bench", "cli", "demo", "doctor"},
    "launch": {"report", "bench", "demo", "doctor"},
}
SHARED = {"config", "errors", "io", "dist", "hardware", "paper", "provenance", "resources", "overlays"}
"""Top-level modules every layer may use; they import no package or module of a layer."""
LAYERS = {"model", "data", "checkpoint", "eval", "train", "report", "launch", "bench", "cli", "demo", "doctor"}


def _imports(path: Path) -> set[str]:
    """mtlxray subpackages/modules imported by a file (absolute imports, any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "mtlxray" and node.level == 0:
            names = [f"mtlxray.{a.name}" for a in node.names]  # from mtlxray import eval
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
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
        for target in _imports(PACKAGE / f"{name}.py") & LAYERS:
            violations.append(f"mtlxray/{name}.py imports mtlxray.{target}")
    assert violations == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from mtlxray.train.trainer import Trainer\n    import mtlxray.report.evaluate\n"
                      "    from mtlxray import eval\n")
    assert _imports(sample) == {"train", "report", "eval"}
