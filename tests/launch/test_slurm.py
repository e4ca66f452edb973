"""mtlxray.launch.slurm: submitit parameter layering, their sbatch form, and one source of launch defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError
from mtlxray.launch.slurm import (DEFAULT_SLURM_PARAMETERS, format_slurm_time, parse_mem_gb, parse_slurm_time,
                                  sbatch_flags, slurm_parameters)

ROOT = Path(__file__).resolve().parents[2]


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
    with pytest.raises(ConfigError, match="cpus_per_task"):
        slurm_parameters(overrides={"cpus_per_task": 0})


def test_default_slurm_parameters_are_a_default_launch_config():
    assert slurm_parameters() == slurm_parameters(LaunchConfig())
    launch = LaunchConfig()
    assert (DEFAULT_SLURM_PARAMETERS["nodes"], DEFAULT_SLURM_PARAMETERS["gpus_per_node"],
            DEFAULT_SLURM_PARAMETERS["cpus_per_task"], DEFAULT_SLURM_PARAMETERS["timeout_min"],
            DEFAULT_SLURM_PARAMETERS["slurm_signal_delay_s"]) == (
        launch.nodes, launch.gpus_per_node, launch.cpus_per_task, launch.timeout_min, launch.requeue_signal_delay_s)


def _sbatch_header(script: Path) -> dict[str, str]:
    """`#SBATCH --key=value` lines of a script (flags without a value map to "")."""
    out = {}
    for m in re.finditer(r"^#SBATCH --([\w-]+)(?:=(\S+))?\s*$", script.read_text(), re.MULTILINE):
        out[m.group(1)] = m.group(2) or ""
    return out


@pytest.mark.parametrize("script", ["phase1.sh", "phase2.sh"])
def test_sbatch_headers_state_the_launch_config_defaults(script):
    """One source of launch defaults: the #SBATCH headers ask for what a default LaunchConfig asks submitit for."""
    header = _sbatch_header(ROOT / "slurm" / script)
    params = slurm_parameters(LaunchConfig())
    assert int(header["nodes"]) == params["nodes"]
    assert int(header["ntasks-per-node"]) == params["tasks_per_node"]
    assert int(header["gpus-per-node"]) == params["gpus_per_node"]
    assert int(header["cpus-per-task"]) == params["cpus_per_task"]
    assert header["time"] == format_slurm_time(params["timeout_min"])
    assert parse_slurm_time(header["time"]) == params["timeout_min"]
    assert header["signal"] == f"B:USR1@{params['slurm_signal_delay_s']}"
    assert "requeue" in header and params["slurm_additional_parameters"]["requeue"] is True
    # The log folder ships with the repository, so the job can write its log in a fresh clone.
    output = Path(header["output"])
    assert not output.is_absolute() and (ROOT / output.parent / ".gitkeep").is_file()


def test_sbatch_flags_are_what_submitit_writes():
    params = slurm_parameters(LaunchConfig(partition="gpu", account="proj", qos="high", mem_gb=64, nodes=2),
                              overrides={"name": "mtlx-phase1", "timeout_min": 90,
                                         "slurm_additional_parameters": {"dependency": "afterok:7"}})
    assert sbatch_flags(params) == [
        "--job-name=mtlx-phase1", "--partition=gpu", "--account=proj", "--qos=high", "--nodes=2",
        "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--mem=64GB", "--time=90",
        "--signal=USR2@120", "--requeue", "--dependency=afterok:7"]
    assert "--mem=512MB" in sbatch_flags({**params, "mem_gb": 0.5})


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("12:00:00", 720), ("2-0", 2880), ("1-12:30", 2190), ("0-0:0:30", 1),
])
def test_parse_slurm_time(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "12h", "1:2:3:4", "0", "-5"])
def test_parse_slurm_time_rejects_what_slurm_would(text):
    with pytest.raises(ConfigError, match="--time"):
        parse_slurm_time(text)


def test_parse_mem_gb_reads_slurm_sizes():
    assert parse_mem_gb("64G") == 64 and parse_mem_gb("64GB") == 64
    assert parse_mem_gb("512M") == 0.5 and parse_mem_gb("1024") == 1  # a bare number is MB, as for sbatch
    assert parse_mem_gb("1T") == 1024
    with pytest.raises(ConfigError, match="--mem"):
        parse_mem_gb("lots")
