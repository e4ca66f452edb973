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

A batch is a dict: `img` uint8 (B, 1, H, W) in 0..255; `lung`, `inf` uint8 (B, 1, H, W) in {0, 1};
`label` int64 (B,); `has_inf` bool (B,) (the infection mask is annotated); `key` list[str];
`boxes` list of per-sample [[x0, y0, x1, y1], ...] from the stored infection mask. Batches stay
uint8 until `batch_to_device` converts them to float32 on the device: a float32 batch is four
times the bytes to copy in the loader, to pickle between processes and to send to the GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mtlxray.config import DataConfig
from mtlxray.data.augment import augment, augment_batch, augment_params, sample_rng
from mtlxray.data.tarstream import tar_samples, tar_to_samples
from mtlxray.errors import ShardError

__all__ = ["read_manifest", "train_batches_per_epoch", "build_train_loader", "build_eval_loader",
           "collate", "batch_to_device", "shard_urls"]

log = logging.getLogger(__name__)

_SUBSETS = {"lung": ("lung",), "infection": ("infection",), "mixed": ("lung", "infection"),
            "alternate": ("lung", "infection")}


def read_manifest(root: str | Path) -> dict:
    """Load `root/manifest.json`; ShardError if it is missing, unreadable, or lists no shards."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{path}: shard manifest not found (build it with `mtlxray shards build`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or not manifest.get("shards"):
        raise ShardError(f"{path}: manifest lists no shards")
    return manifest


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entries(root: Path, manifest: dict, subset: str, split: str) -> list[dict]:
    entries = manifest["shards"].get(subset, {}).get(split, [])
    if not entries or sum(e["samples"] for e in entries) == 0:
        raise ShardError(f"{root / subset}: no samples for subset {subset!r}, split {split!r} in the manifest")
    return entries


def shard_urls(root: str | Path, manifest: dict, subset: str, split: str, verify: bool = False) -> list[str]:
    """Paths of a split's shards; ShardError if one is missing or (verify) its sha256 differs."""
    root = Path(root)
    urls = []
    for e in _entries(root, manifest, subset, split):
        path = root / e["path"]
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        if verify:
            st = path.stat()
            if _file_sha256(str(path), st.st_size, st.st_mtime_ns) != e["sha256"]:
                raise ShardError(f"{path}: sha256 does not match the manifest (corrupt or replaced shard)")
        if e["samples"] > 0:
            urls.append(str(path))
    return urls


def _split_count(manifest: dict, subset: str, split: str) -> int:
    return sum(manifest["counts"].get(subset, {}).get(split, {}).values())


