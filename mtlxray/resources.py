"""The files that ship beside the code (configs/, slurm/) and the version, the same from any directory;
and what Linux reports about this process (`proc_status`).

The repository's top-level configs/ and slurm/ are the one source of both. A wheel carries them as
package data, mtlxray/configs and mtlxray/slurm (setup.py maps them there); a checkout, or an
editable install of one, has them at the repository root beside the package. A config is named by
its path under configs/ without the suffix (`phase1`, `baselines/unet`, `deepspeed/zero2`); an
existing file always wins over a name.
"""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

from mtlxray import __version__
from mtlxray.errors import ConfigError, MtlxError

__all__ = ["CONFIG_SUFFIXES", "configs_dir", "find_config", "shipped_config", "shipped_configs", "slurm_dir",
           "source_checkout", "version_string", "proc_status", "proc_status_kib"]

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def source_checkout() -> Path | None:
    """The repository root when the package runs from a git checkout (not an installed wheel), else None."""
    root = PACKAGE_DIR.parent
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def _shipped_dir(name: str) -> Path:
    for folder in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if folder.is_dir():
            return folder
    raise MtlxError(f"mtlxray's {name}/ is neither in {PACKAGE_DIR} (a wheel) nor in {PACKAGE_DIR.parent} "
                    "(a checkout): reinstall the package")


def configs_dir() -> Path:
    """The shipped configs/ folder."""
    return _shipped_dir("configs")


def slurm_dir() -> Path:
    """The shipped slurm/ folder of sbatch scripts."""
    return _shipped_dir("slurm")


def _config_name(path: Path) -> str:
    """`baselines/unet` for configs/baselines/unet.yaml; JSON files keep no suffix either."""
    return path.relative_to(configs_dir()).with_suffix("").as_posix()


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config, sorted by name."""
    files = sorted(p for p in configs_dir().rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
    return {_config_name(p): p for p in files}


def find_config(spec: str | Path, what: str = "config") -> Path:
    """The file `spec` names: an existing file as given, else the shipped config of that name."""
    path = Path(spec)
    return path if path.is_file() else shipped_config(spec, what)


def shipped_config(name: str | Path, what: str = "config") -> Path:
    """The shipped config called `name`.

    A name may carry the suffix and the `configs/` prefix of the repository's paths, so
    `configs/phase1.yaml`, `phase1.yaml` and `phase1` all name configs/phase1.yaml from any directory.
    """
    path = Path(name)
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if not parts or path.is_absolute() or ".." in parts:
        raise ConfigError(f"{what} file not found: {name}")
    relative = Path(*parts)
    stem = relative.with_suffix("") if relative.suffix in CONFIG_SUFFIXES else relative
    shipped = shipped_configs()
    found = shipped.get(stem.as_posix())
    if found is not None and (relative.suffix not in CONFIG_SUFFIXES or found.suffix == relative.suffix):
        return found
    close = difflib.get_close_matches(stem.as_posix(), list(shipped), n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    raise ConfigError(f"{what} not found: {name} is neither a file nor the name of a shipped config{hint}; "
                      "`mtlxray config list` names them")


def version_string() -> str:
    """`0.1.0`, with the commit (and `-dirty` for uncommitted changes) when running from a git checkout."""
    root = source_checkout()
    if root is None:
        return __version__
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12",
                                 "--exclude=*"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return __version__
    return f"{__version__} (git {commit.stdout.strip()})" if commit.returncode == 0 else __version__


def proc_status(field: str) -> str | None:
    """The value of one `/proc/self/status` field (`VmRSS` -> `123456 kB`), None where Linux does not give it."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0] == field), None)


def proc_status_kib(field: str) -> int:
    """A size field of `/proc/self/status` (`VmRSS`, `VmHWM`) in KiB; RuntimeError where it is missing."""
    value = proc_status(field)
    if value is None:
        raise RuntimeError(f"{field} missing from /proc/self/status")
    return int(value.split()[0])
