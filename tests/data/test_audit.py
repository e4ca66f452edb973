"""Duplicate and leakage audit: hashes in the manifest, `shards audit` on data with planted duplicates
(the answer known), `overlap` for evaluation, and `--dedupe` / `--exclude-from` builds.

Measured near-duplicate detection (test_precision_and_recall_on_the_small_scale, 350 images at
256 px, 40 planted pairs: 20 exact, 20 near): precision 1.000 and recall 1.000 at the default
threshold 16; near copies at distance <= 6, the closest distinct pair at 20. imagehash's 64-bit
phash on the same phantoms gave distinct images distance 0, hence the centred DCT hash.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlxray.cli import main as cli
from mtlxray.data import audit
from mtlxray.data.shards import build_shards
from mtlxray.data.synth import NEAR_TRANSFORMS, _near_copy, render_phantom, synthesize

SIZE = 128  # the hash thumbnail is 64 px: a one-pixel shift at 128 px is half a thumbnail pixel


def _build(tree: Path, out: Path, **kw) -> dict:
    return build_shards(tree, out, format="raw", shard_size=8, workers=1, progress=False, image_size=SIZE, **kw)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny tree with 8 planted duplicates, its shards, and the planted truth."""
    root = tmp_path_factory.mktemp("planted")
    synthesize(root / "tree", "tiny", seed=1, size=SIZE, workers=1, progress=False, duplicates=8)
    _build(root / "tree", root / "shards")
    return root / "tree", root / "shards", json.loads((root / "tree" / "duplicates.json").read_text())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    synthesize(root / "tree", "tiny", seed=1, size=SIZE, workers=1, progress=False)
    _build(root / "tree", root / "shards")
    return root / "tree", root / "shards"


def _found(pairs) -> set:
    return {frozenset((p.a.source, p.b.source)) for p in pairs}


def _truth(planted_pairs) -> set:
    return {frozenset((p["source"], p["copy"])) for p in planted_pairs}


def test_hashes_see_through_encoding_and_near_copies_but_not_other_images():
    rng = np.random.default_rng(0)
    img, lung, _ = render_phantom(rng, "COVID-19", 256)
    other = render_phantom(np.random.default_rng(1), "COVID-19", 256)[0]
    assert audit.content_hash(img) == audit.content_hash(img.copy())
    assert audit.content_hash(img) != audit.content_hash(np.ascontiguousarray(img[:, ::-1]))
    h = audit.perceptual_hash(img)
    assert len(h) == 64 and audit.hamming(h, h) == 0
    for how in NEAR_TRANSFORMS:
        near, _ = _near_copy(img, [lung.astype(np.uint8) * 255], how)
        assert audit.hamming(h, audit.perceptual_hash(near)) <= audit.NEAR_THRESHOLD, how
    assert audit.hamming(h, audit.perceptual_hash(other)) > audit.NEAR_THRESHOLD


def test_the_manifest_records_both_hashes_of_every_image(planted):
    tree, shards, _ = planted
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = manifest["images"]["rows"]
    assert manifest["images"]["columns"] == audit.IMAGE_COLUMNS
    assert len(rows) == 46 and len({r[0] for r in rows}) == 46
    row = next(r for r in rows if r[0] == "lung_train_Normal_Normal_1")
    pixels = np.asarray(Image.open(tree / row[5]))
    assert row[6] == audit.content_hash(pixels) and row[7] == audit.perceptual_hash(pixels)
    assert manifest["duplicates"]["exact_pairs"] == 4 and manifest["duplicates"]["near_pairs"] == 4


def test_audit_finds_every_planted_duplicate_and_nothing_else(planted, tmp_path):
    _, shards, truth = planted
    result = audit.audit([shards], tmp_path / "audit")
    assert _found(result.pairs) == _truth(truth)  # precision and recall 1 on the known answer
    assert {p.kind for p in result.pairs} == {"exact", "near"}
    assert all(p.leakage for p in result.pairs)  # every planted copy went to val or test
    rows = list(csv.DictReader((tmp_path / "audit" / "audit.csv").open()))
    assert len(rows) == 8 and {r["leakage"] for r in rows} == {"1"}
    with Image.open(tmp_path / "audit" / "contact_sheet.png") as sheet:
        assert sheet.height > 8 * 160 and sheet.width > 2 * 160
        px = np.asarray(sheet)
    assert px[10:150, 10:150].std() > 10  # images were drawn, not left blank


