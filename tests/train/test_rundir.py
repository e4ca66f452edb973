"""The run folder: one run at a time (a lock that dies with its holder), and no silent mixing of runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _train_support import DEMO, REPO, cli_env, error_lines, run_cli, tiny_overrides
from mtlxray.errors import ConfigError
from mtlxray.train.main import run_training


def _weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_resume_none_in_a_used_folder_is_refused_with_one_line(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=2", name="rn")
    assert run_cli(["train", "--config", str(DEMO), *args]).returncode == 0
    before = (tmp_path / "rn" / "metrics.jsonl").read_text()
    res = run_cli(["train", "--config", str(DEMO), *args, "optim.lr=1e-4", "run.seed=7", "--resume", "none"])
    assert res.returncode == ConfigError.exit_code
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "--resume auto" in lines[0] and "--overwrite" in lines[0], res.stderr
    assert (tmp_path / "rn" / "metrics.jsonl").read_text() == before  # nothing touched


def test_overwrite_replaces_the_earlier_run_whole(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=3", name="rn")
    assert run_cli(["train", "--config", str(DEMO), *args]).returncode == 0
    first = _weights(tmp_path / "rn")
    res = run_cli(["train", "--config", str(DEMO), *args, "optim.lr=1e-4", "run.seed=7", "--resume", "none",
                   "--overwrite"])
    assert res.returncode == 0, res.stderr[-2000:]
    second = _weights(tmp_path / "rn")
    for key in ("encoder.patch_embed.proj.weight", "lung_head.conv.weight", "cls_head.fc.weight"):
        assert not torch.equal(first[key], second[key]), key  # the second run's own weights
    lines = [json.loads(x) for x in (tmp_path / "rn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2, 3]  # the new run's lines only
    assert sorted(p.name for p in (tmp_path / "rn" / "checkpoints").glob("step-*")) == ["step-000003"]


def test_a_second_run_in_the_same_folder_fails_at_once_naming_the_holder(tiny_shards, tmp_path):
    args = tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=400", "run.log_every=50", name="busy")
    holder = subprocess.Popen([sys.executable, "-m", "mtlxray.cli", "train", "--config", str(DEMO), *args],
                              cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "busy" / ".lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)
        res = run_cli(["train", "--config", str(DEMO), *args])
        assert res.returncode == 1
        lines = error_lines(res.stderr)
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and socket.gethostname() in lines[0], res.stderr
        # At once: the second run ended while the holder still runs, so it did not wait for the lock;
        # and the holder was not disturbed.
        assert holder.poll() is None
        # The lock dies with its holder (as a requeued job's old process does): the next run gets it.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        res = run_cli(["train", "--config", str(DEMO), *tiny_overrides(
            tiny_shards, tmp_path, "schedule.max_steps=2", name="busy")])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()


def _steps(run) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["type"] == "train"]


def test_resume_with_a_changed_config_is_refused_naming_the_keys_and_keeps_the_record(tiny_cfg, tmp_path):
    assert run_training(tiny_cfg("schedule.max_steps=2", name="cc"), "none") == 0
    run = tmp_path / "cc"
    record = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:  # a finished run: it used to say "nothing to do" and rewrite the record
        run_training(tiny_cfg("schedule.max_steps=2", "optim.lr=5e-4", "run.seed=7", name="cc"), "auto")
    message = str(err.value)
    assert "optim.lr 0.002 -> 0.0005" in message and "run.seed 0 -> 7" in message and "\n" not in message
    assert "--allow-config-change" in message and (run / "config.yaml").read_text() == record
    # Deliberately: nothing is left to train, so the record keeps the values that were trained.
    assert run_training(tiny_cfg("schedule.max_steps=2", "optim.lr=5e-4", name="cc"), "auto",
                        allow_config_change=True) == 0
    assert (run / "config.yaml").read_text() == record
    # Extending the schedule and changing what is logged need no flag; the record follows.
    assert run_training(tiny_cfg("schedule.max_steps=3", "run.log_every=2", "run.eval_every=3", name="cc"), "auto") == 0
    assert _steps(run) == [1, 2, 3] and "max_steps: 3" in (run / "config.yaml").read_text()


def test_resume_auto_without_a_complete_checkpoint_restarts_the_log_at_step_0(tiny_cfg, tmp_path, caplog):
    assert run_training(tiny_cfg("schedule.max_steps=2", name="nc"), "none") == 0
    run = tmp_path / "nc"
    for rng in (run / "checkpoints").glob("step-*/random_states_0.pkl"):
        rng.unlink()  # no checkpoint can resume exactly: --resume auto starts at step 0
    assert run_training(tiny_cfg("schedule.max_steps=2", name="nc"), "auto") == 0
    assert _steps(run) == [1, 2]  # not [1, 2, 1, 2]
    assert any("starting at step 0, and dropped the" in r.getMessage() for r in caplog.records)


def test_workers_auto_trains_and_a_resume_keeps_the_count_it_trained_with(tiny_cfg, tmp_path, monkeypatch, caplog):
    # 4 CPUs: auto gives one loader process on a CPU, which config.yaml records
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    assert run_training(tiny_cfg("schedule.max_steps=2", "data.workers=auto", name="wa"), "none") == 0
    run = tmp_path / "wa"
    assert "workers: 1\n" in (run / "config.yaml").read_text()
    # Requeued where auto gives 0: the epoch's batches depend on the count, so the resume keeps 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    with caplog.at_level("INFO", logger="mtlxray.train.resolve"):
        assert run_training(tiny_cfg("schedule.max_steps=3", "data.workers=auto", name="wa"), "auto") == 0
    assert _steps(run) == [1, 2, 3] and "workers: 1\n" in (run / "config.yaml").read_text()
    assert any(r.getMessage().startswith("config: data.workers 0 -> 1 (the count") for r in caplog.records)
