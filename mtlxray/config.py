"""Typed configuration: dataclasses loaded from YAML, with `extends:` inheritance and dotted overrides.

A config is given by path or by the name of a shipped config (`phase1`; mtlxray.resources). A
config file is a mapping whose top-level keys are the fields of `Config` (plus an optional
`extends: other.yaml`, resolved relative to the file, else as a shipped config's name). Command
lines add `a.b=c` overrides whose values are parsed as YAML scalars. Every key is checked against
the dataclass fields and every value against the field's type, so a typo fails loudly with the
key, the file and the allowed keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mtlxray.errors import ConfigError, error_line
from mtlxray.resources import find_config, shipped_config

__all__ = [
    "AugmentConfig", "SourceConfig", "DataConfig", "ModelConfig", "TeacherForcingConfig", "OptimConfig",
    "ScheduleConfig", "PhaseConfig", "RunConfig", "LaunchConfig", "Config", "ConfigError", "load_config", "config_from_dict", "config_to_dict",
    "dump_config", "apply_overrides",
]


def _require_at_least(section: str, config: Any, low: int, *names: str) -> None:
    """ConfigError naming the first field of `names` below `low` (NaN included); None, an unset
    optional field, passes."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value >= low:
            raise ConfigError(f"{section}.{name} must be >= {low}, got {value}")


@dataclass(kw_only=True)
class AugmentConfig:
    """Training-time augmentation, applied identically to the image and its masks.

    There is deliberately no horizontal flip: chest anatomy is not left-right symmetric.
    """

    enabled: bool = True
    on_device: bool = False
    """Warp and adjust whole batches on the training device (GPU) instead of per sample in the
    loader processes; the per-sample parameters are drawn the same way either way."""
    rotate_deg: float = 7.0
    """Maximum absolute rotation, degrees."""
    translate: float = 0.05
    """Maximum shift as a fraction of the image side."""
    scale: float = 0.05
    """Maximum relative zoom (0.05 means 0.95..1.05), below 1."""
    brightness: float = 0.1
    """Maximum additive brightness change on the [0, 1] image."""
    contrast: float = 0.1
    """Maximum relative contrast change, below 1."""

    def __post_init__(self) -> None:
        for name in ("rotate_deg", "translate", "scale", "brightness", "contrast"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"data.augment.{name} must be a finite number >= 0, got {value}")
        for name in ("scale", "contrast"):  # a factor 1 ± value: at 1 or more it reaches 0 or turns negative
            if getattr(self, name) >= 1:
                raise ConfigError(f"data.augment.{name} must be < 1 (the factor is 1 ± {name}), "
                                  f"got {getattr(self, name)}")

    @property
    def in_loader(self) -> bool:
        """Whether the loader processes warp the samples (the costly part of their work)."""
        return self.enabled and not self.on_device


SOURCE_TASKS = ("lung", "inf", "det", "cls")
"""Labels a training source can carry: lung masks, infection masks, infection boxes, the class."""


