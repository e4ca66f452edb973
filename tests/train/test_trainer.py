"""The training loop: exact resume after SIGTERM, survival of a SIGKILL mid-write, resumed logs equal to
uninterrupted ones, fallback past an incomplete checkpoint, and no host reads inside a step."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtlxray.errors import EXIT_REQUEUE, CheckpointError
from mtlxray.checkpoint import TrainState, find_resume, load_model_from_checkpoint, read_state

from _train_support import DEMO, REPO, cli_env, error_lines, host_reads_per_step, tiny_overrides

WORKER = Path(__file__).with_name("_worker.py")
TOTAL = 8  # crosses the epoch boundary after 5 steps (10 samples per epoch, batch size 2)


def _run(tmp: Path, shards: Path, name: str, mode: str = "none", step: int = 0, *extra: str):
    args = tiny_overrides(shards, tmp, f"schedule.max_steps={TOTAL}", "run.save_every=2", "data.samples_per_epoch=10", *extra, name=name)
    return subprocess.run([sys.executable, str(WORKER), str(tmp / f"{name}-out"), mode, str(step), str(DEMO), *args],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


def _weights(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / name / "checkpoints" / "last" / "model.safetensors"))


def _train_steps(tmp: Path, name: str) -> list[int]:
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "train"]


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory) -> Path:
    """Output root of the run that nothing interrupts (run name `full`)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    full = _run(tmp, tiny_shards, "full")
    assert full.returncode == 0, full.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_sigterm_then_resume_auto_is_bit_identical_to_uninterrupted(tiny_shards, tmp_path, uninterrupted):
    first = _run(tmp_path, tiny_shards, "split", "term", 3)
    assert first.returncode == EXIT_REQUEUE, first.stderr[-3000:]
    stopped = read_state(find_resume(tmp_path / "split" / "checkpoints"))
    assert 3 <= stopped.step < TOTAL and stopped.batch_in_epoch > 0  # stopped mid-epoch
    second = _run(tmp_path, tiny_shards, "split")
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_bit_identical(_weights(uninterrupted, "full"), _weights(tmp_path, "split"))
    assert _train_steps(tmp_path, "split") == list(range(1, TOTAL + 1))


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_and_completes(tiny_shards, tmp_path, uninterrupted):
    killed = _run(tmp_path, tiny_shards, "k", "kill-in-save", 4)
    assert killed.returncode == -signal.SIGKILL
    root = tmp_path / "k" / "checkpoints"
    assert (root / ".tmp-step-000004" / "model.safetensors").is_file()  # the half-written one
    assert read_state(find_resume(root)).step == 2
    resumed = _run(tmp_path, tiny_shards, "k")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_state(find_resume(root)).step == TOTAL
    assert not (root / ".tmp-step-000004").exists()
    _assert_bit_identical(_weights(uninterrupted, "full"), _weights(tmp_path, "k"))
    assert _train_steps(tmp_path, "k") == list(range(1, TOTAL + 1))


def _train_lines(tmp: Path, name: str) -> list[dict]:
    """Training log lines without the fields that measure time."""
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in ("time", "img_per_s")}
            for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.mark.slow
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tiny_shards, tmp_path, uninterrupted):
    # log_every=3: the interruption after step 4 falls inside a log interval (steps 4-6).
    first = _run(tmp_path, tiny_shards, "logs", "term", 4, "run.log_every=3")
    assert first.returncode == EXIT_REQUEUE, first.stderr[-3000:]
    assert _run(tmp_path, tiny_shards, "logs", "none", 0, "run.log_every=3").returncode == 0
    reference = tmp_path / "ref"
    assert _run(reference, tiny_shards, "logs", "none", 0, "run.log_every=3").returncode == 0
    assert _train_lines(tmp_path, "logs") == _train_lines(reference, "logs")


@pytest.mark.slow
def test_resume_skips_a_checkpoint_without_its_rng_state_and_stays_exact(tiny_shards, tmp_path, uninterrupted):
    first = _run(tmp_path, tiny_shards, "rng", "term", 3)
    assert first.returncode == EXIT_REQUEUE, first.stderr[-3000:]
    last = (tmp_path / "rng" / "checkpoints" / "last").resolve()
    (last / "random_states_0.pkl").unlink()
    second = _run(tmp_path, tiny_shards, "rng")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"skipping {last.name}" in second.stderr and "random_states_0.pkl is missing" in second.stderr
    _assert_bit_identical(_weights(uninterrupted, "full"), _weights(tmp_path, "rng"))


