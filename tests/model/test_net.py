import json
import socket
import sys
from pathlib import Path

import killable
import pytest
import torch

from _model_support import tiny_config
from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model import build_model, count_params_by_part
from mtlxray.paper import PART_PARAMS

INF_PREFIXES = ("inf_decoder", "inf_head")


def _freeze_infection(model: torch.nn.Module) -> None:
    for name in INF_PREFIXES:
        getattr(model, name).requires_grad_(False)


def test_full_model_part_counts_match_the_paper():
    counts = count_params_by_part(build_model(ModelConfig()))
    tolerance = {"encoder": 0.005, "ppm": 0.01, "decoders": 0.02, "lung_head": 0.005, "infection_head": 0.005,
                 "cls_head": 0.005, "total": 0.01}
    for part, tol in tolerance.items():
        assert abs(counts[part] - PART_PARAMS[part]) / PART_PARAMS[part] < tol, (part, counts[part])


def test_top_level_submodule_names_are_fixed():
    names = {n for n, _ in build_model(tiny_config()).named_children()}
    assert names == {"encoder", "ppm", "lung_decoder", "inf_decoder", "lung_head", "inf_head", "cls_head"}


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes_in_both_modes_for_batch_1_and_3(batch):
    model = build_model(tiny_config()).eval()
    x = torch.rand(batch, 1, 32, 32)
    with torch.no_grad():
        p1 = model(x, mode="phase1")
        model.set_mode("phase2")
        p2 = model(x)
    assert p1["lung"].shape == (batch, 1, 32, 32) and p1["inf"] is None and p1["cls"].shape == (batch, 3)
    assert p2["lung"].shape == p2["inf"].shape == (batch, 1, 32, 32) and p2["cls"].shape == (batch, 3)


def test_input_size_other_than_the_configured_one_divisible_by_32():
    model = build_model(tiny_config(img_size=64, window_size=7)).eval()  # maps 40, 20, 10, 5 get padded
    with torch.no_grad():
        out = model(torch.rand(2, 1, 160, 160), mode="phase2")
    assert out["lung"].shape == out["inf"].shape == (2, 1, 160, 160)


def test_bf16_autocast_forward_backward_has_finite_gradients():
    model = build_model(tiny_config(grad_checkpoint="attention")).train()
    model.set_mode("phase2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 32, 32))
        loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_phase1_infection_params_get_no_grad_and_stay_bit_identical_over_steps():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    _freeze_infection(model)
    model.set_mode("phase1")
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(INF_PREFIXES)}
    lung_before = model.lung_decoder.stages[0].conv[0][0].weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        out = model(torch.rand(2, 1, 32, 32))
        assert out["inf"] is None
        opt.zero_grad()
        (out["lung"].mean() + out["cls"].mean()).backward()
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(INF_PREFIXES))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # weights and BN statistics
    assert not torch.equal(lung_before, model.lung_decoder.stages[0].conv[0][0].weight)


def test_phase1_lung_output_depends_on_the_frozen_infection_branch():
    model = build_model(tiny_config()).eval()
    _freeze_infection(model)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a = model(x)["lung"]
        model.inf_decoder.stages[-1].conv[1][0].weight.mul_(3.0)
        b = model(x)["lung"]
    # The cross-attention reads the infection features. Compared around the head's prior bias
    # (logit(0.2) ≈ -1.39), where allclose's relative tolerance would hide the change.
    bias = model.lung_head.out.bias
    assert not torch.allclose(a - bias, b - bias, rtol=0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_rank_ddp_phase1_without_unused_parameter_search(tmp_path: Path):
    worker = Path(__file__).with_name("_ddp_phase1.py")
    proc = killable.run([sys.executable, str(worker), str(tmp_path), str(_free_port())], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert all(r["frozen_same"] for r in ranks)


def test_cls_use_bottleneck_widens_the_class_fc():
    model = build_model(tiny_config(cls_use_bottleneck=True)).eval()
    assert model.cls_head.fc.in_features == 8 + 96
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32))["cls"].shape == (2, 3)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        build_model(tiny_config(name="resnet"))


def test_invalid_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        build_model(tiny_config()).set_mode("phase3")


def test_the_class_head_and_softmaxes_run_in_fp32_under_bf16_autocast():
    """Numerically sensitive parts stay fp32: the sigmoid masks averaged by the class head, and the
    cross-attention gate softmaxes. The window attention's softmax (5-D maps) may return bf16 on the
    CPU, whose bf16 kernel accumulates in fp32 and rounds once: its values must equal an fp32
    softmax rounded to bf16."""
    cfg = tiny_config()
    model = build_model(cfg)
    model.set_attention("explicit")
    model.set_mode("phase2")
    seen = {}
    model.cls_head.register_forward_pre_hook(lambda m, args: seen.update(cls_in=args[0].dtype))
    model.cls_head.fc.register_forward_pre_hook(lambda m, args: seen.update(cls_pooled=args[0].dtype))
    gates, windows = [], []

    class Softmaxes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "softmax":
                if args[0].dim() == 5:
                    want = args[0].float().softmax(-1).to(out.dtype)
                    windows.append(torch.equal(out, want))
                else:
                    gates.append(out.dtype)
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Softmaxes():
        out = model(torch.rand(2, 1, cfg.img_size, cfg.img_size))
    assert seen == {"cls_in": torch.float32, "cls_pooled": torch.float32}
    assert gates and set(gates) == {torch.float32}  # the cross-attention gates
    assert windows and all(windows)  # every window attention: fp32 values, rounded once
    assert out["cls"].dtype == torch.float32 and out["lung"].dtype == torch.bfloat16
