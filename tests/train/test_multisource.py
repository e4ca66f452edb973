"""Alternating disjoint datasets (`data.sources`): the order every rank follows, label maps, exactly zero
gradient to the heads a batch has no labels for, two real DDP ranks, and a bit-exact resume mid-alternation."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlxray.config import load_config
from mtlxray.errors import EXIT_REQUEUE
from mtlxray.train.multisource import batches_per_epoch, source_batches, source_order

from _train_support import DEMO, DEMO2, REPO, TINY_MODEL, cli_env, tiny_overrides

SOURCES = ("data.sources=[{name: cls, subset: lung, tasks: [lung, cls]}, "
           "{name: inf, subset: infection, tasks: [inf, det], label_map: {Normal: 0, Non-COVID: 0, COVID-19: 2}}]")
WORKER = Path(__file__).with_name("_worker.py")


def _cfg(shards, tmp_path, *extra):
    return load_config(DEMO2, tiny_overrides(shards, tmp_path, "phase.init_from=null", "model.det_head=fcos",
                                             "phase.loss_weights={lung: 1.0, inf: 1.0, cls: 0.3, det: 1.0}",
                                             SOURCES, *extra))


def test_every_rank_follows_one_order_alternating_or_by_weight(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path).data
    assert source_order(cfg, seed=0, epoch=0, n_batches=6) == [0, 1, 0, 1, 0, 1]
    weighted = load_config(DEMO2, ["phase.init_from=null", "data.source_schedule=weighted",
                                   "data.sources=[{name: a, weight: 3.0}, {name: b, subset: infection, weight: 1.0}]"])
    order = source_order(weighted.data, seed=5, epoch=2, n_batches=4000)
    assert order == source_order(weighted.data, seed=5, epoch=2, n_batches=4000)  # rank plays no part
    assert order != source_order(weighted.data, seed=5, epoch=3, n_batches=4000)
    assert 0.72 < order.count(0) / 4000 < 0.78
    # The epoch: both training splits (18 lung + 8 infection samples) in batches of 2.
    assert batches_per_epoch(cfg, 1) == 9 + 4


def test_an_epoch_takes_each_source_in_turn_with_its_tasks_and_label_map(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path)
    batches = list(source_batches(cfg.data, seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == 13
    assert [b["source"] for b in batches] == ["cls", "inf"] * 6 + ["cls"]  # strict turns (shards are resampled)
    assert all(b["tasks"] == (("lung", "cls") if b["source"] == "cls" else ("inf", "det")) for b in batches)
    inf_labels = torch.cat([b["label"] for b in batches if b["source"] == "inf"])
    assert set(inf_labels.tolist()) == {0, 2}  # Non-COVID mapped to 0 in this source only
    assert 1 in torch.cat([b["label"] for b in batches if b["source"] == "cls"]).tolist()
    # Resuming at batch 5 gives batches 5.. of the same epoch, each source from where it stopped.
    again = list(source_batches(cfg.data, seed=0, epoch=0, rank=0, world_size=1, start_batch=5))
    assert [b["key"] for b in again] == [b["key"] for b in batches[5:]]


def test_labels_a_batch_lacks_contribute_exactly_zero_gradient(tiny_shards, tmp_path):
    """A step's gradient is exactly that of the losses its source has labels for; a head that feeds none
    of them gets an all-zero gradient (present, so DDP's reduction sees it), never a stray one."""
    from mtlxray.data.loader import batch_to_device
    from mtlxray.model import build_model
    from mtlxray.train.losses import multitask_loss, phase_loss

    cfg = _cfg(tiny_shards, tmp_path)
    model = build_model(cfg.model, pretrained=False)
    model.set_mode("phase2")
    batches = list(source_batches(cfg.data, seed=0, epoch=0, rank=0, world_size=1))
    idle_heads = {"cls": ["det_head"], "inf": ["lung_head", "cls_head.fc"]}  # upstream of no carried loss

    def grads(loss) -> dict:
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    for batch in (batches[0], batches[1]):
        batch = batch_to_device(batch, "cpu")
        batch["label"][0] = 2  # at least one positive case for the infection and box losses
        torch.manual_seed(0)
        loss, parts = phase_loss(model(batch["img"]), batch, cfg.phase)
        assert set(parts) == set(batch["tasks"])
        got = grads(loss)
        only = {k: v for k, v in cfg.phase.loss_weights.items() if k in batch["tasks"]}
        torch.manual_seed(0)
        plain = {k: v for k, v in batch.items() if k != "tasks"}
        reference = grads(multitask_loss(model(batch["img"]), plain, only, cfg.phase.positive_classes,
                                         bce_weight=cfg.phase.bce_weight)[0])
        for name, g in got.items():
            assert g is not None, name  # every trained parameter is in the graph
            ref = reference[name] if reference[name] is not None else torch.zeros_like(g)
            assert torch.equal(g, ref), name
        for prefix in idle_heads[batch["source"]]:
            params = [g for n, g in got.items() if n.startswith(prefix + ".")]
            assert params and all(torch.count_nonzero(g) == 0 for g in params), prefix



def test_heads_without_labels_keep_bit_identical_weights_under_adamw_with_weight_decay(tiny_shards, tmp_path):
    """Through the trainer's own step (fused AdamW, weight decay 0.1, clipping): a head a batch has no
    labels for keeps its weights and its optimizer state bit for bit; the same head moves on batches
    that carry its labels."""
    from mtlxray.data.loader import batch_to_device
    from mtlxray.train.trainer import Trainer

    trainer = Trainer(_cfg(tiny_shards, tmp_path, "optim.weight_decay=0.1"), resume="none")
    try:
        model, opt = trainer.raw_model, trainer.optimizer.optimizer
        idle = {"cls": ["det_head"], "inf": ["lung_head", "cls_head.fc"]}

        def snapshot(prefix: str) -> dict:
            params = {n: p for n, p in model.named_parameters() if n.startswith(prefix + ".")}
            state = {n: {k: v.clone() for k, v in opt.state.get(p, {}).items()} for n, p in params.items()}
            return {"weights": {n: p.detach().clone() for n, p in params.items()}, "state": state}

        def same(a: dict, b: dict) -> bool:
            return all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"]) and all(
                a["state"][n].keys() == b["state"][n].keys() and all(torch.equal(v, b["state"][n][k])
                                                                     for k, v in a["state"][n].items())
                for n in a["state"])

        batches = trainer._batches()
        moved = {prefix: 0 for heads in idle.values() for prefix in heads}
        for _ in range(3):  # cls, inf, cls: the second cls step after Adam has moments for the box head
            batch = batch_to_device(next(batches), "cpu")
            batch["label"][0] = 2  # a positive case: the box and infection losses have something to train
            before = {prefix: snapshot(prefix) for prefix in moved}
            trainer._micro_step(batch)
            trainer.state.step += 1
            trainer.state.batch_in_epoch += 1
            for prefix in moved:
                unchanged = same(before[prefix], snapshot(prefix))
                if prefix in idle[batch["source"]]:
                    assert unchanged, (batch["source"], prefix)
                else:
                    moved[prefix] += not unchanged
        assert all(moved.values()), moved  # each head trained on the batches with its labels
    finally:
        trainer.close()

