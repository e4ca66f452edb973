"""run.compile: the model's forward and the loss trace whole (no graph breaks) and, compiled, train
to the eager losses. Compiled with backend aot_eager: inductor's code generation takes many
minutes on 2 cores, and the graphs dynamo captures are the same."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from mtlxray.config import RunConfig, load_config
from mtlxray.model import build_model
from mtlxray.train.compiled import compile_loss, compile_options, dynamo_plugin
from mtlxray.train.losses import phase_loss
from mtlxray.train.phases import prepare_phase


def _model_and_batches(config: str, overrides: list[str], batch: int, n: int):
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    prepare_phase(model, cfg.phase)
    g = torch.Generator().manual_seed(0)
    S = cfg.model.img_size

    def one() -> dict:
        return {"img": torch.rand(batch, 1, S, S, generator=g),
                "lung": (torch.rand(batch, 1, S, S, generator=g) > 0.5).float(),
                "inf": (torch.rand(batch, 1, S, S, generator=g) > 0.8).float(),
                "label": torch.randint(0, 3, (batch,), generator=g), "has_inf": torch.ones(batch)}

    return cfg, model.train(), [one() for _ in range(n)]


@pytest.mark.parametrize("config,overrides", [
    ("configs/demo.yaml", []),
    ("configs/demo_phase2.yaml", ["model.grad_checkpoint=selective"]),
    pytest.param("configs/phase1.yaml", [], marks=pytest.mark.slow),  # demo-phase1 holds its code paths
    ("configs/phase2.yaml", []),
], ids=["demo-phase1", "demo-phase2-selective-checkpointing", "paper-phase1", "paper-phase2"])
def test_forward_and_loss_trace_with_zero_graph_breaks(config, overrides):
    cfg, model, (batch,) = _model_and_batches(config, ["data.shards=unused", *overrides], batch=2, n=1)

    def forward_loss(b: dict) -> torch.Tensor:
        return phase_loss(model(b["img"]), b, cfg.phase, cfg.model.cls_loss)[0]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward_loss)(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_twenty_compiled_demo_steps_match_eager_losses():
    """Plain SGD at a small rate: fp32 rounding differences between the graphs (1e-7) grow with
    every step, faster the larger the step (AdamW's normalised steps reached 1e-2 in 20)."""
    cfg, eager, batches = _model_and_batches("configs/demo_phase2.yaml",
                                             ["data.shards=unused", "model.img_size=64", "run.compile=true"],
                                             batch=4, n=4)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    runs = {"eager": (eager, eager, phase_loss),
            "compiled": (compiled, torch.compile(compiled, fullgraph=True, **compile_options(cfg.run, "aot_eager")),
                         compile_loss(phase_loss, cfg, backend="aot_eager"))}
    assert runs["compiled"][2] is not phase_loss
    losses = {}
    for name, (model, forward, loss_fn) in runs.items():
        opt = torch.optim.SGD(model.parameters(), lr=5e-4)
        losses[name] = []
        for step in range(20):
            b = batches[step % len(batches)]
            loss = loss_fn(forward(b["img"]), b, cfg.phase, cfg.model.cls_loss)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.detach())
    eager_l, compiled_l = torch.stack(losses["eager"]), torch.stack(losses["compiled"])
    assert eager_l[-4:].mean() < eager_l[:4].mean()  # it trains (the same 4 batches, in turn)
    torch.testing.assert_close(compiled_l, eager_l, rtol=1e-4, atol=0)


def test_compile_mode_reaches_torch_compile_and_deepspeed_stays_eager():
    assert compile_options(RunConfig(compile=True, compile_mode="reduce-overhead"))["mode"] == "reduce-overhead"
    assert compile_options(RunConfig(compile=True))["mode"] is None
    ddp = load_config("configs/demo.yaml", ["run.compile=true", "run.compile_mode=max-autotune"])
    plugin = dynamo_plugin(ddp)
    assert (plugin.backend.value.lower(), plugin.mode) == ("inductor", "max-autotune")
    ds = load_config("configs/demo.yaml", ["run.compile=true", "run.backend=deepspeed",
                                           "run.deepspeed_config=configs/deepspeed/zero2.json"])
    assert dynamo_plugin(ds).backend.value.lower() == "no"
    assert compile_loss(phase_loss, ds) is phase_loss
