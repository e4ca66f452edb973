"""MTLModel folders: save_pretrained / from_pretrained round trips (huggingface_hub's
PyTorchModelHubMixin convention, local folders only), and the window-attention kernel setter."""

import os

import pytest
import torch

from _model_support import tiny_config
from tiny_models import model_with_moved_bn
from mtlxray.checkpoint import load_model_from_checkpoint
from mtlxray.config import Config
from mtlxray.errors import CheckpointError
from mtlxray.model import MTLModel, build_model


def _trained_looking(phase="phase2", seed=0):
    """A tiny model with its config, BN statistics moved off their init so a lost buffer would show."""
    cfg = Config()
    cfg.model = tiny_config(drop_path_rate=0.0)
    cfg.phase.name = phase
    return model_with_moved_bn(cfg.model, phase, seed).eval(), cfg


def test_save_then_from_pretrained_gives_equal_tensors_and_outputs(tmp_path):
    model, cfg = _trained_looking()
    folder = model.save_pretrained(tmp_path / "m", cfg)
    assert folder == tmp_path / "m"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = MTLModel.from_pretrained(folder)
    assert type(loaded) is type(model) and loaded.mode == "phase2" and not loaded.training
    assert loaded.config == cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.rand(2, 1, 32, 32)
    loaded.set_attention(model.attention_kernel)
    with torch.no_grad():
        got = loaded(x)
        for k, v in model(x).items():
            assert (v is None and got[k] is None) or torch.equal(v, got[k]), k


def test_a_save_pretrained_folder_is_a_checkpoint_for_loading(tmp_path):
    model, cfg = _trained_looking("phase1")
    model.save_pretrained(tmp_path / "m", cfg)
    loaded, cfg2 = load_model_from_checkpoint(tmp_path / "m")
    assert cfg2 == cfg and loaded.mode == "phase1"
    assert torch.equal(loaded.state_dict()["cls_head.fc.weight"], model.state_dict()["cls_head.fc.weight"])
    # and the weights file itself, as checkpoint paths are accepted
    assert MTLModel.from_pretrained(tmp_path / "m" / "model.safetensors").mode == "phase1"


def test_save_pretrained_defaults_to_the_loaded_config_and_checks_the_mode(tmp_path):
    model, cfg = _trained_looking()
    with pytest.raises(ValueError, match="cfg="):
        model.save_pretrained(tmp_path / "a")  # built by hand: no config known
    loaded = MTLModel.from_pretrained(model.save_pretrained(tmp_path / "a", cfg))
    loaded.save_pretrained(tmp_path / "b")  # from_pretrained set .config
    assert (tmp_path / "b" / "config.yaml").read_text() == (tmp_path / "a" / "config.yaml").read_text()
    loaded.set_mode("phase1")
    with pytest.raises(ValueError, match="phase1 mode"):
        loaded.save_pretrained(tmp_path / "c")


def test_from_pretrained_reads_local_folders_only(tmp_path):
    with pytest.raises(CheckpointError, match="nothing is downloaded"):
        MTLModel.from_pretrained("someone/mtlxray-swin-unet")  # a hub id is not fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml|model.safetensors"):
        MTLModel.from_pretrained(tmp_path / "empty")


def test_from_pretrained_names_weights_that_do_not_fit(tmp_path):
    model, cfg = _trained_looking()
    model.save_pretrained(tmp_path / "m", cfg)
    other = Config()
    other.model = tiny_config(embed_dim=16)
    other.phase.name = "phase2"
    from mtlxray.config import dump_config

    (tmp_path / "m" / "config.yaml").write_text(dump_config(other))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        MTLModel.from_pretrained(tmp_path / "m")


def test_save_pretrained_files_keep_the_umask_mode(tmp_path):
    model, cfg = _trained_looking()
    old = os.umask(0o022)
    try:
        folder = model.save_pretrained(tmp_path / "m", cfg)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o644"}


def test_set_attention_reaches_every_window_attention_and_rejects_auto():
    model, _ = _trained_looking()
    assert model.attention_kernel == "sdpa"  # model.attention=auto: SDPA until resolved
    model.set_attention("explicit")
    from mtlxray.model.swin import WindowAttention

    assert {m.attention for m in model.modules() if isinstance(m, WindowAttention)} == {"explicit"}
    with pytest.raises(ValueError, match="resolve `auto` first"):
        model.set_attention("auto")
    unet = build_model(tiny_config(name="unet"), pretrained=False)
    assert unet.attention_kernel is None
    unet.set_attention("explicit")  # no window attention: nothing to set


def test_under_prefix_respects_module_boundaries():
    from mtlxray.model.base import under_prefix

    assert under_prefix("inf_head.conv.weight", "inf_head")
    assert not under_prefix("inf_headx.weight", "inf_head")
