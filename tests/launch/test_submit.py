"""submit_pipeline and `mtlxray submit` on the real local two-node Slurm cluster: chains, requeue, failures."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _launch_support import train_records, train_steps, wait_for_steps

from mtlxray.errors import ConfigError, ShardError
from mtlxray.launch import submit_pipeline
from mtlxray.launch.submit import SubmitError

CPU_PARAMS = {"gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "timeout_min": 15}
DEMO = ["configs/demo.yaml", "configs/demo_phase2.yaml"]


def test_slurm_executor_without_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="`sbatch` is not on PATH"):
        submit_pipeline(DEMO[:1], executor="slurm", overrides=[f"run.output_dir={tmp_path}"], folder=tmp_path)
    assert not list(tmp_path.iterdir())


def _queued(cluster) -> list[str]:
    return cluster.run("squeue", "-h", "-o", "%i").stdout.split()


@pytest.mark.slurm
def test_submit_checks_the_whole_chain_before_the_first_sbatch(slurm_env, demo_overrides, tmp_path):
    runs, folder = tmp_path / "runs", tmp_path / "submitit"
    before = _queued(slurm_env)
    # The second phase's shards are missing: nothing of the chain is submitted.
    with pytest.raises(ShardError, match=r"^phase 2 \(demo_phase2.yaml\): data.shards: "):
        submit_pipeline(DEMO, executor="slurm", overrides=demo_overrides(runs, 2), folder=folder,
                        phase_overrides={2: [f"data.shards={tmp_path / 'missing'}"]}, nodes=1, **CPU_PARAMS)
    # A request no node of the partition can meet would pend forever (Reason=PartitionConfig): refused now.
    with pytest.raises(SubmitError, match=r"phase 1 \(demo.yaml\): the cluster cannot run this job \(.*\); "
                                          r"asked for: .*--cpus-per-task=64"):
        submit_pipeline(DEMO, executor="slurm", overrides=demo_overrides(runs, 2), folder=folder,
                        nodes=1, **{**CPU_PARAMS, "cpus_per_task": 64})
    # The CLI says it in one line, exit 1 (data) or 2 (config).
    res = subprocess.run([sys.executable, "-m", "mtlxray.cli", "submit", "--config", DEMO[0], "--then", DEMO[1],
                          "--executor", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "64",
                          "--folder", str(folder), *demo_overrides(runs, 2)],
                         env=slurm_env.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("mtlxray submit: error: phase 1 (demo.yaml): the cluster cannot run this job")
    assert _queued(slurm_env) == before and not folder.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_cli_submit_wait_runs_a_three_phase_chain_on_two_nodes(slurm_cluster, demo_overrides, third_phase, tmp_path):
    """`submit --wait` on multi-node jobs waits for every task (no `results()` warning, no cancelled phase 2)."""
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "mtlxray.cli", "submit", "--config", DEMO[0], "--then", DEMO[1],
            "--then", str(third_phase), "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "0",
            "--cpus-per-task", "1", "--time", "0:15:00", "--folder", str(tmp_path / "submitit"),
            *demo_overrides(runs, 2)]
    dry = subprocess.run([*args, "--dry-run"], env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    planned = [line.split()[1:] for line in dry.stdout.splitlines() if line.startswith("sbatch ")]

    res = subprocess.run([*args, "--wait"], env=slurm_cluster.env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "results()" not in res.stdout + res.stderr
    ids = [line.split("\t")[1] for line in res.stdout.splitlines() if "\t" in line]
    reports = [line for line in res.stdout.splitlines() if ": job " in line]
    assert len(ids) == 3 and len(reports) == 3 and all(" COMPLETED;" in r for r in reports), res.stdout
    for k in (1, 2, 3):  # each job's progress relayed while waiting, each log step once
        assert [line.split(",")[0] for line in res.stdout.splitlines() if line.startswith(f"phase{k}: step ")
                and "validation" not in line] == [f"phase{k}: step 1/2 (50%)", f"phase{k}: step 2/2 (100%)"]

    accts = [slurm_cluster.sacct(job) for job in ids]
    assert [a["State"] for a in accts] == ["COMPLETED"] * 3
    assert accts[1]["Start"] >= accts[0]["End"] and accts[2]["Start"] >= accts[1]["End"], accts
    for k, (job, flags) in enumerate(zip(ids, planned), start=1):
        # The dry run printed what was submitted.
        assert slurm_cluster.job_field(job, "NumNodes") == "2" and "--nodes=2" in flags
        assert slurm_cluster.job_field(job, "TimeLimit") == "00:15:00" and "--time=15" in flags
        assert slurm_cluster.job_field(job, "JobName") == f"mtlx-phase{k}" and f"--job-name=mtlx-phase{k}" in flags
        assert {r["world_size"] for r in train_records(runs / f"phase{k}" / "metrics.jsonl")} == {2}
    for k in (2, 3):
        log = "".join(p.read_text() for p in (tmp_path / "submitit").glob(f"{ids[k - 1]}_0_log.*"))
        best = runs / f"phase{k - 1}" / "checkpoints" / "best"
        assert f"initialised from {best}" in log or f"initialised from {best.resolve()}" in log
    assert (runs / "phase3" / "checkpoints" / "best").exists()


def _two_node_job(demo_overrides, runs, folder, steps):
    return submit_pipeline(DEMO[:1], executor="slurm", overrides=demo_overrides(runs, steps), folder=folder,
                           nodes=2, **CPU_PARAMS)


@pytest.mark.slurm
@pytest.mark.slow
def test_interrupt_on_two_nodes_saves_requeues_and_completes(slurm_env, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    steps = 8  # runway: the signal must land before the job can finish
    pipeline = _two_node_job(demo_overrides, runs, tmp_path / "submitit", steps)
    job = pipeline.jobs[0]
    metrics = runs / "phase1" / "metrics.jsonl"
    wait_for_steps(metrics, 1, timeout=300)

    # What Slurm sends launch.requeue_signal_delay_s before the time limit, to every task of the job.
    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    reports = pipeline.wait()  # submit_pipeline(...).wait() on a two-task job
    assert reports[0].state == "COMPLETED", reports
    assert slurm_env.job_field(job.job_id, "Restarts") == "1"
    log0 = job.task(0).paths.stdout.read_text() + job.task(0).paths.stderr.read_text()
    assert "Requeued job" in log0 and "resumed from" in log0
    assert "SIGUSR2 received" in log0  # the signal that came, by its name
    assert "exit code 255" not in log0  # rank 0 leaves with the requeue code, 75
    assert train_steps(metrics) == list(range(1, steps + 1))
    assert {r["world_size"] for r in train_records(metrics)} == {2}


@pytest.mark.slurm
@pytest.mark.slow
def test_a_requeue_that_fails_ends_the_job_at_once_in_one_line(slurm_env, demo_overrides, tmp_path):
    """Rank 0 cannot requeue (the job may not be requeued): every rank has saved, so the job fails now,
    with the cause in one line; no rank waits for a requeue that will not come."""
    runs = tmp_path / "runs"
    pipeline = _two_node_job(demo_overrides, runs, tmp_path / "submitit", 40)
    job = pipeline.jobs[0]
    wait_for_steps(runs / "phase1" / "metrics.jsonl", 1, timeout=300)
    slurm_env.run("scontrol", "update", f"JobId={job.job_id}", "Requeue=0")

    slurm_env.run("scancel", "--signal=USR2", job.job_id)
    reports = pipeline.wait()
    report = reports[0]
    # FAILED, not TIMEOUT: the job ended on its own, so no rank was left waiting for a requeue.
    assert report.state == "FAILED" and slurm_env.job_field(job.job_id, "Restarts") == "0"
    assert "\n" not in report.error
    assert re.match(rf"TrainingFailed: training saved, but `scontrol requeue {job.job_id}` failed \(exit 1\); "
                    r"resubmit the job to resume from checkpoints/last \(log .*_0_log.err\)$", report.error), report.error
    assert (runs / "phase1" / "checkpoints" / "last").exists()
