"""Shard sets that lie: paths leaving the shard root, shards cut short (at a 512-byte boundary
between samples, or between the members of one sample), checked at training start and while
evaluation streams."""

import json
import shutil
import tarfile

import pytest

from mtlxray.config import DataConfig
from mtlxray.data.loader import build_eval_loader, build_train_loader, check_shard_sizes, shard_urls
from mtlxray.data.manifest import read_manifest
from mtlxray.errors import ShardError
from mtlxray.io import sha256_file


def _cfg(root, **kw) -> DataConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    return DataConfig(shards=str(root), batch_size=kw.pop("batch_size", 2), **kw)


def _copy(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    return copy


def _edit_manifest(root, fn) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def _member_ends(shard) -> list[tuple[str, int]]:
    """(member name, offset of the 512-byte block after its data) of every member."""
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]


def _cut(root, rel, size) -> None:
    """Cut a shard to `size` bytes and make the manifest agree on its bytes and sha256 (a manifest
    written after a bad copy), so only the sample count can tell."""
    shard = root / rel
    shard.write_bytes(shard.read_bytes()[:size])

    def fix(m):
        for entries in m["shards"].values():
            for es in entries.values():
                for e in es:
                    if e["path"] == rel:
                        e["bytes"], e["sha256"] = size, sha256_file(shard)
    _edit_manifest(root, fix)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.tar", "lung/../../outside.tar", "http://x/y.tar",
                                 "C:\\shards\\a.tar", ""])
def test_manifest_paths_that_leave_the_shard_root_are_refused(tiny_shards, tmp_path, bad):
    copy = _copy(tiny_shards, tmp_path)
    (tmp_path / "outside.tar").write_bytes((copy / "lung" / "train-000000.tar").read_bytes())
    _edit_manifest(copy, lambda m: m["shards"]["lung"]["train"][0].update(path=bad))
    with pytest.raises(ShardError, match=r"manifest\.json: shard path .* leaves the shard root"):
        build_train_loader(_cfg(copy), seed=0, epoch=0, rank=0, world_size=1)
    with pytest.raises(ShardError, match="leaves the shard root"):
        build_eval_loader(_cfg(copy), subset="lung", split="train", rank=0, world_size=1)


def test_training_start_checks_shard_sizes_against_the_manifest(tiny_shards, tmp_path):
    copy = _copy(tiny_shards, tmp_path)
    shard = copy / "lung" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # the end-of-archive blocks: still a valid tar
    manifest = read_manifest(copy)
    with pytest.raises(ShardError, match=r"train-000001\.tar: \d+ bytes, but the manifest says \d+ \(truncated"):
        check_shard_sizes(copy, manifest, "lung", "train")
    with pytest.raises(ShardError, match=r"train-000001\.tar: \d+ bytes, but the manifest says"):
        shard_urls(copy, manifest, "lung", "train")  # what the trainer's preflight calls
    with pytest.raises(ShardError, match=r"train-000001\.tar: \d+ bytes"):
        build_train_loader(_cfg(copy), seed=0, epoch=0, rank=0, world_size=1)


def test_evaluation_refuses_a_shard_cut_between_samples(tiny_shards, tmp_path):
    copy = _copy(tiny_shards, tmp_path)
    rel = "lung/test-000000.tar"
    ends = _member_ends(copy / rel)
    _cut(copy, rel, ends[4][1])  # after the 5 members of the first sample: a valid, shorter tar
    with tarfile.open(copy / rel) as tar:
        assert len(tar.getnames()) == 5
    with pytest.raises(ShardError, match=r"test-000000\.tar: holds 1 samples, but the manifest says 4 \(truncated"):
        for _ in build_eval_loader(_cfg(copy), subset="lung", split="test", rank=0, world_size=1):
            pass
    # Ranks that read a later part of the shard see it too.
    with pytest.raises(ShardError, match=r"test-000000\.tar: holds 1 samples"):
        for _ in build_eval_loader(_cfg(copy), subset="lung", split="test", rank=1, world_size=3):
            pass


def test_a_shard_with_more_samples_than_the_manifest_is_refused(tiny_shards, tmp_path):
    copy = _copy(tiny_shards, tmp_path)
    _edit_manifest(copy, lambda m: m["shards"]["lung"]["val"][0].update(samples=3) or m["counts"])
    with pytest.raises(ShardError, match=r"val-000000\.tar: holds more samples than the manifest's 3"):
        for _ in build_eval_loader(_cfg(copy), subset="lung", split="val", rank=0, world_size=1):
            pass


def test_a_sample_cut_between_its_members_names_the_shard_and_the_key(tiny_shards, tmp_path):
    copy = _copy(tiny_shards, tmp_path)
    rel = "lung/train-000000.tar"
    ends = _member_ends(copy / rel)
    name = ends[6][0]
    key = name.split(".", 1)[0]
    _cut(copy, rel, ends[6][1])  # the second sample keeps 2 of its 5 members
    pattern = rf"train-000000\.tar: sample '{key}' is incomplete \(no .*; truncated shard\?\)"
    with pytest.raises(ShardError, match=pattern):
        for _ in build_eval_loader(_cfg(copy), subset="lung", split="train", rank=0, world_size=1):
            pass
    with pytest.raises(ShardError, match=pattern):
        for _ in build_train_loader(_cfg(copy, batch_size=1), seed=0, epoch=0, rank=0, world_size=1):
            pass
