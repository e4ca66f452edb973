"""Loader: round trip to the source files, batch contract, determinism, exact resume, DDP equal batches."""

import datetime
import json
import multiprocessing
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from mtlxray.config import DataConfig
from mtlxray.data import loader as loader_mod
from mtlxray.data.boxes import bounding_boxes
from mtlxray.data.loader import batch_to_device, build_eval_loader, build_train_loader, train_batches_per_epoch
from mtlxray.data.manifest import Manifest, read_manifest
from mtlxray.data.shards import sample_key
from mtlxray.data.sources import list_covid_qu_ex
from mtlxray.errors import ShardError


def _cfg(root, **kw) -> DataConfig:
    kw.setdefault("workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    return DataConfig(shards=str(root), batch_size=kw.pop("batch_size", 4), **kw)


def _all_keys(manifest: Manifest, subset: str, split: str) -> int:
    return manifest.count(subset, split)


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_round_trip_through_the_loader_equals_the_source_files(fmt, tiny_tree, tiny_shards, tiny_shards_png):
    root = tiny_shards if fmt == "raw" else tiny_shards_png
    records = {sample_key(r): r for r in list_covid_qu_ex(tiny_tree).records}
    seen = 0
    for subset in ("lung", "infection"):
        for split in ("train", "val", "test"):
            for batch in build_eval_loader(_cfg(root), subset=subset, split=split, rank=0, world_size=1):
                for i, key in enumerate(batch["key"]):
                    rec = records[key]
                    img = np.asarray(Image.open(rec.image))
                    lung = np.asarray(Image.open(rec.lung_mask)) // 255
                    inf = np.asarray(Image.open(rec.inf_mask)) // 255 if rec.inf_mask else np.zeros_like(img)
                    np.testing.assert_array_equal(batch["img"][i, 0].numpy(), img)
                    np.testing.assert_array_equal(batch["lung"][i, 0].numpy(), lung)
                    np.testing.assert_array_equal(batch["inf"][i, 0].numpy(), inf)
                    assert batch["label"][i].item() == rec.label
                    assert batch["has_inf"][i].item() == (rec.subset == "infection")
                    assert batch["boxes"][i] == bounding_boxes(inf)
                    seen += 1
    assert seen == len(records)


def test_train_batches_follow_the_contract(tiny_shards):
    cfg = _cfg(tiny_shards, subset="mixed", batch_size=5)
    batches = list(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1))
    assert len(batches) == train_batches_per_epoch(cfg, 1) == (18 + 8) // 5
    for b in batches:
        assert b["img"].shape == b["lung"].shape == b["inf"].shape == (5, 1, 64, 64)
        assert b["img"].dtype == b["lung"].dtype == b["inf"].dtype == torch.uint8
        assert b["img"].float().std() > 0
        assert set(b["lung"].unique().tolist()) <= {0, 1}
        assert b["label"].dtype == torch.int64 and b["has_inf"].dtype == torch.bool
        assert b["has_inf"].tolist() == [k.startswith("infection_") for k in b["key"]]
    assert any(b["has_inf"].any() for b in batches) and any((~b["has_inf"]).any() for b in batches)


