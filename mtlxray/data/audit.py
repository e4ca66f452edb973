"""Duplicate and leakage audit of shard sets, from the image hashes `shards build` records.

Every manifest built by this version holds an image table (`manifest["images"]`: `columns` and one
row per sample) with two hashes of the decoded source image, before any resizing:

- `content`: the first 128 bits of the sha256 of the decoded pixels (and their shape). Equal for
  exact duplicates, whatever the file name or the PNG/JPEG encoding.
- `phash`: a 256-bit perceptual hash (DCT sign hash of a 64² thumbnail centred on its intensity
  centroid). Close in Hamming distance for near duplicates: resized, re-encoded (JPEG), brightness or
  contrast changed, shifted by a pixel or two.

Why not `imagehash.phash`: on the synthetic phantoms (images from one template, as chest X-rays are)
its 64-bit hash gave *distinct* images a distance of 0, and its 256-bit hash put a 1-pixel shift
(distance 26) beyond the closest distinct pair (18). Centring on the intensity centroid first brings
a 1-pixel shift to ≤ 10 and a 2-pixel one to ≤ 20 with distinct images at ≥ 20 (figures from the
benchmark in tests/data/test_audit.py). `NEAR_THRESHOLD` is the default cut.

A pair is *leakage* when its two images sit in different splits (train/val/test), whichever shard
sets or subsets they come from; duplicates within one split are reported but are not leakage.

Python API (the evaluation's leakage check uses `overlap`):

    overlap(eval_shards, "test", train_shards, "train", subset_a=None, subset_b=None) -> list[Pair]
    audit([root, ...], out_dir) -> AuditResult      # what `mtlxray shards audit` runs
    find_pairs(images_a, images_b=None) -> list[Pair]  # every pair: for small sets

Scale: the near search is sub-quadratic (`mtlxray.data.hashsearch`, multi-index hashing) and runs
over distinct hashes; the audit counts pairs per split pair from per-hash image counts, groups
copies as pairs stream out (connected components) and keeps a bounded sample of pairs, so memory is
O(images) however many pairs there are (40,000 copies of one image are one group, not 800M pairs).
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import fft, ndimage

from mtlxray.data import hashsearch
from mtlxray.data.manifest import read_manifest
from mtlxray.data.remote import normalise_root
from mtlxray.data.tarstream import tar_samples
from mtlxray.errors import ShardError
from mtlxray.io import atomic_path

__all__ = ["NEAR_THRESHOLD", "SAMPLE_PAIRS", "IMAGE_COLUMNS", "ImageRef", "Pair", "Group", "AuditResult",
           "content_hash", "perceptual_hash", "hamming", "manifest_images", "find_pairs", "duplicate_groups",
           "overlap", "overlap_images", "summary", "audit", "format_audit", "contact_sheet",
           "EXIT_LEAKAGE"]

log = logging.getLogger(__name__)

NEAR_THRESHOLD = 16
"""Largest Hamming distance (of 255 bits) between the perceptual hashes of a near-duplicate pair."""
IMAGE_COLUMNS = ["key", "subset", "split", "class_name", "shard", "source", "content", "phash"]
"""Columns of a manifest's image table, in order."""
EXIT_LEAKAGE = 3
_THUMB = 64
_HASH = 16  # a 16x16 block of DCT coefficients, DC left out: 255 bits (plus one zero pad bit)
_SPLIT_ORDER = {"test": 0, "val": 1, "train": 2}


def content_hash(pixels: np.ndarray) -> str:
    """32 hex digits identifying the decoded pixels exactly (shape included)."""
    arr = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}:".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()[:32]


