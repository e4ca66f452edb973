"""slurm/phase1.sh, slurm/phase2.sh and slurm/pipeline.sh on the real local two-node cluster (CPU, gloo)."""

from __future__ import annotations

import time

import pytest
from _launch_support import train_records, train_steps, wait_for_steps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _pipeline(cluster, env: dict[str, str], *sbatch_args: str) -> tuple[str, str]:
    out = cluster.run("bash", "slurm/pipeline.sh", *sbatch_args, env=env).stdout
    ids = dict(line.split() for line in out.splitlines() if line.startswith("phase"))
    return ids["phase1"], ids["phase2"]


def _demo_pipeline_env(runs, demo_overrides, **extra: str) -> dict[str, str]:
    """Environment for slurm/pipeline.sh running the demo configs on CPU, writing under `runs`."""
    return {
        "MTLX_CPU": "1",
        "MTLX_PHASE1_CONFIG": "configs/demo.yaml",
        "MTLX_PHASE2_CONFIG": "configs/demo_phase2.yaml",
        "MTLX_OVERRIDES": " ".join(demo_overrides(runs, steps=2)),
        **extra,
    }


def test_pipeline_two_nodes_phase2_after_phase1_from_its_checkpoint(slurm_cluster, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    env = _demo_pipeline_env(runs, demo_overrides)
    job1, job2 = _pipeline(slurm_cluster, env, "--nodes=2", *CPU_JOB)
    assert slurm_cluster.job_field(job2, "Dependency") == f"afterok:{job1}(unfulfilled)"

    assert slurm_cluster.wait_done(job2, timeout=420) == "COMPLETED"
    acct1, acct2 = slurm_cluster.sacct(job1), slurm_cluster.sacct(job2)
    assert acct1["State"] == "COMPLETED" and acct2["State"] == "COMPLETED"
    assert acct2["Start"] >= acct1["End"], (acct1, acct2)

    log1 = (runs / "phase1" / f"slurm-{job1}.out").read_text()
    assert "nodes 2 (node[1-2])" in log1 and "processes 2" in log1
    assert "world size 2" in log1
    assert {r["world_size"] for r in train_records(runs / "phase1" / "metrics.jsonl")} == {2}
    log2 = (runs / "phase2" / f"slurm-{job2}.out").read_text()
    assert f"initialised from {runs / 'phase1' / 'checkpoints' / 'best'}" in log2
    assert (runs / "phase2" / "checkpoints" / "best").exists()


def test_failed_phase1_leaves_phase2_dependency_never_satisfied(slurm_cluster, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    # Phase 1 fails at run time: its shards do not exist.
    env = _demo_pipeline_env(runs, demo_overrides, MTLX_PHASE1_OVERRIDES=f"data.shards={tmp_path / 'missing'}")
    job1, job2 = _pipeline(slurm_cluster, env, "--nodes=1", *CPU_JOB)
    try:
        assert slurm_cluster.wait_done(job1, timeout=180) == "FAILED"
        deadline = time.monotonic() + 60
        while slurm_cluster.job_field(job2, "Reason") != "DependencyNeverSatisfied" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert slurm_cluster.job_field(job2, "Reason") == "DependencyNeverSatisfied"
        assert slurm_cluster.job_field(job2, "JobState") == "PENDING"
        assert slurm_cluster.sacct(job2)["Start"] in ("Unknown", "None")
        assert not (runs / "phase2" / "metrics.jsonl").exists()
    finally:
        slurm_cluster.run("scancel", job2, check=False)


def test_usr1_saves_requeues_and_finishes_without_repeating_steps(slurm_cluster, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    steps = 40  # runway: the signal must land before the job can finish
    (runs / "phase1").mkdir(parents=True)
    env = {"MTLX_CPU": "1", "MTLX_OVERRIDES": " ".join(demo_overrides(runs, steps=steps))}
    job = slurm_cluster.run(
        "sbatch", "--parsable", "--nodes=1", *CPU_JOB, f"--output={runs / 'phase1' / 'slurm-%j.out'}",
        "slurm/phase1.sh", "configs/demo.yaml", env=env).stdout.strip()
    metrics = runs / "phase1" / "metrics.jsonl"
    wait_for_steps(metrics, 1, timeout=240)

    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert slurm_cluster.wait_done(job, timeout=300) == "COMPLETED"

    assert slurm_cluster.job_field(job, "Restarts") == "1"
    log = (runs / "phase1" / f"slurm-{job}.out").read_text()
    assert "USR1 received" in log and f"requeueing job {job}" in log
    assert f"job {job} restart 1 " in log
    assert "resumed from" in log
    assert train_steps(metrics) == list(range(1, steps + 1))
