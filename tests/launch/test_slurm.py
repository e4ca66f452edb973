"""mtlxray.launch.slurm: submitit parameter layering."""

from __future__ import annotations

import pytest

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError
from mtlxray.launch.slurm import slurm_parameters


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
