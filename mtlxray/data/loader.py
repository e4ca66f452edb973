"""WebDataset pipelines for training and evaluation.

Training, per rank and per DataLoader worker, is a list of webdataset stages:
`ResampledShards` (seeded by seed, epoch, rank and stream) -> `tar_to_samples` -> `shuffle`
-> skip (resume; raw bytes, nothing decoded) -> decode + augment -> `batched`; the `WebLoader` on
top applies `with_epoch`, so every rank yields exactly `train_batches_per_epoch` batches however
uneven the shards are. The loader takes batch b from worker b % workers; after a resume at batch k,
worker w replays the stream k + w would have had, so the batches are exactly those of an
uninterrupted epoch.

Evaluation splits the split's samples into contiguous, near-equal ranges per rank (from the
manifest's per-shard counts); every sample is seen exactly once across ranks and ranks may differ by
one sample. The caller must therefore not call a collective per batch (counts of batches may
differ): accumulate per-sample results locally and gather once at the end (for example
`accelerate.utils.gather_object`, or `all_gather` of the counts then of padded tensors).

Evaluation also checks every shard against the manifest while it streams: a shard that ends
early, or holds more samples than the manifest says, raises `ShardError` naming it (a tar cut at
a 512-byte boundary between samples reads as a valid, shorter archive otherwise). Training checks
shard sizes against the manifest's `bytes` when it starts (`check_shard_sizes`, a `stat` per
local shard; remote shards when they are opened). A sample missing a member raises `ShardError`
naming the shard and the key.

`data.shards` may be a local folder or an http(s):// or s3:// prefix (`mtlxray.data.remote`).
Manifest shard paths must stay inside the shard root (no absolute paths, no `..`).

A batch is a dict: `img` uint8 (B, 1, H, W) in 0..255; `lung`, `inf` uint8 (B, 1, H, W) in {0, 1};
`label` int64 (B,) (by `data.classes`); `has_inf` bool (B,) (the infection mask is annotated);
`key` list[str]; `boxes` list of per-sample [[x0, y0, x1, y1], ...], the 8-connected components of
the batch's infection mask *after* augmentation (recomputed when the mask is warped, in the loader
or in `batch_to_device`). Batches stay uint8 until `batch_to_device` converts them to float32 on
the device: a float32 batch is four times the bytes to copy in the loader, to pickle between
processes and to send to the GPU.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import itertools
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mtlxray.config import DataConfig, SourceConfig
from mtlxray.data import remote
from mtlxray.data.augment import augment, augment_batch, augment_params, sample_rng
from mtlxray.data.boxes import bounding_boxes
from mtlxray.data.manifest import SUBSETS, Manifest, read_manifest, shard_subsets
from mtlxray.data.remote import RetryPolicy
from mtlxray.data.sources import CLASS_SCHEMES, scheme_labels
from mtlxray.data.tarstream import ShardSkips, tar_samples, tar_to_samples
from mtlxray.errors import ConfigError, DataError, ShardError
from mtlxray.hardware import resolve_workers
from mtlxray.io import sha256_file

__all__ = ["train_batches_per_epoch", "build_train_loader", "build_eval_loader", "collate", "batch_to_device",
           "shard_urls", "shard_location", "check_shard_sizes", "label_names", "source_config", "decode_image",
           "TrainLoader"]

log = logging.getLogger(__name__)

@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def shard_location(root: str | Path, rel: object) -> str:
    """The URL or path of a manifest shard entry; ShardError if `rel` would leave the shard root
    (absolute, `..`, a drive or scheme)."""
    root = remote.normalise_root(root)
    text = rel if isinstance(rel, str) else ""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if (not text or text.startswith(("/", "\\")) or ".." in parts or ":" in text or "\0" in text):
        raise ShardError(f"{remote.join(root, 'manifest.json') if remote.is_remote(root) else Path(root) / 'manifest.json'}: "
                         f"shard path {rel!r} leaves the shard root (absolute, '..' or a scheme)")
    return remote.join(root, text) if remote.is_remote(root) else str(Path(root) / text)


def _entries(root: str | Path, manifest: Manifest, subset: str, split: str) -> list[dict]:
    entries = manifest.entries(subset, split)
    if not entries or sum(e["samples"] for e in entries) == 0:
        where = remote.join(remote.normalise_root(root), subset) if remote.is_remote(remote.normalise_root(root)) \
            else Path(root) / subset
        raise ShardError(f"{where}: no samples for subset {subset!r}, split {split!r} in the manifest")
    for e in entries:
        shard_location(root, e.get("path"))
    return entries


def check_shard_sizes(root: str | Path, manifest: Manifest, subset: str, split: str) -> None:
    """A `stat` per local shard: ShardError naming the first that is missing or whose size differs
    from the manifest's `bytes` (truncated, or replaced). Remote shards are checked when opened."""
    if remote.is_remote(remote.normalise_root(root)):
        return
    for e in _entries(root, manifest, subset, split):
        path = Path(shard_location(root, e["path"]))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{path}: shard listed in the manifest is missing") from None
        if size != e["bytes"]:
            raise ShardError(f"{path}: {size} bytes, but the manifest says {e['bytes']} (truncated or replaced shard)")


