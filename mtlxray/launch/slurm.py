"""Slurm environment → distributed identity, and Slurm parameters for submitit, as pure functions.

`slurm_dist_env(env)` maps one task's Slurm variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_JOB_ID) to rank, world size, local rank, node rank and
the rendezvous address: the first host of the node list, and a port derived from the job id so
that every task of a job (and its requeued run) agrees on it without talking first.

`slurm_parameters(launch, cluster, overrides)` builds submitit executor parameters: defaults, then
the cluster's and the config's, then the caller's, last one wins (dinov2 style).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError

__all__ = [
    "SlurmDistEnv", "expand_nodelist", "master_port", "slurm_dist_env", "torch_env",
    "resolve_host", "DEFAULT_SLURM_PARAMETERS", "slurm_parameters",
]

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class SlurmDistEnv:
    """Who one Slurm task is in its job, and where the job's ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    """First host of the job's node list (a Slurm node name, not yet resolved)."""
    master_port: int
    job_id: str


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: `a[1-2],b3` → [`a[1-2]`, `b3`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: `gpu[01-03,7],login` → gpu01, gpu02, gpu03, gpu7, login.

    Zero padding of a range follows its first bound, as Slurm does. One bracket group per name
    (Slurm's own output never nests or chains them).
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if m is None:
            if "[" in part or "]" in part:
                raise ConfigError(f"SLURM_JOB_NODELIST: cannot parse `{part}` in `{nodelist}`")
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            r = _RANGE.match(item)
            if r is None:
                raise ConfigError(f"SLURM_JOB_NODELIST: bad range `{item}` in `{nodelist}`")
            lo, hi = r.group(1), r.group(2) or r.group(1)
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    if not hosts:
        raise ConfigError(f"SLURM_JOB_NODELIST is empty: `{nodelist}`")
    return hosts


def master_port(job_id: str | int) -> int:
    """A rendezvous port in [20000, 40000) from the job id (array ids `123_4` use their digits)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ConfigError(f"SLURM_JOB_ID `{job_id}` has no digits to derive a port from")
    return PORT_BASE + int(digits) % PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    raw = env.get(key)
    if raw is None:
        if default is None:
            raise ConfigError(f"{key} is not set: not inside a Slurm job step (srun)")
        return default
    try:
        # SLURM_TASKS_PER_NODE-style values such as `2(x3)` carry the count first.
        return int(raw.split("(")[0])
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer") from None


def slurm_dist_env(env: Mapping[str, str]) -> SlurmDistEnv:
    """Rank, world size, local rank, node rank and rendezvous address of one Slurm task."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise ConfigError("SLURM_JOB_ID is not set: not inside a Slurm job")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set: not inside a Slurm job")
    hosts = expand_nodelist(nodelist)
    world_size = _int(env, "SLURM_NTASKS", 1)
    num_nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", len(hosts)))
    rank = _int(env, "SLURM_PROCID")
    if not 0 <= rank < world_size:
        raise ConfigError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world_size}")
    return SlurmDistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", max(world_size // num_nodes, 1)),
        node_rank=_int(env, "SLURM_NODEID", 0),
        num_nodes=num_nodes,
        master_addr=hosts[0],
        master_port=master_port(job_id),
        job_id=str(job_id),
    )


def torch_env(dist: SlurmDistEnv, master_addr: Optional[str] = None) -> dict[str, str]:
    """The torch.distributed variables (read by accelerate) for one task."""
    return {
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
        "LOCAL_WORLD_SIZE": str(dist.local_world_size),
        "NODE_RANK": str(dist.node_rank),
        "GROUP_RANK": str(dist.node_rank),
        "MASTER_ADDR": master_addr or dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
    }


def resolve_host(name: str) -> str:
    """An address for a Slurm node name: DNS first, then the node's NodeAddr from `scontrol`.

    Node names need not resolve (several slurmd per host, or clusters whose names are not in
    DNS); the controller always knows the address it reaches the node at.
    """
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"cannot resolve Slurm node `{name}`: no DNS entry and scontrol failed ({e})") from None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    if m is None:
        raise ConfigError(f"cannot resolve Slurm node `{name}`: scontrol shows no NodeAddr")
    return m.group(1)


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
