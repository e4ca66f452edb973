"""Slurm parameters for submitit, as one pure function (dinov2 style).

`slurm_parameters(launch, cluster, overrides)` builds submitit executor parameters: defaults,
then the config's `launch:` section, then the cluster's, then the caller's; the last one wins.
Who a task is and where a job's tasks meet is `mtlxray.dist`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError

__all__ = ["DEFAULT_SLURM_PARAMETERS", "slurm_parameters"]


DEFAULT_SLURM_PARAMETERS: dict[str, Any] = {
    "nodes": 1,
    "gpus_per_node": 8,
    "cpus_per_task": 8,
    "timeout_min": 24 * 60,
    "slurm_signal_delay_s": 120,
    "slurm_additional_parameters": {"requeue": True},
}


def _from_launch(launch: LaunchConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "nodes": launch.nodes,
        "gpus_per_node": launch.gpus_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "timeout_min": launch.timeout_min,
        "slurm_signal_delay_s": launch.requeue_signal_delay_s,
    }
    if launch.mem_gb:
        params["mem_gb"] = launch.mem_gb
    if launch.partition:
        params["slurm_partition"] = launch.partition
    if launch.account:
        params["slurm_account"] = launch.account
    if launch.slurm_extra:
        params["slurm_additional_parameters"] = dict(launch.slurm_extra)
    return params


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "slurm_additional_parameters":
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def slurm_parameters(launch: Optional[LaunchConfig] = None, cluster: Optional[Mapping[str, Any]] = None,
                     overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """submitit executor parameters: defaults, then `launch` (the config), then `cluster`, then `overrides`.

    One task per GPU (`tasks_per_node = gpus_per_node`), at least one per node; with no GPUs the
    `gpus_per_node` request is dropped so that GPU-less clusters accept the job.
    `slurm_additional_parameters` dicts are merged key by key rather than replaced.
    """
    params = dict(DEFAULT_SLURM_PARAMETERS)
    for layer in (_from_launch(launch) if launch is not None else {}, cluster or {}, overrides or {}):
        params = _merge(params, layer)
    gpus = int(params.get("gpus_per_node") or 0)
    params.setdefault("tasks_per_node", max(gpus, 1))
    if gpus == 0:
        params.pop("gpus_per_node", None)
    for key in ("nodes", "tasks_per_node", "timeout_min"):
        if int(params[key]) < 1:
            raise ConfigError(f"slurm parameter `{key}` must be >= 1, got {params[key]}")
    return params