def shard_urls(root: str | Path, manifest: Manifest, subset: str, split: str, verify: bool = False,
               policy: Optional[RetryPolicy] = None) -> list[str]:
    """Paths (or URLs) of a split's shards, after `check_shard_sizes`; with `verify`, ShardError if a
    shard's sha256 differs from the manifest (remote shards are streamed to hash them)."""
    root = remote.normalise_root(root)
    check_shard_sizes(root, manifest, subset, split)
    urls = []
    for e in _entries(root, manifest, subset, split):
        loc = shard_location(root, e["path"])
        if verify:
            if remote.is_remote(loc):
                digest = remote.sha256_url(loc, policy, e["bytes"])
            else:
                st = os.stat(loc)
                digest = _file_sha256(loc, st.st_size, st.st_mtime_ns)
            if digest != e["sha256"]:
                raise ShardError(f"{loc}: sha256 does not match the manifest (corrupt or replaced shard)")
        if e["samples"] > 0:
            urls.append(loc)
    return urls


def _sizes(root: str, manifest: Manifest, subset: str, split: str) -> dict[str, int]:
    return {shard_location(root, e["path"]): e["bytes"] for e in _entries(root, manifest, subset, split)}


def source_config(data: DataConfig, src: SourceConfig) -> DataConfig:
    """The data config of one source: `data` with the source's shards, subset, scheme and label map."""
    label_map = dict(src.label_map or data.label_map)
    return dataclasses.replace(
        data, shards=src.shards or data.shards, subset=src.subset, classes=src.classes or data.classes,
        label_map=label_map, class_names=label_names(data) if label_map else [], sources=[])


def label_names(cfg: DataConfig) -> list[str]:
    """Class names in label order for `data.classes` (what a batch's `label` indexes), or
    `data.class_names` with a `data.label_map`."""
    if cfg.label_map:
        return list(cfg.class_names)
    return list(CLASS_SCHEMES[cfg.classes]["names"])


def _labels(cfg: DataConfig, manifest: Manifest, subsets) -> dict[str, int]:
    """class name -> label under `data.classes` (or `data.label_map`) for every class of these subsets."""
    names = sorted({c for s in subsets for c in manifest.classes.get(s, [])})
    if cfg.label_map:
        missing = [c for c in names if c not in cfg.label_map]
        if missing:
            raise ConfigError(f"data.label_map has no label for class(es) {missing} of {cfg.shards}")
        return {c: cfg.label_map[c] for c in names}
    try:
        return scheme_labels(cfg.classes, names)
    except DataError as e:
        raise ConfigError(f"data.classes={cfg.classes}: {e}") from None


def _train_keys(cfg: DataConfig, manifest: Manifest, subset: str) -> Optional[frozenset]:
    """The training keys kept by `data.fraction` (per class, seeded), or None for all of them."""
    if cfg.fraction >= 1.0:
        return None
    table = manifest.images
    if table is None or "rows" not in table:
        raise ShardError(f"{cfg.shards}: data.fraction needs the manifest's image table; rebuild the shards")
    cols = table["columns"]
    k, sub, spl, cls = (cols.index(c) for c in ("key", "subset", "split", "class_name"))
    by_class: dict[str, list[str]] = {}
    for row in table["rows"]:
        if row[sub] == subset and row[spl] == cfg.train_split:
            by_class.setdefault(row[cls], []).append(row[k])
    keep = []
    for i, (name, keys) in enumerate(sorted(by_class.items())):
        keys.sort()
        n = max(1, int(round(len(keys) * cfg.fraction)))
        rng = np.random.default_rng([cfg.fraction_seed, i, len(keys)])
        keep += [keys[j] for j in rng.permutation(len(keys))[:n]]
    return frozenset(keep)


