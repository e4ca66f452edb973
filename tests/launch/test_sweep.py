"""`mtlxray sweep` over 2 seeds x 2 settings of the tiny demo config: locally (pinned worker slots) and
as Slurm job arrays on the local two-node cluster; then `mtlxray compare --sweep` and MLflow."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from _launch_support import ROOT
from mtlxray.cli import main as cli
from mtlxray.errors import ConfigError
from mtlxray.launch.sweep import core_slots, parse_grid

DEMO = [str(ROOT / "configs" / "demo.yaml"), str(ROOT / "configs" / "demo_phase2.yaml")]
SEEDS = ["0", "1"]
GRID = "optim.lr=1e-3,2e-3"
POINTS = ["lr-1e-3", "lr-2e-3"]
ELEMENTS = [f"{p}/seed{s}" for p in POINTS for s in SEEDS]


def _sweep_logs(out: Path) -> dict[str, int]:
    """Bytes of each element's sweep.log (the local runner appends a line per command it runs)."""
    return {k: (out / k / "sweep.log").stat().st_size for k in ELEMENTS}


def test_grid_points_are_the_product_of_the_axes_named_by_their_leaf_keys():
    points = parse_grid(["run.precision=fp32,bf16", "model.depths=[1,1,1,1],[2,2,2,2]"])
    assert [p.name for p in points] == ["precision-fp32_depths-1-1-1-1", "precision-fp32_depths-2-2-2-2",
                                        "precision-bf16_depths-1-1-1-1", "precision-bf16_depths-2-2-2-2"]
    assert points[1].overrides == ("run.precision=fp32", "model.depths=[2,2,2,2]")
    assert [p.name for p in parse_grid([])] == ["base"]
    with pytest.raises(ConfigError, match=r"^--grid 'run.seed': expected key=value1,value2"):
        parse_grid(["run.seed"])
    assert core_slots(2, [0, 1]) == [[0], [1]] and core_slots(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3, 4]]


