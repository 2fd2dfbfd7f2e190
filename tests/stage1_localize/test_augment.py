"""Spatial augmentation keeps image content and points together (tiny exact volumes)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stage1_localize.augment import sample_patch, thick_slices
from stage1_localize.config import AugmentConfig


@pytest.mark.parametrize("n,factor", [(64, 3), (32, 3), (30, 3), (13, 2), (12, 2)])
def test_thick_slices_keep_a_linear_ramp_in_place(n, factor):
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32)[None, :, None], (4, n, 5)).copy()
    out = thick_slices(ramp, axis=1, factor=factor)
    assert out.shape == ramp.shape
    # averaging + linear interpolation between exact block centres reproduces a ramp (edge blocks aside)
    inner = slice(factor, n - 2 * factor)
    np.testing.assert_allclose(out[:, inner], ramp[:, inner], atol=1e-4)


def test_thick_slices_do_not_move_a_blob():
    n = 64
    k = np.arange(n, dtype=np.float64)
    blob = np.exp(-((k - 50.0) ** 2) / (2 * 4.0**2)).astype(np.float32)
    img = np.broadcast_to(blob[None, None, :], (3, 4, n)).copy()
    out = thick_slices(img, axis=2, factor=3)[0, 0]
    assert abs((out * k).sum() / out.sum() - 50.0) < 0.05


def test_augmented_patch_keeps_points_on_their_blobs():
    rng = np.random.default_rng(3)
    shape = (24, 48, 64)
    pts = np.array([[12.0, 20.0, 20.0], [12.3, 26.0, 40.5]])
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for p in pts:
        img = np.maximum(img, np.exp(-sum((g - c) ** 2 for g, c in zip(grids, p)) / (2 * 1.5**2)).astype(np.float32))
    aug = dataclasses.replace(AugmentConfig(), p_rotate=1.0, p_scale=1.0, p_flip_lr=0.5, p_thick_slices=1.0,
                              p_partial_fov=0.0, p_gamma=0.0, p_remap=0.0, p_invert=0.0, p_bias=0.0,
                              p_noise=0.0, p_blur=0.0, p_foreground=1.0)
    checked = 0
    for _ in range(12):
        patch = sample_patch(img, pts, [20, 21], (16, 32, 48), np.array([3.0, 3.0, 3.0]), rng, aug)
        for q in patch.points_ijk:
            r = np.round(q).astype(int)
            if np.any(r < 3) or np.any(r > np.array(patch.image.shape) - 4):
                continue
            box = tuple(slice(c - 3, c + 4) for c in r)
            w = patch.image[box].astype(np.float64)
            local = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
            centre = np.array([(c * w).sum() / w.sum() for c in local])
            assert np.linalg.norm(centre - q) < 0.6, (centre, q)
            checked += 1
    assert checked >= 6


def test_level_balanced_weights_hand_made():
    from stage1_localize.train import level_balanced_weights
    w = level_balanced_weights([[20, 21], [19, 20]])
    np.testing.assert_allclose(w[0], [0.5, 1.0])
    np.testing.assert_allclose(w[1], [1.0, 0.5])
    w = level_balanced_weights([[20, 21], [19, 20], [20]], power=0.5)  # counts 19: 1, 20: 3, 21: 1
    np.testing.assert_allclose(w[0], [3 ** -0.5, 1.0])
    np.testing.assert_allclose(w[2], [3 ** -0.5])
    assert all(np.all(x == 1.0) for x in level_balanced_weights([[20, 21], [20]], power=0.0))


def test_sample_patch_point_weights_pick_the_weighted_point():
    """All weight on the second point: every foreground patch is centred (within the jitter) on it."""
    img = np.zeros((40, 40, 200), dtype=np.float32)
    pts = np.array([[20.0, 20.0, 30.0], [20.0, 20.0, 170.0]])
    aug = AugmentConfig(p_rotate=0, p_scale=0, p_flip_lr=0, p_gamma=0, p_remap=0, p_invert=0, p_bias=0,
                        p_noise=0, p_blur=0, p_thick_slices=0, p_partial_fov=0, p_foreground=1.0)
    rng = np.random.default_rng(0)
    for _ in range(10):
        patch = sample_patch(img, pts, [20, 21], (8, 8, 16), np.array([3.0, 3.0, 3.0]), rng, aug,
                             point_weights=np.array([1e-12, 1.0]))
        # all points are kept (in patch voxels); the weighted one lies within the jitter of the centre
        centre = (np.array([8, 8, 16]) - 1) / 2
        assert np.all(np.abs(patch.points_ijk[1] - centre) <= 0.25 * np.array([8, 8, 16]) + 1e-6)
        assert np.abs(patch.points_ijk[0][2] - centre[2]) > 100
    with pytest.raises(ValueError, match="non-negative weights"):
        sample_patch(img, pts, [20, 21], (8, 8, 16), np.array([3.0, 3.0, 3.0]), rng, aug,
                     point_weights=np.array([1.0]))
    for bad in ([0.0, 0.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="positive sum"):
            sample_patch(img, pts, [20, 21], (8, 8, 16), np.array([3.0, 3.0, 3.0]), rng, aug,
                         point_weights=np.array(bad))


def test_sample_patch_zero_weight_point_is_never_a_centre_and_leaves_the_draws_unchanged():
    """A trailing zero-weight point (a level-only pseudo-point) is never drawn, and appending it does not
    change which real point is drawn nor the rest of the patch (same RNG stream)."""
    img = np.random.default_rng(1).random((40, 40, 200)).astype(np.float32)
    pts = np.array([[20.0, 20.0, 30.0], [20.0, 20.0, 100.0], [20.0, 20.0, 170.0]])
    aug = AugmentConfig(p_foreground=1.0)
    for seed in range(20):
        a = sample_patch(img, pts[:2], [20, 21], (8, 8, 16), np.array([3.0, 3.0, 3.0]),
                         np.random.default_rng(seed), aug, point_weights=np.array([1.0, 2.0]))
        b = sample_patch(img, pts, [20, 21, 26], (8, 8, 16), np.array([3.0, 3.0, 3.0]),
                         np.random.default_rng(seed), aug, point_weights=np.array([1.0, 2.0, 0.0]))
        assert np.array_equal(a.image, b.image)
        real = [n for n, v in enumerate(b.level_ids) if v != 26]
        assert list(a.level_ids) == [b.level_ids[n] for n in real]
        np.testing.assert_allclose(a.points_ijk, b.points_ijk[real])


@pytest.mark.parametrize("fraction,expected_cut", [((0.5, 0.5), 10), ((0.25, 0.25), 5), ((0.0, 0.0), 0)])
def test_partial_fov_blanks_the_configured_share_and_drops_its_points(fraction, expected_cut):
    """``augment.partial_fov_fraction`` sets the blanked head or foot slab exactly (a one-value range), and
    the points inside the slab are dropped with their ids."""
    from stage1_localize.augment import _thick_and_fov

    n = 20
    img = np.ones((3, 4, n), np.float32)
    pts = np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 9.0], [1.0, 1.0, 17.0]])
    aug = AugmentConfig(p_thick_slices=0.0, p_partial_fov=1.0, partial_fov_fraction=fraction)
    sides = set()
    for seed in range(12):
        out, kept, ids = _thick_and_fov(img, pts, [20, 21, 22], np.random.default_rng(seed), aug)
        blank = np.flatnonzero(out[0, 0] == 0.0)
        assert len(blank) == expected_cut
        if expected_cut == 0:
            assert ids == [20, 21, 22]
            continue
        head = blank.min() == n - expected_cut  # blanked at the superior (high k) end
        assert head or blank.max() == expected_cut - 1
        sides.add(head)
        inside = (pts[:, 2] >= n - expected_cut - 0.5) if head else (pts[:, 2] <= expected_cut - 0.5)
        assert ids == [i for i, drop in zip([20, 21, 22], inside) if not drop]
        np.testing.assert_array_equal(kept, pts[~inside])
    assert expected_cut == 0 or sides == {True, False}
    assert np.all(img == 1.0)  # the input is not modified


@pytest.mark.parametrize("bad", [(0.5, 0.2), (-0.1, 0.3), (0.2, 1.0)])
def test_partial_fov_fraction_out_of_range_is_refused(bad):
    from stage1_localize.augment import _thick_and_fov

    aug = AugmentConfig(p_thick_slices=0.0, p_partial_fov=1.0, partial_fov_fraction=bad)
    with pytest.raises(ValueError, match="partial_fov_fraction"):
        _thick_and_fov(np.ones((3, 4, 20), np.float32), np.array([[1.0, 1.0, 5.0]]), [20], np.random.default_rng(0), aug)
