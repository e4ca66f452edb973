"""`loader`: training samples/s of one loader process (one core) from shards, raw and PNG, with
and without augmentation, against a plain `torch.utils.data.Dataset` reading the PNG folders with
PIL (the baseline) and reading the same tar bytes without decoding (the limit). Also a batched
torch affine warp (`affine_grid` + `grid_sample`), the form augmentation takes on the device."""

from __future__ import annotations

import cProfile
import itertools
import pstats
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Context, SuiteResult, SuiteUnavailable, Target, measure_side_by_side
from benchmarks.shards import synth_tree

BATCH = 16


class PngFolderDataset(torch.utils.data.Dataset):
    """The baseline: image + lung mask PNG pairs read with PIL, as a plain map-style dataset."""

    def __init__(self, images: list[Path]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path = self.images[i]
        with Image.open(path) as im:
            img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        with Image.open(path.parent.parent / "lung masks" / path.name) as im:
            lung = (np.asarray(im.convert("L")) > 127).astype(np.float32)
        return {"img": torch.from_numpy(img)[None], "lung": torch.from_numpy(lung)[None]}


def _cycle_batches(make_iter) -> Iterator:
    """An endless stream of batches from a loader factory (re-created when one epoch ends)."""
    while True:
        yield from make_iter()


def _consume(stream: Iterator, n_batches: int):
    return lambda: [None for _ in itertools.islice(stream, n_batches)]


def _shard_stream(root: Path, augment: bool) -> Iterator:
    from mtlxray.config import DataConfig
    from mtlxray.data.loader import build_train_loader

    cfg = DataConfig(shards=str(root), subset="lung", batch_size=BATCH, workers=0, samples_per_epoch=10**7)
    cfg.augment.enabled = augment
    return iter(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1))


def _read_only_stream(root: Path) -> Iterator:
    """Raw tar members of the same shards, nothing decoded, grouped by BATCH."""
    import webdataset as wds

    from mtlxray.data.loader import read_manifest, shard_urls
    from mtlxray.data.tarstream import tar_to_samples

    urls = shard_urls(root, read_manifest(root), "lung", "train")
    samples = wds.DataPipeline(wds.ResampledShards(urls, seed=0, deterministic=True), tar_to_samples())
    it = iter(samples)
    return iter(lambda: [next(it) for _ in range(BATCH)], None)


def _baseline_stream(tree: Path) -> Iterator:
    images = sorted(tree.glob("Lung Segmentation Data/Lung Segmentation Data/Train/*/images/*.png"))
    if not images:
        raise SuiteUnavailable(f"{tree}: no PNG images in the COVID-QU-Ex layout")
    ds = PngFolderDataset(images)
    return _cycle_batches(lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0))


def batched_affine(img: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotate/scale/shift of a batch with one grid: bilinear for images, nearest for masks.

    img: (B, 1, H, W) float, masks: (B, 2, H, W) float -> same shapes."""
    b = img.shape[0]
    angle = torch.deg2rad((torch.rand(b, generator=gen) * 2 - 1) * 7.0)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.05
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * 0.1  # grid units: 0.05 of the side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)  # (B, H, W, 2)
    return (F.grid_sample(img, grid, mode="bilinear", align_corners=False),
            F.grid_sample(masks, grid, mode="nearest", align_corners=False))


def _device_aug_stream(root: Path) -> Iterator:
    """Unaugmented raw batches, then the batched torch warp (what a device-side augment costs here)."""
    from mtlxray.data.loader import batch_to_device

    gen = torch.Generator().manual_seed(0)
    src = _shard_stream(root, augment=False)

    def gen_batches():
        for batch in src:
            batch = batch_to_device(batch, "cpu")
            yield batched_affine(batch["img"], torch.cat([batch["lung"], batch["inf"]], 1), gen)

    return gen_batches()


def python_hotspots(fn, k: int = 8) -> list[dict]:
    """The `k` functions with the most own time in one call of `fn`, by cProfile: the loader's
    work is Python, numpy and PIL, which torch.profiler does not see."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, prim calls, tottime, cumtime, callers)
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:k]
    return [{"function": f"{Path(f).name}:{line}({name})", "own_ms": round(v[2] * 1e3, 2),
             "share": round(v[2] / total, 3), "calls": v[0]} for (f, line, name), v in top]


def run(ctx: Context) -> SuiteResult:
    try:
        from mtlxray.data.shards import build_shards
    except ImportError as e:
        raise SuiteUnavailable(f"mtlxray.data is not part of this build: {e}") from None
    n_batches = ctx.pick(32, 12, 2)
    repeats = ctx.pick(5, 3, 1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tree = Path(tmp) / "tree"
        synth_tree(tree, ctx.pick("small", "small", "tiny"))
        roots = {fmt: Path(tmp) / fmt for fmt in ("raw", "png")}
        for fmt, root in roots.items():
            build_shards(tree, root, format=fmt, shard_size=50, workers=0, progress=False)
        streams = {
            "read_only_raw": _read_only_stream(roots["raw"]),
            "read_only_png": _read_only_stream(roots["png"]),
            "shards_raw": _shard_stream(roots["raw"], augment=False),
            "shards_raw_aug": _shard_stream(roots["raw"], augment=True),
            "shards_png": _shard_stream(roots["png"], augment=False),
            "shards_png_aug": _shard_stream(roots["png"], augment=True),
            "raw+batched_torch_aug": _device_aug_stream(roots["raw"]),
            "baseline_png_folder": _baseline_stream(tree),
        }
        times = measure_side_by_side({k: _consume(s, n_batches) for k, s in streams.items()},
                                     warmup=1, repeats=repeats)
        profile = None if ctx.smoke else {
            name: python_hotspots(_consume(streams[name], 4)) for name in ("shards_raw", "shards_raw_aug")}

    n = n_batches * BATCH
    rate = {k: t.rate(n) for k, t in times.items()}
    result = SuiteResult("loader")
    for k, t in times.items():
        limit = rate["read_only_png" if "png" in k and "baseline" not in k else "read_only_raw"]
        result.rows.append({"pipeline": k, "samples/s/core": rate[k], "iqr%": t.iqr_pct,
                            "of_read_limit": rate[k] / limit, "vs_baseline": rate[k] / rate["baseline_png_folder"]})
    result.targets = [
        Target("raw decode samples/s per core", rate["shards_raw"], 10_000),
        Target("raw loader / read-only limit", rate["shards_raw"] / rate["read_only_raw"], 0.5),
        Target("raw loader with augmentation / read-only limit", rate["shards_raw_aug"] / rate["read_only_raw"], 0.5),
    ]
    result.details = {
        "batch": BATCH, "samples_per_measure": n, "processes": 1,
        "per_core_training_rate": {"raw_aug": rate["shards_raw_aug"], "png_aug": rate["shards_png_aug"],
                                   "raw_batched_torch_aug": rate["raw+batched_torch_aug"]},
        "note": "one process, DataLoader num_workers=0: samples/s per loader core",
    }
    if profile is not None:
        result.details["profile_python_hotspots"] = profile
    return result
