"""Whether a run, its shards and its model fit together, checked from the config alone.

`check_run` is the one list of these checks, in well under a second and before any weights or
workers: the shards (readable, the training and validation splits the config reads), the image
size against the model (models that resize their input take any size), `run.best_metric` among
the model's metrics, no positive `phase.loss_weights` for an output the model does not produce,
`data.sources`, `model.first_stage` and `phase.init_from`. `mtlxray train` raises the first problem,
`mtlxray doctor` reports them all, `mtlxray evaluate` checks the image size (`check_image_size`) and
`mtlxray submit` checks every phase of a chain before submitting it.

What the model produces and whether it resizes its input come from its `ModelSpec`
(`mtlxray.model.registry`); the prefixes of `phase.frozen` and `phase.lr_mult` need the built
model's parameter names and are checked where the model is built (`mtlxray.train.phases`,
`mtlxray.train.optim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mtlxray.checkpoint import resolve_checkpoint
from mtlxray.config import Config, ModelConfig
from mtlxray.data.loader import _labels, label_names, shard_urls, source_config  # _labels: the loader's own label rule
from mtlxray.data.manifest import Manifest, read_manifest, shard_subsets, validation_subset
from mtlxray.data.remote import RetryPolicy
from mtlxray.errors import CheckpointError, ConfigError, MtlxError, ShardError, ShardsNotFoundError
from mtlxray.eval.records import metric_names
from mtlxray.model.registry import model_spec, model_tasks

__all__ = ["Problem", "check_run", "check_image_size", "raise_first"]


@dataclass(frozen=True)
class Problem:
    """One reason a run cannot start: the setting or input at fault, why (with the fix), and the
    error class `mtlxray train` raises for it (its exit code)."""

    what: str
    why: str
    error: type[MtlxError] = ConfigError

    def __str__(self) -> str:
        return f"{self.what}: {self.why}"

    def exception(self) -> MtlxError:
        return self.error(str(self))


def raise_first(problems: Sequence[Problem]) -> None:
    """Raise the first problem as its error class (one line); nothing when there is none."""
    if problems:
        raise problems[0].exception()


def check_run(cfg: Config, manifest: Optional[Manifest] = None, *, resume_from: Optional[Path] = None,
              written_later: Optional[Sequence[Path]] = None) -> list[Problem]:
    """Every reason `cfg` cannot train on its shards, in the order `mtlxray train` meets them.

    `manifest`: the manifest of `cfg.data.shards`, read here when not given. `resume_from`: the
    checkpoint the run resumes (then `phase.init_from` is not read). `written_later`: run folders
    an earlier phase of a chain will write (a chain's phase; [] for the first), so a `phase.init_from`
    under one of them need not exist yet.
    """
    problems: list[Problem] = []
    if manifest is None:
        manifest = _read_shards(cfg, problems)
    if manifest is not None:
        problems += _check_splits(cfg, manifest)
        problems += check_image_size(cfg.model, manifest, cfg.data.shards)
    problems += _check_best_metric(cfg)
    problems += _check_loss_weights(cfg)
    problems += _check_sources(cfg)
    problems += _check_checkpoints(cfg, resume_from, written_later)
    return problems


def _read_shards(cfg: Config, problems: list[Problem]) -> Optional[Manifest]:
    root = cfg.data.shards  # a folder, or an http(s)/s3 URL prefix
    if "://" not in root and not Path(root).exists():
        problems.append(Problem("data.shards", f"{root} does not exist (build it with `mtlxray shards build`)",
                                ShardsNotFoundError))
        return None
    try:
        return read_manifest(root)
    except MtlxError as e:
        problems.append(Problem("data.shards", str(e), type(e)))
        return None


def _check_splits(cfg: Config, manifest: Manifest) -> list[Problem]:
    root, problems = cfg.data.shards, []
    for subset in shard_subsets(cfg.data):
        try:
            if not shard_urls(root, manifest, subset, cfg.data.train_split):
                problems.append(Problem("data.shards", f"{root} has no {subset}/{cfg.data.train_split} shards",
                                        ShardError))
        except MtlxError as e:
            problems.append(Problem("data.shards", str(e), type(e)))
    val = validation_subset(cfg.data)
    if not manifest.entries(val, cfg.data.val_split):
        problems.append(Problem("data.val_split", f"{root} has no {val}/{cfg.data.val_split} shards to validate on"))
    return problems


def check_image_size(model: ModelConfig, manifest: Manifest, root: str | Path) -> list[Problem]:
    """The shards hold `model.img_size`² images, unless the model resizes its input itself."""
    if manifest.image_size == model.img_size or model_spec(model.name).resizes_input:
        return []
    return [Problem("model.img_size", f"a {model.img_size}² model, but the shards in {root} hold "
                    f"{manifest.image_size}² images: use shards built with `--image-size {model.img_size}`")]


def _check_best_metric(cfg: Config) -> list[Problem]:
    tasks = model_tasks(cfg.model, cfg.phase.name)
    classes = label_names(cfg.data)  # model.num_classes matches them (Config checks it at load)
    multilabel = cfg.model.cls_loss == "bce_multilabel"
    gated = cfg.phase.teacher_forcing.gate != "none"
    names = ["val/loss"] + [f"val/{n}" for n in metric_names(sorted(tasks), classes, multilabel, gated)]
    if cfg.run.best_metric in names:
        return []
    return [Problem("run.best_metric", f"`{cfg.run.best_metric}` is not an evaluation metric of {cfg.model.name} "
                    f"in {cfg.phase.name}; choose one of {', '.join(names)}")]


def _check_loss_weights(cfg: Config) -> list[Problem]:
    """A positive weight for an output the model does not produce would train without that loss."""
    tasks = model_tasks(cfg.model, cfg.phase.name)
    extra = sorted(t for t, w in cfg.phase.loss_weights.items() if w > 0 and t not in tasks)
    if not extra:
        return []
    return [Problem("phase.loss_weights", f"{cfg.model.name} produces {sorted(tasks)} in {cfg.phase.name}, not "
                    f"{extra}: set {', '.join(f'phase.loss_weights.{t}=0' for t in extra)}")]


def _check_sources(cfg: Config) -> list[Problem]:
    """Every source's shard set holds its subset's training split, and its classes have labels."""
    problems = []
    for src in cfg.data.sources:
        data = source_config(cfg.data, src)
        try:
            manifest = read_manifest(data.shards, RetryPolicy.from_config(data))
            if not shard_urls(data.shards, manifest, data.subset, data.train_split):
                raise ShardError(f"no {data.subset}/{data.train_split} shards")
            _labels(data, manifest, [data.subset])
        except (ShardError, ConfigError) as e:
            problems.append(Problem(f"data.sources[{src.name}]", str(e)))
    return problems


def _check_checkpoints(cfg: Config, resume_from: Optional[Path],
                       written_later: Optional[Sequence[Path]]) -> list[Problem]:
    problems = []
    if cfg.model.first_stage and cfg.phase.teacher_forcing.gate == "first_stage":
        try:
            resolve_checkpoint(cfg.model.first_stage)
        except CheckpointError as e:
            problems.append(Problem("model.first_stage", f"{e} (train the classifier first)"))
    init = cfg.phase.init_from
    if not init or resume_from is not None:
        return problems
    if written_later is None:
        fix = " (train the previous phase first)"
    elif any(Path(init).resolve().is_relative_to(d) for d in written_later):
        return problems
    else:
        fix = "; no earlier phase of the chain writes it (train that phase first, or chain it before this one)"
    try:
        resolve_checkpoint(init)
    except CheckpointError as e:
        problems.append(Problem("phase.init_from", f"{e}{fix}"))
    return problems
