"""The sub-quadratic near-hash search returns exactly the pairs of the O(N^2) reference, on random
sets with planted near pairs and on adversarial ones (distances at the threshold, all-equal, none)."""

import numpy as np
import pytest

from mtlxray.data.hashsearch import exhaustive_pairs, pairs_within


def _pairs(blocks) -> dict:
    out = {}
    for i, j, d in blocks:
        for a, b, c in zip(i.tolist(), j.tolist(), d.tolist()):
            assert a < b and (a, b) not in out  # each pair once, ordered
            out[(a, b)] = c
    return out


def _flip(row: np.ndarray, bits: np.ndarray) -> np.ndarray:
    b = np.unpackbits(row.view(np.uint8))
    b[bits] ^= 1
    return np.packbits(b).view(np.uint64)


def _planted(rng, n: int, near: int, distances) -> np.ndarray:
    words = rng.integers(0, 2**63, (n, 4), dtype=np.uint64) ^ rng.integers(0, 2, (n, 4), dtype=np.uint64) << 63
    for k in range(near):
        d = int(distances[k % len(distances)])
        words[n - 1 - k] = _flip(words[k], rng.choice(256, d, replace=False))
    return words


@pytest.mark.parametrize("threshold", [0, 1, 4, 16, 31, 40])
def test_the_fast_search_finds_exactly_the_reference_pairs(threshold):
    rng = np.random.default_rng(threshold)
    words = _planted(rng, 1500, 300, [0, 1, threshold, threshold, threshold + 1, max(0, threshold - 1)])
    fast, ref = _pairs(pairs_within(words, threshold)), _pairs(exhaustive_pairs(words, threshold))
    assert fast == ref
    assert sum(d == threshold for d in ref.values()) >= 100  # ties at the threshold are in the answer


def test_adversarial_sets_all_equal_no_pairs_and_spread_bits():
    equal = np.full((300, 4), 0x0123456789ABCDEF, np.uint64)
    assert len(_pairs(pairs_within(equal, 16))) == 300 * 299 // 2
    rng = np.random.default_rng(7)
    far = rng.integers(0, 2**63, (800, 4), dtype=np.uint64)
    assert _pairs(pairs_within(far, 16)) == _pairs(exhaustive_pairs(far, 16)) == {}
    # Differences spread one or two per chunk: near pairs whose chunks almost all differ.
    base = rng.integers(0, 2**63, (200, 4), dtype=np.uint64)
    spread = np.concatenate([base] + [np.stack([_flip(r, np.arange(k, 256, 16)) for r in base]) for k in (0, 5)])
    assert _pairs(pairs_within(spread, 16)) == _pairs(exhaustive_pairs(spread, 16))
    assert len(_pairs(pairs_within(spread, 16))) == 400  # each copy with its original, at distance 16
    assert _pairs(pairs_within(np.zeros((1, 4), np.uint64), 16)) == {}
