"""Every numeric config field drawn at edge values: refused at load (or at start) in one line naming
the field, or usable by training; never a traceback.

Each draw replaces one field of the tiny training config (a list field: its first element; a
mapping of numbers: one entry). A draw the config accepts is then used: a model field builds the
model and runs a forward and backward pass; any other field starts a trainer and runs one training
step on the tiny shards; and a seeded sample of the accepted draws trains 2 whole steps (validation
and checkpoint included). `launch.*` is read only by `mtlxray submit`, so its draws are loaded only.
`data.sources` entries are left out: each needs a shard set of its own. CI draws one value per
field; MTLXRAY_CONFIG_DRAWS=0 draws every edge value of every field (several minutes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import types
import typing

import pytest
import torch

from _train_support import DEMO, tiny_overrides
from mtlxray.config import Config, load_config
from mtlxray.errors import MtlxError

INTS = (-1, 0, 1, 2, 3)
SEEDS = (-1, 0, 2**32 - 1, 2**32)
FLOATS = (math.nan, math.inf, -math.inf, -1.0, 0.0, 0.5, 1.0, 1.5, 100.0)
DICT_KEYS = {"phase.loss_weights": "lung", "phase.lr_mult": "default"}
FORMER_NAMES = {"phase.infection_classes"}
"""Read for old configs and checked as the field they became (phase.positive_classes, drawn itself)."""
PER_FIELD = int(os.environ.get("MTLXRAY_CONFIG_DRAWS", "1"))
"""Values drawn per field (seeded); 0 draws every edge value of every field."""
TRAINED = 3
"""Accepted draws that also train 2 whole steps."""


def _numeric_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, type, object]]:
    """(dotted key, element type, default) of every int/float field, list of them, or mapping to them."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if key in FORMER_NAMES:
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            # `int | Literal["auto"]` (data.workers) draws as an int; its keyword is checked in test_config
            args = [a for a in typing.get_args(tp) if a is not type(None) and typing.get_origin(a) is not typing.Literal]
            tp = args[0] if len(args) == 1 else None
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(tp):
            found += _numeric_fields(tp, key + ".")
        elif tp in (int, float):
            found.append((key, tp, default))
        elif typing.get_origin(tp) in (list, dict) and typing.get_args(tp)[-1] in (int, float):
            if typing.get_origin(tp) is dict and key not in DICT_KEYS:
                continue  # a label map: names the data's classes, not a number to draw
            found.append((key, tp, default))
    return found


def _yaml(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return ".nan"
    if isinstance(v, float) and math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    return repr(v)


def _draws(base) -> list[tuple[str, str]]:
    """(field, override) pairs: every field, PER_FIELD of its edge values (all of them with 0)."""
    rng = random.Random(0)
    draws = []
    for key, tp, default in _numeric_fields():
        leaf_type = typing.get_args(tp)[-1] if typing.get_origin(tp) else tp
        values = SEEDS if key.endswith("seed") else INTS if leaf_type is int else FLOATS
        chosen = values if PER_FIELD == 0 else rng.sample(values, min(PER_FIELD, len(values)))
        current = _current(base, key)
        for v in chosen:
            if typing.get_origin(tp) is list:
                rest = list(current or default or [])[1:]
                draws.append((key, f"{key}=[{', '.join(_yaml(x) for x in [v, *rest])}]"))
            elif typing.get_origin(tp) is dict:
                draws.append((key, f"{key}.{DICT_KEYS[key]}={_yaml(v)}"))
            else:
                draws.append((key, f"{key}={_yaml(v)}"))
    return draws


def _current(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _use_model(cfg: Config) -> None:
    from mtlxray.model import build_model

    model = build_model(cfg.model, pretrained=False).train()
    out = model(torch.rand(2, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size))
    sum(v.float().mean() for v in out.values() if torch.is_tensor(v)).backward()


def _use_trainer(cfg: Config, whole: bool) -> None:
    from mtlxray.data.loader import batch_to_device
    from mtlxray.train.trainer import Trainer

    trainer = Trainer(cfg, "none")
    try:
        if whole:
            trainer.fit()
        else:
            batch = batch_to_device(next(iter(trainer._batches())), trainer.accelerator.device)
            trainer.model.train()
            trainer._micro_step(batch)
    finally:
        trainer.close()


def test_every_numeric_field_is_refused_in_one_line_or_trains(tiny_shards, tmp_path, capsys):
    def overrides(*extra: str, name: str) -> list[str]:
        # Augmentation on, so that its draws reach the loader (the demo trains without it).
        return tiny_overrides(tiny_shards, tmp_path, "schedule.max_steps=2", "data.augment.enabled=true", *extra,
                              name=name)

    draws = _draws(load_config(DEMO, overrides(name="base")))
    refused, used, failures = 0, [], []
    for i, (key, override) in enumerate(draws):
        try:
            cfg = load_config(DEMO, overrides(override, name=f"d{i}"))
        except MtlxError as e:
            refused += 1
            if "\n" in str(e) or key.rsplit(".", 1)[-1] not in str(e):
                failures.append(f"{override}: refused without naming {key} in one line: {e}")
            continue
        used.append((i, key, override, cfg))
    trained = set(random.Random(1).sample(range(len(used)), min(TRAINED, len(used))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small: a second thread costs more than it computes
    try:
        for j, (i, key, override, cfg) in enumerate(used):
            try:
                if key.startswith("launch."):
                    continue
                if key.startswith("model.") and j not in trained:
                    _use_model(cfg)
                else:
                    _use_trainer(cfg, whole=j in trained)
            except MtlxError as e:  # refused when the run starts: still one named line
                if "\n" in str(e):
                    failures.append(f"{override}: {type(e).__name__} over several lines: {e}")
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                failures.append(f"{override}: {type(e).__name__}: {first}")
    finally:
        torch.set_num_threads(threads)
    fields = len({key for key, _ in draws})
    with capsys.disabled():
        print(f"\nconfig draws: {fields} fields, {len(draws)} values; {refused} refused at load, {len(used)} used "
              f"({len(trained)} trained 2 steps); {len(failures)} tracebacks")
    assert not failures, "\n".join(failures)
