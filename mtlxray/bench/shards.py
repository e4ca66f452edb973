"""`shards`: shard-build throughput (images/s, PNG and raw formats, one worker) against plain
`tar` of the same files, which only copies bytes and so is the limit."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from mtlxray.bench.common import Context, SuiteResult, measure_side_by_side
from mtlxray.data.shards import build_shards
from mtlxray.data.synth import synthesize


def synth_tree(root: Path, scale: str, workers: int = 0) -> int:
    """Write synthetic phantoms in the COVID-QU-Ex layout (workers 0: all cores); returns the number of images."""
    counts = synthesize(root, scale=scale, workers=workers, progress=False)
    return sum(n for splits in counts.values() for classes in splits.values() for n in classes.values())


def run(ctx: Context) -> SuiteResult:
    scale = ctx.pick("small", "small", "tiny")
    repeats = ctx.pick(5, 2, 1)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "src"
        n_images = synth_tree(src, scale, workers=0)
        out = tmp_path / "out"

        def fresh(name: str) -> Path:
            path = out / name
            shutil.rmtree(path, ignore_errors=True)  # an up-to-date shard set would be a no-op
            return path

        def build(fmt: str):
            return lambda: build_shards(src, fresh(fmt), format=fmt, workers=1, progress=False)

        def tar() -> None:
            dest = fresh("tar")
            dest.mkdir(parents=True)
            subprocess.run(["tar", "-cf", str(dest / "all.tar"), "-C", str(src), "."], check=True)

        times = measure_side_by_side({"tar": tar, "build_png": build("png"), "build_raw": build("raw")},
                                     warmup=1, repeats=repeats)
        src_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        out_bytes = {name: sum(p.stat().st_size for p in (out / name).rglob("*.tar"))
                     for name in ("tar", "png", "raw")}
    result = SuiteResult("shards")
    tar_rate = times["tar"].rate(n_images)
    for name, t in times.items():
        result.rows.append({"method": name, "images": n_images, "img/s": t.rate(n_images),
                            "iqr%": t.iqr_pct, "of_tar": t.rate(n_images) / tar_rate})
    result.details = {"scale": scale, "workers": 1, "source_mib": src_bytes / 2**20,
                      "output_mib": {k: v / 2**20 for k, v in out_bytes.items()},
                      "note": "images = image files of both subsets; each sample also packs its masks"}
    return result
