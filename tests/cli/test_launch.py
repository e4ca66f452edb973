"""`mtlxray submit` and `sweep`: their resource flags become submitit's parameters in one place."""

from mtlxray import cli
from mtlxray.cli.launch import launch_params


def test_resource_flags_become_submitit_parameters_and_unset_ones_stay_out():
    assert launch_params(nodes=2, gpus_per_node=None, cpus_per_task=6, time="1:30:00", mem="500M",
                         partition="gpu", account=None, qos="high") == {
        "nodes": 2, "cpus_per_task": 6, "timeout_min": 90, "mem_gb": 500 / 1024, "slurm_partition": "gpu",
        "slurm_qos": "high"}
    assert launch_params(timeout_min=30, array_parallelism=4) == {"timeout_min": 30, "slurm_array_parallelism": 4}


def test_time_and_timeout_min_together_are_a_usage_error(capsys):
    code = cli.main(["submit", "--config", "demo", "--time", "10", "--timeout-min", "5", "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "mtlxray submit: error: give --time or --timeout-min, not both"
