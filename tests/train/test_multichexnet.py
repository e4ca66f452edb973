"""configs/multichexnet/: every stage's config loads, and the five-stage chain runs end to end on tiny data."""

import json
from pathlib import Path

import pytest

from mtlxray.config import load_config

from _train_support import REPO, TINY_MODEL, run_cli

STAGES = sorted((REPO / "configs" / "multichexnet").glob("[0-9]_*.yaml"))
STRICT = sorted((REPO / "configs" / "multichexnet" / "paper_strict").glob("[0-9]_*.yaml"))


def test_the_five_stages_load_and_share_one_architecture():
    assert [p.stem for p in STAGES] == ["1_classifier", "2_detection", "3_segmentation", "4_alternating",
                                       "5_transfer"]
    cfgs = [load_config(p) for p in STAGES]
    arch = {k: v for k, v in vars(cfgs[0].model).items() if k not in ("num_classes", "first_stage")}
    assert all({k: v for k, v in vars(c.model).items() if k not in ("num_classes", "first_stage")} == arch
               for c in cfgs)
    assert cfgs[0].model.det_head == "fcos"
    assert [c.phase.teacher_forcing.gate for c in cfgs] == ["none", "first_stage", "first_stage", "cls_head",
                                                            "cls_head"]
    assert [s.tasks for s in cfgs[3].data.sources] == [["lung", "cls"], ["inf", "det"]]
    assert cfgs[4].model.num_classes == 2 and cfgs[4].phase.positive_classes == [1]


def test_the_paper_strict_chain_trains_as_the_paper_does():
    assert [p.name for p in STRICT] == [p.name for p in STAGES]
    chain, strict = [load_config(p) for p in STAGES], [load_config(p) for p in STRICT]
    for c in strict:
        assert (c.model.det_head, c.model.det_kbox_confidence, c.model.cls_loss, c.phase.seg_loss) == (
            "kbox", False, "bce_multilabel", "bce")
        assert c.run.output_dir != chain[0].run.output_dir
    assert [c.phase.teacher_forcing.per for c in strict[1:]] == ["batch"] * 4
    # The encoder trains in the detection, segmentation and transfer stages; the chain beside it freezes it.
    assert [("encoder" in c.phase.frozen) for c in chain] == [False, True, True, False, True]
    assert not any("encoder" in c.phase.frozen for c in strict)
    assert {"det_head", "cls_head"} & set(strict[1].phase.frozen) == {"cls_head"}
    assert {"inf_decoder", "inf_head", "ppm"} & set(strict[2].phase.frozen) == set()
    # Stage 4 alternates a detection and a segmentation dataset.
    assert [(s.name, s.tasks) for s in strict[3].data.sources] == [("detection", ["det", "cls"]),
                                                                   ("segmentation", ["inf", "cls"])]
    for c in strict[1:]:  # every stage starts from the strict chain's own previous stage
        assert c.phase.init_from.startswith(strict[0].run.output_dir + "/")


def _metrics(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "eval"][-1]


@pytest.mark.slow
def test_the_chain_runs_end_to_end_on_tiny_data(tiny_shards, tmp_path):
    from mtlxray.launch.chain import plan_chain

    common = [f"data.shards={tiny_shards}", "data.batch_size=2", "data.eval_batch_size=8", "data.workers=0",
              "data.shuffle_buffer=8", "data.samples_per_epoch=8", *TINY_MODEL, f"run.output_dir={tmp_path}",
              "run.precision=fp32", "run.tensorboard=false", "run.progress=false", "run.log_every=1",
              "schedule.max_steps=2", "schedule.warmup_steps=1"]
    first = f"model.first_stage={tmp_path / '1_classifier' / 'checkpoints' / 'best'}"
    plans = plan_chain(STAGES, common, {2: [first], 3: [first]})
    logs = []
    for plan in plans:
        res = run_cli(["train", "--config", plan.config, *plan.overrides], timeout=600)
        assert res.returncode == 0, f"{plan.label}: {res.stderr[-3000:]}"
        assert (plan.run_dir / "checkpoints" / "best").exists(), plan.label
        logs.append(res.stderr)
    classifier, detection, segmentation, alternating, transfer = (_metrics(p.run_dir) for p in plans)
    assert "val/f1_macro" in classifier and "val/det_map" in classifier  # the frozen head is still scored
    assert {"val/det_map_50", "val/det_map_50_gated", "val/gate_sensitivity"} <= detection.keys()
    assert {"val/inf_dice", "val/inf_dice_gated", "val/inf_fp_share_gated"} <= segmentation.keys()
    assert {"val/loss/det", "val/loss/inf", "val/det_map", "val/inf_dice_gated"} <= alternating.keys()
    train = [json.loads(line) for line in (plans[3].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in r if k.startswith("loss/")) for r in train if r["type"] == "train"] == [
        ["loss/cls", "loss/lung"], ["loss/det", "loss/inf"]]  # one source, then the other
    assert {"val/accuracy", "val/f1/COVID-19", "val/f1/non-COVID", "val/gate_specificity"} <= transfer.keys()
    assert "re-initialised cls_head.fc.weight" in logs[4]  # 3 -> 2 classes
    assert "first-stage classifier" in logs[1] and "first-stage classifier" in logs[2]
