"""`mtlxray.data.manifest`: the manifest file read into a `Manifest`, and the subsets a config reads."""

from __future__ import annotations

import json
import shutil

import pytest

from mtlxray.config import DataConfig
from mtlxray.data.manifest import Manifest, read_manifest, shard_subsets, validation_subset
from mtlxray.errors import ShardError, ShardsNotFoundError


def test_the_manifest_reads_into_typed_fields_of_the_unchanged_file(tiny_shards):
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    manifest = read_manifest(tiny_shards)
    assert manifest.raw == raw
    assert (manifest.format, manifest.image_size) == (raw["format"], raw["image_size"])
    assert manifest.entries("lung", "train") == raw["shards"]["lung"]["train"]
    assert manifest.count("lung", "train") == sum(raw["counts"]["lung"]["train"].values()) > 0
    assert manifest.classes == raw["classes"] and manifest.images["rows"] == raw["images"]["rows"]
    assert manifest.fingerprint == raw["source"]["fingerprint"]
    assert manifest.entries("lung", "nope") == [] and manifest.count("lung", "nope") is None


def test_a_manifest_of_an_older_build_without_counts_or_image_table_still_reads(tiny_shards, tmp_path):
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("images", "counts", "source")}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    manifest = read_manifest(tmp_path)
    assert manifest == Manifest.from_dict(old)
    assert manifest.images is None and manifest.count("lung", "train") is None and manifest.fingerprint is None


def test_a_missing_or_corrupt_manifest_is_a_named_error(tiny_shards, tmp_path):
    with pytest.raises(ShardsNotFoundError, match="shard manifest not found") as missing:
        read_manifest(tmp_path)
    assert missing.value.exit_code == 2
    shutil.copy(tiny_shards / "manifest.json", tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text((tmp_path / "manifest.json").read_text()[:100])
    with pytest.raises(ShardError, match="unreadable manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "raw", "shards": {}}))
    with pytest.raises(ShardError, match="manifest lists no shards"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("subset, trained, validated", [
    ("lung", ("lung",), "lung"), ("infection", ("infection",), "infection"),
    ("mixed", ("lung", "infection"), "infection"), ("alternate", ("lung", "infection"), "infection")])
def test_data_subset_names_the_subsets_trained_and_validated_on(subset, trained, validated):
    data = DataConfig(shards="s", subset=subset)
    assert (shard_subsets(data), validation_subset(data)) == (trained, validated)
