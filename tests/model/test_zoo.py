"""The model zoo: smp segmentation baselines and timm classifiers as MTLModels, their local weights,
their block prefixes, the baseline configs, and model-summary for them."""

import json
from pathlib import Path

import pytest
import timm
import torch

from _zoo_support import SMP_NAMES, TIMM_NAMES, TINY, save_weights, tiny_zoo_config
from mtlxray.cli import main
from mtlxray.config import Config, ModelConfig, load_config
from mtlxray.errors import CheckpointError, ConfigError
from mtlxray.model import MTLModel, build_model, model_names
from mtlxray.train.phases import apply_freezing

BASELINES = Path(__file__).resolve().parents[2] / "configs" / "baselines"
BASELINE_NAMES = ["unet", "unetpp", "deeplabv3p", "mtl_unet", "swin_t_cls", "vit_b_cls", "dinov2_cls", "beitv2_cls",
                  "clip_zeroshot"]
TIMM_DEFAULTS = {"swin_t_cls": "swin_tiny_patch4_window7_224", "vit_b_cls": "vit_base_patch16_224",
                 "dinov2_cls": "vit_small_patch14_dinov2", "beitv2_cls": "beitv2_base_patch16_224"}
"""The timm architecture each classifier builds unless `model.timm_name` names another."""


def _shapes(out: dict) -> dict:
    return {k: None if v is None else tuple(v.shape) for k, v in out.items()}


def test_registry_holds_every_baseline():
    assert set(BASELINE_NAMES) | {"mtl_swin_unet"} == set(model_names())