def _split_count(manifest: Manifest, subset: str, split: str) -> int:
    return manifest.count(subset, split) or 0


def _train_count(cfg: DataConfig, manifest: Manifest, subset: str) -> int:
    keys = _train_keys(cfg, manifest, subset)
    return _split_count(manifest, subset, cfg.train_split) if keys is None else len(keys)


def train_batches_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Batches each rank yields per training epoch (>= 1); counts `data.fraction` of the split."""
    samples = cfg.samples_per_epoch
    if samples is None:
        manifest = read_manifest(cfg.shards, RetryPolicy.from_config(cfg))
        samples = sum(_train_count(cfg, manifest, s) for s in shard_subsets(cfg))
    return max(1, samples // (cfg.batch_size * world_size))


def decode_image(sample: dict, name: str, fmt: str, size: int) -> np.ndarray:
    """One image member (`img`, `lung`, `inf`) of a raw sample -> uint8 (size, size); ShardError
    naming the shard and the key when it is missing or the wrong size."""
    member = f"{name}.{fmt}"
    where = f"{sample.get('__url__', '<shard>')}: sample {sample.get('__key__')!r}"
    if member not in sample:
        raise ShardError(f"{where} is incomplete (no {member}; truncated shard?)")
    data = sample[member]
    try:
        if fmt == "raw":
            arr = np.frombuffer(data, dtype=np.uint8)
            if arr.size != size * size:
                raise ValueError(f"{arr.size} bytes, expected {size * size}")
            return arr.reshape(size, size)
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ShardError(f"{where}: unreadable {member}: {e}") from None
    if arr.shape != (size, size):
        raise ShardError(f"{where}: {member} is {arr.shape[1]}x{arr.shape[0]}, the manifest says {size}x{size}")
    return arr


def _decode(sample: dict, fmt: str, size: int, labels: Optional[dict[str, int]] = None) -> dict:
    """Raw tar members -> uint8 arrays + metadata; the label by `labels` (class name -> label)."""
    for member in ("cls.json", "box.json"):
        if member not in sample:
            raise ShardError(f"{sample.get('__url__', '<shard>')}: sample {sample.get('__key__')!r} is "
                             f"incomplete (no {member}; truncated shard?)")
    arrays = {name: decode_image(sample, name, fmt, size) for name in ("img", "lung", "inf")}
    meta = json.loads(bytes(sample["cls.json"]))  # members may be memoryviews (tarstream)
    label = int(meta["label"]) if labels is None else labels[meta["class_name"]]
    return {"key": sample["__key__"], **arrays, "label": label, "has_inf": meta["subset"] == "infection",
            "boxes": json.loads(bytes(sample["box.json"]))}


def _to_train_sample(sample: dict, fmt: str, size: int, cfg: DataConfig, seed: int, epoch: int,
                     labels: Optional[dict[str, int]] = None) -> dict:
    s = _decode(sample, fmt, size, labels)
    if cfg.augment.enabled and cfg.augment.on_device:
        s["aug"] = augment_params(cfg.augment, sample_rng(seed, epoch, s["key"]), size)  # applied in batch_to_device
    elif cfg.augment.enabled:
        s["img"], s["lung"], s["inf"] = augment(s["img"], s["lung"], s["inf"], cfg.augment,
                                                sample_rng(seed, epoch, s["key"]))
        if s["boxes"]:  # the boxes of the warped mask (an empty mask stays empty)
            s["boxes"] = bounding_boxes(s["inf"])
    return s


def _to_eval_sample(sample: dict, fmt: str, size: int, labels: Optional[dict[str, int]] = None) -> dict:
    return _decode(sample, fmt, size, labels)


def collate(samples: list[dict]) -> dict:
    """Decoded uint8 samples -> a uint8 batch dict (see the module docstring)."""

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([s[name] for s in samples]))[:, None]

    batch = {"img": stack("img"), "lung": stack("lung"), "inf": stack("inf"),
             "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
             "has_inf": torch.tensor([s["has_inf"] for s in samples], dtype=torch.bool),
             "key": [s["key"] for s in samples], "boxes": [s["boxes"] for s in samples]}
    if "aug" in samples[0]:
        batch["aug"] = torch.from_numpy(np.stack([s["aug"] for s in samples]))  # B, 6
    return batch


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    """A loader batch on `device` with `img` float32 in [0, 1] and the masks float32 in {0, 1}.

    The uint8 tensors are copied first and converted on the device (non_blocking: the loader's
    pinned batches overlap the copy with compute). A batch carrying `aug` parameters
    (`augment.on_device`) is augmented here, as a whole, on the device, and the `boxes` of its
    samples that have any are recomputed from the warped infection masks (copied to the host as
    uint8: one synchronisation for such a batch)."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    out["img"] = out["img"].float().div_(255.0)
    out["lung"] = out["lung"].float()
    out["inf"] = out["inf"].float()
    params = out.pop("aug", None)
    if params is not None:
        out["img"], masks = augment_batch(out["img"], torch.cat([out["lung"], out["inf"]], dim=1), params)
        out["lung"], out["inf"] = masks[:, :1], masks[:, 1:]
        boxed = [i for i, b in enumerate(out.get("boxes") or []) if b]
        if boxed:
            warped = out["inf"][boxed, 0].to(torch.uint8).cpu().numpy()
            out["boxes"] = list(out["boxes"])
            for i, mask in zip(boxed, warped):
                out["boxes"][i] = bounding_boxes(mask)
    return out