def _run(tmp: Path, shards: Path, name: str, mode: str = "none", step: int = 0, *extra: str):
    args = tiny_overrides(shards, tmp, "phase.init_from=null", "model.det_head=fcos",
                          "phase.loss_weights={lung: 1.0, inf: 1.0, cls: 0.3, det: 1.0}", SOURCES,
                          "phase.teacher_forcing={gate: cls_head, p: 0.7}", "schedule.max_steps=8",
                          "run.save_every=2", "run.log_every=3", "model.drop_path_rate=0.1", *extra, name=name)
    return subprocess.run([sys.executable, str(WORKER), str(tmp / f"{name}-out"), mode, str(step), str(DEMO2), *args],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)


def _train_lines(tmp: Path, name: str) -> list[dict]:
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in ("time", "img_per_s")}
            for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.mark.slow
def test_sigterm_mid_alternation_then_resume_is_bit_identical(tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from mtlxray.checkpoint import find_resume, read_state

    full = _run(tmp_path, tiny_shards, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    first = _run(tmp_path, tiny_shards, "split", "term", 2)  # acted on at the next sync point, step 3
    assert first.returncode == EXIT_REQUEUE, first.stderr[-3000:]
    stopped = read_state(find_resume(tmp_path / "split" / "checkpoints"))
    assert stopped.step == 3 and stopped.batch_in_epoch == 3  # cls, inf, cls done: the infection source is next
    second = _run(tmp_path, tiny_shards, "split")
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = _train_lines(tmp_path, "split")
    assert lines == _train_lines(tmp_path, "full")
    assert {"loss/det", "loss/inf", "loss/lung", "loss/cls"} <= set().union(*lines)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ddp_ranks_take_the_same_source_at_every_step(tiny_shards, tmp_path):
    import killable

    bin_dir = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    accelerate = shutil.which("accelerate", path=str(bin_dir)) or shutil.which("accelerate")
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    args = tiny_overrides(tiny_shards, tmp_path, "phase.init_from=null", "model.det_head=fcos",
                          "phase.loss_weights={lung: 1.0, inf: 1.0, cls: 0.3, det: 1.0}", SOURCES,
                          "phase.teacher_forcing={gate: cls_head, p: 0.5}", "schedule.max_steps=4")
    res = killable.run([*launcher, str(WORKER), str(tmp_path / "out"), "none", "0", str(DEMO2), *args], cwd=REPO,
                       env={**cli_env(), "ACCELERATE_USE_CPU": "1"}, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_skipped_shards_count_over_the_run_with_sources_and_reach_the_checkpoint(tiny_shards, tmp_path):
    from mtlxray.checkpoint import read_state
    from mtlxray.train.main import run_training

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    bad = shards / "lung" / "train-000002.tar"
    bad.write_bytes(b"\xff" * bad.stat().st_size)  # the manifest's size, unreadable content
    cfg = load_config(DEMO, tiny_overrides(shards, tmp_path, "data.skip_failed_shards=true", "data.batch_size=3",
                                           "data.sources=[{name: a, subset: lung, tasks: [lung, cls]}]",
                                           "schedule.max_steps=18", "run.log_every=6", "run.eval_every=18",
                                           name="skips"))
    assert run_training(cfg, "none") == 0  # three epochs of 6 batches; the first and the third read the bad shard
    lines = [json.loads(x) for x in (tmp_path / "skips" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_shards"] for r in lines if r["type"] == "train"]
    assert counts == [1, 1, 2], counts  # counted with data.sources, and over the run, not per epoch
    assert read_state(tmp_path / "skips" / "checkpoints" / "last").skipped_shards == 2
