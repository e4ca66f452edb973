"""`auto` precision: bf16 only where the device runs it natively; an explicit bf16 is kept, with a
warning. `auto` attention: the measured kernel per device and precision, decided here, once. `auto`
loader workers: what the device needs, within the CPUs the process has."""

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

import mtlxray.hardware as hw


def test_auto_precision_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.resolve_precision("auto", "cpu") == "fp32"
    assert hw.resolve_precision("fp32", "cpu") == "fp32"


def test_explicit_bf16_without_native_support_is_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mtlxray.hardware"):
        assert hw.resolve_precision("bf16", "cpu") == "bf16"
    assert "without native bf16" in caplog.text and "run.precision=auto" in caplog.text


def test_auto_attention_resolves_per_device_and_dtype(monkeypatch):
    for native_bf16, expected in ((True, "explicit"), (False, "sdpa")):
        monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native_bf16)
        assert hw.resolve_attention("auto", torch.bfloat16, "cpu") == expected
        assert hw.resolve_attention("auto", "bf16", "cpu") == expected  # run.precision values too
    assert hw.resolve_attention("auto", torch.float32, "cpu") == "explicit"
    assert hw.resolve_attention("auto", "fp32", "cpu") == "explicit"
    assert hw.resolve_attention("auto", torch.float32, "cuda") == "sdpa"
    assert hw.resolve_attention("auto", torch.bfloat16, "cuda") == "sdpa"


def test_auto_follows_the_first_matching_row_of_the_measurement_table(monkeypatch):
    expected = {  # (device, dtype, native bf16) -> today's kernel
        ("cpu", "fp32", True): "explicit", ("cpu", "fp32", False): "explicit",
        ("cpu", "bf16", True): "explicit", ("cpu", "bf16", False): "sdpa",
        ("cpu", "fp16", True): "explicit", ("cuda", "fp32", True): "sdpa", ("cuda", "bf16", True): "sdpa",
        ("mps", "fp32", True): "sdpa",
    }
    for (device, dtype, native), kernel in expected.items():
        monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native)
        row = hw.attention_choice(dtype, device)
        assert row in hw.ATTENTION_TABLE and row.kernel == kernel == hw.resolve_attention("auto", dtype, device)
        assert "bench" in row.measured or "tests/gpu" in row.measured  # each row names its measurement
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.attention_choice(torch.bfloat16, "cpu").describe("cpu", "bf16").startswith(
        "cpu, bf16, AVX2 only (no native bf16): sdpa 7.0× explicit")


def test_a_configured_kernel_wins_and_nonsense_is_refused(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.resolve_attention("sdpa", torch.bfloat16, "cpu") == "sdpa"
    assert hw.resolve_attention("explicit", torch.float32, "cuda") == "explicit"
    with pytest.raises(ValueError, match="model.attention"):
        hw.resolve_attention("flash", torch.float32, "cpu")
    with pytest.raises(ValueError, match="precision"):
        hw.resolve_attention("auto", "auto", "cpu")


def test_resolved_kernel_is_logged_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="mtlxray.hardware"):
        hw.resolve_attention("auto", "bf16", "cpu")
    assert "window attention: sdpa" in caplog.text and "native bf16" in caplog.text


def test_model_applies_the_resolved_kernel_to_every_window_attention():
    from mtlxray.config import load_config
    from mtlxray.model import build_model
    from mtlxray.model.swin import WindowAttention

    cfg = load_config(None, ["model.img_size=32", "model.embed_dim=8", "model.depths=[1,1,1,1]",
                             "model.num_heads=[1,1,1,1]", "model.window_size=4", "model.decoder_channels=[16,8,8,8]",
                             "model.cross_attn_heads=[1,1,1,1]", "model.ppm_channels=8"])
    model = build_model(cfg.model, pretrained=False)
    model.set_attention(hw.resolve_attention(cfg.model.attention, "fp32", "cpu"))
    kernels = {m.attention for m in model.modules() if isinstance(m, WindowAttention)}
    assert kernels == {"explicit"} and model.attention_kernel == "explicit"