@functools.cache
def _keep_freed_batch_memory() -> None:
    """Stop glibc from handing freed batch memory back to the kernel after every batch.

    By default glibc trims the heap once twice the (dynamic) mmap threshold is free at its top, so
    a loader that frees and allocates a few MiB of batch arrays per step page-faults all of it in
    again each time: that made collate 10× slower than its copies here. Fixed thresholds keep the
    memory mapped (the loader's own working set, tens of MiB). glibc only; elsewhere a no-op.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 256 << 20)
    mallopt(m_mmap_threshold, 32 << 20)


def _stream_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


class _TrainStream(IterableDataset):
    """One rank's infinite stream of training batches; DataLoader workers each run one logical stream."""

    def __init__(self, urls: dict[str, list[str]], cfg: DataConfig, fmt: str, size: int, *, seed: int,
                 epoch: int, rank: int, start_batch: int, sizes: Optional[dict[str, int]] = None,
                 labels: Optional[dict[str, int]] = None, keep: Optional[dict[str, Optional[frozenset]]] = None) -> None:
        super().__init__()
        self.urls, self.cfg, self.fmt, self.size = urls, cfg, fmt, size
        self.seed, self.epoch, self.rank, self.start_batch = seed, epoch, rank, start_batch
        self.sizes, self.labels, self.keep = sizes or {}, labels, keep or {}
        self.policy = RetryPolicy.from_config(cfg)
        self.skips = ShardSkips()

    def _logical(self) -> tuple[int, int, int]:
        """(logical stream id, number of streams, batches of it consumed before start_batch)."""
        info = get_worker_info()
        n = info.num_workers if info is not None else 1
        wid = info.id if info is not None else 0
        stream = (self.start_batch + wid) % n
        return stream, n, max(0, -(-(self.start_batch - stream) // n))

    def _samples(self, subset: str, stream: int) -> wds.DataPipeline:
        """Raw (undecoded) shuffled samples of one subset."""
        k = SUBSETS.index(subset)
        s = _stream_seed(self.seed, self.epoch, self.rank, stream, k)
        buf = max(1, self.cfg.shuffle_buffer)
        sizes, keep = self.sizes, self.keep.get(subset)
        stages = [
            wds.ResampledShards(self.urls[subset], seed=s, worker_seed=lambda: stream, deterministic=True),
            lambda src: ({"url": x["url"], "bytes": sizes.get(x["url"])} for x in src),
            tar_to_samples(policy=self.policy, skip_failed=self.cfg.skip_failed_shards, skips=self.skips),
        ]
        if keep is not None:  # data.fraction: a fixed, seeded part of the split, chosen by key
            stages.append(wds.select(lambda x: x["__key__"] in keep))
        stages.append(wds.shuffle(buf, initial=min(buf, 100), seed=s + 1))
        return wds.DataPipeline(*stages)

    def _batches(self, raw: Iterable[dict], skip_samples: int) -> wds.DataPipeline:
        to_sample = functools.partial(_to_train_sample, fmt=self.fmt, size=self.size, cfg=self.cfg,
                                      seed=self.seed, epoch=self.epoch, labels=self.labels)
        return wds.DataPipeline(
            lambda: iter(raw),
            lambda src: itertools.islice(src, skip_samples, None),  # resume: skipped before decoding
            wds.map(to_sample),
            wds.batched(self.cfg.batch_size, collation_fn=collate, partial=False),
        )

    def __iter__(self) -> Iterator[dict]:
        reported = len(self.skips)
        for batch in self._stream():
            if len(self.skips) > reported:  # shards skipped since the last batch travel with this one
                batch["__skipped__"] = self.skips.items[reported:]
                reported = len(self.skips)
            yield batch

    def _stream(self) -> Iterator[dict]:
        _keep_freed_batch_memory()  # in the process that builds the batches (a worker, or this one)
        stream, n, skip = self._logical()
        mode, bsz = self.cfg.subset, self.cfg.batch_size
        if mode in SUBSETS:
            yield from self._batches(self._samples(mode, stream), skip * bsz)
        elif mode == "mixed":
            rng = np.random.default_rng(_stream_seed(self.seed, self.epoch, self.rank, stream, 99))
            lung, inf = iter(self._samples("lung", stream)), iter(self._samples("infection", stream))
            mixed = (next(inf) if rng.random() < 0.5 else next(lung) for _ in itertools.count())
            yield from self._batches(mixed, skip * bsz)
        else:  # alternate: global batch b = stream + j * n comes from lung when b is even
            parity = [(stream + j * n) % 2 for j in range(skip)]
            its = [iter(self._batches(self._samples(subset, stream), parity.count(k) * bsz))
                   for k, subset in enumerate(SUBSETS)]
            for j in itertools.count(skip):
                yield next(its[(stream + j * n) % 2])


class TrainLoader:
    """The training batches of one rank and epoch (iterate it once), and the shards skipped on the way.

    `skipped_shards` lists (url, reason) of every shard that failed and was skipped
    (`data.skip_failed_shards`), in the order the batches arrived, whichever loader worker skipped
    it; `len(loader.skipped_shards)` is the count to log (for example in metrics.jsonl). Without
    `skip_failed_shards` a failed shard raises `ShardError` instead.
    """

    def __init__(self, loader: Iterable[dict], batches: int) -> None:
        self.loader, self.batches = loader, batches
        self.skipped_shards: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            skipped = batch.pop("__skipped__", None)
            if skipped:
                self.skipped_shards.extend(tuple(x) for x in skipped)
            yield batch


PREFETCH_BATCHES = 4
"""Batches each loader process keeps ready (DataLoader's prefetch_factor) when batches go to a GPU."""


def loader_options(workers: int) -> dict:
    """DataLoader options for `workers` processes: on a CUDA machine, batches in pinned memory (so
    `batch_to_device`'s non_blocking copies overlap compute) and a deeper prefetch.

    Workers are not persistent: a loader is built per epoch, because its shard seeds and resume
    position depend on the epoch, so its processes start once per epoch."""
    cuda = torch.cuda.is_available()
    options: dict = {"num_workers": workers, "persistent_workers": False, "pin_memory": cuda}
    if workers and cuda:
        options["prefetch_factor"] = PREFETCH_BATCHES
    return options


def loader_workers(cfg: DataConfig, *, augmenting: bool) -> int:
    """cfg.workers; `auto` (which a training run resolves once, in its config) for this process."""
    return resolve_workers(cfg.workers, augment_in_loader=augmenting)[0]


def build_train_loader(cfg: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int,
                       start_batch: int = 0) -> TrainLoader:
    """Training batches for one rank and epoch: exactly train_batches_per_epoch - start_batch of them.

    Deterministic in (cfg, seed, epoch, rank, world_size); `start_batch=k` yields batches k, k+1, ...
    of the uninterrupted epoch without decoding the first k. Shard sizes are checked against the
    manifest first (`check_shard_sizes`).
    """
    total = train_batches_per_epoch(cfg, world_size)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch={start_batch} outside [0, {total}] batches per epoch")
    if start_batch == total:
        return TrainLoader([], 0)
    policy = RetryPolicy.from_config(cfg)
    manifest = read_manifest(cfg.shards, policy)
    subsets = shard_subsets(cfg)
    urls = {s: shard_urls(cfg.shards, manifest, s, cfg.train_split, cfg.verify, policy) for s in subsets}
    sizes = {u: n for s in subsets for u, n in _sizes(cfg.shards, manifest, s, cfg.train_split).items()}
    keep = {s: _train_keys(cfg, manifest, s) for s in subsets}
    dataset = _TrainStream(urls, cfg, manifest.format, manifest.image_size, seed=seed, epoch=epoch,
                           rank=rank, start_batch=start_batch, sizes=sizes, labels=_labels(cfg, manifest, subsets),
                           keep=keep)
    workers = loader_workers(cfg, augmenting=cfg.augment.in_loader)
    loader = wds.WebLoader(dataset, batch_size=None, **loader_options(workers))
    return TrainLoader(loader.with_epoch(total - start_batch), total - start_batch)


def _rank_pieces(entries: list[dict], root: str | Path, rank: int,
                 world_size: int) -> list[tuple[str, int, int, int, int]]:
    """(shard url, first, stop, samples in the shard, shard bytes) sample ranges for the rank's
    contiguous share of the split."""
    n = sum(e["samples"] for e in entries)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    pieces, start = [], 0
    for e in entries:
        a, b = max(lo, start), min(hi, start + e["samples"])
        if a < b:
            pieces.append((shard_location(root, e["path"]), a - start, b - start, e["samples"], e["bytes"]))
        start += e["samples"]
    return pieces


class _EvalStream(IterableDataset):
    """Samples of this rank's pieces; DataLoader workers take every n-th piece. Each shard's sample
    count is checked against the manifest while it streams; failed shards are never skipped."""

    def __init__(self, pieces: list[tuple[str, int, int, int, int]], fmt: str, size: int,
                 labels: Optional[dict[str, int]] = None, policy: Optional[RetryPolicy] = None) -> None:
        super().__init__()
        self.pieces, self.fmt, self.size, self.labels, self.policy = pieces, fmt, size, labels, policy

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.pieces[info.id::info.num_workers] if info is not None else self.pieces
        for url, first, stop, in_shard, nbytes in mine:
            samples = tar_samples([{"url": url, "bytes": nbytes}], policy=self.policy)
            n = 0
            while n < stop:
                raw = next(samples, None)
                if raw is None:
                    raise ShardError(f"{url}: holds {n} samples, but the manifest says {in_shard} (truncated shard)")
                if n >= first:  # the samples before `first` are another rank's: read, never decoded
                    yield _to_eval_sample(raw, self.fmt, self.size, self.labels)
                n += 1
            if stop == in_shard and next(samples, None) is not None:
                raise ShardError(f"{url}: holds more samples than the manifest's {in_shard} (replaced shard?)")


def build_eval_loader(cfg: DataConfig, *, subset: str, split: str, rank: int, world_size: int,
                      batch_size: int | None = None) -> Iterable[dict]:
    """Evaluation batches of this rank's share: each sample once across ranks, no augmentation.

    Ranks may get one sample (hence one batch) more than others: gather results once at the end.
    """
    if subset not in SUBSETS:
        raise ShardError(f"evaluation subset must be lung or infection, got {subset!r}")
    policy = RetryPolicy.from_config(cfg)
    root = remote.normalise_root(cfg.shards)
    manifest = read_manifest(root, policy)
    shard_urls(root, manifest, subset, split, cfg.verify, policy)  # existence, size and checksum errors, early
    pieces = _rank_pieces(_entries(root, manifest, subset, split), root, rank, world_size)
    dataset = wds.DataPipeline(
        _EvalStream(pieces, manifest.format, manifest.image_size, _labels(cfg, manifest, [subset]), policy),
        wds.batched(batch_size or cfg.eval_batch_size, collation_fn=collate, partial=True),
    )
    workers = min(loader_workers(cfg, augmenting=False), len(pieces))
    return wds.WebLoader(dataset, batch_size=None, **loader_options(workers))
