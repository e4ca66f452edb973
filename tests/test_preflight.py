"""`mtlxray.preflight.check_run`: the run/shards/model checks `train` raises and `doctor` lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlxray.config import load_config
from mtlxray.errors import ConfigError, ShardError, ShardsNotFoundError
from mtlxray.preflight import Problem, check_run, raise_first
from mtlxray.train.trainer import preflight

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "configs" / "baselines"


@pytest.fixture(scope="module")
def shards64(tmp_path_factory) -> Path:
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("preflight-shards"), format="raw", image_size=64)


def test_a_classifier_that_resizes_its_input_fits_shards_of_another_size(shards64):
    classifier = load_config(BASELINES / "swin_t_cls.yaml", [f"data.shards={shards64}"])
    assert classifier.model.img_size == 224
    assert check_run(classifier) == []
    preflight(classifier, None)
    segmenter = load_config(BASELINES / "unet.yaml", [f"data.shards={shards64}"])
    (problem,) = check_run(segmenter)
    assert problem.what == "model.img_size" and "--image-size 256" in str(problem)


def test_a_positive_loss_weight_for_an_output_the_model_lacks_is_refused(shards64):
    over = [f"data.shards={shards64}", "model.img_size=64"]
    assert check_run(load_config(BASELINES / "unet.yaml", [*over, "phase.loss_weights.cls=0.0"])) == []
    cfg = load_config(BASELINES / "unet.yaml", [*over, "phase.loss_weights.cls=0.5"])
    with pytest.raises(ConfigError, match=r"^phase.loss_weights: unet produces \['lung'\] in phase1, not \['cls'\]"):
        preflight(cfg, None)


def test_every_problem_is_listed_in_order_and_train_raises_the_first_as_its_error(shards64, tmp_path):
    cfg = load_config(REPO / "configs" / "demo_phase2.yaml",
                      [f"data.shards={shards64}", "data.val_split=nope", "run.best_metric=val/nope",
                       f"phase.init_from={tmp_path / 'no-run'}"])
    problems = check_run(cfg)
    assert [p.what for p in problems] == ["data.val_split", "model.img_size", "run.best_metric", "phase.init_from"]
    assert all(isinstance(p, Problem) and p.error is ConfigError for p in problems)
    assert "train the previous phase first" in str(problems[-1])
    with pytest.raises(ConfigError) as raised:
        raise_first(problems)
    assert str(raised.value) == str(problems[0]) == f"data.val_split: {shards64} has no infection/nope shards to " \
                                                      "validate on"
    # resuming: phase.init_from is not read
    assert "phase.init_from" not in [p.what for p in check_run(cfg, resume_from=tmp_path)]


def test_missing_shards_keep_their_error_class(shards64, tmp_path):
    (tmp_path / "empty").mkdir()
    problems = check_run(load_config(BASELINES / "swin_t_cls.yaml", [f"data.shards={tmp_path / 'empty'}"]))
    assert [(p.what, p.error) for p in problems] == [("data.shards", ShardsNotFoundError)]
    assert ShardsNotFoundError.exit_code == 2
    cfg = load_config(BASELINES / "swin_t_cls.yaml", [f"data.shards={shards64}", "data.subset=infection",
                                                       "data.train_split=nope", "data.val_split=val"])
    (problem,) = check_run(cfg)
    assert problem.error is ShardError and "no samples for subset 'infection', split 'nope'" in str(problem)


def test_each_training_source_is_checked_under_its_own_name(shards64, tmp_path):
    sources = (f"data.sources=[{{name: seg, subset: lung, tasks: [lung, cls]}}, "
               f"{{name: far, shards: {tmp_path / 'nowhere'}, subset: infection, tasks: [inf]}}]")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards64}", "model.img_size=64", sources])
    (problem,) = check_run(cfg)
    assert problem.what == "data.sources[far]" and "shard manifest not found" in problem.why