def train_batches_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Batches each rank yields per training epoch (>= 1)."""
    samples = cfg.samples_per_epoch
    if samples is None:
        manifest = read_manifest(cfg.shards)
        samples = sum(_split_count(manifest, s, cfg.train_split) for s in _SUBSETS[cfg.subset])
    return max(1, samples // (cfg.batch_size * world_size))


def _decode(sample: dict, fmt: str, size: int) -> dict:
    """Raw tar members -> uint8 arrays + metadata."""

    def array(name: str) -> np.ndarray:
        data = sample[f"{name}.{fmt}"]
        if fmt == "raw":
            return np.frombuffer(data, dtype=np.uint8).reshape(size, size)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im, dtype=np.uint8)

    meta = json.loads(bytes(sample["cls.json"]))  # members may be memoryviews (tarstream)
    return {"key": sample["__key__"], "img": array("img"), "lung": array("lung"), "inf": array("inf"),
            "label": int(meta["label"]), "has_inf": meta["subset"] == "infection",
            "boxes": json.loads(bytes(sample["box.json"]))}


def _to_train_sample(sample: dict, fmt: str, size: int, cfg: DataConfig, seed: int, epoch: int) -> dict:
    s = _decode(sample, fmt, size)
    if cfg.augment.enabled and cfg.augment.on_device:
        s["aug"] = augment_params(cfg.augment, sample_rng(seed, epoch, s["key"]), size)  # applied in batch_to_device
    elif cfg.augment.enabled:
        s["img"], s["lung"], s["inf"] = augment(s["img"], s["lung"], s["inf"], cfg.augment,
                                                sample_rng(seed, epoch, s["key"]))
    return s


def _to_eval_sample(sample: dict, fmt: str, size: int) -> dict:
    return _decode(sample, fmt, size)


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
    (`augment.on_device`) is augmented here, as a whole, on the device. `boxes` describe the
    stored masks and are not warped."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    out["img"] = out["img"].float().div_(255.0)
    out["lung"] = out["lung"].float()
    out["inf"] = out["inf"].float()
    params = out.pop("aug", None)
    if params is not None:
        out["img"], masks = augment_batch(out["img"], torch.cat([out["lung"], out["inf"]], dim=1), params)
        out["lung"], out["inf"] = masks[:, :1], masks[:, 1:]
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
                 epoch: int, rank: int, start_batch: int) -> None:
        super().__init__()
        self.urls, self.cfg, self.fmt, self.size = urls, cfg, fmt, size
        self.seed, self.epoch, self.rank, self.start_batch = seed, epoch, rank, start_batch

    def _logical(self) -> tuple[int, int, int]:
        """(logical stream id, number of streams, batches of it consumed before start_batch)."""
        info = get_worker_info()
        n = info.num_workers if info is not None else 1
        wid = info.id if info is not None else 0
        stream = (self.start_batch + wid) % n
        return stream, n, max(0, -(-(self.start_batch - stream) // n))

    def _samples(self, subset: str, stream: int) -> wds.DataPipeline:
        """Raw (undecoded) shuffled samples of one subset."""
        k = list(_SUBSETS).index(subset)
        s = _stream_seed(self.seed, self.epoch, self.rank, stream, k)
        buf = max(1, self.cfg.shuffle_buffer)
        return wds.DataPipeline(
            wds.ResampledShards(self.urls[subset], seed=s, worker_seed=lambda: stream, deterministic=True),
            tar_to_samples(),
            wds.shuffle(buf, initial=min(buf, 100), seed=s + 1),
        )

    def _batches(self, raw: Iterable[dict], skip_samples: int) -> wds.DataPipeline:
        to_sample = functools.partial(_to_train_sample, fmt=self.fmt, size=self.size, cfg=self.cfg,
                                      seed=self.seed, epoch=self.epoch)
        return wds.DataPipeline(
            lambda: iter(raw),
            lambda src: itertools.islice(src, skip_samples, None),  # resume: skipped before decoding
            wds.map(to_sample),
            wds.batched(self.cfg.batch_size, collation_fn=collate, partial=False),
        )

    def __iter__(self) -> Iterator[dict]:
        _keep_freed_batch_memory()  # in the process that builds the batches (a worker, or this one)
        stream, n, skip = self._logical()
        mode, bsz = self.cfg.subset, self.cfg.batch_size
        if mode in ("lung", "infection"):
            yield from self._batches(self._samples(mode, stream), skip * bsz)
        elif mode == "mixed":
            rng = np.random.default_rng(_stream_seed(self.seed, self.epoch, self.rank, stream, 99))
            lung, inf = iter(self._samples("lung", stream)), iter(self._samples("infection", stream))
            mixed = (next(inf) if rng.random() < 0.5 else next(lung) for _ in itertools.count())
            yield from self._batches(mixed, skip * bsz)
        else:  # alternate: global batch b = stream + j * n comes from lung when b is even
            parity = [(stream + j * n) % 2 for j in range(skip)]
            its = [iter(self._batches(self._samples(subset, stream), parity.count(k) * bsz))
                   for k, subset in enumerate(("lung", "infection"))]
            for j in itertools.count(skip):
                yield next(its[(stream + j * n) % 2])


def build_train_loader(cfg: DataConfig, *, seed: int, epoch: int, rank: int, world_size: int,
                       start_batch: int = 0) -> Iterable[dict]:
    """Training batches for one rank and epoch: exactly train_batches_per_epoch - start_batch of them.

    Deterministic in (cfg, seed, epoch, rank, world_size); `start_batch=k` yields batches k, k+1, ...
    of the uninterrupted epoch without decoding the first k.
    """
    total = train_batches_per_epoch(cfg, world_size)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch={start_batch} outside [0, {total}] batches per epoch")
    if start_batch == total:
        return []
    manifest = read_manifest(cfg.shards)
    urls = {s: shard_urls(cfg.shards, manifest, s, cfg.train_split, cfg.verify) for s in _SUBSETS[cfg.subset]}
    dataset = _TrainStream(urls, cfg, manifest["format"], manifest["image_size"], seed=seed, epoch=epoch,
                           rank=rank, start_batch=start_batch)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=cfg.workers, persistent_workers=False)
    return loader.with_epoch(total - start_batch)


def _rank_pieces(entries: list[dict], root: Path, rank: int, world_size: int) -> list[tuple[str, int, int]]:
    """(shard path, first, stop) sample ranges for the rank's contiguous share of the split."""
    n = sum(e["samples"] for e in entries)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    pieces, start = [], 0
    for e in entries:
        a, b = max(lo, start), min(hi, start + e["samples"])
        if a < b:
            pieces.append((str(root / e["path"]), a - start, b - start))
        start += e["samples"]
    return pieces


class _EvalStream(IterableDataset):
    """Samples of this rank's pieces; DataLoader workers take every n-th piece."""

    def __init__(self, pieces: list[tuple[str, int, int]], fmt: str, size: int) -> None:
        super().__init__()
        self.pieces, self.fmt, self.size = pieces, fmt, size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.pieces[info.id::info.num_workers] if info is not None else self.pieces
        for path, first, stop in mine:
            samples = tar_samples([{"url": path}])
            for raw in itertools.islice(samples, first, stop):
                yield _to_eval_sample(raw, self.fmt, self.size)


def build_eval_loader(cfg: DataConfig, *, subset: str, split: str, rank: int, world_size: int,
                      batch_size: int | None = None) -> Iterable[dict]:
    """Evaluation batches of this rank's share: each sample once across ranks, no augmentation.

    Ranks may get one sample (hence one batch) more than others: gather results once at the end.
    """
    if subset not in ("lung", "infection"):
        raise ShardError(f"evaluation subset must be lung or infection, got {subset!r}")
    manifest = read_manifest(cfg.shards)
    root = Path(cfg.shards)
    shard_urls(root, manifest, subset, split, cfg.verify)  # existence and checksum errors, early
    pieces = _rank_pieces(_entries(root, manifest, subset, split), root, rank, world_size)
    dataset = wds.DataPipeline(
        _EvalStream(pieces, manifest["format"], manifest["image_size"]),
        wds.batched(batch_size or cfg.eval_batch_size, collation_fn=collate, partial=True),
    )
    workers = min(cfg.workers, len(pieces))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)