def test_flex_attention_is_refused_on_cpu_in_one_named_line():
    from mtlxray.errors import ConfigError
    from mtlxray.hardware import resolve_attention

    with pytest.raises(ConfigError, match="flex.*no backward on CPU"):
        resolve_attention("flex", "fp32", "cpu")
    assert resolve_attention("flex", "bf16", "cuda") == "flex"


H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("cpus, device_type, name, augmenting, expected", [
    (16, "cuda", H100, True, 5),  # the card's need, CPUs to spare
    (4, "cuda", H100, True, 3),  # all the CPUs less one for the training process
    (1, "cuda", H100, True, 0),  # no CPU to spare: decode in the training process
    (16, "cuda", H100, False, 1),  # augment.on_device: the loader only draws parameters
    (16, "cuda", "NVIDIA H100 PCIe", True, 4),  # the longest matching name wins over `h100`
    (16, "cuda", "NVIDIA A100-SXM4-80GB", True, 2),
    (64, "cuda", "NVIDIA Z900", True, 10),  # a card not in the table: the most any card there needs
    (2, "cpu", "", True, 0),  # a CPU computes on every core: load in the training process
    (4, "cpu", "", True, 1),
    (64, "cpu", "", False, 1),
])
def test_auto_workers_follow_the_cpus_and_what_the_device_needs(cpus, device_type, name, augmenting, expected):
    n, why = hw.auto_workers(cpus=cpus, device_type=device_type, device_name=name, augment_in_loader=augmenting)
    assert n == expected and f"{cpus} CPUs" in why and "\n" not in why


def test_cpus_per_process_counts_the_affinity_slurm_and_the_processes_sharing_them(monkeypatch):
    from mtlxray.dist import WorldInfo
    from mtlxray.errors import ConfigError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    alone = WorldInfo(0, 0, 1, 1, 0, "local")
    torchrun8 = WorldInfo(0, 0, 8, 8, 0, "torchrun")
    task = WorldInfo(3, 3, 8, 8, 0, "slurm")  # one Slurm task per GPU (the sbatch scripts)
    assert hw.cpus_per_process({}, alone) == 64
    assert hw.cpus_per_process({}, torchrun8) == 8
    assert hw.cpus_per_process({"SLURM_CPUS_PER_TASK": "8"}, task) == 8
    # `mtlxray submit`: submitit sets torchrun's variables in each of a node's 8 tasks of 8 CPUs
    assert hw.cpus_per_process({"SLURM_CPUS_PER_TASK": "8", "SLURM_TASKS_PER_NODE": "8(x2)"}, torchrun8) == 8
    # torchrun or accelerate launch with 8 processes in one task of 32 CPUs
    assert hw.cpus_per_process({"SLURM_CPUS_PER_TASK": "32", "SLURM_TASKS_PER_NODE": "1"}, torchrun8) == 4
    assert hw.cpus_per_process({}, WorldInfo(0, 0, 128, 128, 0, "torchrun")) == 1
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK='x' is not a positive integer"):
        hw.cpus_per_process({"SLURM_CPUS_PER_TASK": "x"}, task)


def test_a_configured_worker_count_is_kept():
    assert hw.resolve_workers(3, augment_in_loader=True, env={}, device_type="cpu") == (3, "as configured")


def test_the_loader_core_table_is_the_benchmarks_figures():
    """Each card's row is ceil(its 30%-of-peak phase-1 images/s / a loader core's rate), from the
    benchmark record that benchmarks/README.md cites and the cards' data-sheet peaks."""
    from mtlxray.bench.gpus import bf16_dense_peak

    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/loader_cores.json").read_text())
    rate, target = record["per_core_samples_s"], record["target"]
    for card, cores in hw.LOADER_CORES_PER_GPU.items():
        img_s = target["fraction_of_peak"] * bf16_dense_peak(card) / (target["phase1_gflop_per_image"] * 1e9)
        assert cores == (math.ceil(img_s / rate["raw_aug"]), math.ceil(img_s / rate["raw_aug_on_device"])), card
