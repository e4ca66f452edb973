"""`loader`: training samples/s of one loader process (one core) from shards, raw and PNG, with
and without augmentation, against a plain `torch.utils.data.Dataset` reading the PNG folders with
PIL (the baseline) and reading the same tar bytes without decoding (the limit). Also
`augment.on_device`: the loader's share (drawing the parameters) and, on this CPU, the whole of it
with the batched warp (`affine_grid` + `grid_sample`) that a GPU would run.

Remote rows: the same raw shards streamed from HTTP (nginx when installed, else Python's
`http.server`) and from S3 (moto's standalone server, when `moto[server]` and boto3 are installed)
on the loopback address, side by side with local disk. The servers share this machine's cores with
the loader, so the rows bound what a loader process gets from storage, not what a network gives."""

from __future__ import annotations

import contextlib
import cProfile
import functools
import http.server
import itertools
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mtlxray.bench.common import Context, SuiteResult, Target, measure_side_by_side
from mtlxray.bench.shards import synth_tree
from mtlxray.config import DataConfig

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


def _shard_stream(root: Path | str, augment: bool, on_device: bool = False) -> Iterator:
    from mtlxray.data.loader import build_train_loader

    cfg = DataConfig(shards=str(root), subset="lung", batch_size=BATCH, workers=0, samples_per_epoch=10**7)
    cfg.augment.enabled = augment
    cfg.augment.on_device = on_device
    return iter(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1))


def _read_only_stream(root: Path) -> Iterator:
    """The same shards' members read into memory (one copy of every byte, as a reader must make),
    nothing decoded, grouped by BATCH. The loader maps the shards and hands out zero-copy views,
    so without the copy this would time only the tar headers."""
    import webdataset as wds

    from mtlxray.data.loader import shard_urls
    from mtlxray.data.manifest import read_manifest
    from mtlxray.data.tarstream import tar_to_samples

    urls = shard_urls(root, read_manifest(root), "lung", "train")
    samples = wds.DataPipeline(wds.ResampledShards(urls, seed=0, deterministic=True), tar_to_samples(),
                               wds.map(lambda s: {k: bytes(v) if isinstance(v, memoryview) else v for k, v in s.items()}))
    it = iter(samples)
    return iter(lambda: [next(it) for _ in range(BATCH)], None)


def _baseline_stream(tree: Path) -> Iterator:
    images = sorted(tree.glob("Lung Segmentation Data/Lung Segmentation Data/Train/*/images/*.png"))
    if not images:
        raise RuntimeError(f"{tree}: no PNG images in the COVID-QU-Ex layout")
    ds = PngFolderDataset(images)
    return _cycle_batches(lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=0))


def _device_aug_stream(root: Path) -> Iterator:
    """`augment.on_device` batches put through `batch_to_device` on this CPU: the loader draws the
    parameters, the batched warp (`augment_batch`) runs where the model does."""
    from mtlxray.data.loader import batch_to_device

    src = _shard_stream(root, augment=True, on_device=True)
    return (batch_to_device(batch, "cpu") for batch in src)


