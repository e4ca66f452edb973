"""mtlxray.launch.slurm: submitit parameter layering, their sbatch form, and one source of launch defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlxray.config import LaunchConfig
from mtlxray.errors import ConfigError
from mtlxray.launch.slurm import (DEFAULT_SLURM_PARAMETERS, parse_mem_gb, parse_slurm_time, sbatch_flags,
                                  sbatch_header, slurm_parameters)

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


@pytest.mark.parametrize("script", ["phase1.sh", "phase2.sh"])
def test_sbatch_headers_are_the_launch_config_defaults_as_the_one_table_writes_them(script):
    """One source of launch defaults and one signal: the #SBATCH lines are sbatch_header of a default LaunchConfig."""
    lines = [line for line in (ROOT / "slurm" / script).read_text().splitlines() if line.startswith("#SBATCH ")]
    params = {**slurm_parameters(LaunchConfig()), "name": f"mtlx-{script.removesuffix('.sh')}"}
    header = sbatch_header(params)
    assert lines[:len(header)] == header
    assert "#SBATCH --time=24:00:00" in header and "#SBATCH --signal=B:USR2@120" in header
    assert parse_slurm_time(header[header.index("#SBATCH --time=24:00:00")].split("=")[1]) == params["timeout_min"]
    # The log folder ships with the repository, so the job can write its log in a fresh clone.
    (output,) = [line.split("=", 1)[1] for line in lines[len(header):] if line.startswith("#SBATCH --output=")]
    assert not Path(output).is_absolute() and (ROOT / Path(output).parent / ".gitkeep").is_file()


def test_both_paths_ask_for_the_configured_signal_delay():
    params = slurm_parameters(LaunchConfig(requeue_signal_delay_s=300))
    assert params["slurm_signal_delay_s"] == 300  # submitit's executor parameter
    assert "--signal=USR2@300" in sbatch_flags(params) and "#SBATCH --signal=B:USR2@300" in sbatch_header(params)


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
