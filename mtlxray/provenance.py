"""What produced a result: mtlxray version, git commit, torch version and the config's hash.

Written into a training run's `run.json`, an evaluation's `metrics.json` and the reports, so a
number in a paper can be traced to the code and settings that made it."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Optional

from mtlxray import __version__
from mtlxray.config import dump_config

__all__ = ["provenance", "config_hash", "git_commit"]


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the source tree mtlxray runs from (with `+dirty` when it has changes), or None
    for an installed wheel or a machine without git."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode != 0:
            return None
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def config_hash(cfg) -> str:
    """The first 12 hex digits of the SHA-256 of the resolved config as YAML (`dump_config`)."""
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:12]


def provenance(cfg=None) -> dict:
    """{mtlxray_version, git_commit, torch_version[, config_hash]}."""
    import torch

    out = {"mtlxray_version": __version__, "git_commit": git_commit(),
           "torch_version": torch.__version__}
    if cfg is not None:
        out["config_hash"] = config_hash(cfg)
    return out