def test_on_device_augmentation_ships_parameters_and_applies_them_in_batch_to_device(tiny_shards):
    plain = _cfg(tiny_shards, batch_size=4)
    plain.augment.enabled = False
    on_device = _cfg(tiny_shards, batch_size=4)
    on_device.augment.on_device = True
    b0 = next(iter(build_train_loader(plain, seed=0, epoch=0, rank=0, world_size=1)))
    b1 = next(iter(build_train_loader(on_device, seed=0, epoch=0, rank=0, world_size=1)))
    assert b1["key"] == b0["key"] and torch.equal(b1["img"], b0["img"])  # the loader left pixels alone
    assert b1["aug"].shape == (4, 6) and "aug" not in b0
    f = batch_to_device(b1, "cpu")
    assert "aug" not in f and f["img"].shape == (4, 1, 64, 64)
    assert set(f["lung"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(f["img"], batch_to_device(b0, "cpu")["img"])  # augmented on the device


def test_batch_to_device_scales_the_image_and_keeps_masks_binary(tiny_shards):
    b = next(iter(build_train_loader(_cfg(tiny_shards, batch_size=4), seed=0, epoch=0, rank=0, world_size=1)))
    f = batch_to_device(b, "cpu")
    assert f["img"].dtype == f["lung"].dtype == f["inf"].dtype == torch.float32
    assert torch.equal(f["img"], b["img"].float() / 255.0)
    assert torch.equal(f["lung"], b["lung"].float()) and set(f["lung"].unique().tolist()) <= {0.0, 1.0}
    assert f["key"] == b["key"] and torch.equal(f["label"], b["label"])


def test_batches_per_epoch_come_from_the_manifest_or_samples_per_epoch(tiny_shards):
    assert train_batches_per_epoch(_cfg(tiny_shards), 2) == 18 // 8
    assert train_batches_per_epoch(_cfg(tiny_shards, subset="alternate"), 1) == (18 + 8) // 4
    assert train_batches_per_epoch(_cfg(tiny_shards, samples_per_epoch=100), 2) == 12
    assert train_batches_per_epoch(_cfg(tiny_shards, samples_per_epoch=3), 2) == 1


def test_alternate_takes_whole_batches_from_each_subset_in_turn(tiny_shards):
    cfg = _cfg(tiny_shards, subset="alternate", workers=2)
    batches = list(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1))
    assert [bool(b["has_inf"].all()) for b in batches] == [i % 2 == 1 for i in range(len(batches))]
    assert all(b["has_inf"].all() or not b["has_inf"].any() for b in batches)


def test_same_seed_same_batches_and_another_epoch_reorders(tiny_shards):
    cfg = _cfg(tiny_shards, batch_size=3)
    run = lambda epoch: list(build_train_loader(cfg, seed=1, epoch=epoch, rank=0, world_size=1))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["img"], y["img"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]


@pytest.mark.parametrize("subset", ["lung", "alternate"])
def test_one_loader_process_yields_the_batches_of_loading_in_the_training_process(tiny_shards, subset):
    # what lets a config pick `workers: 0` or `1` for speed alone (the demo on 2 cores loads in process)
    batches = {w: list(build_train_loader(_cfg(tiny_shards, subset=subset, workers=w, batch_size=3),
                                          seed=2, epoch=1, rank=0, world_size=1)) for w in (0, 1)}
    assert [b["key"] for b in batches[0]] == [b["key"] for b in batches[1]]
    for x, y in zip(batches[0], batches[1]):
        assert all(torch.equal(x[k], y[k]) for k in ("img", "lung", "inf", "label"))


@pytest.mark.parametrize("subset, workers", [("lung", 0), ("lung", 2), ("alternate", 2), ("mixed", 1)])
def test_start_batch_resumes_exactly_where_an_uninterrupted_epoch_was(tiny_shards, subset, workers):
    cfg = _cfg(tiny_shards, subset=subset, workers=workers, batch_size=2)
    full = list(build_train_loader(cfg, seed=3, epoch=2, rank=1, world_size=2))
    assert len(full) == train_batches_per_epoch(cfg, 2)
    for k in (1, 3):
        resumed = list(build_train_loader(cfg, seed=3, epoch=2, rank=1, world_size=2, start_batch=k))
        assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]]
        assert all(torch.equal(x["img"], y["img"]) for x, y in zip(resumed, full[k:]))
    assert list(build_train_loader(cfg, seed=3, epoch=2, rank=1, world_size=2, start_batch=len(full))) == []


def test_start_batch_skips_without_decoding(tiny_shards, monkeypatch):
    calls = []
    real = loader_mod._decode
    monkeypatch.setattr(loader_mod, "_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = _cfg(tiny_shards, batch_size=2)
    total = train_batches_per_epoch(cfg, 1)
    list(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1, start_batch=4))
    # Only the yielded batches are decoded, plus the one sample webdataset's `batched` reads ahead.
    assert len(calls) == (total - 4) * 2 + 1


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (3, "auto"), (7, 1)])  # auto: as `evaluate` builds it
def test_eval_covers_every_sample_exactly_once_across_ranks(tiny_shards, world_size, workers):
    manifest = read_manifest(tiny_shards)
    keys = []
    for rank in range(world_size):
        for b in build_eval_loader(_cfg(tiny_shards, workers=workers), subset="lung", split="train",
                                   rank=rank, world_size=world_size, batch_size=3):
            keys += b["key"]
    assert len(keys) == len(set(keys)) == _all_keys(manifest, "lung", "train")


