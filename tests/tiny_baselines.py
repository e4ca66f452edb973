"""Tiny, fast versions of the configs/baselines/*.yaml runs for the training, evaluation and compare tests.

`baseline_overrides(name, shards, out, tmp)` turns a shipped baseline config into a one-epoch fp32
run of a few steps on the tiny 64-px shards: the model shrunk to the model-zoo tests' sizes (the
ViT-style encoders keep 12 blocks so the configs' frozen `encoder.blocks.0..7` exist), CLIP a
randomly initialised tiny open_clip model saved by the test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "configs" / "baselines"
NAMES = ["unet", "unetpp", "deeplabv3p", "mtl_unet", "swin_t_cls", "vit_b_cls", "dinov2_cls", "beitv2_cls",
         "clip_zeroshot"]


def _zoo_support():
    """tests/model/_zoo_support.py (the model tests' tiny settings), loaded by path."""
    spec = importlib.util.spec_from_file_location("_zoo_support", REPO / "tests" / "model" / "_zoo_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_overrides(name: str, tmp: Path) -> list[str]:
    """`model.*` overrides of a tiny instance of baseline `name` (CLIP: its config and weights under tmp)."""
    zoo = _zoo_support()
    if name == "clip_zeroshot":
        arch, weights = zoo.write_tiny_clip(Path(tmp))
        return [f"model.clip_arch={arch}", f"model.pretrained={weights}", "model.img_size=64"]
    fields = dict(zoo.TINY[name])
    kwargs = dict(fields.pop("lib_kwargs"))
    if "depth" in kwargs:
        kwargs["depth"] = 12
    return [f"model.{k}={v}" for k, v in fields.items()] + ["model.lib_kwargs=" + json.dumps(kwargs)]


def run_overrides(shards: Path, out: Path, run_name: str, *extra: str) -> list[str]:
    """A one-epoch fp32 run of 2 steps (4 images, batch 2) writing under out/run_name."""
    return [
        f"data.shards={shards}", "data.batch_size=2", "data.eval_batch_size=8", "data.workers=0",
        "data.shuffle_buffer=8", "data.samples_per_epoch=4", "schedule.epochs=1", f"run.output_dir={out}",
        f"run.name={run_name}", "run.precision=fp32", "run.tensorboard=false", "run.progress=false",
        "run.log_every=1", "run.save_every=1000", *extra,
    ]


def baseline_overrides(name: str, shards: Path, out: Path, tmp: Path, *extra: str,
                       run_name: str | None = None) -> list[str]:
    return model_overrides(name, tmp) + run_overrides(shards, out, run_name or name, *extra)
