"""Every benchmark suite runs at minimal size and writes its JSON, so the benchmarks never rot.

Figures at these sizes mean nothing; no timing is asserted. Each test checks the result's shape
and the facts that do not depend on speed (FLOP counts, ranks, identical parameters).
"""

import json
import math

import pytest

from mtlxray.bench.common import Context
from mtlxray.bench.run import SUITES, run_suite


@pytest.fixture
def ctx(tmp_path):
    return Context(quick=True, out=tmp_path, smoke=True)


def _run(name: str, ctx: Context) -> dict:
    data = run_suite(name, ctx)
    on_disk = json.loads((ctx.out / f"{name}.json").read_text())
    assert on_disk == json.loads(json.dumps(data, default=str))
    assert on_disk["status"] == "ok", on_disk["details"]
    assert on_disk["rows"]
    assert on_disk["machine"]["cpu"] and on_disk["machine"]["torch"]
    assert all(t["value"] is not None and t["met"] in (True, False) for t in on_disk["targets"])
    return on_disk


def test_registry_lists_every_suite():
    assert set(SUITES) == {"model", "attention", "checkpointing", "loader", "ddp", "projection", "shards"}


def test_attention_suite_compares_sdpa_and_explicit(ctx):
    data = _run("attention", ctx)
    assert {(r["dtype"], r["pass"]) for r in data["rows"]} == {
        (d, p) for d in ("fp32", "bf16") for p in ("fwd", "fwd+bwd")}
    assert all(r["sdpa_ms"] > 0 and r["explicit_ms"] > 0 for r in data["rows"])
    assert set(data["details"]["faster_fwd_bwd"].values()) <= {"sdpa", "explicit"}


def test_model_suite_counts_flops_against_monai(ctx):
    data = _run("model", ctx)
    nets = {(r["net"], r["dtype"]) for r in data["rows"]}
    assert nets == {(n, d) for n in ("monai_encoder", "ours_encoder", "ours_full") for d in ("fp32", "bf16")}
    flops = data["details"]["flops_per_image_fwd_bwd"]
    assert flops["ours_full"] > flops["ours_encoder"] > 0 and flops["monai_encoder"] > 0
    assert len(data["targets"]) == 3


def test_checkpointing_suite_measures_each_config_in_its_own_process(ctx):
    data = _run("checkpointing", ctx)
    configs = {r["config"] for r in data["rows"]}
    assert configs == {"ours_none", "ours_attention", "ours_block", "ours_selective", "monai_off", "monai_on"}
    assert all(r["act_mib"] > 0 and r["step_s"] > 0 for r in data["rows"])
    assert data["details"]["recommended"] in ("ours_attention", "ours_block", "ours_selective")


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


@pytest.mark.distributed
def test_ddp_suite_runs_two_gloo_ranks_with_identical_params(ctx):
    data = _run("ddp", ctx)
    assert data["details"]["world_size"] == 2
    assert data["details"]["threads_per_rank"] == 1
    assert data["details"]["params_identical_across_ranks"] == {"ddp": True, "ddp_fp16_grads": True, "zero2": True}
    assert data["details"]["zero2_collectives"] == "gloo"
    assert {r["variant"] for r in data["rows"]} == {"1_rank", "2_ranks_no_comm", "ddp_2_ranks",
                                                   "ddp_fp16_grads_2_ranks", "zero2_2_ranks"}


def test_projection_suite_projects_phases_and_loader_cores(ctx):
    (ctx.out / "loader.json").write_text(json.dumps(
        {"status": "ok", "details": {"per_core_training_rate": {"raw_aug": 100.0}}}))
    data = _run("projection", ctx)
    assert "PROJECTION" in data["label"]
    assert {(r["phase"], r["gpus"]) for r in data["rows"]} == {
        (p, g) for p in ("phase1", "phase2") for g in (1, 8, 32)}
    one = {r["phase"]: r for r in data["rows"] if r["gpus"] == 1}
    for phase, (epochs, images) in {"phase1": (50, 21_715), "phase2": (30, 3_728)}.items():
        r = one[phase]
        assert r["img/s/gpu"] == pytest.approx(989e12 * 0.4 / (r["GFLOP/img"] * 1e9))
        assert r["wall_h"] == pytest.approx(epochs * images / r["img/s/gpu"] / 3600)
        assert data["details"]["loader_cores_per_gpu"]["raw_aug"][phase] == math.ceil(r["img/s/gpu"] / 100.0)