def test_missing_or_empty_shard_sets_raise_shard_error(tiny_shards, tmp_path):
    with pytest.raises(ShardError, match="manifest not found"):
        read_manifest(tmp_path)
    with pytest.raises(ShardError, match="no samples for subset 'lung', split 'nope'"):
        next(iter(build_eval_loader(_cfg(tiny_shards), subset="lung", split="nope", rank=0, world_size=1)))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    (copy / "lung" / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: shard listed in the manifest is missing"):
        build_train_loader(_cfg(copy), seed=0, epoch=0, rank=0, world_size=1)


def test_verify_detects_a_changed_shard_by_sha256(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    build_train_loader(_cfg(copy, verify=True), seed=0, epoch=0, rank=0, world_size=1)
    shard = copy / "lung" / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    build_train_loader(_cfg(copy), seed=0, epoch=0, rank=0, world_size=1)  # not checked without verify
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256 does not match"):
        build_train_loader(_cfg(copy, verify=True), seed=0, epoch=0, rank=0, world_size=1)


def _rank_main(rank: int, port: int, root: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = _cfg(root, batch_size=3, workers=1)
        batches = 0
        for _ in build_train_loader(cfg, seed=0, epoch=0, rank=rank, world_size=2):
            t = torch.ones(1)
            dist.all_reduce(t)  # a step's collective: hangs (times out) if batch counts differ
            batches += 1
        keys = []
        for b in build_eval_loader(cfg, subset="lung", split="train", rank=rank, world_size=2, batch_size=4):
            keys += b["key"]
        gathered = [None, None]
        dist.all_gather_object(gathered, keys)
        queue.put((rank, dist.get_world_size(), batches, gathered))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_on_uneven_shards_get_equal_batches_and_eval_sees_each_sample_once(tiny_shards):
    manifest = read_manifest(tiny_shards)
    sizes = [e["samples"] for e in manifest.entries("lung", "train")]
    assert len(set(sizes)) > 1  # deliberately uneven shards
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tiny_shards), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [r[1] for r in results] == [2, 2]
    assert results[0][2] == results[1][2] == train_batches_per_epoch(_cfg(tiny_shards, batch_size=3), 2)
    keys = results[0][3][0] + results[0][3][1]
    assert len(keys) == len(set(keys)) == _all_keys(manifest, "lung", "train")
    assert json.dumps(results[0][3]) == json.dumps(results[1][3])


def test_batch_order_is_the_same_in_a_fresh_interpreter(tiny_shards):
    import os
    import subprocess
    import sys

    code = ("import json, sys; from mtlxray.config import DataConfig; "
            "from mtlxray.data.loader import build_train_loader; "
            "cfg = DataConfig(shards=sys.argv[1], batch_size=3, workers=0, shuffle_buffer=8, subset='mixed'); "
            "print(json.dumps([b['key'] for b in build_train_loader(cfg, seed=5, epoch=1, rank=0, world_size=1)]))")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_shards)], env=env, capture_output=True,
                         text=True, check=True).stdout
    cfg = _cfg(tiny_shards, batch_size=3, subset="mixed")
    here = [b["key"] for b in build_train_loader(cfg, seed=5, epoch=1, rank=0, world_size=1)]
    assert json.loads(out.strip().splitlines()[-1]) == here


def _aug_cfg(root, on_device: bool) -> DataConfig:
    cfg = _cfg(root, subset="infection", batch_size=4)
    cfg.augment.rotate_deg, cfg.augment.translate, cfg.augment.scale = 20.0, 0.15, 0.15
    cfg.augment.on_device = on_device
    return cfg


@pytest.mark.parametrize("on_device", [False, True])
def test_boxes_follow_the_augmented_infection_mask(tiny_shards, on_device):
    cfg = _aug_cfg(tiny_shards, on_device)
    plain = _cfg(tiny_shards, subset="infection", batch_size=4)
    plain.augment.enabled = False
    moved = 0
    for b, b0 in zip(build_train_loader(cfg, seed=0, epoch=0, rank=0, world_size=1),
                     build_train_loader(plain, seed=0, epoch=0, rank=0, world_size=1)):
        assert b["key"] == b0["key"]
        f = batch_to_device(b, "cpu") if on_device else b
        for i in range(len(b["key"])):
            inf = f["inf"][i, 0].to(torch.uint8).numpy()
            assert f["boxes"][i] == bounding_boxes(inf)  # the components of the mask the model sees
            moved += f["boxes"][i] != b0["boxes"][i]
    assert moved > 0  # the stored boxes would have been wrong for these samples


def _radiography_shards(tree, out):
    from mtlxray.data.shards import build_shards

    return build_shards(tree, out, layout="radiography", format="raw", image_size=32, workers=1, progress=False)