def test_audit_is_clean_on_clean_data_and_the_cli_exit_codes_say_so(clean, planted, tmp_path, capsys):
    _, clean_shards = clean
    result = audit.audit([clean_shards], tmp_path / "a")
    assert result.leakage == [] and result.pairs == []
    assert cli(["shards", "audit", str(clean_shards), "--out", str(tmp_path / "b")]) == 0
    assert "clean: no image crosses a train/val/test boundary" in capsys.readouterr().out
    assert cli(["shards", "audit", str(planted[1]), "--out", str(tmp_path / "c")]) == audit.EXIT_LEAKAGE == 3
    out = capsys.readouterr()
    assert "LEAKAGE: 8 pair(s)" in out.out and (tmp_path / "c" / "audit.csv").is_file()
    assert len(out.err.strip().splitlines()) == 1


def test_audit_across_two_shard_sets(clean, planted, tmp_path):
    """The same source tree built twice: every image pairs with its twin; twins in the same split are
    duplicates, not leakage; the planted copies are leakage across sets too."""
    result = audit.audit([clean[1], planted[1]], None)
    cross = [p for p in result.pairs if p.a.set != p.b.set]
    assert len(cross) >= 46 - 8
    same_split = [p for p in cross if not p.leakage]
    assert same_split and all(p.kind == "exact" for p in same_split)


def test_overlap_tells_evaluation_whether_a_split_was_trained_on(planted, clean):
    _, shards, truth = planted
    pairs = audit.overlap(shards, "test", shards, "train")
    want = {t for t in _truth(truth) if any("/Test/" in s for s in t)}
    assert _found(pairs) == want and want
    assert all(p.a.split == "test" and p.b.split == "train" for p in pairs)
    assert audit.overlap(clean[1], "test", clean[1], "train") == []
    manifest = json.loads((shards / "manifest.json").read_text())
    assert _found(audit.overlap(manifest, "test", manifest, "train", subset_a="lung", subset_b="infection")) == \
        _found(p for p in pairs if p.a.subset == "lung" and p.b.subset == "infection")
    del manifest["images"]
    from mtlxray.errors import ShardError

    with pytest.raises(ShardError, match="no image hashes"):
        audit.overlap(manifest, "test", shards, "train")


@pytest.mark.parametrize("mode", ["keep-first", "drop"])
def test_dedupe_drops_copies_and_records_it(planted, tmp_path, mode):
    tree, _, truth = planted
    manifest = _build(tree, tmp_path / "out", dedupe=mode)
    kept = {r[5] for r in manifest["images"]["rows"]}
    dropped = manifest["dedupe"]["dropped"]
    assert manifest["params"]["dedupe"] == manifest["dedupe"]["mode"] == mode
    for pair in truth:
        if mode == "keep-first":  # the copy in val/test stays, the training original goes
            assert pair["copy"] in kept and pair["source"] not in kept
        else:
            assert pair["copy"] not in kept and pair["source"] not in kept
    assert len(dropped) == manifest["dedupe"]["dropped_count"] == (8 if mode == "keep-first" else 16)
    assert manifest["duplicates"]["exact_pairs"] == manifest["duplicates"]["near_pairs"] == 0
    assert sum(n for s in manifest["counts"].values() for sp in s.values() for n in sp.values()) == 46 - len(dropped)
    assert "dropped: " in (tmp_path / "out" / "notes.jsonl").read_text()
    assert audit.audit([tmp_path / "out"]).leakage == []


def test_exclude_from_leaves_out_another_sets_test_images(planted, clean, tmp_path):
    tree, _, truth = planted
    other = clean[1]  # built from the same phantoms, without the planted copies
    manifest = _build(tree, tmp_path / "out", exclude_from=[other])
    assert manifest["params"]["exclude_from"][0]["shards"] == str(other)
    rec = manifest["dedupe"]["exclude_from"][0]
    replaced = sum("/Test/" in t["copy"] for t in truth)  # those test images are train copies here
    assert rec["shards"] == str(other) and rec["test_images"] == 10 and rec["dropped"] == 10 - replaced
    assert audit.overlap(tmp_path / "out", "train", other, "test") == []
    assert audit.overlap(tmp_path / "out", "test", other, "test") == []
    # the test images left are exactly those that are train copies here, not the other set's test images
    assert sum(n for subset in manifest["counts"].values() for n in subset.get("test", {}).values()) == replaced


