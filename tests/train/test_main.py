"""`mtlxray train` end to end: phase 1 → phase 2, outputs, and fast one-line failures on bad configs."""

import json

import pytest

import torch
from safetensors.torch import load_file

from _train_support import DEMO, DEMO2, error_lines, run_cli, tiny_overrides
from mtlxray.errors import CheckpointError, ConfigError, ShardError
from mtlxray.model import build_model
from mtlxray.train.main import run_training


def test_phase2_starts_from_phase1_best_and_reports_infection_metrics(tiny_cfg, tmp_path):
    assert run_training(tiny_cfg("schedule.max_steps=2", name="p1"), resume="none") == 0
    best = tmp_path / "p1" / "checkpoints" / "best"
    cfg2 = tiny_cfg("schedule.max_steps=2", "data.samples_per_epoch=4", f"phase.init_from={best}", phase2=True, name="p2")
    assert run_training(cfg2, resume="none") == 0
    run = tmp_path / "p2"
    assert (run / "config.yaml").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all("loss/inf" in r and r["img_per_s"] > 0 for r in train)
    evals = [r for r in lines if r["type"] == "eval"]
    assert {"val/inf_dice", "val/lung_dice", "val/accuracy", "val/f1_macro", "val/recall/COVID-19"} <= evals[-1].keys()
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    assert state["phase"] == "phase2" and state["step"] == 2
    # Phase 2 started from phase 1's weights: phase 1's class input conv, which phase 2 never
    # uses or trains, still holds exactly what phase 1 learned.
    p1 = load_file(str(best / "model.safetensors"))
    p2 = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert torch.equal(p1["cls_head.conv_phase1.weight"], p2["cls_head.conv_phase1.weight"])
    fresh = build_model(cfg2.model).state_dict()["cls_head.conv_phase1.weight"]
    assert not torch.equal(fresh, p2["cls_head.conv_phase1.weight"])


def _one_line_failure(res, code: int, *words: str) -> str:
    assert res.returncode == code, res.stderr[-2000:]
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_missing_shards_are_a_config_error_in_one_line(tmp_path):
    res = run_cli(["train", "--config", str(DEMO), f"data.shards={tmp_path}/none", f"run.output_dir={tmp_path}"])
    _one_line_failure(res, ConfigError.exit_code, "data.shards", "does not exist")
    assert not (tmp_path / "phase1").exists()  # failed before creating anything


def test_phase2_without_phase1_checkpoint_is_a_config_error_in_one_line(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, f"phase.init_from={tmp_path}/phase1/checkpoints/best")
    res = run_cli(["train", "--config", str(DEMO2), *args])
    _one_line_failure(res, ConfigError.exit_code, "phase.init_from", "previous phase")


def test_a_best_metric_that_evaluation_never_produces_fails_before_training(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "run.best_metric=val/inf_dice")  # phase 1 has no infection output
    res = run_cli(["train", "--config", str(DEMO), *args])
    _one_line_failure(res, ConfigError.exit_code, "run.best_metric", "val/lung_dice")
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_a_missing_validation_split_fails_before_training(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "data.val_split=holdout")
    res = run_cli(["train", "--config", str(DEMO), *args])
    _one_line_failure(res, ConfigError.exit_code, "data.val_split", "holdout")


def test_a_shard_error_in_a_loader_worker_is_one_line(tiny_shards, tmp_path):
    import shutil

    broken = tmp_path / "shards"
    shutil.copytree(tiny_shards, broken)
    for tar in (broken / "lung").glob("train-*.tar"):
        data = bytearray(tar.read_bytes())
        data[512:1536] = b"\xff" * 1024  # same size, garbage where the second member's header was
        tar.write_bytes(bytes(data))
    args = tiny_overrides(broken, tmp_path, "data.workers=1", "schedule.max_steps=2")
    res = run_cli(["train", "--config", str(DEMO), *args])
    assert res.returncode == ShardError.exit_code
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr and ".tar" in lines[0], res.stderr


def test_image_size_not_matching_shards_is_a_config_error(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "model.img_size=128")
    res = run_cli(["train", "--config", str(DEMO), *args])
    _one_line_failure(res, ConfigError.exit_code, "model.img_size: a 128² model", "--image-size 128")


def test_without_a_terminal_progress_is_a_log_line_per_log_step_not_carriage_returns(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3", "run.progress=true")
    res = run_cli(["train", "--config", str(DEMO), *args])  # stderr is a pipe, as in a Slurm log
    assert res.returncode == 0, res.stderr[-2000:]
    assert "\r" not in res.stderr
    assert all(f"step {k}/3" in res.stderr for k in (1, 2, 3))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process: `run.precision=auto` resolves to bf16 on an
    AVX-512 CPU, which an earlier fp32 test's state would refuse. Reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_training_leaves_the_callers_config_as_it_was(tiny_cfg, fresh_accelerate_state):
    cfg = tiny_cfg("schedule.max_steps=1", "run.precision=auto", "data.global_batch_size=4", name="same")
    before = repr(cfg)
    assert run_training(cfg, resume="none") == 0
    assert repr(cfg) == before


def test_the_phase_log_line_says_what_trains_and_what_is_frozen(tiny_cfg, caplog):
    from mtlxray.train.phases import prepare_phase

    cfg = tiny_cfg(phase2=True)
    with caplog.at_level("INFO", logger="mtlxray.train.phases"):
        prepare_phase(build_model(cfg.model), cfg.phase)
    line = caplog.records[-1].getMessage()
    assert line.startswith("phase2: training ") and "frozen by the phase: 0 (no prefix)" in line
    assert "unused in this mode: " in line  # phase 1's class input conv, not "frozen (none)"


def test_a_corrupt_or_truncated_init_from_checkpoint_fails_in_one_line(tiny_cfg, tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "p1"
    ckpt.mkdir()
    weights = ckpt / "model.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(tiny_cfg().model).state_dict().items()}, str(weights))
    whole = weights.read_bytes()
    for name, damaged in (("cut", whole[: len(whole) // 2]), ("garbled", b"\xff" * 64 + whole[64:])):
        weights.write_bytes(damaged)
        with pytest.raises(CheckpointError) as err:
            run_training(tiny_cfg(f"phase.init_from={ckpt}", phase2=True, name=name), resume="none")
        assert str(weights) in str(err.value) and "corrupt or truncated" in str(err.value)
        assert "\n" not in str(err.value)


def test_a_batch_of_one_with_batch_norm_is_refused_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_training(tiny_cfg("data.batch_size=1", "schedule.max_steps=1", name="b1"), resume="none")
    assert "data.batch_size=1 per process" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b1" / "checkpoints").exists()