def test_data_classes_picks_the_label_scheme_from_each_samples_class_name(radiography_tree, tiny_shards, tmp_path):
    from mtlxray.errors import ConfigError

    out = tmp_path / "rad"
    manifest = _radiography_shards(radiography_tree, out)
    assert manifest["label_scheme"] == "covid3" and manifest["label_names"] == ["Normal", "Non-COVID", "COVID-19"]
    want = {"covid3": {"Normal": 0, "Lung_Opacity": 1, "Viral Pneumonia": 1, "COVID": 2},
            "radiography4": {"Normal": 0, "Lung_Opacity": 1, "COVID": 2, "Viral Pneumonia": 3}}
    for scheme, labels in want.items():
        seen = {}
        for b in build_eval_loader(_cfg(out, classes=scheme), subset="lung", split="train", rank=0, world_size=1):
            for key, label in zip(b["key"], b["label"].tolist()):
                seen[key.split("_")[2] if "Viral" not in key else "Viral Pneumonia"] = label
        assert {("Lung_Opacity" if k == "Lung" else k): v for k, v in seen.items()} == labels
        batch = next(iter(build_train_loader(_cfg(out, classes=scheme), seed=0, epoch=0, rank=0, world_size=1)))
        assert set(batch["label"].tolist()) <= set(labels.values())
    assert loader_mod.label_names(_cfg(out, classes="radiography4")) == ["Normal", "Lung_Opacity", "COVID",
                                                                          "Viral Pneumonia"]
    with pytest.raises(ConfigError, match=r"data.classes=radiography4: .*no label for class\(es\) \['COVID-19'"):
        build_eval_loader(_cfg(tiny_shards, classes="radiography4"), subset="lung", split="val", rank=0, world_size=1)


def test_a_radiography4_build_records_its_four_label_names(radiography_tree, tmp_path):
    from mtlxray.data.shards import build_shards

    m = build_shards(radiography_tree, tmp_path / "r4", layout="radiography", format="raw", image_size=32,
                     workers=1, progress=False, classes="radiography4")
    assert m["label_scheme"] == "radiography4"
    assert m["label_names"] == ["Normal", "Lung_Opacity", "COVID", "Viral Pneumonia"]
    assert m["label_map"]["lung"] == {"COVID": 2, "Lung_Opacity": 1, "Normal": 0, "Viral Pneumonia": 3}


def test_data_fraction_trains_on_a_fixed_seeded_per_class_part_of_the_split(tiny_shards):
    full = _cfg(tiny_shards, batch_size=1)
    half = _cfg(tiny_shards, batch_size=1, fraction=0.5)
    assert train_batches_per_epoch(full, 1) == 18 and train_batches_per_epoch(half, 1) == 9

    def keys(cfg, epoch):
        return {k for b in build_train_loader(cfg, seed=0, epoch=epoch, rank=0, world_size=1) for k in b["key"]}

    chosen = loader_mod._train_keys(half, read_manifest(tiny_shards), "lung")
    seen = keys(half, 0) | keys(half, 1) | keys(half, 2)
    assert len(chosen) == 9 and seen <= chosen and len(seen) > 4  # every epoch draws from the same part
    assert sorted(k.split("_")[2] for k in chosen) == ["COVID-19"] * 3 + ["Non-COVID"] * 3 + ["Normal"] * 3
    other = loader_mod._train_keys(_cfg(tiny_shards, fraction=0.5, fraction_seed=1), read_manifest(tiny_shards), "lung")
    assert other != chosen and len(other) == 9


@pytest.mark.parametrize("field, value", [("fraction", 0.0), ("fraction", 1.5), ("fraction", float("nan")),
                                          ("remote_retries", -1), ("remote_backoff_s", -0.1),
                                          ("remote_timeout_s", 0.0)])
def test_data_config_rejects_bad_values_naming_the_key(field, value):
    from mtlxray.config import ConfigError

    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(**{field: value})


def test_data_config_rejects_an_unknown_label_scheme():
    from mtlxray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.classes"):
        load_config(None, ["data.classes=radiography5"])


def test_loader_options_pin_and_prefetch_only_for_a_gpu(monkeypatch):
    import torch

    from mtlxray.data.loader import loader_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader_options(2) == {"num_workers": 2, "persistent_workers": False, "pin_memory": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_options(2)["pin_memory"] and loader_options(2)["prefetch_factor"] == 4
    assert "prefetch_factor" not in loader_options(0)  # in-process loading takes no prefetch factor
