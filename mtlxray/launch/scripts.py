"""`mtlxray slurm-scripts`: the sbatch scripts of the repository's slurm/, written out for an installed package.

In a checkout the scripts run from the repository root (they find each other under slurm/ and the
venv at .venv). The copies written here find each other in their own folder and activate the
virtual environment the package runs from, so `sbatch phase1.sh` works from that folder with a
wheel install. The configs they name (`configs/phase1.yaml`) are shipped configs' names there.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from mtlxray.errors import MtlxError
from mtlxray.io import write_text_atomic
from mtlxray.resources import slurm_dir, version_string

__all__ = ["SCRIPTS", "current_venv", "write_slurm_scripts"]

SCRIPTS = ("phase1.sh", "phase2.sh", "pipeline.sh", "train.sh")

_SCRIPTS_LINE = re.compile(r"^scripts=.*$", re.MULTILINE)
_VENV_LINE = re.compile(r"^venv=\$\{MTLX_VENV:-.*\}$", re.MULTILINE)
_DEFAULT_LINES = {"phase1.sh": {_SCRIPTS_LINE}, "phase2.sh": {_SCRIPTS_LINE},
                  "pipeline.sh": {_SCRIPTS_LINE, _VENV_LINE}, "train.sh": {_VENV_LINE}}
"""The lines each script sets its defaults on: where its sibling scripts are, which venv to activate."""


def current_venv() -> Path | None:
    """The virtual environment this interpreter runs in (with a bin/activate), else None."""
    prefix = Path(sys.prefix)
    return prefix if sys.prefix != sys.base_prefix and (prefix / "bin" / "activate").is_file() else None


def _rewrite(name: str, text: str, out: Path, venv: Path | None) -> str:
    replacements = {_SCRIPTS_LINE: f"scripts={shlex.quote(str(out))}"}
    if venv is not None:
        replacements[_VENV_LINE] = f"venv=${{MTLX_VENV:-{shlex.quote(str(venv))}}}"
    for pattern in _DEFAULT_LINES[name]:
        if len(pattern.findall(text)) != 1:
            raise MtlxError(f"slurm/{name}: expected one line matching {pattern.pattern}, the line the written "
                            "copy sets its defaults on")
        if pattern in replacements:
            text = pattern.sub(lambda _: replacements[pattern], text)
    shebang, rest = text.split("\n", 1)
    header = (f"# Written by `mtlxray slurm-scripts` (mtlxray {version_string()}) from the package's slurm/{name}.\n"
              f"# Submit from {out}: \"the repository root\" below means this folder. The scripts find each\n"
              "# other here" + (f", the jobs activate {venv} unless MTLX_VENV names another" if venv else "")
              + ",\n# and configs/<name>.yaml names a shipped config (`mtlxray config list`) unless the file exists.\n")
    return f"{shebang}\n{header}{rest}"


def write_slurm_scripts(out: str | Path, venv: Path | None = None) -> list[Path]:
    """Write phase1.sh, phase2.sh, pipeline.sh and train.sh into `out` (and runs/ for the job logs)."""
    out = Path(out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCRIPTS:
        path = write_text_atomic(out / name, _rewrite(name, (slurm_dir() / name).read_text(), out, venv))
        path.chmod(0o755)
        written.append(path)
    return written
