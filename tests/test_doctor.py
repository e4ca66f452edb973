"""`mtlxray doctor`, run as a user runs it: on this CPU node it reports "no GPU" and passes the demo
config; broken shards fail it with a verdict line; a config error exits 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

# A small model at the demo's 128² (the doctor's probe and memory count take seconds on it).
SMALL_MODEL = ["model.embed_dim=12", "model.depths=[2,2]", "model.num_heads=[1,2]", "model.window_size=4",
               "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
               "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8"]


@pytest.fixture(scope="module")
def shards_128(tmp_path_factory) -> Path:
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("doctor-shards"), format="raw", image_size=128)


def doctor(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "mtlxray.cli", "doctor", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the report of a node without GPU")
def test_doctor_reports_no_gpu_and_passes_the_demo_config(shards_128, tmp_path):
    res = doctor("--config", str(DEMO), f"data.shards={shards_128}", f"run.output_dir={tmp_path}", "data.workers=auto")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "gpu: no GPU (torch.cuda.is_available() is False): CPU only" in out
    # data.workers=auto resolved for this node, with the reason, in one line
    workers = re.search(r"^data workers: (\d+) per training process \(auto on CPU with (\d+) CPUs", out, re.M)
    assert workers and int(workers[1]) == (1 if int(workers[2]) >= 4 else 0), out
    assert "versions: python" in out and "torch" in out and "cuDNN" in out and "NCCL" in out
    # `auto`'s kernel with the row of the measurement table it follows
    assert any(line.startswith("attention: auto -> explicit (cpu, ") and "bench attention 2026-" in line
               for line in out.splitlines())
    # the window attention of the demo model (window 4: N=16) under each SDPA kernel
    sdpa = [line for line in out.splitlines() if line.startswith("sdpa ")]
    assert sdpa and all("math yes" in line for line in sdpa)
    assert any("mask" in line for line in sdpa)  # a shifted window's bias + mask is among the shapes probed
    assert "shards: " in out and "lung/train" in out and "lung/val" in out
    assert "disk: " in out and "free under" in out
    assert "memory (PROJECTION)" in out and "80GB" in out
    assert "slurm: " in out
    assert out.rstrip().splitlines()[-1] == "doctor: 0 error(s), 0 warning(s): the config can run here"


def test_doctor_fails_on_a_truncated_shard_with_one_verdict_line_per_problem(shards_128, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards_128, broken)
    victim = sorted((broken / "lung").glob("val-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1024])
    res = doctor("--config", str(DEMO), "--json", f"data.shards={broken}", f"run.output_dir={tmp_path / 'runs'}",
                 "run.backend=deepspeed", f"run.deepspeed_config={REPO}/configs/deepspeed/zero2.json", *SMALL_MODEL)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is False and report["gpus"] == []
    errors = [p["text"] for p in report["problems"] if p["level"] == "error"]
    assert any(victim.name in e and "manifest says" in e for e in errors), errors
    assert report["shards"]["splits"]["lung/train"]["ok"] is True
    assert report["shards"]["splits"]["lung/val"]["ok"] is False
    # DeepSpeed backend: its ops are listed, and the memory projection is ZeRO-2's
    assert report["deepspeed_ops"] and all({"op", "compatible", "installed"} <= set(o) for o in report["deepspeed_ops"])
    assert report["memory"]["backend"] == "zero2" and report["memory"]["label"].startswith("PROJECTION")
    assert report["memory"]["state_bytes"] > 1.8 * 2**30  # DeepSpeed's default 5e8-element fp32 reduce bucket


def test_doctor_exits_2_on_a_config_error(tmp_path):
    res = doctor("--config", str(DEMO), "model.window_sise=7")
    assert res.returncode == 2
    assert "window_sise" in res.stderr and "did you mean" in res.stderr


def test_doctor_without_a_config_checks_the_node_only(tmp_path):
    res = doctor(cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "versions: python" in res.stdout and "slurm: " in res.stdout
    assert "verdict: OK: no problems found (no --config: node checks only)" in res.stdout


def test_doctor_passes_a_classifier_that_resizes_its_input_on_shards_of_another_size(shards_128, tmp_path):
    res = doctor("--config", str(REPO / "configs" / "baselines" / "swin_t_cls.yaml"), "--json",
                 f"data.shards={shards_128}", f"run.output_dir={tmp_path}", "launch.gpus_per_node=0")
    report = json.loads(res.stdout)
    assert (res.returncode, report["problems"]) == (0, []), res.stderr
    assert report["shards"]["image_size"] == 128 and report["run"]["img_size"] == 224


def test_doctor_reports_a_loss_weight_for_an_output_the_model_lacks(shards_128, tmp_path):
    res = doctor("--config", str(REPO / "configs" / "baselines" / "unet.yaml"), f"data.shards={shards_128}",
                 f"run.output_dir={tmp_path}", "model.img_size=128", "launch.gpus_per_node=0",
                 "phase.loss_weights.cls=0.5", "run.best_metric=val/nope")
    assert res.returncode == 1, res.stdout + res.stderr
    verdicts = [line for line in res.stdout.splitlines() if line.startswith("verdict: ERROR: ")]
    assert [v.split(": ")[2] for v in verdicts] == ["run.best_metric", "phase.loss_weights"], verdicts
    assert "unet produces ['lung'] in phase1, not ['cls']" in verdicts[1]
