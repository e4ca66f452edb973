"""Exact resume after SIGTERM, survival of a SIGKILL mid-write, and loading weights back."""

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

from _train_support import DEMO, REPO, cli_env, tiny_overrides

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


def test_load_model_from_checkpoint_rebuilds_model_and_config(uninterrupted):
    model, cfg = load_model_from_checkpoint(uninterrupted / "full" / "checkpoints" / "last")
    saved = _weights(uninterrupted, "full")
    _assert_bit_identical({k: v for k, v in model.state_dict().items() if k in saved}, saved)
    assert cfg.run.name == "full" and cfg.schedule.max_steps == TOTAL
    out = model(torch.rand(1, 1, cfg.model.img_size, cfg.model.img_size))
    assert out["lung"].shape == (1, 1, cfg.model.img_size, cfg.model.img_size)


def test_load_model_from_checkpoint_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model_from_checkpoint(tmp_path / "nowhere")


def test_find_resume_ignores_incomplete_checkpoints(tmp_path):
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "step-000002" / "state.json").write_text(TrainState(step=2).to_json())
    (tmp_path / "step-000002" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "step-000004").mkdir()  # no state.json: never completed
    (tmp_path / ".tmp-step-000006").mkdir()
    assert find_resume(tmp_path) == tmp_path / "step-000002"