@pytest.mark.parametrize("name", SMP_NAMES)
def test_smp_models_return_lung_logits_at_input_size_and_train(name):
    torch.manual_seed(0)
    model = build_model(tiny_zoo_config(name)).train()
    assert isinstance(model, MTLModel)
    assert {n for n, _ in model.named_children()} >= {"encoder", "decoder", "lung_head"}
    out = model(torch.rand(2, 1, 64, 64))
    with_cls = name == "mtl_unet"
    assert _shapes(out) == {"lung": (2, 1, 64, 64), "inf": None, "cls": (2, 3) if with_cls else None}
    assert model.tasks == ({"lung", "cls"} if with_cls else {"lung"})
    assert model.classifier_names() == (["cls_head.3"] if with_cls else [])
    loss = out["lung"].mean() + (out["cls"].mean() if with_cls else 0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    feats = model.encode(torch.rand(1, 1, 64, 64))
    assert [f.shape[-1] for f in feats][-1] in (2, 4)  # stride 32 (16 for DeepLabV3+'s dilated encoder)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_classifiers_return_class_logits_from_any_input_size(name):
    torch.manual_seed(0)
    model = build_model(tiny_zoo_config(name)).train()
    assert model.tasks == {"cls"} and model.classifier_names() == ["cls_head"]
    assert model.encoder.default_cfg["architecture"] == TIMM_DEFAULTS[name]
    out = model(torch.rand(2, 1, 48, 48))  # resized to img_size inside
    assert _shapes(out) == {"lung": None, "inf": None, "cls": (2, 3)}
    out["cls"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    feats = model.encode(torch.rand(1, 1, 48, 48))
    assert all(f.ndim == 4 for f in feats)


def test_smp_encoder_from_a_local_timm_checkpoint_sums_the_rgb_stem(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model("resnet10t", pretrained=False)  # RGB, 1000 classes
    path = save_weights(src, tmp_path / "resnet10t.safetensors")
    model = build_model(tiny_zoo_config("unet", encoder_pretrained=str(path)))
    enc = model.encoder.model.state_dict()
    assert torch.allclose(enc["conv1.0.weight"], src.conv1[0].weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(enc["layer4.0.conv2.weight"], src.layer4[0].conv2.weight)
    assert torch.equal(enc["bn1.running_var"], src.bn1.running_var)


def test_smp_native_encoder_from_a_local_state_dict(tmp_path):
    from segmentation_models_pytorch.encoders import get_encoder

    torch.manual_seed(2)
    src = get_encoder("resnet18", in_channels=3, weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": src.state_dict()}, path)  # a training checkpoint wrapping, read weights_only
    model = build_model(tiny_zoo_config("unet", encoder="resnet18", encoder_pretrained=str(path)))
    assert torch.allclose(model.encoder.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(model.encoder.layer3[1].conv1.weight, src.layer3[1].conv1.weight)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_b_cls", {}), ("dinov2_cls", {}), ("beitv2_cls", {}),
    ("swin_t_cls", {}),
])
def test_timm_classifier_from_a_local_rgb_checkpoint(tmp_path, name, kwargs):
    """Same class count: every tensor is the checkpoint's, with the RGB patch filters summed."""
    cfg = tiny_zoo_config(name)
    torch.manual_seed(3)
    src = timm.create_model(TIMM_DEFAULTS[name], pretrained=False, num_classes=3, img_size=cfg.img_size,
                            **cfg.lib_kwargs)
    path = save_weights(src, tmp_path / "w.safetensors")
    model = build_model(tiny_zoo_config(name, pretrained=str(path)))
    ours = model.state_dict()
    head = src.get_classifier()
    assert torch.equal(ours["cls_head.weight"], head.weight) and torch.equal(ours["cls_head.bias"], head.bias)
    for key, value in src.state_dict().items():
        if key.startswith("head"):
            continue
        if key == "patch_embed.proj.weight":
            assert torch.allclose(ours["encoder." + key], value.sum(dim=1, keepdim=True), atol=1e-6)
        else:
            assert torch.equal(ours["encoder." + key], value), key
    # The 1-channel model sees a grey image as the RGB model sees it copied to three channels
    # (up to the per-channel normalisation constants, equal here when they are).
    x = torch.rand(1, 1, cfg.img_size, cfg.img_size)
    if len(set(src.pretrained_cfg["mean"])) == 1 and len(set(src.pretrained_cfg["std"])) == 1:
        with torch.no_grad():
            rgb = src.eval()(model.normalise(x).expand(-1, 3, -1, -1))
            assert torch.allclose(model.eval()(x)["cls"], rgb, atol=1e-4)


def test_timm_checkpoint_with_another_class_count_keeps_the_encoder_and_resets_the_head(tmp_path):
    cfg = tiny_zoo_config("vit_b_cls")
    src = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=64, **cfg.lib_kwargs)  # 1000 classes
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    model = build_model(tiny_zoo_config("vit_b_cls", pretrained=str(path)))  # 32 px: pos_embed resampled by timm
    assert model.cls_head.weight.shape == (3, 32)
    assert model.encoder.pos_embed.shape == (1, 1 + 4, 32) and src.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(model.encoder.blocks[2].mlp.fc2.weight, src.blocks[2].mlp.fc2.weight)


def test_missing_weights_file_is_one_line_checkpoint_error(tmp_path):
    for name, field in [("vit_b_cls", "pretrained"), ("unet", "encoder_pretrained"),
                        ("mtl_swin_unet", "encoder_pretrained")]:
        cfg = tiny_zoo_config(name, **{field: str(tmp_path / "nope.safetensors")}) if name != "mtl_swin_unet" \
            else ModelConfig(img_size=32, window_size=4, encoder_pretrained=str(tmp_path / "nope.safetensors"))
        with pytest.raises(CheckpointError, match="no such checkpoint file") as e:
            build_model(cfg)
        assert "\n" not in str(e.value)


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        build_model(tiny_zoo_config("vit_b_cls", pretrained=str(bad)))


def test_build_without_pretrained_reads_no_file(tmp_path):
    model = build_model(tiny_zoo_config("vit_b_cls", pretrained=str(tmp_path / "absent.pth")), pretrained=False)
    assert model.tasks == {"cls"}


def test_weights_field_the_model_does_not_read_is_a_config_error():
    with pytest.raises(ConfigError, match="model.encoder_pretrained"):
        build_model(tiny_zoo_config("unet", pretrained="x.safetensors"))
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(tiny_zoo_config("vit_b_cls", encoder_pretrained="x.safetensors"))


def test_bad_library_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="smp Unet"):
        build_model(tiny_zoo_config("unet", encoder="tu-no_such_net"))
    with pytest.raises(ConfigError, match="timm"):
        build_model(tiny_zoo_config("vit_b_cls", lib_kwargs={"no_such_arg": 1}))
    with pytest.raises(ConfigError, match="divisible by 32"):
        build_model(tiny_zoo_config("unetpp", img_size=48))


def test_first_n_blocks_prefixes_freeze_exactly_the_stem_and_those_blocks():
    model = build_model(tiny_zoo_config("vit_b_cls"))
    assert model.num_encoder_blocks() == 3
    prefixes = model.encoder_block_prefixes(2)
    assert prefixes == ["encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed", "encoder.blocks.0",
                        "encoder.blocks.1"]
    assert model.encoder_block_prefixes(0) == []
    assert model.encoder_block_prefixes(3)[-1] == "encoder.blocks"
    with pytest.raises(ConfigError, match="3 encoder blocks"):
        model.encoder_block_prefixes(4)
    for name, p in model.named_parameters():
        p.requires_grad_(not any(name == q or name.startswith(q + ".") for q in prefixes))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith(("encoder.blocks.2.", "encoder.norm.", "cls_head."))}


def test_swin_classifier_block_prefixes_follow_stages():
    model = build_model(tiny_zoo_config("swin_t_cls"))  # depths 1-1-2-1
    assert model.num_encoder_blocks() == 5
    assert model.encoder_block_prefixes(3) == ["encoder.patch_embed", "encoder.layers.0", "encoder.layers.1",
                                               "encoder.layers.2.downsample", "encoder.layers.2.blocks.0"]
    with pytest.raises(ConfigError, match="no encoder blocks"):
        build_model(tiny_zoo_config("unet")).encoder_block_prefixes(1)


def test_save_and_from_pretrained_round_trip_without_reading_pretrained_files(tmp_path):
    torch.manual_seed(4)
    src = timm.create_model("resnet10t", pretrained=False)
    path = save_weights(src, tmp_path / "enc.safetensors")
    cfg = Config(model=tiny_zoo_config("mtl_unet", encoder_pretrained=str(path)))
    model = build_model(cfg.model).eval()
    model.save_pretrained(tmp_path / "saved", cfg)
    path.unlink()  # the saved folder must not need the encoder's source file
    again = MTLModel.from_pretrained(tmp_path / "saved")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a, b = model(x), again(x)
    assert torch.equal(a["lung"], b["lung"]) and torch.equal(a["cls"], b["cls"])


# ---------------------------------------------------------------------------------------------------
# configs/baselines


def _tiny_overrides(name: str, tmp_path: Path) -> list[str]:
    """Overrides that shrink a baseline config's model (12 blocks, as the real ones, so that the
    frozen block prefixes exist and the first 8 do not collapse to `encoder.blocks`)."""
    if name == "clip_zeroshot":
        from _zoo_support import write_tiny_clip

        arch, _ = write_tiny_clip(tmp_path)
        return [f"model.clip_arch={arch}"]
    fields = dict(TINY[name])
    kwargs = dict(fields.pop("lib_kwargs"))
    if "depth" in kwargs:
        kwargs["depth"] = 12
    out = [f"model.{k}={v}" for k, v in fields.items()]
    return out + ["model.lib_kwargs=" + json.dumps(kwargs)]


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_baseline_config_validates_builds_and_its_phase_fits_the_model(name, tmp_path, capsys):
    path = BASELINES / f"{name}.yaml"
    assert main(["config", "show", "--config", str(path)]) == 0
    cfg = load_config(path)
    assert cfg.model.name == name
    if name != "clip_zeroshot":
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 5e-5, 1e-6)
    cfg = load_config(path, _tiny_overrides(name, tmp_path))
    model = build_model(cfg.model)
    apply_freezing(model, cfg.phase.frozen)  # every frozen prefix names parameters (ConfigError otherwise)
    assert {t for t, w in cfg.phase.loss_weights.items() if w > 0} == set(model.tasks)
    if name in ("dinov2_cls", "beitv2_cls"):
        assert cfg.phase.frozen == model.encoder_block_prefixes(8)


def test_model_summary_prints_a_baselines_parameters_and_gflops(capsys):
    over = _tiny_overrides("unet", Path("."))
    assert main(["model-summary", "--config", str(BASELINES / "unet.yaml"), *over]) == 0
    out = capsys.readouterr().out
    assert "model unet" in out and "encoder" in out and "decoder" in out and "GFLOPs/image: forward" in out
    assert main(["model-summary", "--json", "--config", str(BASELINES / "mtl_unet.yaml"), *over]) == 0
    report = json.loads(capsys.readouterr().out)
    model = build_model(load_config(BASELINES / "mtl_unet.yaml", over).model)
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["tasks"] == ["cls", "lung"] and report["paper_params"] is None
    assert 0 < report["gflops"]["forward"] < report["gflops"]["forward_backward"]
