"""Launch layer: Slurm parameters, the phase chain and its submitit jobs.

The names below load their module on first use, so that `python -m mtlxray.cli.chain` (run by
slurm/pipeline.sh) and `mtlxray.launch.slurm` do not import submitit's job machinery.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "slurm_parameters": "mtlxray.launch.slurm",
    "plan_chain": "mtlxray.launch.chain",
    "validate_chain": "mtlxray.launch.chain",
    "Pipeline": "mtlxray.launch.submit",
    "PhaseReport": "mtlxray.launch.submit",
    "TrainJob": "mtlxray.launch.submit",
    "submit_pipeline": "mtlxray.launch.submit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
