"""submit_pipeline: submitit chains on the real local Slurm cluster, requeue on interrupt, two nodes."""

from __future__ import annotations

import pytest
from _launch_support import train_records, train_steps, wait_for_steps

from mtlxray.errors import ConfigError
from mtlxray.launch import submit_pipeline

CPU_PARAMS = {"gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 15}
DEMO = ["configs/demo.yaml", "configs/demo_phase2.yaml"]


def test_slurm_executor_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="`sbatch` is not on PATH"):
        submit_pipeline(DEMO[:1], executor="slurm", overrides=[f"run.output_dir={tmp_path}"], folder=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_pipeline_chains_phase2_afterok_from_phase1_best(slurm_env, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    pipeline = submit_pipeline(DEMO, executor="slurm", overrides=demo_overrides(runs, 2),
                               folder=tmp_path / "submitit", nodes=1, **CPU_PARAMS)
    job1, job2 = (j.job_id for j in pipeline.jobs)
    assert slurm_env.job_field(job2, "Dependency") == f"afterok:{job1}(unfulfilled)"

    reports = pipeline.wait()
    assert [r.state for r in reports] == ["COMPLETED", "COMPLETED"]
    assert reports[0].run_dir == str(runs / "phase1")
    assert reports[1].best_checkpoint == str(runs / "phase2" / "checkpoints" / "best")
    acct1, acct2 = slurm_env.sacct(job1), slurm_env.sacct(job2)
    assert acct1["State"] == acct2["State"] == "COMPLETED"
    assert acct2["Start"] >= acct1["End"], (acct1, acct2)
    log2 = pipeline.jobs[1].paths.stdout.read_text() + pipeline.jobs[1].paths.stderr.read_text()
    assert f"initialised from {runs / 'phase1' / 'checkpoints' / 'best'}" in log2


@pytest.mark.slurm
@pytest.mark.slow
def test_interrupt_checkpoints_requeues_and_completes(slurm_env, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    steps = 40  # runway: the signal must land before the job can finish
    pipeline = submit_pipeline(DEMO[:1], executor="slurm", overrides=demo_overrides(runs, steps),
                               folder=tmp_path / "submitit", nodes=1, **CPU_PARAMS)
    job = pipeline.jobs[0]
    metrics = runs / "phase1" / "metrics.jsonl"
    wait_for_steps(metrics, 1, timeout=240)

    job._interrupt()
    reports = pipeline.wait()
    assert reports[0].state == "COMPLETED", reports
    assert slurm_env.job_field(job.job_id, "Restarts") == "1"
    log = job.paths.stdout.read_text() + job.paths.stderr.read_text()
    assert "Requeued job" in log and "resumed from" in log
    assert train_steps(metrics) == list(range(1, steps + 1))


@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_trains_with_world_size_2(slurm_env, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    pipeline = submit_pipeline(DEMO[:1], executor="slurm", overrides=demo_overrides(runs, 2),
                               folder=tmp_path / "submitit", nodes=2, **CPU_PARAMS)
    reports = pipeline.wait()
    assert reports[0].state == "COMPLETED", reports
    assert slurm_env.job_field(pipeline.jobs[0].job_id, "NumNodes") == "2"
    records = train_records(runs / "phase1" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert {r["world_size"] for r in records} == {2}
