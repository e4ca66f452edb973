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
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Optional

import numpy as np

from mtlxray.config import DataConfig, SourceConfig
from mtlxray.data.loader import build_train_loader, label_names, read_manifest, shard_urls, train_batches_per_epoch
from mtlxray.data.remote import RetryPolicy
from mtlxray.errors import ConfigError, ShardError

__all__ = ["source_config", "source_order", "batches_per_epoch", "source_batches", "check_sources"]


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
    from mtlxray.data.loader import _labels  # the loader's own class-name -> label rule

    for src in data.sources:
        cfg = source_config(data, src)
        try:
            manifest = read_manifest(cfg.shards, RetryPolicy.from_config(cfg))
            if not shard_urls(cfg.shards, manifest, cfg.subset, cfg.train_split):
                raise ShardError(f"no {cfg.subset}/{cfg.train_split} shards")
            _labels(cfg, manifest, [cfg.subset])
        except (ShardError, ConfigError) as e:
            raise ConfigError(f"data.sources[{src.name}]: {e}") from None
