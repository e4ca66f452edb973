"""Who this process is in a job, and where the job's processes meet: the one place for it.

`resolve_world()` reads the identity in order: torchrun / `accelerate launch` variables (RANK,
WORLD_SIZE, LOCAL_RANK), then Slurm's one-process-per-task variables (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, SLURM_NODEID; `srun` and submitit's Slurm jobs both set them), then a single local
process. `export_torch_env` writes it back as the torch.distributed variables that accelerate
reads, with the rendezvous of a Slurm job: the address of the job's first host and a port derived
from the job id, so that every task (and a requeued run) computes the same ones without talking.
The sbatch scripts get the same rendezvous from `python -m mtlxray.dist rendezvous`, and the
tasks of a submitit job from `export_submitit_env` (submitit's own TorchDistributedEnvironment,
with this module's address and port), so that all three launch paths meet at the same place.

Environment knob: MTLXRAY_PG_TIMEOUT_S sets the process-group timeout (default 1800 s); tests
shorten it so that a hung collective fails fast instead of after gloo's 30 minutes.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from mtlxray.errors import ConfigError
from mtlxray.io import free_port

__all__ = ["WorldInfo", "resolve_world", "slurm_hosts", "master_port", "resolve_host", "slurm_rendezvous",
           "export_torch_env", "export_submitit_env", "pg_timeout", "is_main_process"]

_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class WorldInfo:
    """Who this process is in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    source: Literal["torchrun", "slurm", "local"]
    """Where the identity came from."""


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        # SLURM_TASKS_PER_NODE-style values such as `2(x3)` carry the count first.
        return int(raw.split("(")[0].split(",")[0])
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer") from None


def resolve_world(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, local rank and world size from torchrun/accelerate, then Slurm tasks, then local."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        return WorldInfo(_int(env, "RANK", 0), _int(env, "LOCAL_RANK", 0), world,
                         _int(env, "LOCAL_WORLD_SIZE", world), _int(env, "GROUP_RANK", 0), "torchrun")
    ntasks = _int(env, "SLURM_NTASKS", 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        rank = _int(env, "SLURM_PROCID", 0)
        if not 0 <= rank < ntasks:
            raise ConfigError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={ntasks}")
        nodes = max(_int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES", 1)), 1)
        return WorldInfo(rank, _int(env, "SLURM_LOCALID", 0), ntasks,
                         _int(env, "SLURM_NTASKS_PER_NODE", max(ntasks // nodes, 1)),
                         _int(env, "SLURM_NODEID", 0), "slurm")
    return WorldInfo(0, 0, 1, 1, 0, "local")


def slurm_hosts() -> list[str]:
    """The current job's host names in order (`node[1-3]` → node1, node2, node3).

    Parsed by submitit's Slurm job environment, which reads SLURM_JOB_NODELIST."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    if not os.environ.get("SLURM_JOB_NODELIST"):
        raise ConfigError("SLURM_JOB_NODELIST is not set: not inside a Slurm job")
    try:
        return list(SlurmJobEnvironment().hostnames)
    except Exception as e:  # submitit raises a bare error on a list it cannot read
        raise ConfigError(f"SLURM_JOB_NODELIST: cannot parse {os.environ['SLURM_JOB_NODELIST']!r}: {e}") from None


def master_port(job_id: str | int) -> int:
    """A rendezvous port in [20000, 40000) from the job id (array ids `123_4` use their digits)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ConfigError(f"SLURM_JOB_ID `{job_id}` has no digits to derive a port from")
    return PORT_BASE + int(digits) % PORT_SPAN


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


def slurm_rendezvous() -> tuple[str, int]:
    """(address, port) where the processes of the current Slurm job meet."""
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID")
    if not job_id:
        raise ConfigError("SLURM_JOB_ID is not set: not inside a Slurm job")
    return resolve_host(slurm_hosts()[0]), master_port(job_id)


def export_torch_env(info: WorldInfo, force: bool = False) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT where the launcher did not.

    A single local process gets them only with `force` (DeepSpeed wants a process group even then).
    """
    if info.world_size == 1 and not force:
        return
    for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank),
                       ("LOCAL_WORLD_SIZE", info.local_world_size), ("GROUP_RANK", info.node_rank)):
        os.environ.setdefault(key, str(value))
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    if info.source == "slurm":
        addr, port = slurm_rendezvous()
    else:
        addr, port = "127.0.0.1", free_port()
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))


def export_submitit_env() -> WorldInfo:
    """Inside a submitit task: set the torch.distributed variables with submitit's TorchDistributedEnvironment.

    submitit reads the task's rank, local rank and world size from its job environment. Two things
    are ours: the address (submitit names the first host, whose name need not resolve: it goes
    through `resolve_host`, or is 127.0.0.1 for the local executor) and the port (`master_port` of
    the job id, as in the sbatch scripts, so that a requeued job meets at the same place).
    Variables inherited from the submitting shell are overwritten; CUDA_VISIBLE_DEVICES is left
    alone (accelerate picks cuda:LOCAL_RANK). A single task sets nothing.
    """
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    job = JobEnvironment()
    if job.num_tasks == 1:
        for key in _TORCH_VARS:  # a single process: nothing stale from the submitting shell
            os.environ.pop(key, None)
        return resolve_world()
    os.environ["MASTER_PORT"] = str(master_port(job.job_id))  # TorchDistributedEnvironment takes it from here
    torch_env = TorchDistributedEnvironment()
    torch_env.master_addr = "127.0.0.1" if job.cluster == "local" else resolve_host(torch_env.master_addr)
    torch_env.export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["GROUP_RANK"] = str(job.node)
    return resolve_world()


def pg_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("MTLXRAY_PG_TIMEOUT_S", "1800")))


def process_group_kwargs(world: WorldInfo, *, force: bool = False):
    """accelerate's InitProcessGroupKwargs for this machine and job.

    On CPU the gloo backend must be named (else each DeepSpeed rank believes it is alone), and
    only when there is a group to make (accelerate treats any named backend as distributed); GPUs
    take accelerate's default (NCCL). The timeout is `pg_timeout()`."""
    import torch
    from accelerate.utils import InitProcessGroupKwargs

    distributed = world.world_size > 1 or force
    return InitProcessGroupKwargs(backend="gloo" if distributed and not torch.cuda.is_available() else None,
                                  timeout=pg_timeout())


def is_main_process() -> bool:
    """Rank 0 of the job (or a single process), decided from the environment alone."""
    return resolve_world().rank == 0


def _main(argv: list[str]) -> int:
    """`python -m mtlxray.dist rendezvous`: print the current Slurm job's address and port."""
    if argv != ["rendezvous"]:
        print("usage: python -m mtlxray.dist rendezvous", file=sys.stderr)
        return 2
    try:
        addr, port = slurm_rendezvous()
    except ConfigError as e:
        print(f"mtlxray.dist: error: {e}", file=sys.stderr)
        return 2
    print(addr, port)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
