"""A shard set's `manifest.json`, read into a typed `Manifest`, and the subsets a config reads.

`mtlxray shards build` writes the file (`mtlxray.data.shards`); its JSON format is unchanged: the
image format and size, per subset and split the shard entries (`path`, `samples`, `bytes`,
`sha256`) and the images per class, the classes of each subset, and the image table (`images`:
`columns` and one row per sample, with the hashes `mtlxray.data.audit` reads). Fields only the
summaries read (label scheme, dedupe and duplicate counts, build parameters) stay in `raw`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mtlxray.config import DataConfig
from mtlxray.data import remote
from mtlxray.data.remote import RetryPolicy
from mtlxray.errors import ShardError, ShardsNotFoundError

__all__ = ["Manifest", "read_manifest", "shard_subsets", "validation_subset", "SUBSETS"]

SUBSETS = ("lung", "infection")
"""The subsets a shard set holds: lung segmentation, infection segmentation."""

_SHARD_SUBSETS = {"lung": ("lung",), "infection": ("infection",), "mixed": SUBSETS, "alternate": SUBSETS}


def shard_subsets(data: DataConfig) -> tuple[str, ...]:
    """The subsets whose training split `data.subset` reads: itself, or both for `mixed`/`alternate`."""
    return _SHARD_SUBSETS[data.subset]


def validation_subset(data: DataConfig) -> str:
    """The subset validated on: the training subset, or `infection` when training mixes both."""
    return data.subset if data.subset in SUBSETS else "infection"


@dataclass(frozen=True)
class Manifest:
    """What a shard set's manifest says; `raw` is the whole file, as `shards build` wrote it."""

    format: str
    """How images are stored in the shards: `raw` or `png`."""
    image_size: int
    """Side of the square images, in pixels."""
    shards: dict[str, dict[str, list[dict]]]
    """subset -> split -> shard entries (`path` under the root, `samples`, `bytes`, `sha256`)."""
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """subset -> split -> class name -> images."""
    classes: dict[str, list[str]] = field(default_factory=dict)
    """subset -> the class names of its images."""
    images: Optional[dict] = None
    """The image table (`columns`, `rows`); None in a manifest built before hashes were recorded."""
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict) -> "Manifest":
        table = raw.get("images")
        return cls(format=raw.get("format"), image_size=raw.get("image_size"), shards=raw["shards"],
                   counts=raw.get("counts", {}), classes=raw.get("classes", {}),
                   images=table if isinstance(table, dict) else None, raw=raw)

    def entries(self, subset: str, split: str) -> list[dict]:
        """The shard entries of `subset`/`split` ([] when the manifest lists none)."""
        return self.shards.get(subset, {}).get(split, [])

    def count(self, subset: str, split: str) -> Optional[int]:
        """Images of `subset`/`split` by the manifest's per-class counts; None when it counts none."""
        per_class = self.counts.get(subset, {}).get(split)
        return sum(per_class.values()) if isinstance(per_class, dict) else None

    @property
    def fingerprint(self) -> Optional[str]:
        """The fingerprint of the source folder the set was built from."""
        return self.raw.get("source", {}).get("fingerprint")


def read_manifest(root: str | Path, policy: Optional[RetryPolicy] = None) -> Manifest:
    """Load `root/manifest.json` (root: a folder or an http(s)/s3 prefix); ShardsNotFoundError (exit
    2) if it is missing, ShardError if it is unreadable or lists no shards."""
    root = remote.normalise_root(root)
    if remote.is_remote(root):
        url = remote.join(root, "manifest.json")
        try:
            text = remote.fetch_bytes(url, policy)
        except ShardError as e:
            if "HTTP 404" in str(e) or "NoSuchKey" in str(e) or "S3 404" in str(e):
                raise ShardsNotFoundError(f"{url}: shard manifest not found (build it with `mtlxray shards build` "
                                 "and upload the whole folder)") from None
            raise
        where = url
    else:
        path = Path(root) / "manifest.json"
        if not path.is_file():
            raise ShardsNotFoundError(f"{path}: shard manifest not found (build it with `mtlxray shards build`)")
        try:
            text = path.read_bytes()
        except OSError as e:
            raise ShardError(f"{path}: unreadable manifest: {e}") from None
        where = str(path)
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or not manifest.get("shards"):
        raise ShardError(f"{where}: manifest lists no shards")
    return Manifest.from_dict(manifest)
