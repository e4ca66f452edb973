"""The import directions of docs/architecture.md, enforced by walking every module's imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtlxray"

# package (or top-level module) -> packages and modules it must never import (directly or inside a function).
# Bottom to top: the shared modules; model and data; checkpoint (reads a saved model); eval; preflight (whether a
# run fits its shards and model); memory_plan; train and report; launch; the commands (cli, demo, doctor, bench).
FORBIDDEN = {
    "model": {"data", "checkpoint", "eval", "preflight", "memory_plan", "train", "report", "launch", "bench", "cli",
              "demo", "doctor", "hardware"},
    "data": {"model", "checkpoint", "eval", "preflight", "memory_plan", "train", "report", "launch", "bench", "cli",
             "demo", "doctor"},
    "checkpoint": {"data", "eval", "preflight", "memory_plan", "train", "report", "launch", "bench", "cli", "demo",
                   "doctor"},
    "eval": {"preflight", "memory_plan", "train", "report", "launch", "bench", "cli", "demo", "doctor"},
    "preflight": {"memory_plan", "train", "report", "launch", "bench", "cli", "demo", "doctor"},
    "memory_plan": {"report", "launch", "bench", "cli", "demo", "doctor"},
    "train": {"report", "launch", "bench", "cli", "demo", "doctor"},
    "report": {"train", "launch", "bench", "cli", "demo", "doctor"},
    "launch": {"report", "bench", "cli", "demo", "doctor"},
}
SHARED = {"config", "errors", "io", "dist", "hardware", "paper", "provenance", "resources", "overlays"}
"""Top-level modules every layer may use; they import no package or module of a layer."""
LAYERS = {"model", "data", "checkpoint", "eval", "preflight", "memory_plan", "train", "report", "launch", "bench",
          "cli", "demo", "doctor"}


def _imported(node: ast.AST) -> list[str]:
    """The modules an absolute import statement names ([] for any other node)."""
    if isinstance(node, ast.ImportFrom) and node.module == "mtlxray" and node.level == 0:
        return [f"mtlxray.{a.name}" for a in node.names]  # from mtlxray import eval
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def _imports(path: Path) -> set[str]:
    """mtlxray subpackages/modules imported by a file (absolute imports, any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        for name in _imported(node):
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


def test_no_import_cycle_runs_through_the_model_package():
    """Every import, at module level or inside a function, is an edge between mtlxray modules; no
    cycle of them may pass through a module of mtlxray/model (such a cycle leaves one module
    half-initialised when the other is imported first)."""
    from collections import deque

    root = PACKAGE.parent

    def module_name(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}

    def targets(path: Path) -> set[str]:
        """The mtlxray modules a file imports: `from a.b import c` imports a.b, and a.b.c where that is a module."""
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        return found & set(modules)

    # `from mtlxray.model import zoo` in mtlxray/model/__init__.py names the package itself: no edge.
    graph = {name: targets(path) - {name} for name, path in modules.items()}

    def cycle_from(start: str) -> list[str]:
        """A shortest import path from `start` back to itself ([] if there is none)."""
        parent: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        return []

    assert "mtlxray.model.base" in graph and "mtlxray.model" in graph  # the walk found the package
    in_model = [name for name in graph if name == "mtlxray.model" or name.startswith("mtlxray.model.")]
    cycles = [" -> ".join(cycle) for cycle in map(cycle_from, in_model) if cycle]
    assert cycles == []


def test_command_handlers_live_only_in_the_cli_package():
    """The library takes keyword arguments; turning a parsed command line into them is mtlxray/cli's job."""
    handlers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            annotations = [a.annotation for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)]
            if node.name.startswith("cli_") or any(a is not None and "Namespace" in ast.unparse(a)
                                                   for a in annotations):
                handlers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert handlers == []


def test_doctor_imports_no_benchmark_code():
    """The doctor's memory projection and GPU listing are the library's (memory_plan, hardware), not bench's."""
    assert "bench" not in _imports(PACKAGE / "doctor.py")


# Where an mtlxray import may stay inside a function: the commands import the library when their command runs (so
# `mtlxray --help` imports no torch), bench's suites measure each process's own memory, the picklable submitit job
# and `run_training` import training when they run. Anywhere else, an entry names the module, the import and why.
LAZY_IMPORT_PLACES = ("cli", "bench", "launch/submit.py", "train/main.py")
LAZY_IMPORTS_ALLOWED = {
    ("data/audit.py", "mtlxray.data.loader"): "the loader imports torch, which `shards build` and the hash audit "
                                              "need only to read stored images back",
}


def test_mtlxray_modules_are_imported_at_module_level():
    """A function-level import of an mtlxray module hides a dependency (and often an import cycle):
    only the places above and the listed exceptions keep one."""
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(LAZY_IMPORT_PLACES):
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                for module in _imported(node):
                    if module.split(".")[0] == "mtlxray" and (rel, module) not in LAZY_IMPORTS_ALLOWED:
                        hidden.append(f"mtlxray/{rel}:{node.lineno} {function.name} imports {module}")
    assert hidden == []
