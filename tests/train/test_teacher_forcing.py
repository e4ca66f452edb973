"""Positive-case training and teacher forcing: p=1 is ground-truth gating, p=0 is the gate's, the coins are
reproducible, and a step still reads nothing back (the gate itself: tests/eval/test_gate.py)."""

import pytest
import torch

from mtlxray.config import load_config
from mtlxray.errors import ConfigError
from mtlxray.eval.gate import Gate
from mtlxray.train.losses import phase_loss
from mtlxray.train.teacher_forcing import PositiveSelector, coin_flips

from _train_support import DEMO2, TINY_MODEL

LABELS = torch.tensor([2, 0, 2, 1, 2, 0, 1, 2])


def _cfg(*extra: str):
    return load_config(DEMO2, [*TINY_MODEL, "phase.init_from=null", *extra])


def _out(labels: torch.Tensor) -> dict:
    """Class logits that call every sample the opposite of its truth (positive <-> negative)."""
    logits = torch.zeros(len(labels), 3)
    logits[torch.arange(len(labels)), torch.where(labels == 2, 0, 2)] = 5.0
    return {"cls": logits}


def _batch(labels: torch.Tensor = LABELS) -> dict:
    return {"label": labels, "img": torch.rand(len(labels), 1, 64, 64)}


@pytest.mark.parametrize("per", ["sample", "batch"])
def test_p1_is_ground_truth_gating_and_p0_is_the_gate(per):
    truth = LABELS == 2
    for p, expected in ((1.0, truth), (0.0, ~truth)):
        cfg = _cfg(f"phase.teacher_forcing={{gate: cls_head, p: {p}, per: {per}}}")
        selector = PositiveSelector(cfg, Gate.from_config(cfg, "cpu"), rank=0)
        for step in range(5):
            got = selector.select(_out(LABELS), _batch(), step=step, batch_index=step)
            assert torch.equal(got, expected), (p, step)
    no_gate = PositiveSelector(_cfg(), None, rank=0)
    assert torch.equal(no_gate.select(_out(LABELS), _batch(), step=0, batch_index=0), truth)


def test_p_mixes_truth_and_gate_per_sample_or_per_batch_with_reproducible_coins():
    kw = dict(seed=3, step=7, batch=2, rank=1, device="cpu")
    before = torch.random.get_rng_state()
    a = coin_flips(0.5, 64, "sample", **kw)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(a, coin_flips(0.5, 64, "sample", **kw))  # a resume flips the same coins
    assert not torch.equal(a, coin_flips(0.5, 64, "sample", **{**kw, "rank": 0}))
    assert not torch.equal(a, coin_flips(0.5, 64, "sample", **{**kw, "step": 8}))
    assert 16 < int(a.sum()) < 48
    flips = torch.stack([coin_flips(0.9, 8, "batch", **{**kw, "step": s}) for s in range(200)])
    assert ((flips.all(1)) | (~flips.any(1))).all()  # one coin for the whole batch
    assert 0.8 < flips[:, 0].float().mean() < 0.97


def test_a_per_batch_coin_is_the_same_on_every_rank():
    """MultiCheXNet tosses once per batch: under DDP the global batch goes one way, on every rank."""
    kw = dict(seed=3, batch=2, device="cpu")
    for step in range(50):
        ranks = [coin_flips(0.5, 4, "batch", step=step, rank=r, **kw) for r in range(4)]
        assert all(torch.equal(ranks[0], r) for r in ranks[1:]), step
    per_sample = [torch.cat([coin_flips(0.5, 4, "sample", step=s, rank=r, **kw) for s in range(50)]) for r in (0, 1)]
    assert not torch.equal(*per_sample)  # per sample, each rank has its own coins


def _samples(batch: dict, index: list[int]) -> dict:
    """The batch of the samples at `index` only."""
    return {k: [v[i] for i in index] if isinstance(v, list) else v[index] for k, v in batch.items()}


def test_the_losses_see_exactly_the_selected_samples():
    from mtlxray.config import ModelConfig
    from mtlxray.model import build_model

    cfg = _cfg("model.det_head=fcos", "phase.loss_weights.det=1.0",
               "phase.teacher_forcing={gate: cls_head, p: 0.0}")
    model = build_model(ModelConfig(**{**cfg.model.__dict__}), pretrained=False)
    model.set_mode("phase2")
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 2, 1])
    batch = {"img": torch.rand(4, 1, 64, 64), "label": labels, "has_inf": torch.ones(4, dtype=torch.bool),
             "lung": (torch.rand(4, 1, 64, 64) > 0.5).float(), "inf": (torch.rand(4, 1, 64, 64) > 0.9).float(),
             "boxes": [[[2, 2, 20, 20]], [], [[30, 30, 50, 60]], [[5, 40, 20, 60]]]}
    with torch.no_grad():
        out = {**model(batch["img"]), **_out(labels)}  # the gate passes exactly the truth's negatives
    include = PositiveSelector(cfg, Gate.from_config(cfg, "cpu"), rank=0).select(out, batch, step=0, batch_index=0)
    assert include.tolist() == [False, True, False, True]
    _, forced = phase_loss(out, batch, cfg.phase, include=include)
    # By hand: the same losses on a batch of the selected samples alone, every one of them included.
    selected = [1, 3]
    out_selected = {k: out[k][selected] for k in ("lung", "inf", "cls", "det")} | {"det_points": out["det_points"]}
    _, selected_only = phase_loss(out_selected, _samples(batch, selected), cfg.phase,
                                  include=torch.ones(2, dtype=torch.bool))
    _, truth = phase_loss(out, batch, cfg.phase)  # the ground truth's positives, samples 0 and 2
    for task in ("inf", "det"):
        assert forced[task] > 0 and torch.allclose(forced[task], selected_only[task], rtol=1e-5, atol=0), task
        assert not torch.allclose(forced[task], truth[task], rtol=1e-3, atol=0), task  # other samples, other loss


def test_config_checks_of_positive_classes_and_the_gate():
    cfg = load_config(None, ["phase.infection_classes=[1,2]"])  # an older config that says infection_classes
    assert cfg.phase.positive_classes == [1, 2] == cfg.phase.infection_classes  # the former name still reads
    with pytest.raises(ConfigError, match="disagree"):
        _cfg("phase.infection_classes=[1]", "phase.positive_classes=[2]")
    with pytest.raises(ConfigError, match="needs model.first_stage"):
        _cfg("phase.teacher_forcing={gate: first_stage}")
    with pytest.raises(ConfigError, match="teacher_forcing.p"):
        _cfg("phase.teacher_forcing={gate: cls_head, p: 1.5}")


def test_a_teacher_forced_step_with_a_detection_head_reads_nothing_back(tiny_shards, tmp_path):
    """The trainer's promise (mtlxray.train.trainer) holds with the gate, the coins and the box loss."""
    from _train_support import host_reads_per_step, tiny_overrides

    cfg = load_config(DEMO2, tiny_overrides(
        tiny_shards, tmp_path, "phase.init_from=null", "schedule.max_steps=7", "run.log_every=3",
        "run.eval_every=1000", "run.save_every=1000", "data.samples_per_epoch=100", "model.det_head=fcos",
        "phase.loss_weights.det=1.0", "phase.teacher_forcing={gate: cls_head, p: 0.5}",
        "data.sources=[{name: a, subset: lung, tasks: [lung, cls]}, {name: b, subset: infection, tasks: [inf, det]}]"))
    assert host_reads_per_step(cfg) == {2: 0, 3: 0, 4: 1, 5: 0, 6: 0}