def perceptual_hash(pixels: np.ndarray) -> str:
    """64 hex digits: sign bits (against their median) of the 255 lowest DCT coefficients of a 64²
    thumbnail that was shifted so its intensity centroid sits at the centre."""
    thumb = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.uint8)).resize(
        (_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float64)
    mass = thumb - thumb.min()
    total = mass.sum()
    if total > 0:
        # The centroid by two weighted sums (what ndimage.center_of_mass computes, in a tenth of its time).
        cy = mass.sum(axis=1) @ _AXIS / total
        cx = mass.sum(axis=0) @ _AXIS / total
        c = (_THUMB - 1) / 2.0
        thumb = ndimage.shift(thumb, (c - cy, c - cx), order=1, mode="nearest")
    # Only the 16x16 lowest coefficients are kept: two products with the first 16 rows of the
    # orthonormal DCT-II matrix instead of the whole 64x64 transform.
    coeffs = (_DCT @ thumb @ _DCT.T).ravel()[1:]
    # The median of the 255 coefficients is the middle one: what np.median returns, without its overhead.
    median = np.partition(coeffs, len(coeffs) // 2)[len(coeffs) // 2]
    bits = np.append(coeffs > median, False)
    return np.packbits(bits).tobytes().hex()


_AXIS = np.arange(_THUMB, dtype=np.float64)
_DCT = fft.dct(np.eye(_THUMB), norm="ortho", axis=0)[:_HASH]
"""(16, 64): rows of the orthonormal DCT-II matrix, so `_DCT @ x @ _DCT.T` is dctn(x)[:16, :16]."""


def _words(hexes: Sequence[str]) -> np.ndarray:
    """Perceptual hashes -> (N, 4) uint64."""
    if not hexes:
        return np.zeros((0, 4), np.uint64)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64).reshape(-1, 4)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two perceptual hashes."""
    return int(np.bitwise_count(_words([a]) ^ _words([b])).sum())


@dataclass(frozen=True)
class ImageRef:
    """One image of a shard set, as its manifest's image table lists it."""

    set: str
    subset: str
    split: str
    class_name: str
    key: str
    shard: str
    source: str
    content: str
    phash: str


@dataclass(frozen=True)
class Pair:
    """Two images that are the same picture: `exact` (same pixels) or `near` (hash distance)."""

    kind: str
    distance: int
    a: ImageRef
    b: ImageRef

    @property
    def leakage(self) -> bool:
        return self.a.split != self.b.split

    @property
    def label_conflict(self) -> bool:
        return self.a.class_name != self.b.class_name


def _read(root_or_manifest) -> tuple[str, dict]:
    if isinstance(root_or_manifest, dict):
        return str(root_or_manifest.get("source", {}).get("root", "<manifest>")), root_or_manifest
    root = normalise_root(root_or_manifest)
    return root, read_manifest(root).raw


def manifest_images(manifest: dict, name: str = "") -> list[ImageRef]:
    """The image table of a manifest; ShardError if it was built without one."""
    table = manifest.get("images")
    if not isinstance(table, dict) or table.get("columns") != IMAGE_COLUMNS:
        raise ShardError(f"{name or 'manifest'}: the manifest has no image hashes (built by an older "
                         "mtlxray); rebuild the shards to audit them")
    return [_ref(name, row) for row in table["rows"]]


def _ref(name: str, row: Sequence[str]) -> ImageRef:
    """An image-table row (`IMAGE_COLUMNS` order) of shard set `name`."""
    return ImageRef(set=name, **dict(zip(IMAGE_COLUMNS, row)))


def _content_ids(hexes: Sequence[str]) -> np.ndarray:
    """Content hashes -> int64 ids, equal ids for equal hashes."""
    if not hexes:
        return np.zeros(0, np.int64)
    return np.unique(np.asarray(hexes), return_inverse=True)[1].ravel().astype(np.int64)


def _within(x: np.ndarray) -> np.ndarray:
    """Pairs inside each row's group, by split pair: x (K, S) images per split of K groups -> (S, S)
    upper-triangular counts (s <= t: pairs with one image in split s and the other in t)."""
    x = x.astype(np.int64)
    m = x.T @ x
    return np.triu(m, 1) + np.diag((np.diag(m) - x.sum(axis=0)) // 2)


def _between(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairs across row-aligned groups x[k] and y[k], by split pair, as `_within`."""
    m = x.astype(np.int64).T @ y.astype(np.int64)
    return np.triu(m, 1) + np.triu(m.T, 1) + np.diag(np.diag(m))


class _Components:
    """Connected components of N nodes as edges stream in, in bounded memory: pending edges are
    folded into the labels by scipy's connected_components once they pass `flush` edges."""

    def __init__(self, n: int, flush: int = 1 << 22):
        self.label = np.arange(n, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.size, self.flush = 0, flush

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.pending.append((self.label[a], self.label[b]))
        self.size += len(a)
        if self.size >= self.flush:
            self._fold()

    def _fold(self) -> None:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not self.pending:
            return
        a = np.concatenate([p[0] for p in self.pending])
        b = np.concatenate([p[1] for p in self.pending])
        n = len(self.label)
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        self.label = comp[self.label].astype(np.int64)
        self.pending, self.size = [], 0

    def labels(self) -> np.ndarray:
        self._fold()
        return self.label


@dataclass
class _Scan:
    """What `_scan` found: pair counts by kind and split pair, copy groups, a bounded pair sample."""

    exact: np.ndarray    # (S, S) upper-triangular pair counts
    near: np.ndarray
    group: np.ndarray    # (N,) group id of each image (equal ids: copies of one another)
    sample: list[tuple[int, int, str, int]]  # (i, j, kind, distance), best first


SAMPLE_PAIRS = 200
"""Pairs an audit keeps for its report, audit.csv's head and the contact sheet."""
_EXAMPLES_PER_SPLIT = 12


class _Members:
    """The image indices of each node (images with one perceptual hash), as a CSR table."""

    def __init__(self, node: np.ndarray, n_nodes: int):
        self.order = np.argsort(node, kind="stable")
        self.start = np.r_[0, np.cumsum(np.bincount(node, minlength=n_nodes))]

    def __call__(self, u: int) -> np.ndarray:
        return self.order[self.start[u]:self.start[u + 1]]


def _examples(members: np.ndarray, split: np.ndarray, per: int) -> np.ndarray:
    """Up to `per` members of each split, in index order."""
    if len(members) <= per:
        return members
    s = split[members]
    return np.concatenate([members[s == k][:per] for k in np.unique(s)])


def _scan(words: np.ndarray, content: np.ndarray, split: np.ndarray, n_splits: int, threshold: int,
          sample: int = SAMPLE_PAIRS, pair_sink=None) -> _Scan:
    """Exact and near duplicate pairs of N images (perceptual hashes `words` (N, 4), content ids,
    split codes), counted, grouped and sampled without ever holding them all.

    Images with one perceptual hash form a node; the near search runs over the distinct hashes
    (`hashsearch.pairs_within`), and pairs inside a node or between two near nodes are counted from
    per-split image counts, so N copies of one image cost O(N), not N^2/2 pairs. `pair_sink(i, j,
    exact, distance)`, when given, receives every pair in blocks (for a full audit.csv)."""
    n = len(words)
    if n == 0:
        z = np.zeros((n_splits, n_splits), np.int64)
        return _Scan(z, z.copy(), np.zeros(0, np.int64), [])
    uniq, node = np.unique(words, axis=0, return_inverse=True)
    node = node.ravel().astype(np.int64)
    n_nodes = len(uniq)
    per_split = np.bincount(node * n_splits + split, minlength=n_nodes * n_splits).reshape(n_nodes, n_splits)
    # Atoms: images with the same pixels (content) in the same node.
    n_content = int(content.max()) + 1
    atom_key, atom = np.unique(node * n_content + content, return_inverse=True)
    atom = atom.ravel()
    atom_split = np.bincount(atom * n_splits + split, minlength=len(atom_key) * n_splits).reshape(-1, n_splits)
    atom_node = atom_key // n_content
    by_content = np.bincount(content * n_splits + split, minlength=n_content * n_splits).reshape(n_content, n_splits)
    exact = _within(by_content)                       # every same-pixel pair, wherever its hashes are
    near = _within(per_split) - _within(atom_split)   # distance 0, other pixels
    comps = _Components(n_nodes)
    members = _Members(node, n_nodes)
    present = per_split > 0
    best: list[np.ndarray] = []  # candidate node pairs for the sample: rows (leak-free?, distance, u, v)

    def keep_best(u, v, d):
        leak = (present[u].sum(axis=1) + present[v].sum(axis=1) > 2) | (present[u] != present[v]).any(axis=1)
        rows = np.stack([~leak, d, u, v], axis=1).astype(np.int64)
        rows = np.concatenate(best + [rows]) if best else rows
        if len(rows) > sample:
            rows = rows[np.lexsort(rows.T[::-1])[:sample]]
        best[:] = [rows]

    for u, v, d in hashsearch.pairs_within(uniq, threshold):
        near += _between(per_split[u], per_split[v])
        comps.add(u, v)
        keep_best(u, v, d)
        if pair_sink is not None:
            for a, b, dist in zip(u.tolist(), v.tolist(), d.tolist()):
                _sink_cross(pair_sink, members(a), members(b), content, dist)
    # Same pixels under different hashes (hashes from another build): exact, whatever the distance.
    atoms_of_content = np.bincount(content[np.unique(atom, return_index=True)[1]], minlength=n_content)
    for c in np.flatnonzero(atoms_of_content > 1):
        nodes = np.unique(node[content == c])
        for x in range(len(nodes)):
            for y in range(x + 1, len(nodes)):
                a, b = int(nodes[x]), int(nodes[y])
                d = int(np.bitwise_count(uniq[a] ^ uniq[b]).sum())
                ia = np.flatnonzero((node == a) & (content == c))
                ib = np.flatnonzero((node == b) & (content == c))
                if d <= threshold:  # counted as near above
                    near -= _between(np.bincount(split[ia], minlength=n_splits)[None],
                                     np.bincount(split[ib], minlength=n_splits)[None])
                else:
                    comps.add(np.array([a]), np.array([b]))
                    keep_best(np.array([a]), np.array([b]), np.array([d]))
                    if pair_sink is not None:
                        _sink_cross(pair_sink, ia, ib, content, d)
    group = comps.labels()[node]
    sizes = np.bincount(node, minlength=n_nodes)
    multi = np.flatnonzero(sizes > 1)
    if pair_sink is not None:
        for u in multi.tolist():
            _sink_within(pair_sink, members(u), content)
    # The sample: the best nodes (leakage possible first, then same pixels) and node pairs,
    # expanded into image pairs from a few examples per split, then ranked pair by pair.
    leak_node = present[multi].sum(axis=1) > 1
    dup_content = np.zeros(n_nodes, bool)
    dup_content[atom_node[np.bincount(atom) > 1]] = True
    rank = np.lexsort((multi, ~dup_content[multi], ~leak_node))[:sample]
    cand = []
    for u in multi[rank].tolist():
        ex = _examples(members(u), split, _EXAMPLES_PER_SPLIT)
        i, j = np.triu_indices(len(ex), 1)
        cand.append(np.stack([np.minimum(ex[i], ex[j]), np.maximum(ex[i], ex[j]), np.zeros(len(i), np.int64)],
                             axis=1))
    for _, d, u, v in (best[0] if best else np.zeros((0, 4), np.int64)).tolist():
        ea, eb = _examples(members(u), split, _EXAMPLES_PER_SPLIT), _examples(members(v), split, _EXAMPLES_PER_SPLIT)
        ia, ib = (x.ravel() for x in np.meshgrid(ea, eb))
        ok = (d <= threshold) | (content[ia] == content[ib])
        cand.append(np.stack([np.minimum(ia, ib)[ok], np.maximum(ia, ib)[ok], np.full(ok.sum(), d)], axis=1))
    pairs = np.concatenate(cand) if cand else np.zeros((0, 3), np.int64)
    is_exact = content[pairs[:, 0]] == content[pairs[:, 1]]
    leak = split[pairs[:, 0]] != split[pairs[:, 1]]
    top = np.lexsort((pairs[:, 1], pairs[:, 0], pairs[:, 2], ~is_exact, ~leak))[:sample]
    chosen = [(int(i), int(j), "exact" if e else "near", int(d))
              for (i, j, d), e in zip(pairs[top].tolist(), is_exact[top].tolist())]
    return _Scan(exact, near, group, chosen)


def _sink_within(sink, m: np.ndarray, content: np.ndarray, block: int = 1 << 20) -> None:
    """Every pair inside one node (distance 0) to `sink`, in blocks of rows."""
    rows = max(1, block // max(1, len(m)))
    for s in range(0, len(m) - 1, rows):
        a = np.repeat(np.arange(s, min(s + rows, len(m) - 1)), len(m))
        b = np.tile(np.arange(len(m)), min(s + rows, len(m) - 1) - s)
        keep = b > a
        i, j = m[a[keep]], m[b[keep]]
        sink(np.minimum(i, j), np.maximum(i, j), content[i] == content[j], np.zeros(len(i), np.int64))


def _sink_cross(sink, ma: np.ndarray, mb: np.ndarray, content: np.ndarray, d: int) -> None:
    ia, ib = (x.ravel() for x in np.meshgrid(ma, mb))
    sink(np.minimum(ia, ib), np.maximum(ia, ib), content[ia] == content[ib], np.full(len(ia), d))


def _matches(words_a: np.ndarray, content_a: np.ndarray, words_b: np.ndarray, content_b: np.ndarray,
             threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """For each image of A, one image of B with the same pixels or a hash within `threshold`
    (its index, -1 when none) and their distance: O(N_A + N_B) memory however many pairs there are."""
    n_a = len(words_a)
    match = np.full(n_a, -1, np.int64)
    dist = np.zeros(n_a, np.int64)
    if n_a == 0 or len(words_b) == 0:
        return match, dist

    uniq, node = np.unique(np.concatenate([words_a, words_b]), axis=0, return_inverse=True)
    node = node.ravel()
    node_a, node_b = node[:n_a], node[n_a:]
    b_of_node = np.full(len(uniq), -1, np.int64)
    b_of_node[node_b[::-1]] = np.arange(len(node_b))[::-1]  # the first B image of each node
    # Same pixels first (exact), then the same hash, then the closest near hash found.
    where = {c: k for k, c in reversed(list(enumerate(content_b.tolist())))}
    by_content = np.array([where.get(c, -1) for c in content_a.tolist()], np.int64)
    match_node = b_of_node.copy()
    node_dist = np.zeros(len(uniq), np.int64)
    for u, v, d in hashsearch.pairs_within(uniq, threshold):
        for x, y in ((u, v), (v, u)):
            better = (b_of_node[y] >= 0) & ((match_node[x] < 0) | (node_dist[x] > d))
            match_node[x[better]], node_dist[x[better]] = b_of_node[y[better]], d[better]
    match = np.where(by_content >= 0, by_content, match_node[node_a])
    exact_b = by_content >= 0
    dist = np.where(exact_b, 0, node_dist[node_a])
    if exact_b.any():
        bw = words_b[by_content[exact_b]]
        dist[exact_b] = np.bitwise_count(words_a[exact_b] ^ bw).sum(axis=1)
    return match, dist


def _split_codes(refs: Sequence[ImageRef]) -> tuple[np.ndarray, list[str]]:
    names = sorted({r.split for r in refs}, key=lambda s: (_SPLIT_ORDER.get(s, 9), s))
    code = {s: k for k, s in enumerate(names)}
    return np.array([code[r.split] for r in refs], np.int64), names


def find_pairs(images_a: Sequence[ImageRef], images_b: Optional[Sequence[ImageRef]] = None,
               threshold: int = NEAR_THRESHOLD) -> list[Pair]:
    """Every exact and near duplicate pair within `images_a`, or between `images_a` and `images_b`;
    leakage first, then exact, then by distance. For small sets and tests: the list is as long as
    the pairs are many (N^2/2 for N copies); the audit and the build count and sample instead."""
    same = images_b is None
    both = list(images_a) if same else list(images_a) + list(images_b)
    codes, _ = _split_codes(both)
    out: list[Pair] = []

    def sink(i, j, exact, d):
        for a, b, e, dd in zip(i.tolist(), j.tolist(), exact.tolist(), d.tolist()):
            if same or (a < len(images_a)) != (b < len(images_a)):
                out.append(Pair("exact" if e else "near", dd, both[a], both[b]))

    _scan(_words([x.phash for x in both]), _content_ids([x.content for x in both]), codes,
          max(1, int(codes.max(initial=0)) + 1), threshold, sample=0, pair_sink=sink)
    return sorted(out, key=_sort_key)


def summary(images: Sequence[ImageRef], threshold: int = NEAR_THRESHOLD) -> dict:
    """Pair counts (exact, near, across splits) and copy groups of one set of images, for a manifest."""
    split, names = _split_codes(images)
    content = _content_ids([x.content for x in images])
    scan = _scan(_words([x.phash for x in images]), content, split, max(1, len(names)), threshold, sample=0)
    sizes = np.bincount(scan.group) if len(images) else np.zeros(0, np.int64)
    leak = np.triu(np.ones_like(scan.exact), 1)
    return {"threshold": threshold, "exact_pairs": int(scan.exact.sum()), "near_pairs": int(scan.near.sum()),
            "leakage_pairs": int(((scan.exact + scan.near) * leak).sum()), "groups": int((sizes > 1).sum()),
            "largest_group": int(sizes.max(initial=0)) if (sizes > 1).any() else 0}


def _sort_key(p: Pair) -> tuple:
    return (not p.leakage, p.kind != "exact", p.distance, p.a.set, p.a.key, p.b.set, p.b.key)


def duplicate_groups(images: Sequence[ImageRef], threshold: int = NEAR_THRESHOLD) -> list[list[int]]:
    """Indices of images that are copies of one another (connected through exact or near pairs),
    groups of two or more only, in order of their first image."""
    if not images:
        return []
    codes = np.zeros(len(images), np.int64)
    scan = _scan(_words([x.phash for x in images]), _content_ids([x.content for x in images]), codes, 1,
                 threshold, sample=0)
    return _groups(scan.group)


def _groups(group: np.ndarray) -> list[list[int]]:
    order = np.argsort(group, kind="stable")
    cuts = np.flatnonzero(np.diff(group[order])) + 1
    runs = [r for r in np.split(order, cuts) if len(r) > 1]
    return sorted((r.tolist() for r in runs), key=lambda r: r[0])


def overlap(a, split_a: str, b, split_b: str, *, subset_a: Optional[str] = None, subset_b: Optional[str] = None,
            threshold: int = NEAR_THRESHOLD) -> list[Pair]:
    """Images of split `split_a` of shard set `a` that appear (exact or near copies) in split
    `split_b` of shard set `b` (each a shard root, URL or manifest dict; subsets optional): one pair
    per such image, with one of its copies in `b`, exact first.

    For evaluation: `overlap(eval_shards, "test", train_shards, "train")` is empty when no test image
    appears in the training data. ShardError when a manifest has no image table (an older build).
    """
    name_a, ma = _read(a)
    name_b, mb = _read(b)
    ia = [x for x in manifest_images(ma, name_a) if x.split == split_a and subset_a in (None, x.subset)]
    ib = [x for x in manifest_images(mb, name_b) if x.split == split_b and subset_b in (None, x.subset)]
    return overlap_images(ia, ib, threshold)


def overlap_images(ia: Sequence[ImageRef], ib: Sequence[ImageRef], threshold: int = NEAR_THRESHOLD) -> list[Pair]:
    """One pair per image of `ia` that has a copy in `ib` (the copy: same pixels first, then the
    closest hash found); O(len(ia) + len(ib)) memory."""
    content = _content_ids([x.content for x in ia] + [x.content for x in ib])
    match, dist = _matches(_words([x.phash for x in ia]), content[:len(ia)], _words([x.phash for x in ib]),
                           content[len(ia):], threshold)
    pairs = [Pair("exact" if x.content == ib[m].content else "near", int(d), x, ib[m])
             for x, m, d in zip(ia, match.tolist(), dist.tolist()) if m >= 0]
    return sorted(pairs, key=_sort_key)


# ---------------------------------------------------------------------------------------------
# The audit command


@dataclass
class Group:
    """Images that are copies of one another (connected through exact or near pairs)."""

    size: int
    exact: bool               # all of them have the same pixels
    splits: dict[str, int]    # images per split
    examples: list[ImageRef]

    def describe(self) -> str:
        what = "copies of one image" if self.exact else "copies or near copies of one image"
        where = ", ".join(f"{n:,} {s}" for s, n in self.splits.items())
        eg = ", ".join(f"{Path(x.set).name}:{x.subset}/{x.split}/{x.key}" for x in self.examples)
        return f"{self.size:,} images are {what} ({where}; e.g. {eg})"


@dataclass
class AuditResult:
    """What `audit` found and wrote: pair counts, copy groups, and a bounded sample of the pairs."""

    images: dict[str, int]
    pairs: list[Pair]          # the sample: leakage first, then exact, then by distance
    threshold: int
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, "test-train") -> pairs
    groups: list[Group] = field(default_factory=list)  # the largest, largest first
    n_groups: int = 0
    csv: Optional[Path] = None
    sheet: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_pairs(self) -> int:
        return sum(self.counts.values())

    @property
    def leakage_pairs(self) -> int:
        return sum(n for (_, boundary), n in self.counts.items() if "-" in boundary)

    @property
    def leakage(self) -> list[Pair]:
        """The leakage pairs of the sample."""
        return [p for p in self.pairs if p.leakage]


def _counts(scan: _Scan, names: list[str]) -> dict[tuple[str, str], int]:
    out = {}
    for kind, m in (("exact", scan.exact), ("near", scan.near)):
        for s, t in zip(*np.nonzero(m)):
            boundary = names[s] if s == t else f"{names[s]}-{names[t]}"
            out[(kind, boundary)] = int(m[s, t])
    return out


def _group_report(scan: _Scan, images: Sequence[ImageRef], content: np.ndarray, names: list[str],
                  split: np.ndarray, shown: int = 10, examples: int = 3) -> tuple[list[Group], int]:
    sizes = np.bincount(scan.group)
    multi = np.flatnonzero(sizes > 1)
    top = multi[np.lexsort((multi, -sizes[multi]))][:shown]
    groups = []
    for g in top.tolist():
        members = np.flatnonzero(scan.group == g)
        per_split = np.bincount(split[members], minlength=len(names))
        groups.append(Group(int(sizes[g]), len(np.unique(content[members])) == 1,
                            {names[k]: int(c) for k, c in enumerate(per_split) if c},
                            [images[i] for i in _examples(members, split, 1)[:examples]]))
    return groups, len(multi)


def _pixels_of(refs: Iterable[ImageRef], roots: dict[str, str], manifests: dict[str, dict]) -> dict[tuple[str, str], np.ndarray]:
    """The stored images of `refs`, read from their shards (local or remote), one pass per shard."""
    from mtlxray.data.loader import decode_image, shard_location  # the loader imports torch; hashing needs none

    wanted: dict[tuple[str, str], set[str]] = {}
    for r in refs:
        wanted.setdefault((r.set, r.shard), set()).add(r.key)
    out = {}
    for (name, shard), keys in wanted.items():
        m = manifests[name]
        url = shard_location(roots[name], shard)
        for sample in tar_samples([{"url": url}]):
            if sample["__key__"] in keys:
                out[(name, sample["__key__"])] = decode_image(sample, "img", m["format"], m["image_size"])
                keys.discard(sample["__key__"])
                if not keys:
                    break
    return out


def contact_sheet(pairs: Sequence[Pair], roots: dict[str, str], manifests: dict[str, dict], path: Path,
                  thumb: int = 192) -> Path:
    """A PNG with one row per pair, the two images side by side and a caption under each."""
    pixels = _pixels_of([r for p in pairs for r in (p.a, p.b)], roots, manifests)
    caption = 30
    gap = 8
    sheet = Image.new("L", (2 * thumb + 3 * gap, len(pairs) * (thumb + caption + gap) + gap), 255)
    draw = ImageDraw.Draw(sheet)
    for row, p in enumerate(pairs):
        y = gap + row * (thumb + caption + gap)
        for col, ref in enumerate((p.a, p.b)):
            x = gap + col * (thumb + gap)
            arr = pixels.get((ref.set, ref.key))
            if arr is not None:
                sheet.paste(Image.fromarray(arr).resize((thumb, thumb), Image.Resampling.BILINEAR), (x, y))
            label = f"{Path(ref.set).name}:{ref.subset}/{ref.split}"
            draw.text((x, y + thumb + 2), label[:38], fill=0)
            draw.text((x, y + thumb + 15), ref.key[-38:], fill=0)
        tag = f"{p.kind} d={p.distance}" + (" LEAK" if p.leakage else "")
        draw.rectangle((gap, y, gap + 6 * len(tag) + 4, y + 12), fill=0)
        draw.text((gap + 2, y + 1), tag, fill=255)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


_CSV_COLUMNS = ["set", "subset", "split", "class_name", "key", "shard", "source"]


def _csv_row(p: Pair) -> list:
    return ([p.kind, p.distance, int(p.leakage), int(p.label_conflict)] + [getattr(p.a, c) for c in _CSV_COLUMNS]
            + [getattr(p.b, c) for c in _CSV_COLUMNS])


def _write_csv(pairs: Sequence[Pair], path: Path, rest=None) -> Path:
    """audit.csv: the sample's pairs first; `rest(writer)`, when given, streams every other pair."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["kind", "distance", "leakage", "label_conflict"] + [f"{c}_a" for c in _CSV_COLUMNS]
                        + [f"{c}_b" for c in _CSV_COLUMNS])
        writer.writerows(_csv_row(p) for p in pairs)
        if rest is not None:
            rest(writer)
    return path


def audit(roots: Sequence[str | Path], out: Optional[str | Path] = None, *, threshold: int = NEAR_THRESHOLD,
          sheet_pairs: int = 24, sample: int = SAMPLE_PAIRS, all_pairs: bool = False) -> AuditResult:
    """Find exact and near duplicates across every subset and split of the given shard sets: pair
    counts per kind and split pair, groups of copies, and a sample of `sample` pairs (leakage first).
    With `out`, write `audit.csv` (the sample; every pair with `all_pairs`, streamed to disk) and
    `contact_sheet.png` (the sample's first `sheet_pairs` pairs). Memory is O(images), whatever the
    number of pairs."""
    names: dict[str, str] = {}
    manifests: dict[str, dict] = {}
    images: list[ImageRef] = []
    counts: dict[str, int] = {}
    for root in roots:
        name, manifest = _read(root)
        if name in manifests:
            continue
        names[name], manifests[name] = name, manifest
        rows = manifest_images(manifest, name)
        counts[name] = len(rows)
        images += rows
    split, split_names = _split_codes(images)
    content = _content_ids([x.content for x in images])
    words = _words([x.phash for x in images])
    scan = _scan(words, content, split, max(1, len(split_names)), threshold, sample)
    pairs = [Pair(kind, d, images[i], images[j]) for i, j, kind, d in scan.sample]
    groups, n_groups = _group_report(scan, images, content, split_names, split)
    result = AuditResult(counts, pairs, threshold, _counts(scan, split_names), groups, n_groups)
    if out is not None:
        out = Path(out)
        rest = None
        if all_pairs:
            seen = {(i, j) for i, j, _, _ in scan.sample}

            def rest(writer):
                def sink(i, j, exact, d):
                    writer.writerows(_csv_row(Pair("exact" if e else "near", dd, images[a], images[b]))
                                     for a, b, e, dd in zip(i.tolist(), j.tolist(), exact.tolist(), d.tolist())
                                     if (a, b) not in seen)
                _scan(words, content, split, max(1, len(split_names)), threshold, 0, pair_sink=sink)
        result.csv = _write_csv(pairs, out / "audit.csv", rest)
        if pairs and sheet_pairs > 0:
            result.sheet = contact_sheet(pairs[:sheet_pairs], names, manifests, out / "contact_sheet.png")
    return result


def format_audit(result: AuditResult, show: int = 20) -> str:
    lines = [f"{n:,} images in {name}" for name, n in result.images.items()]
    lines.append(f"near-duplicate threshold: Hamming distance <= {result.threshold} of 255 bits")
    lines.append(f"{'pairs':<8}{'splits':<14}{'count':>12}  leakage")
    for (kind, boundary), n in sorted(result.counts.items()):
        lines.append(f"{kind:<8}{boundary:<14}{n:>12,}  {'yes' if '-' in boundary else 'no'}")
    if not result.counts:
        lines.append("(no duplicates)")
    if result.groups:
        lines.append("")
        lines.append(f"{result.n_groups:,} group(s) of copies; the largest:")
        lines += [f"  {g.describe()}" for g in result.groups]
    if result.pairs:
        lines.append("")
        lines.append(f"{'kind':<6} {'dist':>4}  {'leak':<4}  image a  <->  image b")
        for p in result.pairs[:show]:
            a = f"{Path(p.a.set).name}:{p.a.subset}/{p.a.split}/{p.a.key}"
            b = f"{Path(p.b.set).name}:{p.b.subset}/{p.b.split}/{p.b.key}"
            lines.append(f"{p.kind:<6} {p.distance:>4}  {'yes' if p.leakage else 'no':<4}  {a}  <->  {b}")
        if result.total_pairs > show:
            lines.append(f"... {result.total_pairs - show:,} more"
                         + (" (audit.csv holds the first {:,}; --all-pairs writes every one)".format(len(result.pairs))
                            if len(result.pairs) < result.total_pairs else " in audit.csv"))
    lines.append("")
    lines.append(f"LEAKAGE: {result.leakage_pairs:,} pair(s) cross a train/val/test boundary" if result.leakage_pairs
                 else "clean: no image crosses a train/val/test boundary")
    if result.csv is not None:
        lines.append(f"wrote {result.csv}" + (f" and {result.sheet}" if result.sheet else ""))
    return "\n".join(lines) + "\n"
