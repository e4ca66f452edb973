"""mtlxray.launch.slurm: Slurm environment → ranks and rendezvous, and submitit parameter layering."""

from __future__ import annotations

import pytest

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError
from mtlxray.launch.slurm import (expand_nodelist, master_port, resolve_host, slurm_dist_env,
                                  slurm_parameters, torch_env)


def _task_env(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What Slurm sets for one task of a 2-node × 2-task job."""
    return {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid), **extra,
    }


def test_slurm_dist_env_maps_every_task_of_a_two_node_job():
    tasks = [slurm_dist_env(_task_env(p, p % 2, p // 2)) for p in range(4)]
    assert [t.rank for t in tasks] == [0, 1, 2, 3]
    assert [t.local_rank for t in tasks] == [0, 1, 0, 1]
    assert [t.node_rank for t in tasks] == [0, 0, 1, 1]
    assert {t.world_size for t in tasks} == {4}
    assert {t.local_world_size for t in tasks} == {2}
    assert {t.num_nodes for t in tasks} == {2}
    # Every task agrees on the rendezvous without talking: first host, port from the job id.
    assert {(t.master_addr, t.master_port) for t in tasks} == {("gpu07", 20000 + 4242 % 20000)}


def test_slurm_dist_env_single_task_defaults():
    dist = slurm_dist_env({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_PROCID": "0"})
    assert (dist.rank, dist.world_size, dist.local_rank, dist.node_rank, dist.num_nodes) == (0, 1, 0, 0, 1)
    assert dist.master_addr == "node1"


@pytest.mark.parametrize("env, key", [
    ({"SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "0"}, "SLURM_JOB_ID"),
    ({"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"}, "SLURM_PROCID"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "x"}, "SLURM_PROCID"),
    ({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "SLURM_PROCID"),
])
def test_slurm_dist_env_bad_environment_names_the_variable(env, key):
    with pytest.raises(ConfigError, match=key):
        slurm_dist_env(env)


def test_torch_env_exports_the_torch_distributed_variables():
    env = torch_env(slurm_dist_env(_task_env(3, 1, 1)), master_addr="10.0.0.7")
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "NODE_RANK": "1", "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "24242"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],login", ["gpu01", "gpu02", "gpu03", "gpu7", "login"]),
    ("a[9-11]-ib,b5", ["a9-ib", "a10-ib", "a11-ib", "b5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-", "node[a-b]", ""])
def test_expand_nodelist_rejects_malformed_lists(bad):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_master_port_is_stable_in_range_and_accepts_array_ids():
    assert master_port("123") == master_port(123) == 20123
    assert master_port("45000") == 25000
    assert master_port("123_4") == 20000 + 1234
    assert all(20000 <= master_port(j) < 40000 for j in (0, 19999, 20000, 987654321))


def test_resolve_host_uses_dns_first():
    assert resolve_host("localhost") == "127.0.0.1"


def test_slurm_parameters_layers_defaults_config_cluster_then_caller():
    launch = LaunchConfig(nodes=2, gpus_per_node=4, cpus_per_task=6, timeout_min=60, partition="gpu",
                          slurm_extra={"constraint": "a100"})
    params = slurm_parameters(launch, cluster={"slurm_partition": "big", "cpus_per_task": 12},
                              overrides={"timeout_min": 30, "slurm_additional_parameters": {"qos": "high"}})
    assert params["nodes"] == 2
    assert params["gpus_per_node"] == 4 and params["tasks_per_node"] == 4  # one task per GPU
    assert params["cpus_per_task"] == 12  # cluster over config
    assert params["slurm_partition"] == "big"
    assert params["timeout_min"] == 30  # caller over everything
    assert params["slurm_signal_delay_s"] == 120
    assert params["slurm_additional_parameters"] == {"requeue": True, "constraint": "a100", "qos": "high"}
    assert "mem_gb" not in params and "slurm_account" not in params


def test_slurm_parameters_cpu_only_drops_the_gpu_request():
    params = slurm_parameters(LaunchConfig(gpus_per_node=0, nodes=2))
    assert "gpus_per_node" not in params and params["tasks_per_node"] == 1 and params["nodes"] == 2
    assert slurm_parameters(overrides={"gpus_per_node": 0, "tasks_per_node": 3})["tasks_per_node"] == 3


def test_slurm_parameters_rejects_zero_nodes():
    with pytest.raises(ConfigError, match="nodes"):
        slurm_parameters(LaunchConfig(nodes=0))
