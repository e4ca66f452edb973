"""mtlxray.checkpoint: reading complete, verified, finite checkpoints, and no pickle from an unknown source."""

import json
import os
import pickle
import sys
from pathlib import Path

import killable
import pytest
import torch
from safetensors.torch import save_file

from mtlxray.checkpoint import (TrainState, all_finite, check_deepspeed_pickles, find_resume,
                                load_model_from_checkpoint, read_state, verify_checkpoint)
from mtlxray.config import dump_config, load_config
from mtlxray.errors import CheckpointError
from mtlxray.model import build_model

TINY = ["model.img_size=64", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
        "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
        "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8"]


def _write(folder: Path, step: int = 2, weights: dict | None = None, rng: bool = True) -> Path:
    """A checkpoint folder as the trainer writes it, for one process."""
    from accelerate.utils import save as accelerate_save

    cfg = load_config(None, TINY)
    folder.mkdir(parents=True)
    model = build_model(cfg.model)
    save_file(weights or {k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(dump_config(cfg))
    (folder / "optimizer.bin").write_bytes(b"o" * 100)
    if rng:
        import random

        import numpy as np

        accelerate_save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                         "torch_manual_seed": torch.get_rng_state()}, folder / "random_states_0.pkl")
    parts = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / "state.json").write_text(TrainState(step=step, parts=parts).to_json())
    return folder


def test_verify_checkpoint_accepts_a_complete_one(tmp_path):
    assert verify_checkpoint(_write(tmp_path / "step-000002")).step == 2


@pytest.mark.parametrize("damage, words", [
    (lambda d: (d / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    (lambda d: (d / "optimizer.bin").write_bytes(b"o" * 99), "optimizer.bin has 99 bytes"),
    (lambda d: (d / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml is missing"),
])
def test_verify_checkpoint_names_the_missing_or_damaged_part(tmp_path, damage, words):
    ckpt = _write(tmp_path / "step-000002")
    damage(ckpt)
    with pytest.raises(CheckpointError, match=words):
        verify_checkpoint(ckpt)


def test_verify_checkpoint_refuses_an_unreadable_rng_state_of_the_same_size(tmp_path):
    ckpt = _write(tmp_path / "step-000002")
    rng = ckpt / "random_states_0.pkl"
    rng.write_bytes(b"\0" * rng.stat().st_size)
    with pytest.raises(CheckpointError, match="unreadable RNG state"):
        verify_checkpoint(ckpt)


def test_find_resume_falls_back_past_an_incomplete_last(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    _write(root / "step-000002", step=2)
    newest = _write(root / "step-000004", step=4)
    os.symlink("step-000004", root / "last")
    (newest / "random_states_0.pkl").unlink()
    (root / ".tmp-step-000006").mkdir()
    with caplog.at_level("WARNING"):
        assert find_resume(root) == root / "step-000002"
    assert "random_states_0.pkl is missing" in caplog.text and "newest complete" in caplog.text


def test_find_resume_ignores_folders_without_state(tmp_path):
    (tmp_path / "step-000004").mkdir()  # never completed
    assert find_resume(tmp_path) is None


def test_load_model_from_checkpoint_rebuilds_model_and_config(tmp_path):
    ckpt = _write(tmp_path / "ckpt")
    model, cfg = load_model_from_checkpoint(ckpt)
    assert cfg.model.img_size == 64 and not model.training
    out = model(torch.rand(1, 1, 64, 64))
    assert out["lung"].shape == (1, 1, 64, 64)


def test_load_model_from_checkpoint_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: does not exist"):
        load_model_from_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.safetensors there"):  # a folder, but not a checkpoint
        load_model_from_checkpoint(tmp_path)


def test_load_model_from_checkpoint_refuses_non_finite_weights(tmp_path):
    cfg = load_config(None, TINY)
    weights = {k: v.contiguous() for k, v in build_model(cfg.model).state_dict().items()}
    weights["lung_head.conv.weight"][0, 0, 0, 0] = float("nan")
    ckpt = _write(tmp_path / "ckpt", weights=weights)
    with pytest.raises(CheckpointError, match="nan or inf"):
        load_model_from_checkpoint(ckpt)


def test_all_finite_sees_a_single_inf_in_a_buffer():
    model = build_model(load_config(None, TINY).model)
    assert bool(all_finite(model))
    next(b for n, b in model.named_buffers() if n.endswith("running_var"))[0] = float("inf")
    assert not bool(all_finite(model))


@pytest.mark.distributed
def test_all_finite_reads_only_the_zero3_shard_and_not_its_uninitialised_padding(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = killable.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(Path(__file__).with_name("_zero3_padding.py")), str(tmp_path)], env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world_size"], r["ds_numel"], r["shard"]) for r in ranks] == [(2, 3, 2), (2, 3, 2)]
    assert [r["finite_with_nan_padding"] for r in ranks] == [True, True]
    assert [r["finite_with_nan_weight"] for r in ranks] == [False, False]


class _Payload:
    """Unpickling this runs `touch <marker>`, as a tampered checkpoint file could."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant_payload(folder: Path, marker: Path) -> None:
    """A DeepSpeed-named model-state file in `folder` whose unpickling creates `marker`."""
    with open(folder / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)


def test_deepspeed_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "pytorch_model"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8"}, folder / "mp_rank_00_model_states.pt")
    check_deepspeed_pickles(tmp_path)  # a plain DeepSpeed-style file passes
    marker = tmp_path / "ran"
    _plant_payload(folder, marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        check_deepspeed_pickles(tmp_path)
    assert not marker.exists()
    with open(folder / "mp_rank_00_model_states.pt", "rb") as f:
        pickle.load(f)  # the control: an unchecked load does run the payload
    assert marker.exists()


def test_deepspeed_pickle_check_walks_a_link_loop_inside_the_checkpoint_once(tmp_path):
    ckpt = tmp_path / "step-000002"
    (ckpt / "engine").mkdir(parents=True)
    os.symlink("engine", ckpt / "pytorch_model")
    os.symlink("..", ckpt / "engine" / "loop")  # a link back up: walked once, not forever
    marker = tmp_path / "ran"
    _plant_payload(ckpt / "engine", marker)
    with pytest.raises(CheckpointError, match="weights_only"):
        check_deepspeed_pickles(ckpt)
    assert not marker.exists()


def test_deepspeed_pickle_check_refuses_a_link_leaving_the_checkpoint(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    marker = tmp_path / "ran"
    _plant_payload(elsewhere, marker)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    os.symlink(elsewhere, ckpt / "pytorch_model")
    with pytest.raises(CheckpointError, match="outside the checkpoint") as err:
        check_deepspeed_pickles(ckpt)
    assert str(ckpt / "pytorch_model") in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_read_state_of_a_folder_without_state_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="state.json"):
        read_state(tmp_path)