def _wait_port(port: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def http_server(root: Path, work: Path) -> Iterator[tuple[str, str]]:
    """(URL, server name) of `root` served on the loopback address: nginx where installed (one
    process, no daemon), else Python's threaded `http.server`."""
    from mtlxray.io import free_port

    port = free_port()
    nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if nginx:
        work.mkdir(parents=True, exist_ok=True)
        (work / "conf").write_text(
            f"daemon off; master_process off; pid {work}/pid; error_log {work}/error.log;\n"
            f"events {{}}\nhttp {{ access_log off; sendfile on; client_body_temp_path {work}/body;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n")
        proc = subprocess.Popen([nginx, "-c", str(work / "conf"), "-p", str(work)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if _wait_port(port):
                yield f"http://127.0.0.1:{port}", "nginx"
                return
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", "python http.server"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[str | None]:
    """s3:// URL of `root` uploaded to moto's standalone S3 server, with the standard AWS variables
    pointing at it while the block runs; None when moto or boto3 is not installed."""
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    from mtlxray.io import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        if not _wait_port(port, 60):
            yield None
            return
        os.environ.update(env)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        for path in sorted(root.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), "bench", f"shards/{path.relative_to(root).as_posix()}")
        yield "s3://bench/shards"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


def batch_memory_cost(repeats: int, size: int = 256, batches: int = 20) -> dict:
    """What stacking one uint8 field of a batch costs in fresh pages (a new allocation per batch,
    eight batches kept alive, as a consumer holds them) against the same copy into reused memory,
    side by side. The difference is the kernel's page-fault cost, which no loader code avoids."""
    src = [np.random.default_rng(i).integers(0, 255, (size, size), dtype=np.uint8) for i in range(BATCH)]
    held: list[np.ndarray] = []
    reused = np.empty((BATCH, size, size), np.uint8)

    def fresh() -> None:
        for _ in range(batches):
            held.append(np.stack(src))
            del held[:-8]

    def reuse() -> None:
        for _ in range(batches):
            np.stack(src, out=reused)

    t = measure_side_by_side({"fresh": fresh, "reused": reuse}, warmup=1, repeats=repeats)
    mib = BATCH * size * size / 2**20
    return {"us_per_mib_fresh": 1e6 * t["fresh"].median / batches / mib,
            "us_per_mib_reused": 1e6 * t["reused"].median / batches / mib,
            "fresh/reused": t["fresh"].median / t["reused"].median}


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
    from mtlxray.data.shards import build_shards

    n_batches = ctx.pick(32, 12, 2)
    repeats = ctx.pick(5, 3, 1)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp, contextlib.ExitStack() as servers:
        tree = Path(tmp) / "tree"
        synth_tree(tree, ctx.pick("small", "small", "tiny"))
        roots = {fmt: Path(tmp) / fmt for fmt in ("raw", "png")}
        for fmt, root in roots.items():
            build_shards(tree, root, format=fmt, shard_size=50, workers=0, progress=False)
        http_url, http_kind = servers.enter_context(http_server(roots["raw"], Path(tmp) / "nginx"))
        s3_url = servers.enter_context(s3_server(roots["raw"]))
        streams = {
            "read_only_raw": _read_only_stream(roots["raw"]),
            "read_only_png": _read_only_stream(roots["png"]),
            "shards_raw": _shard_stream(roots["raw"], augment=False),
            "shards_raw_aug": _shard_stream(roots["raw"], augment=True),
            "shards_png": _shard_stream(roots["png"], augment=False),
            "shards_png_aug": _shard_stream(roots["png"], augment=True),
            "shards_raw_aug_params": _shard_stream(roots["raw"], augment=True, on_device=True),
            "raw_aug_on_device(cpu)": _device_aug_stream(roots["raw"]),
            "baseline_png_folder": _baseline_stream(tree),
            "shards_raw_http": _shard_stream(http_url, augment=False),
        }
        if s3_url is not None:
            streams["shards_raw_s3"] = _shard_stream(s3_url, augment=False)
        # Fill every shuffle buffer first: until it is full, each batch out reads two batches in.
        fill = ctx.pick(DataConfig.shuffle_buffer // BATCH + 1, DataConfig.shuffle_buffer // BATCH + 1, 1)
        for s in streams.values():
            _consume(s, fill)()
        times = measure_side_by_side({k: _consume(s, n_batches) for k, s in streams.items()},
                                     warmup=1, repeats=repeats)
        profile = None if ctx.smoke else {
            name: python_hotspots(_consume(streams[name], 4)) for name in ("shards_raw", "shards_raw_aug")}
        servers.close()
    memory = batch_memory_cost(repeats)

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
                                   "raw_aug_on_device": rate["shards_raw_aug_params"]},
        "note": "one process, DataLoader num_workers=0: samples/s per loader core",
        "batch_memory_page_faults": memory,
        "remote": {"http_server": http_kind, "s3_server": "moto" if s3_url else "not installed (moto[server], boto3)",
                   "local_raw": rate["shards_raw"], "http_raw": rate["shards_raw_http"],
                   "s3_raw": rate.get("shards_raw_s3"),
                   "http/local": rate["shards_raw_http"] / rate["shards_raw"],
                   "s3/local": rate["shards_raw_s3"] / rate["shards_raw"] if "shards_raw_s3" in rate else None,
                   "note": "loopback; the server runs on the same cores as the loader process"},
    }
    if profile is not None:
        result.details["profile_python_hotspots"] = profile
    return result
