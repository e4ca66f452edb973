"""The benchmark package's behaviour: every suite runs at minimal size and writes the rows it
promises; the time projection responds to its inputs; results go only to --out or the checkout
(the memory plan's own counts and projection: tests/test_memory_plan.py).

Figures at smoke size mean nothing; no timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlxray import memory_plan as plan
from mtlxray.bench import gpu as gpu_suite
from mtlxray.bench import memory as mem
from mtlxray.bench.common import Context
from mtlxray.bench.gpus import bf16_dense_peak
from mtlxray.bench.projection import loader_cores, project_phase
from mtlxray.bench.run import default_out, find_checkout, run_suite

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ctx(tmp_path):
    return Context(quick=True, out=tmp_path, smoke=True, device="cpu")


def _run(name: str, ctx: Context) -> dict:
    data = run_suite(name, ctx)
    on_disk = json.loads((ctx.out / f"{name}.json").read_text())
    assert on_disk["suite"] == name and on_disk["status"] == "ok", on_disk["details"]
    assert on_disk["rows"]
    assert on_disk["machine"]["cpu"] and on_disk["machine"]["torch"]
    assert len(on_disk["rows"]) == len(data["rows"])
    assert all(t["met"] in (True, False, None) for t in on_disk["targets"])
    return on_disk


# ---------------------------------------------------------------------------------------------
# every suite at minimal size


def test_attention_suite_compares_sdpa_and_explicit(ctx):
    data = _run("attention", ctx)
    assert {(r["dtype"], r["pass"]) for r in data["rows"]} == {
        (d, p) for d in ("fp32", "bf16") for p in ("fwd", "fwd+bwd")}
    assert all(r["sdpa_ms"] > 0 and r["explicit_ms"] > 0 for r in data["rows"])
    assert set(data["details"]["faster_fwd_bwd"].values()) <= {"sdpa", "explicit"}
    # flex (forward only on CPU) is left out at smoke size: its eager first call takes seconds
    assert all("flex_ms" in r for r in data["rows"] if r["stage"] != "all (x depth)")
    (layout,) = data["details"]["tables"].values()  # the block with the current vs the former window layout
    assert {(r["dtype"], r["kernel"]) for r in layout} == {
        (d, k) for d in ("fp32", "bf16") for k in ("explicit", "sdpa")}
    assert all(r["current_ms"] > 0 and r["former_ms"] > 0 for r in layout)
    assert all(r["copies current"] < r["copies former"] for r in layout if r["dtype"] == "fp32")


def test_model_suite_compares_ours_monai_timm_channels_last_and_compiled(ctx):
    data = _run("model", ctx)
    measured = {(r["net"], r["dtype"]) for r in data["rows"] if r.get("img/s")}
    nets = ("monai_encoder", "timm_encoder", "ours_encoder", "ours_full", "ours_full_channels_last")
    assert measured == {(n, d) for n in nets for d in ("fp32", "bf16")}
    assert {r["device"] for r in data["rows"]} == {"cpu"}
    flops = data["details"]["flops_per_image_fwd_bwd"]
    assert flops["ours_full"] > flops["ours_encoder"] > 0 and flops["monai_encoder"] > 0
    assert flops["ours_full_channels_last"] == flops["ours_full"]  # same maths, another layout
    assert flops["timm_encoder"] > 0 and set(data["details"]["encoder_vs_timm"]) == {"fp32", "bf16"}
    assert all(r["vs_timm_enc"] > 0 for r in data["rows"] if r.get("GFLOP/img"))
    assert set(data["details"]["channels_last_decoder_vs_default"]) == {"fp32", "bf16"}
    compiled = [r for r in data["rows"] if r["net"] == "ours_tiny_compiled"]
    assert len(compiled) == 1 and compiled[0]["note"]  # smoke runs do not compile; the row says so
    targets = {t["name"]: t for t in data["targets"]}
    assert len(targets) == 5 and targets["encoder bf16 ours/timm Swin-T, eager"]["value"] > 0
    assert targets["encoder bf16 ours/timm Swin-T, both compiled"]["met"] is None  # compiled in full runs only


def test_checkpointing_suite_measures_every_configuration(ctx):
    data = _run("checkpointing", ctx)
    assert {r["config"] for r in data["rows"]} == {
        "ours_none", "ours_attention", "ours_block", "ours_selective", "monai_off", "monai_on"}
    assert all(r["act_mib"] >= 0 and r["step_s"] > 0 for r in data["rows"])  # smoke sizes: memory may not register
    assert data["details"]["recommended"] in ("ours_attention", "ours_block", "ours_selective")


def test_memory_suite_measures_each_mode_and_projects_every_backend(ctx):
    data = _run("memory", ctx)
    rows = {(r["phase"], r["grad_checkpoint"]): r for r in data["rows"]}
    assert set(rows) == {(p, m) for p in ("phase1", "phase2") for m in plan.CHECKPOINT_MODES}
    for phase in ("phase1", "phase2"):
        # recomputing whole blocks keeps less than recomputing attention only, which keeps less than nothing
        assert rows[(phase, "block")]["retained_MiB/img"] < rows[(phase, "attention")]["retained_MiB/img"] \
            < rows[(phase, "none")]["retained_MiB/img"]
    assert rows[("phase1", "none")]["retained_MiB/img"] < rows[("phase2", "none")]["retained_MiB/img"]
    grid = data["details"]["projection"]
    assert {(g["backend"], g["batch"]) for g in grid} == {(b, n) for b in plan.BACKENDS for n in mem.BATCHES}
    assert all(isinstance(g[f"fits_{c}"], bool) for g in grid for c in plan.CARDS)
    assert any("PROJECTION" in title for title in data["details"]["tables"])


def test_loader_suite_reports_formats_baseline_and_limit(ctx):
    data = _run("loader", ctx)
    rows = {r["pipeline"]: r for r in data["rows"]}
    assert {"read_only_raw", "shards_raw", "shards_raw_aug", "shards_png", "shards_png_aug",
            "baseline_png_folder", "shards_raw_aug_params", "raw_aug_on_device(cpu)"} <= set(rows)
    assert all(r["samples/s/core"] > 0 for r in rows.values())


def test_shards_suite_compares_builds_with_tar(ctx):
    data = _run("shards", ctx)
    assert {r["method"] for r in data["rows"]} == {"tar", "build_png", "build_raw"}
    assert all(r["images"] > 0 and r["img/s"] > 0 for r in data["rows"])


def test_scale_suite_measures_build_audit_evaluate_and_the_hash_audit_with_full_recall(ctx):
    data = _run("scale", ctx)
    assert [r["stage"].split()[0] for r in data["rows"]] == ["build", "audit", "evaluate", "audit"]
    assert all(r["peak_MiB"] > 0 and r["images"] > 0 for r in data["rows"])
    evaluated = data["rows"][2]
    assert evaluated["images"] == 1 + 1 + 2 and evaluated["img/cpu_s"] > 0  # the tiny scale's infection test split
    hashes = data["details"]["stages"]["audit 20,000 hashes"]
    assert hashes["planted_found"] == hashes["planted"] == 200 and hashes["largest_group"] == 2_000


@pytest.mark.distributed
def test_ddp_suite_runs_two_gloo_ranks_with_identical_params(ctx):
    data = _run("ddp", ctx)
    assert data["details"]["world_size"] == 2
    assert data["details"]["threads_per_rank"] == 1
    assert data["details"]["params_identical_across_ranks"] == {"ddp": True, "ddp_fp16_grads": True, "zero2": True}
    assert data["details"]["zero2_collectives"] == "gloo"
    assert {r["variant"] for r in data["rows"]} == {"1_rank", "2_ranks_no_comm", "ddp_2_ranks",
                                                   "ddp_fp16_grads_2_ranks", "zero2_2_ranks"}


def test_projection_suite_reads_the_loader_rate_it_is_given(ctx):
    def cores(rate: float) -> dict:
        (ctx.out / "loader.json").write_text(json.dumps(
            {"status": "ok", "details": {"per_core_training_rate": {"raw_aug": rate}}}))
        data = _run("projection", ctx)
        assert "PROJECTION" in data["label"]
        assert {(r["phase"], r["gpus"]) for r in data["rows"]} == {(p, g) for p in ("phase1", "phase2") for g in (1, 8, 32)}
        return data["details"]["loader_cores_per_gpu"]["raw_aug"]

    slow, fast = cores(100.0), cores(400.0)
    for phase in ("phase1", "phase2"):
        assert fast[phase] < slow[phase] and fast[phase] >= slow[phase] / 4 - 1


def test_time_projection_moves_with_flops_gpus_and_loader_rate():
    base = project_phase(80e9, 50, 21_715, 1)
    assert project_phase(160e9, 50, 21_715, 1)["img/s/gpu"] == pytest.approx(base["img/s/gpu"] / 2)
    assert project_phase(80e9, 50, 21_715, 8)["wall_h"] == pytest.approx(base["wall_h"] / 8)
    assert project_phase(80e9, 50, 21_715, 1, mfu=0.2)["wall_h"] == pytest.approx(base["wall_h"] * 2)
    cores = loader_cores({"phase1": 1000.0}, {"slow": 100.0, "fast": 1000.0, "none": 0.0})
    assert cores == {"slow": {"phase1": 10}, "fast": {"phase1": 1}}


def test_card_peaks_by_device_name():
    assert bf16_dense_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_dense_peak("NVIDIA H100 PCIe") < bf16_dense_peak("NVIDIA H100 80GB HBM3")
    assert bf16_dense_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_dense_peak("Tesla V100-SXM2-32GB") is None


# ---------------------------------------------------------------------------------------------
# where results go


def test_results_default_to_runs_bench_and_the_tracked_results_need_a_flag(tmp_path, monkeypatch):
    assert find_checkout(REPO / "mtlxray" / "bench") == REPO
    monkeypatch.chdir(REPO / "tests")  # inside the checkout, the tracked results are still left alone
    assert default_out() == Path("runs") / "bench"
    assert default_out(update_results=True) == REPO / "benchmarks" / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "mtlxray.cli", "bench", "projection", "--quick", "--update-results"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "--update-results" in res.stderr and "not inside an mtlxray checkout" in res.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_suite_refuses_without_a_gpu_in_one_line_and_runs_its_paths_at_smoke_size(ctx, tmp_path):
    refused = run_suite("gpu", Context(quick=False, out=tmp_path / "full", device="cpu"))
    assert refused["status"] == "unavailable" and "no CUDA device" in refused["details"]["reason"]
    assert "\n" not in refused["details"]["reason"]
    data = _run("gpu", ctx)
    measured = [r for r in data["rows"] if r.get("img/s")]
    assert {(r["net"], r["phase"]) for r in measured} == {("ours_full", "phase2"), ("ours_encoder_64", "encoder")}
    assert all(r["GFLOP/img"] > 0 and r["TFLOP/s"] > 0 for r in measured)
    profile = data["details"]["profile"]
    assert profile["kernels_per_step"] > 0 and 0 < len(profile["top_kernels"]) <= 15
    full_plan = gpu_suite._plan(False)  # on a GPU: the decoders in channels_last measured compiled too
    assert ("ours_full_channels_last", "phase2", 64, "compiled", "sdpa") in full_plan
    assert ("ours_full", "phase2", 64, "compiled", "flex") in full_plan


def test_matmul_peak_is_set_by_the_fastest_call_not_the_median(monkeypatch):
    """A ceiling: slow calls on a shared machine must not lower it (a median once read 114 GFLOP/s
    on a CPU that does 182, and the encoder then showed 111% of "peak")."""
    from mtlxray.bench import common

    monkeypatch.setattr(common, "measure", lambda fn, **kw: common.Timing.from_samples([1.0, 4.0, 4.0, 4.0, 4.0]))
    assert common.matmul_peak(torch.float32, n=64) == pytest.approx(2 * 64**3 / 1.0 / 1e9)
