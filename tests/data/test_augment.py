"""Augmentation: identical geometry for image and masks, keyed randomness, never a left-right flip,
and the batched device form agreeing with the per-sample one."""

import numpy as np
import torch

from mtlxray.config import AugmentConfig
from mtlxray.data.augment import affine_matrix, augment, augment_batch, augment_params, sample_rng


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lung = np.zeros((64, 64), np.uint8)
    lung[10:50, 6:26] = 1  # one field on the image's left only
    inf = np.zeros_like(lung)
    inf[35:45, 8:16] = 1
    return lung * 200 + 30, lung, inf


def test_same_seed_epoch_and_key_give_the_same_augmentation():
    cfg = AugmentConfig()
    a = augment(*_phantom(), cfg, sample_rng(1, 2, "lung_train_Normal_Normal_1"))
    b = augment(*_phantom(), cfg, sample_rng(1, 2, "lung_train_Normal_Normal_1"))
    c = augment(*_phantom(), cfg, sample_rng(1, 3, "lung_train_Normal_Normal_1"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_image_and_masks_move_together():
    cfg = AugmentConfig(rotate_deg=15, translate=0.1, scale=0.1, brightness=0.0, contrast=0.0)
    for k in range(10):
        img, lung, inf = augment(*_phantom(), cfg, sample_rng(0, 0, f"k{k}"))
        assert set(np.unique(lung)) <= {0, 1} and set(np.unique(inf)) <= {0, 1}
        bright = img > 127
        iou = (bright & (lung > 0)).sum() / (bright | (lung > 0)).sum()
        assert iou > 0.95
        assert not (inf.astype(bool) & ~lung.astype(bool)).any()  # same nearest warp: inf stays inside


def test_never_a_left_right_flip():
    cfg = AugmentConfig(rotate_deg=15, translate=0.1, scale=0.1)
    for k in range(20):
        _, lung, _ = augment(*_phantom(), cfg, sample_rng(0, 0, f"k{k}"))
        xs = np.nonzero(lung)[1]
        assert xs.mean() < 32  # the left-side field stays on the left
    for angle in (-15.0, 0.0, 15.0):
        a, b, _, d, e, _ = affine_matrix(64, angle, 1.05, 3.0, -2.0)
        assert a * e - b * d > 0  # orientation-preserving: no reflection


def test_disabled_geometry_and_intensity_leave_the_sample_unchanged():
    cfg = AugmentConfig(rotate_deg=0, translate=0, scale=0, brightness=0, contrast=0)
    img0, lung0, inf0 = _phantom()
    img, lung, inf = augment(img0, lung0, inf0, cfg, sample_rng(0, 0, "x"))
    assert img.dtype == np.uint8 and np.array_equal(img, img0)
    assert np.array_equal(lung, lung0) and np.array_equal(inf, inf0)


def _batch(params: list[list[float]]):
    img, lung, inf = _phantom()
    n = len(params)
    as_t = lambda a: torch.from_numpy(np.repeat(a[None, None], n, 0)).float()  # noqa: E731
    return as_t(img) / 255.0, torch.cat([as_t(lung), as_t(inf)], 1), torch.tensor(params, dtype=torch.float32)


def test_batch_augmentation_with_identity_parameters_changes_nothing():
    img, masks, params = _batch([[0.0, 1.0, 0.0, 0.0, 1.0, 0.0]] * 2)
    out_img, out_masks = augment_batch(img, masks, params)
    torch.testing.assert_close(out_img, img, atol=1e-5, rtol=0)
    assert torch.equal(out_masks, masks)


def test_batch_augmentation_matches_the_per_sample_warp():
    cfg = AugmentConfig(rotate_deg=15, translate=0.1, scale=0.1)
    for k in range(6):
        params = augment_params(cfg, sample_rng(0, 0, f"k{k}"), 64)
        cpu_img, cpu_lung, cpu_inf = augment(*_phantom(), cfg, sample_rng(0, 0, f"k{k}"))
        img, masks, p = _batch([params.tolist()])
        dev_img, dev_masks = augment_batch(img, masks, p)
        for cpu, dev in ((cpu_lung, dev_masks[0, 0]), (cpu_inf, dev_masks[0, 1])):
            cpu, dev = torch.tensor(cpu).bool(), dev.bool()
            assert set(dev.float().unique().tolist()) <= {0.0, 1.0}
            assert (cpu & dev).sum() / (cpu | dev).sum() > 0.9  # same geometry, up to edge pixels
        assert (dev_img[0, 0] - torch.tensor(cpu_img).float() / 255).abs().mean() < 0.03
