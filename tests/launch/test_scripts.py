"""slurm/phase1.sh, slurm/phase2.sh and slurm/pipeline.sh on the real local two-node cluster (CPU, gloo)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _launch_support import train_records, train_steps, wait_for_steps
from _launch_support import ROOT, TINY_RUN

from mtlxray.dist import master_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU_JOB = ["--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]


def _fresh_clone(dest: Path) -> Path:
    """What `git clone` of this tree gives: tracked files and new files not ignored (no runs/ content, no venv)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _header_examples(script: Path) -> list[str]:
    """The command lines in a script's header comment that run sbatch, without trailing comments."""
    out = []
    for line in script.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+((?:\w+=\S+ )*sbatch .*)$", line)
        if m:
            out.append(re.sub(r"\s+#.*$", "", m.group(1)).strip())
    return out


def test_every_header_example_runs_as_written_in_a_fresh_clone(slurm_cluster, tiny_shards, tmp_path):
    """Each `sbatch ...` example of the phase scripts' headers, run exactly as written from a fresh clone,
    either completes or is refused at once by sbatch: none is left pending forever, and the job's log
    needs no folder the user must make. The demo configs read runs/demo/shards (here the tiny set) and
    MTLX_OVERRIDES (a documented variable) shrinks the model to a few seconds per step."""
    clone = _fresh_clone(tmp_path / "clone")
    assert not (clone / ".venv").exists() and [p.name for p in (clone / "runs").iterdir()] == [".gitkeep"]
    shutil.copytree(tiny_shards, clone / "runs" / "demo" / "shards")
    env = {"MTLX_OVERRIDES": " ".join([*TINY_RUN, "schedule.max_steps=2"])}
    completed, refused = [], []
    for script in ("phase1.sh", "phase2.sh"):
        examples = _header_examples(clone / "slurm" / script)
        assert len(examples) >= 3, examples
        for example in examples:
            res = slurm_cluster.run("bash", "-c", example, cwd=clone, env=env, check=False)
            if res.returncode != 0:  # refused by sbatch itself: no job was queued to wait for
                assert "sbatch: error:" in res.stderr and "Submitted batch job" not in res.stdout, (example, res.stderr)
                refused.append(example)
                continue
            job = re.search(r"Submitted batch job (\d+)", res.stdout).group(1)
            log_path = clone / "runs" / f"slurm-{job}.out"
            try:
                state = slurm_cluster.wait_done(job, timeout=420)
            finally:
                slurm_cluster.run("scancel", job, check=False)
            log = log_path.read_text()
            assert state == "COMPLETED", f"{example}: {state}\n{log[-3000:]}"
            assert f"main 127.0.0.1:{master_port(job)} processes 2" in log  # the rendezvous of mtlxray.dist
            assert "world size 2" in log and "srun: error" not in log
            completed.append(example)
    # The CPU examples ran (phase 2 from phase 1's best); the GPU ones cannot run on CPU nodes.
    assert [e for e in completed] == [e for e in completed if "--gpus-per-node=0" in e] and len(completed) == 2
    assert (clone / "runs" / "demo" / "phase2" / "checkpoints" / "best").exists()
    assert len(refused) >= 4


