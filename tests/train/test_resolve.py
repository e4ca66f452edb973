"""mtlxray.train.resolve: the config a run trains with, from the file's and the environment, without changing it."""

import copy
import logging
import os

import pytest

from mtlxray.config import load_config
from mtlxray.dist import WorldInfo
from mtlxray.errors import ConfigError
from mtlxray.train.resolve import resolve, resolve_global_batch

from _train_support import DEMO

ONE = WorldInfo(0, 0, 1, 1, 0, "local")


def test_resolve_leaves_the_callers_config_as_it_was_and_logs_each_difference(caplog):
    cfg = load_config(DEMO, ["run.precision=auto", "run.compile=false", "data.global_batch_size=128",
                             "data.batch_size=16", "optim.grad_accum=1"])
    before = copy.deepcopy(cfg)
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "inductor"}
    with caplog.at_level(logging.INFO, logger="mtlxray.train.resolve"):
        resolved, source = resolve(cfg, env, WorldInfo(0, 0, 2, 2, 0, "torchrun"), device_type="cpu")
    assert cfg == before
    assert (resolved.run.precision, resolved.run.compile) == ("fp32", True)
    assert (resolved.data.batch_size, resolved.optim.grad_accum) == (16, 4)
    assert source == "accelerate launch --mixed_precision no"
    assert sorted(r.getMessage() for r in caplog.records) == [
        "config: optim.grad_accum 1 -> 4", "config: run.compile False -> True", "config: run.precision auto -> fp32"]


def test_resolve_logs_nothing_when_the_environment_changes_nothing(caplog):
    cfg = load_config(DEMO, ["run.precision=fp32"])
    with caplog.at_level(logging.INFO, logger="mtlxray.train.resolve"):
        resolved, source = resolve(cfg, {}, ONE, device_type="cpu")
    assert resolved == cfg and resolved is not cfg
    assert source == "run.precision=fp32" and not caplog.records


def test_accelerate_launch_precision_flag_is_honoured_or_refused_in_one_line():
    def precision(env: dict, *overrides: str) -> tuple[str, str]:
        resolved, source = resolve(load_config(DEMO, list(overrides)), env, ONE, device_type="cpu")
        return resolved.run.precision, source

    assert precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, "run.precision=auto") == (
        "bf16", "accelerate launch --mixed_precision bf16")
    with pytest.raises(ConfigError, match="disagrees with run.precision=fp32"):
        precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, "run.precision=fp32")
    with pytest.raises(ConfigError, match="fp16"):
        precision({"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(ConfigError, match="dynamo_backend eager"):
        precision({"ACCELERATE_DYNAMO_BACKEND": "eager"})
    # `no` is honoured over auto; an explicit bf16 is kept (with a warning line).
    assert precision({"ACCELERATE_MIXED_PRECISION": "no"}, "run.precision=auto")[0] == "fp32"
    assert precision({"ACCELERATE_MIXED_PRECISION": "no"}, "run.precision=bf16") == ("bf16", "run.precision=bf16")


def test_global_batch_size_derives_the_micro_batch_and_accumulation():
    for world, expected in ((1, (16, 8)), (8, (16, 1)), (32, (4, 1)), (2, (16, 4))):
        cfg = load_config(DEMO, ["data.global_batch_size=128", "data.batch_size=16"])
        resolve_global_batch(cfg, world)
        assert (cfg.data.batch_size, cfg.optim.grad_accum) == expected, world
        assert cfg.data.batch_size * cfg.optim.grad_accum * world == 128
    with pytest.raises(ConfigError, match="3 processes"):
        resolve_global_batch(load_config(DEMO, ["data.global_batch_size=128"]), 3)


@pytest.mark.parametrize("cpus, world, expected", [
    (8, ONE, 1),  # a CPU run with CPUs to spare: one loader process
    (8, WorldInfo(0, 0, 4, 4, 0, "torchrun"), 0),  # four processes share the 8: 2 each, decode in process
    (3, ONE, 0),
])
def test_workers_auto_resolves_from_the_cpus_and_processes_and_is_logged(monkeypatch, caplog, cpus, world, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    cfg = load_config(DEMO, ["data.workers=auto", "run.precision=fp32"])
    with caplog.at_level(logging.INFO, logger="mtlxray.train.resolve"):
        resolved, _ = resolve(cfg, {}, world, device_type="cpu")
    assert resolved.data.workers == expected and cfg.data.workers == "auto"
    messages = [r.getMessage() for r in caplog.records]
    assert f"config: data.workers auto -> {expected}" in messages
    assert any(m.startswith("data.workers: auto on CPU with ") for m in messages)