@dataclass(kw_only=True)
class SourceConfig:
    """One shard set of `data.sources` (alternating disjoint datasets; docs/multichexnet.md)."""

    name: str
    """A short name for logs and errors."""
    shards: Optional[str] = None
    """Shard root of this source; default: data.shards."""
    subset: Literal["lung", "infection"] = "lung"
    """Subset of the shard set to train on."""
    tasks: list[str] = field(default_factory=lambda: ["lung", "cls"])
    """The labels this source carries (of lung, inf, det, cls): a batch from it computes only these
    losses; the model's other heads get an exactly zero gradient in that step."""
    classes: Optional[Literal["covid3", "radiography4"]] = None
    """Label scheme of its shards' class names (default: data.classes)."""
    label_map: dict[str, int] = field(default_factory=dict)
    """Class name as stored in the shards (e.g. `Viral Pneumonia`) -> the model's label; empty: the
    label scheme's labels (or data.label_map when that is set)."""
    weight: float = 1.0
    """Share of the batches with `data.source_schedule: weighted` (relative to the other sources)."""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("data.sources: every source needs a non-empty name")
        bad = [t for t in self.tasks if t not in SOURCE_TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"data.sources[{self.name}].tasks: {bad or 'empty'}; choose from {', '.join(SOURCE_TASKS)}")
        if {"inf", "det"} & set(self.tasks) and self.subset != "infection":
            raise ConfigError(f"data.sources[{self.name}]: tasks inf/det need infection masks: subset must be infection")
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(f"data.sources[{self.name}].weight must be finite and > 0, got {self.weight}")
        if self.shards == "":
            raise ConfigError(f"data.sources[{self.name}].shards is empty; leave it out to use data.shards")


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how they are streamed."""

    shards: str = "shards/synthetic"
    """Shard root holding manifest.json and <subset>/<split>-NNNNNN.tar: a folder, or an
    `http(s)://host/prefix` or `s3://bucket/prefix` URL (streamed; see docs/data.md)."""
    subset: Literal["lung", "infection", "mixed", "alternate"] = "lung"
    """Training subset; `mixed` interleaves lung and infection samples, `alternate` whole batches."""
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = 16
    """Per-process batch size; with `global_batch_size`, the largest per-process micro-batch."""
    global_batch_size: Optional[int] = None
    """Images per optimizer step across all processes. When set, the per-process micro-batch and
    optim.grad_accum are derived from the world size (the fewest accumulation steps whose
    micro-batch fits `batch_size`), so a recipe means the same on 1 GPU or 32; the resolved values
    are what the run's config.yaml records."""
    eval_batch_size: int = 32
    workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes per training process, or `auto`: what the device needs to be fed
    (a table per GPU model from the `loader` benchmark), at most the process's CPUs less one; on a
    CPU one from 4 CPUs on, else none. The run's config.yaml records the number it resolved to."""
    shuffle_buffer: int = 1000
    samples_per_epoch: Optional[int] = None
    """Global samples per training epoch; default: the manifest's count for the training split."""
    verify: bool = False
    """Check every shard's sha256 against the manifest before training."""
    classes: Literal["covid3", "radiography4"] = "covid3"
    """Label scheme of `label`: covid3 (Normal, Non-COVID, COVID-19; the Radiography DB's
    Lung_Opacity and Viral Pneumonia fold into Non-COVID) or radiography4 (Normal, Lung_Opacity,
    COVID, Viral Pneumonia; Radiography DB shards only). Labels come from each sample's class name,
    so one shard set serves both; model.num_classes must match (3 or 4)."""
    fraction: float = 1.0
    """Train on this fraction of the training split, in (0, 1]: a fixed, seeded, per-class selection
    of sample keys (the same every epoch); epochs shrink to match unless samples_per_epoch is set."""
    fraction_seed: int = 0
    """Seed of the `fraction` selection (independent of run.seed, so runs can share a subset)."""
    skip_failed_shards: bool = False
    """Training only: a shard that still fails after the retries is skipped (and counted in the
    loader's `skipped_shards`) instead of failing the run. Evaluation never skips."""
    remote_retries: int = 5
    """Remote shards: failed attempts in a row (connection drop, timeout, 5xx) before a read fails."""
    remote_backoff_s: float = 0.5
    """Remote shards: wait before the first retry, doubled per retry (capped at 30 s)."""
    remote_timeout_s: float = 30.0
    """Remote shards: socket timeout of each connect and read, in seconds."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    label_map: dict[str, int] = field(default_factory=dict)
    """Class name as the shards store it -> the model's label, replacing the `classes` scheme's labels
    in training, validation and evaluation (e.g. `{Normal: 0, Non-COVID: 0, COVID-19: 1}` for a
    2-class transfer). Needs `class_names`; every class of the shards must be mapped."""
    class_names: list[str] = field(default_factory=list)
    """Names of the model's labels in label order when `label_map` is set (what reports show)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Alternating disjoint datasets: shard sets that take turns, batch by batch, each training only
    the heads it has labels for (docs/multichexnet.md). Empty: train on
    `shards`/`subset`. Validation always uses `shards`, `subset` and `val_split`."""
    source_schedule: Literal["alternate", "weighted"] = "alternate"
    """With `sources`: `alternate` takes one batch from each source in turn; `weighted` draws the
    source of each batch by the sources' weights (seeded by run.seed, epoch and batch, so every
    rank takes the same source at the same step and a resume replays the same order)."""

    def __post_init__(self) -> None:
        if self.label_map and not self.class_names:
            raise ConfigError("data.label_map needs data.class_names: the names of the model's labels in order")
        if self.class_names and not self.label_map:
            raise ConfigError("data.class_names renames labels only together with data.label_map")
        bad = {k: v for k, v in self.label_map.items() if not 0 <= v < len(self.class_names)}
        if bad:
            raise ConfigError(f"data.label_map: labels {bad} are outside 0..{len(self.class_names) - 1} "
                              f"(data.class_names has {len(self.class_names)})")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        _require_at_least("data", self, 1, "global_batch_size", "samples_per_epoch")
        if self.workers != "auto" and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                       or self.workers < 0):
            raise ConfigError(f"data.workers must be auto or an integer >= 0, got {self.workers!r}")
        _require_at_least("data", self, 0, "shuffle_buffer", "fraction_seed", "remote_retries", "remote_backoff_s")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"data.fraction must be in (0, 1], got {self.fraction}")
        if not self.remote_timeout_s > 0.0:
            raise ConfigError(f"data.remote_timeout_s must be > 0, got {self.remote_timeout_s}")


@dataclass(kw_only=True)
class ModelConfig:
    """The multi-task Swin-UNet (or a baseline from the registry)."""

    name: str = "mtl_swin_unet"
    img_size: int = 256
    in_chans: int = 1
    patch_size: int = 4
    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    ppm_bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    ppm_channels: int = 192
    decoder_channels: list[int] = field(default_factory=lambda: [384, 192, 96, 48])
    cross_attn_heads: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    head_channels: int = 24
    num_classes: int = 3
    cls_channels: int = 64
    cls_use_bottleneck: bool = False
    """Also feed pooled bottleneck features to the class head (off: the paper's mask-only head)."""
    cls_loss: Literal["ce", "bce_multilabel"] = "ce"
    """Class loss: `ce` (softmax cross-entropy; class probabilities are a softmax) or
    `bce_multilabel` (a sigmoid and binary cross-entropy per class against the one-hot label, as
    MultiCheXNet's classifier; class probabilities are then independent sigmoids, and evaluation
    adds F1 at probability 0.5 per class and macro, `f1_at_0.5/<class>`, `f1_at_0.5_macro`)."""
    input_norm: bool = True
    """Standardise the [0, 1] image ((x - 0.5) / 0.25) before the encoder; the paper does not say."""
    grad_checkpoint: Literal["none", "attention", "block", "selective"] = "none"
    attention: Literal["auto", "sdpa", "explicit", "flex"] = "auto"
    """Window-attention kernel; `auto` picks the measured-faster one per dtype."""
    # --- model zoo (docs/baselines.md); weights always come from local files, never a hub.
    pretrained: Optional[str] = None
    """Local checkpoint of the whole library model, loaded when the model is built: a timm
    classifier checkpoint (`swin_t_cls`, `vit_b_cls`, `dinov2_cls`, `beitv2_cls`; RGB weights are
    adapted to `in_chans` by timm, a head of another class count is re-initialised) or an open_clip
    checkpoint (`clip_zeroshot`). .safetensors, or .pth/.bin read with weights_only=True."""
    encoder_pretrained: Optional[str] = None
    """Local checkpoint for the encoder only: a timm Swin-T checkpoint for `mtl_swin_unet` (names
    mapped onto ours, RGB patch filters summed into one channel), or a checkpoint of the smp
    encoder for `unet`/`unetpp`/`deeplabv3p`/`mtl_unet` (a timm checkpoint for `tu-` encoders)."""
    encoder: str = "tu-resnet34"
    """segmentation-models-pytorch encoder of the smp baselines: `tu-<timm name>` or an smp name."""
    timm_name: Optional[str] = None
    """timm architecture of a classifier baseline; default: the baseline's own (e.g.
    `vit_small_patch14_dinov2` for `dinov2_cls`; `vit_base_patch14_dinov2` is the next size up)."""
    lib_kwargs: dict[str, int | float | bool | str | list[int]] = field(default_factory=dict)
    """Extra keyword arguments for the library constructor (the smp model class, timm.create_model),
    e.g. `{decoder_channels: [128, 64, 32, 16, 8]}` for smp or `{drop_path_rate: 0.1}` for timm."""
    clip_arch: str = "ViT-B-32"
    """open_clip architecture of `clip_zeroshot`: a built-in name or a path to a model-config JSON."""
    prompts: list[list[str]] = field(default_factory=list)
    """`clip_zeroshot`: text prompts per class, in label order (their embeddings are averaged);
    empty: built-in prompts for the 3 classes Normal, Non-COVID, COVID-19."""

    # --- detection and the first-stage classifier (docs/multichexnet.md)
    det_head: Literal["none", "fcos", "kbox"] = "none"
    """Infection-box head (`model.det_head`, output `det`): `fcos`, an anchor-free FCOS-style head
    on one feature map (per location an objectness, a centre-ness and the distances to the four
    box sides; GIoU + focal loss; the default choice: infection opacities are small, many and
    irregular, and a dense head needs no anchors and no cap on their number); `kbox`,
    MultiCheXNet's K boxes (ReLU outputs) regressed from pooled features with an L2 loss against
    the ground-truth boxes matched by overlap; `none`: no detection head. For models with a
    spatial encoder (the Swin-UNet and the smp baselines)."""
    det_features: Literal["encoder", "decoder"] = "encoder"
    """What the detection head reads: the encoder's map at stride `det_stride`, or the (infection)
    decoder's last features average-pooled to that stride."""
    det_stride: int = 8
    """Stride of the detection head's feature map (input pixels per location)."""
    det_channels: int = 64
    """Width of the detection head's convolutions (`fcos`) or hidden layer (`kbox`)."""
    det_max_boxes: int = 10
    """K of `kbox`, and the most boxes kept per image after NMS (both heads)."""
    det_kbox_confidence: bool = False
    """`kbox` also predicts a confidence per box, trained with BCE (matched or not) and used as
    the box's score; off (MultiCheXNet's head): boxes only, each scored 0.5."""
    det_score_threshold: float = 0.3
    """A box is reported (predict, the report's boxes, the false-positive share on negatives) when
    its score is at least this; mAP uses every box kept after NMS."""
    det_nms_iou: float = 0.5
    """IoU above which NMS drops the lower-scored of two boxes."""
    first_stage: Optional[str] = None
    """A trained classification checkpoint (any model with a class output), frozen and used as the
    gate when `phase.teacher_forcing.gate: first_stage`, in training and at inference."""

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_heads):
            raise ConfigError("model.depths and model.num_heads must have the same length")
        if len(self.decoder_channels) != len(self.cross_attn_heads):
            raise ConfigError("model.decoder_channels and model.cross_attn_heads must have the same length")
        _require_at_least("model", self, 1, "window_size", "patch_size", "embed_dim", "img_size", "ppm_channels",
                          "head_channels", "cls_channels")
        if self.in_chans != 1:
            raise ConfigError(f"model.in_chans must be 1: the images are grayscale (one channel), got {self.in_chans}")
        for name in ("depths", "num_heads", "ppm_bins", "decoder_channels", "cross_attn_heads"):
            values = getattr(self, name)
            least = 0 if name == "depths" else 1
            if not values or any(v < least for v in values):
                raise ConfigError(f"model.{name} must be a non-empty list of numbers >= {least}, got {values}")
        if not math.isfinite(self.mlp_ratio) or self.embed_dim * self.mlp_ratio < 1:
            raise ConfigError(f"model.mlp_ratio must be a finite number > 0 (at least 1/embed_dim), "
                              f"got {self.mlp_ratio}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2, got {self.num_classes}")
        for name in ("pretrained", "encoder_pretrained", "timm_name"):
            if getattr(self, name) == "":
                raise ConfigError(f"model.{name} is empty; leave it out (null) or name a file/architecture")
        if self.prompts:
            if len(self.prompts) != self.num_classes:
                raise ConfigError(f"model.prompts has {len(self.prompts)} classes, model.num_classes is "
                                  f"{self.num_classes}: give one list of prompts per class")
            if any(not p or any(not t.strip() for t in p) for p in self.prompts):
                raise ConfigError("model.prompts: every class needs at least one non-empty prompt")
        _require_at_least("model", self, 1, "det_stride", "det_channels", "det_max_boxes")
        for name in ("det_score_threshold", "det_nms_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.first_stage == "":
            raise ConfigError("model.first_stage is empty; leave it out (null) or name a checkpoint")
        if self.name == "mtl_swin_unet":
            self._check_swin_unet()

    def _check_swin_unet(self) -> None:
        """The shapes the Swin-UNet needs: whole patches and windows, heads that divide the widths."""
        if self.img_size % (self.patch_size * 2 ** (len(self.depths) - 1)) != 0:
            raise ConfigError(
                f"model.img_size={self.img_size} must be divisible by "
                f"patch_size*2^(stages-1)={self.patch_size * 2 ** (len(self.depths) - 1)}"
            )
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ConfigError(f"model.num_heads[{i}]={heads} does not divide stage {i}'s width "
                                  f"embed_dim*2^{i}={self.embed_dim * 2 ** i}")
        for i, (chs, heads) in enumerate(zip(self.decoder_channels, self.cross_attn_heads)):
            if chs % heads:
                raise ConfigError(f"model.cross_attn_heads[{i}]={heads} does not divide "
                                  f"model.decoder_channels[{i}]={chs}")


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer: AdamW (default) or Adam."""

    name: Literal["adamw", "adam"] = "adamw"
    """`adamw`: decoupled weight decay (torch.optim.AdamW); `adam`: torch.optim.Adam, whose
    weight_decay is an L2 term added to the gradient (the course-project baselines' recipe)."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    grad_accum: int = 1
    no_decay_norm_bias: bool = True
    """Exempt norm weights, biases and relative-position tables from weight decay (common practice
    for transformers; the paper does not say). False: every parameter decays."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Cosine learning-rate schedule from optim.lr down to min_lr, with optional linear warmup."""

    epochs: int = 50
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs × steps per epoch when set)."""
    warmup_steps: int = 0
    min_lr: float = 1e-6
    min_lr_mode: Literal["relative", "absolute"] = "relative"
    """`relative`: one cosine factor for every parameter group, which ends at min_lr / optim.lr, so
    a group with multiplier m ends at m·min_lr and the groups keep their ratios; `absolute`: every
    group ends at min_lr itself, as torch's CosineAnnealingLR(eta_min=min_lr) would."""
    interval: Literal["step", "epoch"] = "step"
    """`step`: the rate follows the cosine at every optimizer step; `epoch`: it changes once per
    epoch and holds within it, as `CosineAnnealingLR` stepped per epoch (the papers' form; late in
    training the two differ by up to a fourth of the rate). The warmup stays per step."""

    def __post_init__(self) -> None:
        _require_at_least("schedule", self, 1, "epochs", "max_steps")
        _require_at_least("schedule", self, 0, "warmup_steps")
        if not math.isfinite(self.min_lr) or self.min_lr < 0:
            raise ConfigError(f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass(kw_only=True)
class TeacherForcingConfig:
    """Which samples reach the infection and detection losses (MultiCheXNet's teacher forcing),
    and the gate that inference applies before reporting masks and boxes.

    With `gate: none` the ground truth decides (`phase.positive_classes`), always. Otherwise, per
    sample or per batch, a coin with probability `p` lets the ground truth decide, and with 1 - p
    the gate's prediction does: P(positive classes) >= `threshold` under the model's own class head
    (`cls_head`, from the same forward pass) or under the frozen `model.first_stage` classifier.
    The coins come from a generator seeded by (run.seed, step, batch, rank): a resumed run flips the
    same coins and no step waits for the device. `mtlxray evaluate` and `predict` apply the same
    gate and report gated beside ungated figures.
    """

    gate: Literal["none", "cls_head", "first_stage"] = "none"
    p: float = 0.9
    """Probability that the ground truth, not the gate, selects (0.9 in MultiCheXNet)."""
    per: Literal["sample", "batch"] = "sample"
    """One coin per sample, or one per batch (MultiCheXNet's "every batch"; the same coin on every
    rank, so the global batch goes one way)."""
    threshold: float = 0.5
    """The gate passes a sample when its probability of a positive class is at least this."""

    def __post_init__(self) -> None:
        for name in ("p", "threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"phase.teacher_forcing.{name} must be in [0, 1], got {getattr(self, name)}")


LOSS_TASKS = ("lung", "inf", "cls", "det")


@dataclass(kw_only=True)
class PhaseConfig:
    """What a training phase trains: freezing, loss weights and learning-rate multipliers, as data."""

    name: Literal["phase1", "phase2"] = "phase1"
    """Selects the class head's input (phase1: lung mask; phase2: lung + infection masks)."""
    frozen: list[str] = field(default_factory=lambda: ["inf_decoder", "inf_head"])
    """Module-name prefixes whose parameters get requires_grad=False before wrapping."""
    cls_phase2_init: Literal["random", "from_phase1"] = "random"
    """How the class head's phase-2 input conv (lung + infection masks) starts: freshly initialised
    (a new part: give `cls_head.conv_phase2` the new parts' rate in phase.lr_mult), or as the
    phase-1 conv on the lung channel and zero on the infection channel."""
    frozen_bn_stats: Literal["update", "keep"] = "update"
    """Batch-norm running statistics under `frozen` prefixes: `update` goes on updating them in
    training mode, as plain `requires_grad=False` freezing does (so a frozen head's evaluation
    outputs still move); `keep` holds them exactly (momentum 0), so a frozen part predicts after
    the phase exactly as before it."""
    freeze_encoder_blocks: int = 0
    """Also freeze the patch embedding and the first N encoder blocks (Swin/ViT/DINOv2/BEiTv2
    encoders), as in partial fine-tuning of a pretrained encoder."""
    loss_weights: dict[str, float] = field(default_factory=lambda: {"lung": 1.0, "inf": 0.0, "cls": 0.5})
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Module-name prefix -> learning-rate multiplier; key `default` covers everything else."""
    positive_classes: Optional[list[int]] = None
    """Labels of the positive cases (default [2], COVID-19, as in the paper): only their infection
    masks and boxes train the infection and detection heads (see `teacher_forcing` for who
    decides), the gate passes the probability of these classes, and evaluation scores infection
    and boxes on them and counts false positives on the others."""
    infection_classes: Optional[list[int]] = None
    """The former name of `positive_classes`, still read; after loading both hold the same list."""
    teacher_forcing: TeacherForcingConfig = field(default_factory=TeacherForcingConfig)
    init_from: Optional[str] = None
    """Checkpoint (a run's checkpoint folder or model.safetensors) to start from."""
    seg_loss: Literal["bce_dice", "bce", "dice"] = "bce_dice"
    """Each mask's loss: `bce_dice`, w·BCE + soft Dice (the Swin-UNet paper's); `bce`, BCE alone
    (MultiCheXNet's); `dice`, soft Dice alone."""
    bce_weight: float = 0.5
    """Weight w of the BCE term of `seg_loss: bce_dice` (0.5, the Swin-UNet paper's equation 1)."""
    inf_loss_mean: Literal["positives", "batch"] = "positives"
    """Average the infection loss over the batch's positive samples (COVID-19 with a mask), or
    over the whole batch (negatives then count as zero loss)."""

    def __post_init__(self) -> None:
        unknown = set(self.loss_weights) - set(LOSS_TASKS)
        if unknown:
            raise ConfigError(f"phase.loss_weights has unknown task(s) {sorted(unknown)}; allowed: {', '.join(LOSS_TASKS)}")
        given = [c for c in (self.positive_classes, self.infection_classes) if c is not None]
        if len(given) == 2 and sorted(given[0]) != sorted(given[1]):
            raise ConfigError(f"phase.positive_classes={self.positive_classes} and its former name "
                              f"phase.infection_classes={self.infection_classes} disagree; set positive_classes only")
        classes = list(given[0]) if given else [2]
        if not classes:
            raise ConfigError("phase.positive_classes must name at least one label")
        self.positive_classes, self.infection_classes = classes, list(classes)
        bad = {k: v for k, v in self.loss_weights.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise ConfigError(f"phase.loss_weights must be finite and >= 0, got {bad}")
        if not math.isfinite(self.bce_weight) or self.bce_weight < 0:
            raise ConfigError(f"phase.bce_weight must be >= 0, got {self.bce_weight}")
        if self.freeze_encoder_blocks < 0:
            raise ConfigError(f"phase.freeze_encoder_blocks must be >= 0, got {self.freeze_encoder_blocks}")
        bad = {k: v for k, v in self.lr_mult.items() if not math.isfinite(v) or v <= 0}
        if bad:
            raise ConfigError(f"phase.lr_mult values must be finite and > 0, got {bad}")


@dataclass(kw_only=True)
class RunConfig:
    """Where outputs go and how the loop behaves."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 autocast where the device runs bf16 natively (recent GPUs, AVX-512 CPUs), else fp32."""
    backend: Literal["ddp", "deepspeed"] = "ddp"
    grad_allreduce: Literal["fp32", "fp16", "bf16"] = "fp32"
    """DDP only: all-reduce gradients compressed to fp16/bf16 (half the bytes; DDP's comm hook)."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON (configs/deepspeed/zero2.json, ...) when backend is deepspeed."""
    log_every: int = 10
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 means at the end of each epoch."""
    save_every: int = 200
    """Write the `last` checkpoint every N optimizer steps (and at each epoch end)."""
    best_metric: str = "val/lung_dice"
    best_mode: Literal["max", "min"] = "max"
    nan_skip_budget: int = 0
    """Non-finite losses tolerated (step skipped) before the run fails; 0 fails on the first."""
    compile: bool = False
    """Compile the model's forward (through accelerate's dynamo plugin, so DDP's graph is split at
    its gradient buckets) and the loss with torch.compile (inductor). DeepSpeed runs eager."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode with run.compile: `reduce-overhead` replays CUDA graphs (fewer launches
    for small batches), `max-autotune` also searches kernel configurations (a longer compile)."""
    tensorboard: bool = True
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    """Experiment trackers, through accelerate's tracker API (`log_with`), beside metrics.jsonl and with
    its metric names; the resolved config is logged as the run's parameters. `mlflow` writes to
    `run.mlflow_uri`, `wandb` runs offline (`WANDB_MODE=offline` unless set). `run.tensorboard: true`
    adds tensorboard. Needs `pip install 'mtlxray[track]'` for mlflow."""
    experiment: Optional[str] = None
    """The trackers' experiment (MLflow) or project (W&B); default run.name. `mtlxray sweep` sets the sweep's name."""
    tracker_run_name: Optional[str] = None
    """The run's name in the trackers; default run.name."""
    mlflow_uri: Optional[str] = None
    """MLflow tracking store; default `sqlite:///<run.output_dir>/mlflow.db`, a local file that needs no server."""
    progress: bool = True
    """A progress bar on a terminal; a progress log line every log step otherwise (Slurm logs)."""

    def __post_init__(self) -> None:
        _require_at_least("run", self, 1, "log_every", "save_every")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"run.seed must be in [0, 2^32), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir is empty; name the folder that holds the runs (default: runs)")
        _require_at_least("run", self, 0, "eval_every", "nan_skip_budget")
        if not self.name.strip() or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name must be a plain folder name, got {self.name!r}")


@dataclass(kw_only=True)
class LaunchConfig:
    """Cluster resources of one job: the one source of the launch defaults.

    `mtlxray submit` (submitit) uses them through `mtlxray.launch.slurm.slurm_parameters`, and the
    `#SBATCH` headers of slurm/phase*.sh state the same defaults (a test holds them equal). A job
    runs one task (one training process) per GPU, or one per node without GPUs.
    """

    executor: Literal["slurm", "local"] = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    """CPUs per task, i.e. per training process (its data-loader workers included)."""
    mem_gb: int = 0
    """0 leaves memory to the cluster default."""
    timeout_min: int = 24 * 60
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    requeue_signal_delay_s: int = 120
    """The preemption signal comes this long before the time limit, to save and requeue."""
    slurm_extra: dict[str, str] = field(default_factory=dict)
    """Extra sbatch parameters, passed through to submitit's slurm_additional_parameters."""

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task", "timeout_min"):
            if getattr(self, name) < 1:
                raise ConfigError(f"launch.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "mem_gb", "requeue_signal_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"launch.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        if self.schedule.min_lr > self.optim.lr:
            raise ConfigError(f"schedule.min_lr={self.schedule.min_lr} is above optim.lr={self.optim.lr}: the "
                              "schedule would raise the rate")
        n = self.model.num_classes
        if not self.data.label_map and n != {"covid3": 3, "radiography4": 4}[self.data.classes]:
            raise ConfigError(f"model.num_classes={n} but data.classes={self.data.classes} has "
                              f"{ {'covid3': 3, 'radiography4': 4}[self.data.classes]} labels")
        bad = [c for c in self.phase.positive_classes if not 0 <= c < n]
        if bad:
            raise ConfigError(f"phase.positive_classes {bad} are outside the model's labels 0..{n - 1}")
        if self.data.class_names and len(self.data.class_names) != n:
            raise ConfigError(f"data.class_names has {len(self.data.class_names)} names, model.num_classes is {n}")
        for src in self.data.sources:
            bad = {k: v for k, v in src.label_map.items() if not 0 <= v < n}
            if bad:
                raise ConfigError(f"data.sources[{src.name}].label_map: labels {bad} are outside 0..{n - 1}")
        tf, weights = self.phase.teacher_forcing, self.phase.loss_weights
        if tf.gate == "first_stage" and not self.model.first_stage:
            raise ConfigError("phase.teacher_forcing.gate=first_stage needs model.first_stage: a classification checkpoint")
        if weights.get("det", 0.0) > 0 and self.model.det_head == "none":
            raise ConfigError("phase.loss_weights.det > 0 but the model has no detection head: set model.det_head")
        if self.model.det_head != "none" and weights.get("det", 0.0) == 0 and not any(
                f == "det_head" or "det_head".startswith(f + ".") for f in self.phase.frozen):
            raise ConfigError("model.det_head is set but phase.loss_weights.det is 0: add det_head to phase.frozen "
                              "(under DDP every trained parameter must get a gradient each step)")


# ---------------------------------------------------------------------------------------------
# Loading


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; `over` wins. Lists are replaced, not concatenated."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and resolve its `extends:` chain (relative to the file, else a shipped name)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `extends` ({' -> '.join(str(p) for p in seen + (path,))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {error_line(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    beside = path.parent / str(parent)
    base = _read_yaml(beside if beside.is_file() else shipped_config(str(parent), f"{path}: extends: {parent}"),
                      seen + (path,))
    return _merge(base, raw)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `int or 'auto'`, `float or null`
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Returns the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):  # a dataclass inside a list (data.sources)
        return _build(tp, value, key, source)
    bad = ConfigError(
        f"{source}: `{key}` expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: `{key}` must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any string float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{prefix or 'config'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            allowed = sorted(fields)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean `{(prefix + '.' if prefix else '') + close[0]}`?)" if close else ""
            raise ConfigError(f"{source}: unknown key `{dotted}`{hint}; allowed keys: {', '.join(allowed)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, source)
        else:
            kwargs[key] = _coerce(value, tp, dotted, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override `{item}` has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) to a raw config mapping."""
    data = dict(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate a raw mapping (as read from YAML) into a `Config`; errors name `source`."""
    return _build(Config, data, "", source)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, else a shipped config's name; following `extends:`), apply
    overrides, and validate into a `Config`."""
    raw = _read_yaml(find_config(path)) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return config_from_dict(raw, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