def _pipeline(cluster, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return cluster.run("bash", "slurm/pipeline.sh", *args, env=env, check=check)


def _ids(out: str) -> list[str]:
    return [line.split()[1] for line in out.splitlines() if re.match(r"phase\d+ \d+$", line)]


def test_pipeline_chains_three_phases_each_from_the_previous_best(slurm_cluster, demo_overrides, third_phase,
                                                                   tmp_path):
    runs = tmp_path / "runs"
    env = {"MTLX_CPU": "1", "MTLX_OVERRIDES": " ".join(demo_overrides(runs, 2))}
    res = _pipeline(slurm_cluster, env, "--nodes=1", *CPU_JOB, "configs/demo.yaml", "configs/demo_phase2.yaml",
                    str(third_phase))
    ids = _ids(res.stdout)
    try:
        assert len(ids) == 3, res.stdout
        for prev, job in zip(ids, ids[1:]):
            assert slurm_cluster.job_field(job, "Dependency") == f"afterok:{prev}(unfulfilled)"
        for k, job in enumerate(ids, start=1):  # in order, so that a failed phase fails the test at once
            log = runs / f"phase{k}" / f"slurm-{job}.out"
            state = slurm_cluster.wait_done(job, timeout=300)
            assert state == "COMPLETED", f"phase {k}: {state}\n{log.read_text()[-3000:] if log.exists() else ''}"
    finally:
        slurm_cluster.run("scancel", *ids, check=False)
    accts = [slurm_cluster.sacct(job) for job in ids]
    assert [a["State"] for a in accts] == ["COMPLETED"] * 3
    assert accts[1]["Start"] >= accts[0]["End"] and accts[2]["Start"] >= accts[1]["End"], accts
    for k in (2, 3):
        log = (runs / f"phase{k}" / f"slurm-{ids[k - 1]}.out").read_text()
        best = runs / f"phase{k - 1}" / "checkpoints" / "best"
        assert f"initialised from {best}" in log or f"initialised from {best.resolve()}" in log
    assert (runs / "phase3" / "checkpoints" / "best").exists()


def test_pipeline_refuses_a_broken_chain_or_an_impossible_request_with_nothing_queued(slurm_cluster, demo_overrides,
                                                                                      tmp_path):
    runs = tmp_path / "runs"
    env = {"MTLX_CPU": "1", "MTLX_OVERRIDES": " ".join(demo_overrides(runs, 2)),
           "MTLX_PHASE2_OVERRIDES": f"data.shards={tmp_path / 'missing'}"}
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout
    res = _pipeline(slurm_cluster, env, *CPU_JOB, "configs/demo.yaml", "configs/demo_phase2.yaml", check=False)
    # missing shards are a usage error (2) in every command, and the chain passes its code on
    assert res.returncode == 2 and not res.stdout and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("pipeline.sh: error: phase 2 (demo_phase2.yaml): data.shards: ")
    # More CPUs per node than any node has: sbatch would accept it and leave it pending forever.
    del env["MTLX_PHASE2_OVERRIDES"]
    res = _pipeline(slurm_cluster, env, "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=64",
                    "configs/demo.yaml", "configs/demo_phase2.yaml", check=False)
    assert res.returncode == 1 and not res.stdout and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("pipeline.sh: error: phase 1 (") and "cannot run this job" in res.stderr
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout == before
    assert not runs.exists()


def test_failed_phase1_leaves_phase2_dependency_never_satisfied(slurm_cluster, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    # Phase 1 passes the chain's checks at submission and fails on the node: a learning rate of 1e30
    # makes step 2's loss non-finite, and with no skip budget the trainer stops with an error.
    env = {"MTLX_CPU": "1", "MTLX_OVERRIDES": " ".join(demo_overrides(runs, 2)),
           "MTLX_PHASE1_OVERRIDES": "optim.lr=1e30 optim.grad_clip=0 run.nan_skip_budget=0"}
    ids = _ids(_pipeline(slurm_cluster, env, "--nodes=1", *CPU_JOB, "configs/demo.yaml",
                         "configs/demo_phase2.yaml").stdout)
    job1, job2 = ids
    try:
        assert slurm_cluster.wait_done(job1, timeout=300) == "FAILED"
        deadline = time.monotonic() + 60
        while slurm_cluster.job_field(job2, "Reason") != "DependencyNeverSatisfied" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert slurm_cluster.job_field(job2, "Reason") == "DependencyNeverSatisfied"
        assert slurm_cluster.job_field(job2, "JobState") == "PENDING"
        # never started; a pending job may not have reached the accounting database yet (no line)
        assert slurm_cluster.sacct(job2).get("Start", "Unknown") in ("Unknown", "None")
        assert not (runs / "phase2" / "metrics.jsonl").exists()
        log = (runs / "phase1" / f"slurm-{job1}.out").read_text()
        assert "optim.lr=1e30" in log and "non-finite loss or gradients at step 2" in log
    finally:
        slurm_cluster.run("scancel", job2, check=False)


def test_usr2_saves_requeues_and_finishes_on_two_nodes_with_a_clean_log(slurm_cluster, demo_overrides, tmp_path):
    runs = tmp_path / "runs"
    steps = 8  # runway: the signal must land before the job can finish
    (runs / "phase1").mkdir(parents=True)
    env = {"MTLX_CPU": "1", "MTLX_OVERRIDES": " ".join(demo_overrides(runs, steps))}
    job = slurm_cluster.run(
        "sbatch", "--parsable", "--nodes=2", *CPU_JOB, f"--output={runs / 'phase1' / 'slurm-%j.out'}",
        "slurm/phase1.sh", "configs/demo.yaml", env=env).stdout.strip()
    metrics = runs / "phase1" / "metrics.jsonl"
    try:
        wait_for_steps(metrics, 1, timeout=300)
        slurm_cluster.run("scancel", "--signal=USR2", "--batch", job)
        assert slurm_cluster.wait_done(job, timeout=420) == "COMPLETED"
    finally:
        slurm_cluster.run("scancel", job, check=False)

    assert slurm_cluster.job_field(job, "Restarts") == "1"
    log = (runs / "phase1" / f"slurm-{job}.out").read_text()
    assert "mtlxray: SIGUSR2 received: asking training to save" in log
    assert log.count("SIGUSR2 received") == 3  # the batch shell, then both ranks: the real signal by name
    assert f"training saved after SIGUSR2 (exit 75); requeueing job {job}" in log
    assert "srun: error" not in log and "exit 138" not in log and "User defined signal" not in log
    assert f"job {job} restart 1 " in log and "resumed from" in log
    assert train_steps(metrics) == list(range(1, steps + 1))
    assert {r["world_size"] for r in train_records(metrics)} == {2}
