"""Slurm parameters for both launch paths, as one pure function (dinov2 style) and one table of sbatch options.

`slurm_parameters(launch, cluster, overrides)` builds submitit executor parameters: defaults (a
default `LaunchConfig`: the one source of launch defaults), then the config's `launch:` section,
then the cluster's, then the caller's; the last one wins. `mtlxray submit` hands them to submitit's
`update_parameters`. `SBATCH_OPTIONS` is the one table from those parameters to sbatch options:
`sbatch_flags(params)` writes the request as submitit's executor does (for `mtlxray submit
--dry-run` and the `sbatch --test-only` check before anything is submitted), and
`sbatch_header(params)` as the `#SBATCH` lines of slurm/phase*.sh, which a test holds equal to
`sbatch_header(slurm_parameters())`. Both paths ask for the same preemption signal, `PREEMPT_SIGNAL`,
`launch.requeue_signal_delay_s` before the time limit. Who a task is and where a job's tasks meet is
`mtlxray.dist`'s business.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError

__all__ = ["DEFAULT_SLURM_PARAMETERS", "SBATCH_OPTIONS", "slurm_parameters", "sbatch_flags", "sbatch_header",
           "parse_slurm_time", "format_slurm_time", "parse_mem_gb", "PREEMPT_SIGNAL"]

PREEMPT_SIGNAL = "USR2"
"""The signal both launch paths ask Slurm for before the time limit: submitit's (its default, which
`SUBMITIT_PREEMPT_SIGNAL` would change: leave that unset), and the batch shell's in slurm/train.sh."""


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
    if launch.qos:
        params["slurm_qos"] = launch.qos
    if launch.slurm_extra:
        params["slurm_additional_parameters"] = dict(launch.slurm_extra)
    return params


DEFAULT_SLURM_PARAMETERS: dict[str, Any] = {
    **_from_launch(LaunchConfig()),
    "slurm_additional_parameters": {"requeue": True},
}
"""A default LaunchConfig as submitit parameters, plus `--requeue` (preempted jobs come back)."""


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
    for key in ("nodes", "tasks_per_node", "timeout_min", "cpus_per_task"):
        if int(params[key]) < 1:
            raise ConfigError(f"slurm parameter `{key}` must be >= 1, got {params[key]}")
    return params


SBATCH_OPTIONS = {"name": "job-name", "slurm_partition": "partition", "slurm_account": "account",
                  "slurm_qos": "qos", "nodes": "nodes", "tasks_per_node": "ntasks-per-node",
                  "gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task", "mem_gb": "mem",
                  "timeout_min": "time", "slurm_signal_delay_s": "signal"}
"""submitit executor parameter -> sbatch option, in the order the options are written. Another
`slurm_<x>` parameter is `--<x>` (submitit's own rule), and `slurm_additional_parameters` are
written as they are named. Written out here because submitit renders its sbatch file only inside
`submit()`: `--dry-run` and `--test-only` must say the same request without submitting it."""


def _sbatch_options(params: Mapping[str, Any], *, script: bool) -> dict[str, Any]:
    """sbatch option -> value for `params`; `script`: as a batch script's #SBATCH lines say it."""
    flags: dict[str, Any] = {}
    for key, value in params.items():
        if value is None or key == "slurm_additional_parameters":
            continue
        if key == "mem_gb":
            value = f"{int(value)}GB" if float(value) == int(value) else f"{int(float(value) * 1024)}MB"
        elif key == "timeout_min" and script:
            value = format_slurm_time(int(value))
        elif key == "slurm_signal_delay_s":
            # The batch shell of slurm/train.sh relays the signal to srun (B:); submitit's tasks take it directly.
            value = f"{'B:' if script else ''}{PREEMPT_SIGNAL}@{value}"
        if key in SBATCH_OPTIONS:
            flags[SBATCH_OPTIONS[key]] = value
        elif key.startswith("slurm_"):
            flags[key[len("slurm_"):].replace("_", "-")] = value
        else:
            raise ConfigError(f"unknown launch parameter `{key}`")
    for key, value in (params.get("slurm_additional_parameters") or {}).items():
        flags[key.replace("_", "-")] = value
    order = {name: i for i, name in enumerate([*SBATCH_OPTIONS.values(), "requeue"])}
    return {k: flags[k] for k in sorted(flags, key=lambda k: (order.get(k, len(order)), k))}


def _render(flags: Mapping[str, Any]) -> list[str]:
    return [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items() if v is not False]


def sbatch_flags(params: Mapping[str, Any]) -> list[str]:
    """The sbatch options that submitit writes for `params` (submitit names, as `slurm_parameters` gives).

    Output paths are left out (submitit puts them in its folder).
    """
    return _render(_sbatch_options(params, script=False))


def sbatch_header(params: Mapping[str, Any]) -> list[str]:
    """`params` as a batch script's `#SBATCH` lines: the time as H:MM:SS, the signal to the batch shell."""
    return [f"#SBATCH {flag}" for flag in _render(_sbatch_options(params, script=True))]


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_slurm_time(text: str) -> int:
    """Minutes (rounded up) from a Slurm time: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    m = _TIME.match(text.strip())
    if m is None:
        raise ConfigError(f"--time {text!r}: not a Slurm time (M, H:M:S, D-H, D-H:M, D-H:M:S)")
    d, a, b, c = (int(g) if g is not None else None for g in m.group("d", "a", "b", "c"))
    if d is None:
        if b is None:
            seconds = a * 60  # M
        elif c is None:
            seconds = a * 60 + b  # M:S
        else:
            seconds = a * 3600 + b * 60 + c  # H:M:S
    else:
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)  # D-H[:M[:S]]
    minutes = -(-seconds // 60)
    if minutes < 1:
        raise ConfigError(f"--time {text!r}: must be at least one minute")
    return minutes


def format_slurm_time(minutes: int) -> str:
    """`H:MM:SS` (hours may exceed 24), as the `#SBATCH --time` lines write it."""
    return f"{minutes // 60}:{minutes % 60:02d}:00"


_MEM = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<u>[KMGT]?)B?$", re.IGNORECASE)


def parse_mem_gb(text: str) -> float:
    """GB from a Slurm memory size: `64G`, `500M`, `1T`; a bare number is in MB, as for sbatch."""
    m = _MEM.match(text.strip())
    if m is None:
        raise ConfigError(f"--mem {text!r}: not a memory size such as 64G or 500M")
    scale = {"K": 1 / 1024 ** 2, "M": 1 / 1024, "G": 1, "T": 1024, "": 1 / 1024}[m.group("u").upper()]
    gb = float(m.group("n")) * scale
    if gb <= 0:
        raise ConfigError(f"--mem {text!r}: must be more than zero")
    return gb