@pytest.mark.slow
def test_precision_and_recall_on_the_small_scale(tmp_path):
    tree, out = tmp_path / "tree", tmp_path / "shards"
    synthesize(tree, "small", seed=0, size=256, workers=2, progress=False, duplicates=40)
    build_shards(tree, out, format="raw", workers=2, progress=False)
    truth = _truth(json.loads((tree / "duplicates.json").read_text()))
    refs = audit.manifest_images(json.loads((out / "manifest.json").read_text()), "small")
    found = _found(audit.find_pairs(refs))
    precision, recall = len(found & truth) / max(1, len(found)), len(found & truth) / len(truth)
    distances = audit.find_pairs(refs, threshold=255)
    closest_distinct = min(p.distance for p in distances if frozenset((p.a.source, p.b.source)) not in truth)
    farthest_copy = max(p.distance for p in distances if frozenset((p.a.source, p.b.source)) in truth)
    print(f"precision {precision:.3f} recall {recall:.3f}; copies <= {farthest_copy}, "
          f"closest distinct pair {closest_distinct} (threshold {audit.NEAR_THRESHOLD})")
    assert precision == recall == 1.0
    assert farthest_copy < audit.NEAR_THRESHOLD < closest_distinct


def test_synth_refuses_more_duplicates_than_the_scale_holds(tmp_path):
    from mtlxray.errors import DataError

    with pytest.raises(DataError, match="room for fewer than 500 planted duplicates"):
        synthesize(tmp_path, "tiny", size=32, workers=1, progress=False, duplicates=500)
    shutil.rmtree(tmp_path)


def _reference_pairs(refs, threshold):
    """The O(N^2) definition: every pair with the same pixels or hashes within the threshold."""
    out = {}
    for i in range(len(refs)):
        for j in range(i + 1, len(refs)):
            d = audit.hamming(refs[i].phash, refs[j].phash)
            if d <= threshold or refs[i].content == refs[j].content:
                out[(i, j)] = ("exact" if refs[i].content == refs[j].content else "near", d)
    return out