def test_a_corrupt_optimizer_state_fails_in_one_line(tiny_shards, tmp_path):
    from _train_support import error_lines, run_cli

    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=2")
    assert run_cli(["train", "--config", str(DEMO), *args]).returncode == 0
    optimizer = (tmp_path / "t" / "checkpoints" / "last" / "optimizer.bin").resolve()
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size: only loading can tell
    last = (tmp_path / "t" / "checkpoints" / "last").resolve()
    res = run_cli(["train", "--config", str(DEMO), *args[:-1], "schedule.max_steps=4", "--resume", str(last)])
    assert res.returncode == CheckpointError.exit_code
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "cannot load the training state" in lines[0], res.stderr


def test_a_training_step_reads_nothing_back_from_the_device_except_at_log_steps(tiny_shards, tmp_path):
    """Documented in mtlxray.train.trainer: 0 host reads per DDP step, 1 per log step."""
    from mtlxray.config import load_config

    cfg = load_config(DEMO, tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=7", "run.log_every=3",
                                           "run.eval_every=1000", "run.save_every=1000",
                                           "data.samples_per_epoch=100"))
    per_step = host_reads_per_step(cfg)
    assert per_step == {2: 0, 3: 0, 4: 1, 5: 0, 6: 0}, per_step


def test_global_batch_size_derives_the_micro_batch_and_accumulation():
    from mtlxray.config import load_config
    from mtlxray.errors import ConfigError
    from mtlxray.train.trainer import resolve_global_batch

    for world, expected in ((1, (16, 8)), (8, (16, 1)), (32, (4, 1)), (2, (16, 4))):
        cfg = load_config(DEMO, ["data.global_batch_size=128", "data.batch_size=16"])
        resolve_global_batch(cfg, world)
        assert (cfg.data.batch_size, cfg.optim.grad_accum) == expected, world
        assert cfg.data.batch_size * cfg.optim.grad_accum * world == 128
    with pytest.raises(ConfigError, match="3 processes"):
        resolve_global_batch(load_config(DEMO, ["data.global_batch_size=128"]), 3)


def test_compiled_model_trains_to_the_same_losses_as_eager(tiny_shards, tmp_path):
    """run.compile: torch.compile (inductor) through accelerate's dynamo plugin, same maths as eager."""
    from mtlxray.config import load_config
    from mtlxray.train.main import run_training

    losses = {}
    for compiled in ("false", "true"):
        cfg = load_config(DEMO, tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3", "model.drop_path_rate=0",
                                               f"run.compile={compiled}", name=f"compile-{compiled}"))
        assert run_training(cfg, resume="none") == 0
        losses[compiled] = [r["loss"] for r in _train_lines(tmp_path, f"compile-{compiled}")]
    assert len(losses["true"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)


def test_accelerate_launch_precision_flag_is_honoured_or_refused_in_one_line(monkeypatch):
    from mtlxray.config import load_config
    from mtlxray.errors import ConfigError
    from mtlxray.train.accelerator import apply_launcher_flags

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = load_config(DEMO, ["run.precision=auto"])
    apply_launcher_flags(cfg)
    assert cfg.run.precision == "bf16"
    with pytest.raises(ConfigError, match="disagrees with run.precision=fp32"):
        apply_launcher_flags(load_config(DEMO, ["run.precision=fp32"]))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16"):
        apply_launcher_flags(load_config(DEMO))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    cfg = load_config(DEMO, ["run.precision=auto"])
    assert apply_launcher_flags(cfg) == "accelerate launch --mixed_precision no"
    assert cfg.run.compile and cfg.run.precision == "fp32"  # `no` is honoured over auto (it was bf16 here)
    cfg = load_config(DEMO, ["run.precision=bf16"])
    assert apply_launcher_flags(cfg) is None and cfg.run.precision == "bf16"  # an explicit bf16 is kept, warned
