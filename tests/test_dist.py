"""mtlxray.dist: one resolver for who a process is and where a job's processes meet."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mtlxray.dist import (WorldInfo, export_submitit_env, export_torch_env, master_port, resolve_host, resolve_world,
                          slurm_hosts)
from mtlxray.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_environ():
    """export_*_env write os.environ by design; a variable it adds must not reach later tests
    (a leaked WORLD_SIZE makes every later single-process run wait for ranks that never come)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _slurm_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What Slurm sets for one task of a 2-node × 2-task job."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), **extra}


def test_resolve_world_prefers_torchrun_then_slurm_then_local():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert resolve_world(torchrun) == WorldInfo(3, 1, 4, 4, 0, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
             "SLURM_JOB_NUM_NODES": "4"}
    assert resolve_world(slurm) == WorldInfo(5, 1, 8, 2, 2, "slurm")
    assert resolve_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == WorldInfo(0, 0, 1, 1, 0, "local")
    assert resolve_world({}) == WorldInfo(0, 0, 1, 1, 0, "local")


def test_resolve_world_maps_every_task_of_a_two_node_slurm_job():
    tasks = [resolve_world(_slurm_task(p, p % 2, p // 2)) for p in range(4)]
    assert [(t.rank, t.local_rank, t.node_rank) for t in tasks] == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    assert {(t.world_size, t.local_world_size, t.source) for t in tasks} == {(4, 2, "slurm")}


@pytest.mark.parametrize("env, key", [
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE"),
])
def test_resolve_world_names_a_bad_variable(env, key):
    with pytest.raises(ConfigError, match=key):
        resolve_world(env)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[01-03,7],login", ["gpu01", "gpu02", "gpu03", "gpu7", "login"]),
])
def test_slurm_hosts_expands_the_node_list_without_scontrol(monkeypatch, nodelist, hosts):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is parsed, not asked for
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    assert slurm_hosts() == hosts


def test_slurm_hosts_outside_a_job_is_a_config_error(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        slurm_hosts()


def test_master_port_is_stable_in_range_and_accepts_array_ids():
    assert master_port("123") == master_port(123) == 20123
    assert master_port("45000") == 25000
    assert master_port("123_4") == 20000 + 1234
    assert all(20000 <= master_port(j) < 40000 for j in (0, 19999, 20000, 987654321))


def test_resolve_host_uses_dns_first():
    assert resolve_host("localhost") == "127.0.0.1"


def test_export_torch_env_gives_every_slurm_task_the_same_rendezvous(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    task = _slurm_task(3, 1, 1, SLURM_JOB_NODELIST="localhost,node9")
    for k, v in task.items():
        monkeypatch.setenv(k, v)
    export_torch_env(resolve_world())
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                        "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port("4242"))}


def test_rendezvous_command_prints_what_the_trainer_uses():
    env = {**os.environ, "SLURM_JOB_ID": "31", "SLURM_JOB_NODELIST": "localhost"}
    out = subprocess.run([sys.executable, "-m", "mtlxray.dist", "rendezvous"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["127.0.0.1", str(master_port("31"))]


_TORCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_submitit_tasks_meet_where_the_sbatch_scripts_do(monkeypatch):
    """A submitit Slurm task gets its identity from submitit's TorchDistributedEnvironment, and the
    rendezvous of `python -m mtlxray.dist rendezvous` (resolved address, port from the job id)."""
    monkeypatch.setenv("RANK", "7")  # stale, from the shell the job was submitted from
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in _slurm_task(3, 1, 1, SLURM_JOB_NODELIST="localhost,node9").items():
        monkeypatch.setenv(k, v)
    for key in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    world = export_submitit_env()
    assert world == WorldInfo(3, 1, 4, 2, 1, "torchrun")
    assert {k: os.environ[k] for k in _TORCH} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port("4242"))}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "1"


def test_a_single_submitit_task_is_a_local_process(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    for k, v in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}.items():
        monkeypatch.setenv(k, v)
    assert export_submitit_env() == WorldInfo(0, 0, 1, 1, 0, "local")
    assert not set(_TORCH) & set(os.environ)
