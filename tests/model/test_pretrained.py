"""Weights from local files: timm Swin-T onto the paper's encoder, and transfer across class counts."""

import pytest
import timm
import torch

from _model_support import tiny_config
from _zoo_support import save_weights, tiny_zoo_config
from mtlxray.config import ModelConfig
from mtlxray.errors import CheckpointError
from mtlxray.model import build_model
from mtlxray.model.pretrained import load_state_dict_transfer, timm_swin_to_mtlxray

SWIN_T = "swin_tiny_patch4_window7_224"


def test_timm_swin_names_map_onto_ours():
    assert timm_swin_to_mtlxray("layers.2.blocks.5.mlp.fc1.weight") == "stages.2.blocks.5.mlp.0.weight"
    assert timm_swin_to_mtlxray("layers.1.downsample.reduction.weight") == "stages.1.downsample.reduction.weight"
    assert timm_swin_to_mtlxray("layers.0.blocks.1.attn.relative_position_bias_table") == \
        "stages.0.blocks.1.attn.relative_position_bias_table"
    assert timm_swin_to_mtlxray("patch_embed.proj.weight") == "patch_embed.proj.weight"
    for derived in ("layers.0.blocks.1.attn.relative_position_index", "layers.0.blocks.1.attn_mask", "head.fc.weight"):
        assert timm_swin_to_mtlxray(derived) is None


@pytest.mark.slow
def test_swin_t_encoder_from_timm_weights_gives_timms_stage_outputs(tmp_path):
    """The full Swin-T at 224 px (no padded windows), one forward of batch 1 each (narrow decoders:
    only the encoder is compared)."""
    torch.manual_seed(0)
    src = timm.create_model(SWIN_T, pretrained=False).eval()  # RGB, 1000 classes: an ImageNet-like checkpoint
    path = save_weights(src, tmp_path / "swin_t.safetensors")
    model = build_model(ModelConfig(img_size=224, drop_path_rate=0.0, encoder_pretrained=str(path),
                                    ppm_channels=8, decoder_channels=[16, 16, 16, 16])).eval()
    ref = timm.create_model(SWIN_T, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, in_chans=1,
                            img_size=224).eval()
    enc = model.encoder
    # RGB patch filters summed into one channel; relative-position tables kept as they were.
    assert torch.allclose(enc.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(enc.stages[2].blocks[5].attn.relative_position_bias_table,
                       src.layers[2].blocks[5].attn.relative_position_bias_table)
    assert torch.equal(enc.stages[3].downsample.reduction.weight, src.layers[3].downsample.reduction.weight)
    x = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        ours = enc(x)
        theirs = ref.forward_intermediates(x, norm=True, intermediates_only=True)
        rgb = src.forward_intermediates(x.expand(-1, 3, -1, -1), norm=True, intermediates_only=True)
    assert [tuple(o.shape) for o in ours] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    for a, b, c in zip(ours, theirs, rgb):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        assert torch.allclose(a, c, atol=1e-5, rtol=0), (a - c).abs().max()  # grey = RGB copy of it


def test_small_swin_from_timm_weights_with_shrunk_windows(tmp_path):
    """At 64 px with window 4 the last stage's 2×2 map shrinks its window: timm resizes the table too."""
    kw = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4)
    torch.manual_seed(1)
    src = timm.create_model(SWIN_T, pretrained=False, img_size=64, **kw).eval()
    path = save_weights(src, tmp_path / "small.safetensors")
    cfg = ModelConfig(img_size=64, embed_dim=24, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4,
                      drop_path_rate=0.0, encoder_pretrained=str(path))
    model = build_model(cfg).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.encoder(x)
        rgb = src.forward_intermediates(x.expand(-1, 3, -1, -1), norm=True, intermediates_only=True)
    for a, c in zip(ours, rgb):
        assert torch.allclose(a, c, atol=1e-5, rtol=0)


def test_swin_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    src = timm.create_model(SWIN_T, pretrained=False, img_size=64, embed_dim=24, depths=(1, 1, 2, 1),
                            num_heads=(1, 2, 2, 4), window_size=4)
    path = save_weights(src, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="small.safetensors: does not fit timm"):
        build_model(ModelConfig(img_size=64, embed_dim=48, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                                window_size=4, encoder_pretrained=str(path)))


def test_swin_unet_block_prefixes():
    model = build_model(tiny_config())  # depths 2-2-2-2
    assert model.classifier_names() == ["cls_head.fc"]
    assert model.encoder_block_prefixes(3) == ["encoder.patch_embed", "encoder.stages.0.blocks.0",
                                               "encoder.stages.0.blocks.1", "encoder.stages.1.downsample",
                                               "encoder.stages.1.blocks.0"]
    names = [n for n, _ in model.named_parameters()]
    for prefix in model.encoder_block_prefixes(8):
        assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix


# ---------------------------------------------------------------------------------------------------
# transfer


@pytest.mark.parametrize("new_classes", [4, 2])
def test_transfer_swin_unet_to_another_class_count_reinitialises_only_the_class_fc(new_classes):
    torch.manual_seed(0)
    old = build_model(tiny_config(num_classes=3))
    new = build_model(tiny_config(num_classes=new_classes))
    before = new.cls_head.fc.weight.clone()
    torch.manual_seed(5)
    reset = load_state_dict_transfer(new, old.state_dict(), "phase1/best")
    assert reset == ["cls_head.fc.weight", "cls_head.fc.bias"]
    assert new.cls_head.fc.weight.shape == (new_classes, 8)
    assert not torch.equal(new.cls_head.fc.weight, before)  # freshly initialised, not left as built
    for key, value in old.state_dict().items():
        if not key.startswith("cls_head.fc."):
            assert torch.equal(new.state_dict()[key], value), key


def test_transfer_with_equal_shapes_is_a_plain_load():
    old, new = build_model(tiny_config()), build_model(tiny_config())
    assert load_state_dict_transfer(new, old.state_dict()) == []
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


@pytest.mark.parametrize("name,head", [("mtl_unet", "cls_head.3"), ("vit_b_cls", "cls_head")])
def test_transfer_baselines_3_to_4_classes(name, head):
    old = build_model(tiny_zoo_config(name, num_classes=3))
    new = build_model(tiny_zoo_config(name, num_classes=4))
    assert load_state_dict_transfer(new, old.state_dict()) == [f"{head}.weight", f"{head}.bias"]
    assert new(torch.rand(1, 1, 64, 64))["cls"].shape == (1, 4)


def test_transfer_mismatch_outside_the_head_names_the_tensor():
    old = build_model(tiny_config(num_classes=3))
    new = build_model(tiny_config(num_classes=4, cls_channels=16))  # the class conv differs too
    with pytest.raises(CheckpointError, match=r"ckpt: cls_head\.conv_phase1\.weight has shape .*cls_head\.fc"):
        load_state_dict_transfer(new, old.state_dict(), "ckpt")


def test_transfer_missing_or_unexpected_tensors_are_errors():
    old = build_model(tiny_config())
    state = old.state_dict()
    state.pop("lung_head.out.bias")
    with pytest.raises(CheckpointError, match="missing lung_head.out.bias"):
        load_state_dict_transfer(build_model(tiny_config()), state)
    state = {**old.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="unexpected extra.weight"):
        load_state_dict_transfer(build_model(tiny_config()), state)