def test_local_sweep_runs_four_chains_aggregates_them_tracks_them_and_reruns_only_what_is_missing(
        tmp_path, tiny_shards, demo_overrides, capsys):
    out = tmp_path / "study"
    args = ["sweep", "--config", DEMO[0], "--seeds", *SEEDS, "--grid", GRID, "--executor", "local", "--jobs", "2",
            "--out", str(out), "--eval-bootstrap", "0", *demo_overrides(tmp_path / "unused", 1),
            "run.trackers=[mlflow]"]
    assert cli(args) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [f"{e['point']}/seed{e['seed']}" for e in record["elements"]] == ELEMENTS
    assert {e["state"] for e in record["elements"]} == {"FINISHED"}
    slots = {f"on cores {share}, OMP_NUM_THREADS={len(share)}" for share in core_slots(2)}
    used = set()
    for key in ELEMENTS:
        assert (out / key / "phase1" / "checkpoints" / "best").exists()
        log = (out / key / "sweep.log").read_text()  # the element's process says where it ran
        used |= {slot for slot in slots if slot in log}
    assert used == slots  # two slots, each pinned to its own half of the cores

    # The aggregate equals a hand computation from the four evaluations.
    assert cli(["compare", "--sweep", str(out), "--bootstrap", "200"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for point in POINTS:
        evals = [json.loads((out / point / f"seed{s}" / "eval-lung" / "metrics.json").read_text())["metrics"]
                 for s in SEEDS]
        row = next(r for r in summary["points"] if r["point"] == point)
        for metric in ("accuracy", "auc_macro"):
            values = [e[metric] for e in evals]
            got = row["metrics"][metric]
            assert got["values"] == pytest.approx(values) and got["mean"] == pytest.approx(statistics.mean(values))
            assert got["sd"] == pytest.approx(statistics.stdev(values))
            half = stats.t.ppf(0.975, 1) * statistics.stdev(values) / 2 ** 0.5
            assert got["seed_ci95"] == pytest.approx([statistics.mean(values) - half, statistics.mean(values) + half])
    assert [p["a"] for p in summary["paired"]] == ["lr-2e-3"] * len(summary["paired"])
    report = (out / "report.md").read_text()
    assert "lr-2e-3 − lr-1e-3 = " in report and "figures/lung_accuracy.png" in report
    assert (out / "figures" / "lung_accuracy.png").stat().st_size > 0 and (out / "summary.csv").is_file()

    # Each element is an MLflow run of one experiment named after the sweep: the config as parameters,
    # the final metrics under metrics.jsonl's names.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["study"], output_format="list")}
    assert sorted(runs) == sorted(k.replace("/", "-") for k in ELEMENTS)
    for key in ELEMENTS:
        run = runs[key.replace("/", "-")]
        lines = [json.loads(x) for x in (out / key / "phase1" / "metrics.jsonl").read_text().splitlines()]
        assert run.data.params["run.seed"] == key[-1] and float(run.data.params["optim.lr"]) == float(key[3:7])
        last_eval = [x for x in lines if x["type"] == "eval"][-1]
        assert run.data.metrics["val/lung_dice"] == pytest.approx(last_eval["val/lung_dice"])
        assert run.data.metrics["loss"] == pytest.approx([x for x in lines if x["type"] == "train"][-1]["loss"])

    # The same command again: every element is finished, nothing runs.
    logs = _sweep_logs(out)
    assert cli(args) == 0
    assert _sweep_logs(out) == logs

    # One element lost its checkpoints: only that one trains again, from scratch.
    import shutil

    shutil.rmtree(out / ELEMENTS[2] / "phase1" / "checkpoints")
    capsys.readouterr()
    assert cli(args) == 0
    after = _sweep_logs(out)
    assert [k for k in ELEMENTS if after[k] != logs[k]] == [ELEMENTS[2]]
    assert (out / ELEMENTS[2] / "phase1" / "checkpoints" / "best").exists()
    lines = [json.loads(x) for x in (out / ELEMENTS[2] / "phase1" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "train"] == [1]  # the old run's lines are not mixed in
    assert "4/4 element(s) finished" in capsys.readouterr().out


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_is_one_job_array_per_phase_chained_element_by_element(slurm_cluster, demo_overrides, tmp_path):
    out = tmp_path / "study"
    args = [sys.executable, "-m", "mtlxray", "sweep", "--config", DEMO[0], "--then", DEMO[1], "--seeds", *SEEDS,
            "--grid", GRID, "--executor", "slurm", "--gpus-per-node", "0", "--cpus-per-task", "1", "--nodes", "1",
            "--time", "0:15:00", "--array-parallelism", "4", "--out", str(out), *demo_overrides(tmp_path / "x", 1)]
    dry = subprocess.run([*args, "--dry-run"], env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "--array=0-3%4 --dependency=aftercorr:<phase1>" in dry.stdout

    res = subprocess.run([*args, "--wait"], env=slurm_cluster.env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads((out / "sweep.json").read_text())
    assert {e["state"] for e in record["elements"]} == {"FINISHED"}
    arrays = [a["job_id"] for a in record["arrays"]]
    assert len(arrays) == 2 and [a["elements"] for a in record["arrays"]] == [ELEMENTS, ELEMENTS]
    acct = {}
    for array in arrays:
        lines = slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", array, "-o", "JobID,State,Start,End").stdout
        acct[array] = {jid: (state, start, end) for jid, state, start, end in
                       (line.split("|") for line in lines.splitlines())}
        assert sorted(acct[array]) == [f"{array}_{i}" for i in range(4)], acct
        assert {s for s, _, _ in acct[array].values()} == {"COMPLETED"}, acct
    # Phase 2's array waited on phase 1's element by element (aftercorr), as submitted.
    script = (out / "submitit" / f"{arrays[1]}_submission.sh").read_text()
    assert f"--dependency=aftercorr:{arrays[0]}" in script and "--array=0-3%4" in script
    for i in range(4):
        assert acct[arrays[1]][f"{arrays[1]}_{i}"][1] >= acct[arrays[0]][f"{arrays[0]}_{i}"][2]
    for key in ELEMENTS:
        assert (out / key / "phase2" / "checkpoints" / "best").exists()
        assert json.loads((out / key / "eval-infection" / "metrics.json").read_text())["subset"] == "infection"


def test_make_demo_study_is_one_valid_sweep_over_three_seeds_and_both_precisions(tiny_shards, tmp_path, capsys):
    """The Makefile's demo study (the demo over seeds 0-2, fp32 and bf16) checks as a sweep of 6 chains."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo-study:")[1].split("\n\n")[0]
    command = recipe.replace("\\\n", " ").split("$(BIN)/mtlxray sweep")[1].split("\n")[0].split()
    command[command.index("--out") + 1] = str(tmp_path / "demo_study")  # not a study of this checkout
    assert cli(["sweep", *command, "--dry-run", f"data.shards={tiny_shards}"]) == 0
    out = capsys.readouterr().out
    elements = [line.split("\t")[0] for line in out.splitlines() if "\t" in line]
    assert elements == [f"precision-{p}/seed{s}" for p in ("fp32", "bf16") for s in (0, 1, 2)]
    assert "# phase 2 (demo_phase2.yaml): 6 element(s)" in out
    assert "evaluates lung, infection (test)" in out
