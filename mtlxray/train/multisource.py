"""Alternating disjoint datasets (`data.sources`): shard sets that take turns, batch by batch.

Each source is an ordinary training pipeline (`mtlxray.data.loader.build_train_loader` on a copy
of `data` with the source's shards, subset, label scheme and label map), and each of its batches
carries `tasks`, the labels the source has, so that the step computes only those losses
(`mtlxray.train.losses.multitask_loss`; the model's other heads get an exactly zero gradient).

Which source batch b of an epoch comes from is a pure function of (run.seed, epoch, b)
(`source_order`): `alternate` cycles through the sources, `weighted` draws by their weights. Every
rank computes the same order, so all ranks run the same heads at the same step (DDP), and the
data position needs no new state: after a resume at batch k of an epoch, source s has given
exactly `order[:k].count(s)` batches, and its loader restarts there (`start_batch`), so a resumed
run sees the batches an uninterrupted one would.

An epoch is `data.samples_per_epoch` samples, or by default the sum of the sources' training
splits; each source's loader is sized to the batches the order asks of it.

`IdleParameters` keeps the heads a batch has no labels for still: their exactly zero gradient
would still move them under Adam (its moments) and AdamW (its decay), so after the backward pass
their gradients are set to None, which the optimizer skips.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from typing import Optional

import numpy as np
import torch
from torch import nn

from mtlxray.config import DataConfig, SourceConfig
from mtlxray.data.loader import (_labels, build_train_loader, label_names, read_manifest, shard_urls,
                                 train_batches_per_epoch)
from mtlxray.data.remote import RetryPolicy
from mtlxray.errors import ConfigError, ShardError

__all__ = ["source_config", "source_order", "batches_per_epoch", "source_batches", "check_sources",
           "reached_parameters", "IdleParameters"]


def source_config(data: DataConfig, src: SourceConfig) -> DataConfig:
    """The data config of one source: `data` with the source's shards, subset, scheme and label map."""
    label_map = dict(src.label_map or data.label_map)
    return dataclasses.replace(
        data, shards=src.shards or data.shards, subset=src.subset, classes=src.classes or data.classes,
        label_map=label_map, class_names=label_names(data) if label_map else [], sources=[])


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint32)[0] >> 1)


def source_order(data: DataConfig, seed: int, epoch: int, n_batches: int) -> list[int]:
    """The source index of each batch of an epoch (the same on every rank)."""
    n = len(data.sources)
    if data.source_schedule == "alternate":
        return [b % n for b in range(n_batches)]
    weights = np.array([s.weight for s in data.sources], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    return rng.choice(n, size=n_batches, p=weights / weights.sum()).tolist()


def batches_per_epoch(data: DataConfig, world_size: int) -> int:
    """Batches each rank takes per epoch: `train_batches_per_epoch`, or with sources their sum
    (or `data.samples_per_epoch` over the global batch)."""
    if not data.sources:
        return train_batches_per_epoch(data, world_size)
    if data.samples_per_epoch is not None:
        return max(1, data.samples_per_epoch // (data.batch_size * world_size))
    return sum(train_batches_per_epoch(source_config(data, s), world_size) for s in data.sources)


def source_batches(data: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int,
                   start_batch: int = 0, wrap=None, loaders: Optional[list] = None) -> Iterator[dict]:
    """This rank's batches of an epoch from batch `start_batch` on, each with `tasks` set.

    `wrap`: applied to each source's loader before iterating it (the trainer keeps the global RNG
    untouched with `mtlxray.train.validation.iterate_keeping_rng`). `loaders`: a list that receives
    each source's `TrainLoader` (whose `skipped_shards` the trainer counts)."""
    total = batches_per_epoch(data, world_size)
    order = source_order(data, seed, epoch, total)
    iterators: dict[int, Iterator[dict]] = {}
    for k, src in enumerate(data.sources):  # every loader starts (and prefetches) before the first batch
        count, done = order.count(k), order[:start_batch].count(k)
        if count > done:
            cfg = dataclasses.replace(source_config(data, src), samples_per_epoch=count * data.batch_size * world_size)
            loader = build_train_loader(cfg, seed=_seed(seed, k + 1), epoch=epoch, rank=rank, world_size=world_size,
                                        start_batch=done)
            if loaders is not None:
                loaders.append(loader)
            it = iter(wrap(loader) if wrap else loader)
            iterators[k] = itertools.chain([next(it)], it)  # start it now: no loader set-up inside a step
    tasks = [tuple(s.tasks) for s in data.sources]
    for b in range(start_batch, total):
        k = order[b]
        batch: Optional[dict] = next(iterators[k], None)
        if batch is None:
            return
        batch["tasks"] = tasks[k]
        batch["source"] = data.sources[k].name
        yield batch


def check_sources(data: DataConfig) -> None:
    """Preflight: every source's shard set holds its subset's training split, and its classes have labels."""
    for src in data.sources:
        cfg = source_config(data, src)
        try:
            manifest = read_manifest(cfg.shards, RetryPolicy.from_config(cfg))
            if not shard_urls(cfg.shards, manifest, cfg.subset, cfg.train_split):
                raise ShardError(f"no {cfg.subset}/{cfg.train_split} shards")
            _labels(cfg, manifest, [cfg.subset])
        except (ShardError, ConfigError) as e:
            raise ConfigError(f"data.sources[{src.name}]: {e}") from None


def reached_parameters(roots: Iterable[torch.Tensor]) -> set[int]:
    """ids of the leaf tensors (parameters) whose gradient the backward pass of `roots` computes:
    a walk of their autograd graph on the host (no device read)."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen, leaves = set(), set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf's gradient
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


class IdleParameters:
    """The trained parameters that no loss of an accumulation window reaches, given no gradient.

    A batch of a source without some labels (`tasks`) computes only its own losses; the heads
    upstream of none of them get an exactly zero gradient (kept in the graph for DDP's reduction,
    `mtlxray.train.losses`). Adam would still move them by its moments, AdamW also by its decay;
    `release()` sets their gradients to None after the backward pass (after DDP's all-reduce, on
    every rank alike: every rank takes the same source at the same step), and the optimizer skips
    a parameter without a gradient, so their weights and optimizer state stay bit-identical.

    Which parameters a set of tasks reaches is found once per set by walking the graph of its
    losses, then cached: the model's graph for given tasks is the same at every step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self._idle_by_tasks: dict[tuple[str, ...], frozenset[int]] = {}
        self._window: Optional[frozenset[int]] = None

    def observe(self, tasks: Optional[Iterable[str]], parts: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch: its carried `tasks` (None: every label) and its loss parts."""
        if tasks is None:
            idle: frozenset[int] = frozenset()
        else:
            key = tuple(tasks)
            if key not in self._idle_by_tasks:
                reached = reached_parameters(parts.values())
                self._idle_by_tasks[key] = frozenset(id(p) for p in self.trained if id(p) not in reached)
            idle = self._idle_by_tasks[key]
        self._window = idle if self._window is None else self._window & idle

    def release(self) -> int:
        """At the optimizer step: drop the gradients of the window's idle parameters; returns how many."""
        idle, self._window = self._window or frozenset(), None
        for p in self.trained:
            if id(p) in idle:
                p.grad = None
        return len(idle)
