"""Non-finite steps: skipped exactly within the budget, and a non-finite model is never saved."""

import json

import torch

from _train_support import DEMO, run_cli, tiny_overrides
from mtlxray.checkpoint import all_finite, find_resume, read_state
from mtlxray.config import load_config
from mtlxray.data.loader import batch_to_device
from mtlxray.errors import NonFiniteLossError
from mtlxray.train.trainer import Trainer


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def _snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, state in enumerate(trainer.optimizer.optimizer.state.values()):
        out.update({f"opt.{i}.{k}": v.clone() for k, v in state.items()})
    return out


def test_skipped_step_leaves_weights_optimizer_state_and_bn_statistics_exactly(tiny_shards, tmp_path):
    cfg = load_config(DEMO, tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=4", "run.nan_skip_budget=3",
                                           "run.log_every=2"))
    trainer = Trainer(cfg, "none")
    try:
        batches = trainer._batches()
        trainer.model.train()
        trainer._micro_step(batch_to_device(next(batches), trainer.accelerator.device))  # a real update first
        before = _snapshot(trainer)
        poisoned = batch_to_device(next(batches), trainer.accelerator.device)
        poisoned["img"][0, 0, 0, 0] = float("nan")  # one pixel: nan loss, nan gradients, nan BN batch stats
        trainer._micro_step(poisoned)
        after = _snapshot(trainer)
        assert before.keys() == after.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed == [], changed  # weights, Adam moments and step counts, BN running statistics
        trainer._micro_step(batch_to_device(next(batches), trainer.accelerator.device))
        assert not torch.equal(before["model.lung_head.out.weight"], _snapshot(trainer)["model.lung_head.out.weight"])
        assert int(trainer.guard.sync_values()[0]) == 1
    finally:
        trainer.close()


def test_nan_skip_budget_spent_names_the_step_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path):
    # A learning rate of 1e9 makes the first update's weights huge but finite (saved as step 1); step 2's
    # loss overflows. (From about 1e20 on, the weights themselves overflow: another guard's error.)
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=6", "run.save_every=1", "run.nan_skip_budget=0",
                          "optim.lr=1e9", "optim.grad_clip=0", "schedule.warmup_steps=0")
    res = run_cli(["train", "--config", str(DEMO), *args])
    assert res.returncode == NonFiniteLossError.exit_code
    err = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
    assert "non-finite loss or gradients at step 2" in err and "run.nan_skip_budget=0" in err, err
    kept = find_resume(tmp_path / "t" / "checkpoints")
    assert read_state(kept).step == 1 and bool(all_finite(_load(kept)))


def _load(ckpt):
    from mtlxray.model.base import MTLModel

    return MTLModel.from_pretrained(ckpt)


def test_finite_loss_with_nonfinite_weights_is_never_saved_as_last_or_best(tiny_shards, tmp_path):
    # lr 1e3: step 2's loss is finite (about 1e10) but the update leaves inf/nan weights.
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=6", "run.save_every=1", "run.nan_skip_budget=10",
                          "optim.lr=1e3", "optim.grad_clip=0", "schedule.warmup_steps=0", "run.eval_every=1")
    res = run_cli(["train", "--config", str(DEMO), *args])
    assert res.returncode == NonFiniteLossError.exit_code, res.stderr[-2000:]
    assert "non-finite" in res.stderr.strip().splitlines()[-1]
    root = tmp_path / "t" / "checkpoints"
    saved = sorted(root.glob("step-*"))
    assert saved, "the good first step was saved"
    for link in ("last", "best"):  # both name the good first step
        assert bool(all_finite(_load(root / link))), link
    for ckpt in saved:
        assert bool(all_finite(_load(ckpt))), ckpt.name
    state = read_state(find_resume(root))
    assert state.step < 6
    for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)  # no bare NaN or Infinity