def _random_refs(seed: int, n: int = 160):
    """Images in clusters: equal hashes with equal or other pixels, near hashes (some exactly at the
    threshold), one image's pixels under a far hash (as another build may hash them), singletons."""
    rng = np.random.default_rng(seed)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8) for _ in range(n // 4)]
    refs = []
    for k in range(n):
        h = hashes[rng.integers(len(hashes))].copy()
        flips = rng.choice([0, 0, 1, 8, 16, 17])
        bits = np.unpackbits(h)
        bits[rng.choice(255, flips, replace=False)] ^= 1
        h = np.packbits(bits)
        content = h.tobytes().hex()[:32] if rng.random() < 0.7 else f"{k:032x}"
        refs.append(audit.ImageRef("s", "lung", str(rng.choice(["train", "val", "test"])), "Normal", f"k{k:04d}",
                                   "x.tar", f"src/{k}.png", content, h.tobytes().hex()))
    far = np.packbits(1 - np.unpackbits(np.frombuffer(bytes.fromhex(refs[0].phash), np.uint8))).tobytes().hex()
    refs.append(audit.ImageRef("s", "lung", "test", "Normal", "k_far", "x.tar", "src/far.png", refs[0].content, far))
    return refs


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_groups_and_pairs_match_the_quadratic_reference(seed):
    refs = _random_refs(seed)
    ref = _reference_pairs(refs, audit.NEAR_THRESHOLD)
    found = {(refs.index(p.a), refs.index(p.b)): (p.kind, p.distance) for p in audit.find_pairs(refs)}
    assert {tuple(sorted(k)): v for k, v in found.items()} == ref
    s = audit.summary(refs)
    assert s["exact_pairs"] == sum(k == "exact" for k, _ in ref.values())
    assert s["near_pairs"] == sum(k == "near" for k, _ in ref.values())
    assert s["leakage_pairs"] == sum(refs[i].split != refs[j].split for i, j in ref)
    parent = list(range(len(refs)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in ref:
        parent[root(i)] = root(j)
    want = {}
    for i in range(len(refs)):
        want.setdefault(root(i), []).append(i)
    assert sorted(audit.duplicate_groups(refs)) == sorted(g for g in want.values() if len(g) > 1)
    assert s["groups"] == sum(len(g) > 1 for g in want.values())


# The child imports first (torch, through webdataset, peaks near 0.9 GiB while loading), then
# resets its peak resident size (Linux: 5 > /proc/self/clear_refs), so VmHWM is the build's own peak.
_MEASURED_BUILD = """
import sys
from pathlib import Path
import mtlxray.data.shards
from mtlxray.cli import main
from mtlxray.resources import proc_status_kib as status

Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
code = main(sys.argv[1:])
print("GROWTH_KIB", status("VmHWM") - base, flush=True)
sys.exit(code)
"""


def test_a_build_of_4002_copies_of_one_image_stays_in_bounded_memory_and_reports_one_group(tmp_path):
    """4,002 copies of one image are 8M pairs: the audit counts them from one hash and one group
    instead of holding them (the build peaked at 3.6 GiB on such a set when it held every pair)."""
    import os
    import subprocess
    import sys

    from tiny_data import write_png

    n = 4002
    top = tmp_path / "tree" / "Lung Segmentation Data" / "Lung Segmentation Data"
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 6:26] = 255
    write_png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8))
    write_png(tmp_path / "mask.png", mask)
    for split, count in (("Train", 1000), ("Val", 167), ("Test", 167)):  # per class
        for cls in ("Normal", "Non-COVID", "COVID-19"):
            for kind, src in (("images", "img.png"), ("lung masks", "mask.png")):
                folder = top / split / cls / kind
                folder.mkdir(parents=True)
                for k in range(count):
                    os.link(tmp_path / src, folder / f"copy_{k}.png")
    proc = subprocess.run([sys.executable, "-c", _MEASURED_BUILD, "shards", "build", "--input", str(tmp_path / "tree"),
                           "--output", str(tmp_path / "out"), "--format", "raw", "--image-size", "16",
                           "--workers", "2", "--shard-size", "1000"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth_mib = int(proc.stdout.split("GROWTH_KIB")[1].split()[0]) / 1024
    print(f"the build grew by {growth_mib:.0f} MiB")
    assert growth_mib < 200, f"the build's resident memory grew by {growth_mib:.0f} MiB"
    dup = json.loads((tmp_path / "out" / "manifest.json").read_text())["duplicates"]
    assert dup["groups"] == 1 and dup["largest_group"] == n
    assert dup["exact_pairs"] == n * (n - 1) // 2 and dup["near_pairs"] == 0
    assert dup["leakage_pairs"] == 3000 * 501 * 2 + 501 * 501
    result = audit.audit([tmp_path / "out"], tmp_path / "audit")
    assert result.n_groups == 1 and result.groups[0].size == n and result.groups[0].exact
    assert "4,002 images are copies of one image" in audit.format_audit(result)
    assert len(result.pairs) == audit.SAMPLE_PAIRS and all(p.leakage for p in result.pairs)


def test_audit_csv_holds_the_sample_and_every_pair_only_when_asked(clean, planted, tmp_path):
    sets = [clean[1], planted[1]]
    result = audit.audit(sets, tmp_path / "s", sample=5, sheet_pairs=0)
    assert len(result.pairs) == 5 and result.total_pairs > 5
    assert len(list(csv.DictReader((tmp_path / "s" / "audit.csv").open()))) == 5
    full = audit.audit(sets, tmp_path / "f", sample=5, sheet_pairs=0, all_pairs=True)
    rows = list(csv.DictReader((tmp_path / "f" / "audit.csv").open()))
    assert len(rows) == full.total_pairs == len(audit.find_pairs(
        [r for s in sets for r in audit.manifest_images(json.loads((s / "manifest.json").read_text()), str(s))]))
    assert [(r["key_a"], r["key_b"]) for r in rows[:5]] == [(p.a.key, p.b.key) for p in full.pairs]
    assert len({(r["set_a"], r["key_a"], r["set_b"], r["key_b"]) for r in rows}) == len(rows)
