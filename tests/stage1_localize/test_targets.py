"""Target builders on tiny grids (hand-checked values)."""
from __future__ import annotations

import numpy as np
import pytest

from stage1_localize.targets import IGNORE, centre_heatmap, level_indices, level_map, make_targets


def test_heatmap_peak_and_sigma_in_mm_with_anisotropic_spacing():
    h = centre_heatmap((11, 11, 11), np.array([[5.0, 5.0, 5.0]]), spacing=(1.0, 2.0, 4.0), sigma_mm=4.0)
    assert h.dtype == np.float32 and h.shape == (11, 11, 11)
    assert h[5, 5, 5] == pytest.approx(1.0)
    # one sigma (4 mm) away: 4 voxels along i, 2 along j, 1 along k -> exp(-1/2)
    for idx in [(9, 5, 5), (5, 7, 5), (5, 5, 6)]:
        assert h[idx] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert h[0, 0, 0] < 1e-3


def test_heatmap_is_max_not_sum_and_keeps_tails_of_outside_points():
    pts = np.array([[2.0, 2.0, 2.0], [2.0, 2.0, 4.0]])
    h = centre_heatmap((5, 5, 7), pts, spacing=(1, 1, 1), sigma_mm=1.0)
    assert h.max() == pytest.approx(1.0)
    assert h[2, 2, 3] == pytest.approx(np.exp(-0.5))  # not 2 * exp(-0.5)
    outside = centre_heatmap((5, 5, 5), np.array([[2.0, 2.0, 6.0]]), spacing=(1, 1, 1), sigma_mm=1.0)
    assert outside[2, 2, 4] == pytest.approx(np.exp(-2.0))  # 2 mm from a point beyond the edge
    assert centre_heatmap((4, 4, 4), np.zeros((0, 3)), (1, 1, 1), 2.0).max() == 0.0


def test_level_map_balls_nearest_wins_ignore_elsewhere():
    pts = np.array([[3.0, 3.0, 2.0], [3.0, 3.0, 6.0]])
    m = level_map((7, 7, 9), pts, [4, 7], spacing=(1.0, 1.0, 1.0), radius_mm=2.5)
    assert m.dtype == np.int64
    assert m[3, 3, 2] == 4 and m[3, 3, 6] == 7
    assert m[3, 3, 4] == 4  # 2 mm from both centres: inside both balls, a tie keeps the first
    assert level_map((7, 7, 9), pts, [4, 7], (1.0, 1.0, 1.0), radius_mm=1.5)[3, 3, 4] == IGNORE
    assert m[3, 3, 0] == 4 and m[0, 0, 0] == IGNORE
    # overlap: with radius 3 the voxel k=4 is within both balls at equal distance; k=5 is nearer the second
    m2 = level_map((7, 7, 9), pts, [4, 7], spacing=(1.0, 1.0, 1.0), radius_mm=3.0)
    assert m2[3, 3, 5] == 7 and m2[3, 3, 3] == 4
    # anisotropic: radius in mm, 2 mm voxels along k -> ball reaches 1 voxel along k, 2 along i
    m3 = level_map((7, 7, 7), np.array([[3.0, 3.0, 3.0]]), [1], spacing=(1.0, 1.0, 2.0), radius_mm=2.0)
    assert m3[5, 3, 3] == 1 and m3[3, 3, 4] == 1 and m3[3, 3, 5] == IGNORE and m3[6, 3, 3] == IGNORE
    with pytest.raises(ValueError):
        level_map((3, 3, 3), pts, [1], (1, 1, 1), 1.0)


def test_level_indices_and_make_targets_unknown_level():
    levels = (19, 20, 21)
    assert level_indices([20, 26, 19], levels).tolist() == [1, IGNORE, 0]
    t = make_targets((5, 5, 9), np.array([[2.0, 2.0, 2.0], [2.0, 2.0, 6.0]]), [21, 26], (1.0, 1.0, 1.0),
                     levels=levels, sigma_mm=1.0, level_radius_mm=1.0)
    assert t["heatmap"][2, 2, 6] == pytest.approx(1.0)  # S1 is still a vertebra for the heatmap
    assert t["levels"][2, 2, 2] == 2 and t["levels"][2, 2, 6] == IGNORE


def test_annotated_span_weight_ignores_unannotated_levels_only():
    from stage1_localize.targets import annotated_span_weight

    spacing = (1.0, 1.0, 2.0)  # k (superior) in 2 mm voxels
    pts = np.array([[2.0, 2.0, 10.0], [2.0, 2.0, 20.0]])  # k = 10 (20 mm) and k = 20 (40 mm)
    # L2..L3 annotated: ignore more than 4 mm above L2 (k > 22) and below L3 (k < 8)
    w = annotated_span_weight((4, 4, 30), pts, [21, 22][::-1], spacing, margin_mm=4.0)
    assert w.dtype == np.float32 and w.shape == (4, 4, 30)
    assert w[0, 0, 22] == 1.0 and w[0, 0, 23] == 0.0 and w[0, 0, 8] == 1.0 and w[0, 0, 7] == 0.0
    # L4..L5 annotated (L5 lowest): the sacrum below stays a negative -> no ignore band below
    w2 = annotated_span_weight((4, 4, 30), pts, [24, 23], spacing, margin_mm=4.0)
    assert w2[0, 0, 0] == 1.0 and w2[0, 0, 23] == 0.0
    assert annotated_span_weight((2, 2, 2), np.zeros((0, 3)), [], spacing, 4.0).min() == 1.0
    t = make_targets((4, 4, 30), pts, [24, 23], spacing, levels=(23, 24), sigma_mm=2.0, level_radius_mm=2.0,
                     span_margin_mm=4.0)
    assert np.array_equal(t["heatmap_weight"], w2)


def test_offset_map_points_to_the_nearest_centroid_in_mm():
    from stage1_localize.targets import offset_map

    pts = np.array([[2.0, 2.0, 1.5], [2.0, 2.0, 6.0]])
    off, mask = offset_map((5, 5, 8), pts, spacing=(1.0, 1.0, 2.0), radius_mm=3.0)
    assert off.shape == (3, 5, 5, 8) and off.dtype == np.float32 and mask.dtype == bool
    # voxel (2, 2, 1): point 1 is 0.5 voxel = 1 mm above along k
    assert off[:, 2, 2, 1].tolist() == [0.0, 0.0, 1.0]
    # voxel (3, 1, 5): nearest is point 2 -> (-1 mm, +1 mm, +2 mm)
    assert off[:, 3, 1, 5].tolist() == [-1.0, 1.0, 2.0]
    # voxel (2, 2, 4) is 5 mm from point 1 and 4 mm from point 2: outside both 3 mm balls
    assert not mask[2, 2, 4] and off[:, 2, 2, 4].tolist() == [0.0, 0.0, 0.0]
    assert mask[2, 2, 3] and off[2, 2, 2, 3] == pytest.approx(-3.0)  # nearer point 1 (3 mm) than point 2 (6 mm)
    assert not mask[0, 0, 7]
    empty, m0 = offset_map((3, 3, 3), np.zeros((0, 3)), (1, 1, 1), 2.0)
    assert not m0.any() and not empty.any()
    t = make_targets((5, 5, 8), pts, [20, 21], (1.0, 1.0, 2.0), levels=(20, 21), sigma_mm=2.0,
                     level_radius_mm=2.0, offset_radius_mm=3.0)
    assert np.array_equal(t["offset"], off) and np.array_equal(t["offset_mask"], mask)
    assert "offset" not in make_targets((5, 5, 8), pts, [20, 21], (1.0, 1.0, 2.0), levels=(20, 21),
                                        sigma_mm=2.0, level_radius_mm=2.0)


def test_extrapolate_cranial_hand_made():
    from stage1_localize.targets import extrapolate_cranial
    world = np.array([[0.0, 0.0, -30.0], [0.0, 0.0, 0.0], [0.0, 0.0, -62.0]])  # L2, L1, L3 (any order)
    ids, pts = extrapolate_cranial(world, [21, 20, 22])
    assert ids == [19]
    np.testing.assert_allclose(pts, [[0.0, 0.0, 30.0]])
    # two levels: T12 then T11, each repeating the step (a curved spine keeps its last step)
    world = np.array([[0.0, 0.0, 0.0], [0.0, 4.0, -30.0]])  # L1, L2
    ids, pts = extrapolate_cranial(world, [20, 21], n_levels=2)
    assert ids == [19, 18]
    np.testing.assert_allclose(pts, [[0.0, -4.0, 30.0], [0.0, -8.0, 60.0]])


def test_extrapolate_caudal_hand_made():
    """L5 annotated last: S1 one step below; nothing below S1; an L6 (transitional) end is not extended."""
    from stage1_localize.targets import extrapolate_caudal
    world = np.array([[0.0, 0.0, -30.0], [0.0, 5.0, 0.0], [0.0, 2.0, 30.0]])  # L5, L4, L3 (any order)
    ids, pts = extrapolate_caudal(world, [24, 23, 22])
    assert ids == [26]
    np.testing.assert_allclose(pts, [[0.0, -5.0, -60.0]])
    # L4 last, two levels: L5 then S1
    ids, pts = extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [22, 23], n_levels=2)
    assert ids == [24, 26]
    np.testing.assert_allclose(pts, [[0.0, 0.0, -60.0], [0.0, 0.0, -90.0]])
    # the step into S1 (only that one) turned towards posterior (+y) by the lumbosacral bend
    ids, pts = extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [23, 24], sacral_bend_deg=(90.0,))
    np.testing.assert_allclose(pts, [[0.0, 30.0, -30.0]], atol=1e-9)
    pts = extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [23, 24], sacral_bend_deg=(90.0,),
                             sacral_step_scale=0.5)[1]
    np.testing.assert_allclose(pts, [[0.0, 15.0, -30.0]], atol=1e-9)
    # an arc: one S1 point per angle, and nothing after S1 even when more levels are asked for
    ids, pts = extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [23, 24], n_levels=3,
                                  sacral_bend_deg=(0.0, 90.0))
    assert ids == [26, 26]
    np.testing.assert_allclose(pts, [[0.0, 0.0, -60.0], [0.0, 30.0, -30.0]], atol=1e-9)
    ids, pts = extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [22, 23], n_levels=2,
                                  sacral_bend_deg=(30.0,))
    assert ids == [24, 26]
    np.testing.assert_allclose(pts, [[0.0, 0.0, -60.0], [0.0, 15.0, -60.0 - 15.0 * np.sqrt(3.0)]], atol=1e-9)
    with pytest.raises(ValueError, match="sacral_step_scale: expected a positive factor, got 0.0"):
        extrapolate_caudal(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -30.0]]), [23, 24], sacral_step_scale=0.0)
    # S1 already annotated (nothing below it), L6 at the end, a gap, or a step pointing head-wards: nothing
    assert extrapolate_caudal(np.array([[0, 0, 0.0], [0, 0, -30.0]]), [24, 26])[0] == []
    assert extrapolate_caudal(np.array([[0, 0, 0.0], [0, 0, -30.0]]), [24, 25])[0] == []
    assert extrapolate_caudal(np.array([[0, 0, 0.0], [0, 0, -60.0]]), [22, 24])[0] == []
    assert extrapolate_caudal(np.array([[0, 0, -30.0], [0, 0, 0.0]]), [23, 24])[0] == []


def test_make_targets_level_only_sacrum_point_names_the_level_map_but_not_the_heatmap():
    """An S1 pseudo-point below L5 (``level_only``): S1 in the level map around it, no heat, no offsets, and
    the sacrum stays a heatmap negative (span closed below L5)."""
    from stage1_localize.targets import IGNORE
    pts = np.array([[4.0, 4.0, 10.0], [4.0, 4.0, 6.0]])  # L5 above, S1 pseudo-point 12 mm below (k = superior)
    kw = dict(levels=(23, 24, 26), sigma_mm=2.0, level_radius_mm=9.0, span_margin_mm=6.0, offset_radius_mm=6.0)
    t = make_targets((9, 9, 20), pts, [24, 26], (3.0, 3.0, 3.0), level_only=[False, True], **kw)
    assert t["levels"][4, 4, 6] == 2 and t["levels"][4, 4, 10] == 1
    assert t["levels"][4, 4, 9] == 1 and t["levels"][4, 4, 7] == 2  # nearest point wins between the balls
    assert t["levels"][0, 0, 0] == IGNORE
    assert t["heatmap"][4, 4, 6] < 1e-6 and t["heatmap"][4, 4, 10] == pytest.approx(1.0)
    assert not t["offset_mask"][4, 4, 6] and t["offset_mask"][4, 4, 10]
    assert np.all(t["heatmap_weight"][:, :, :10] == 1.0)  # below L5 is the sacrum: no ignore band there
    plain = make_targets((9, 9, 20), pts[:1], [24], (3.0, 3.0, 3.0), **kw)
    assert np.array_equal(t["heatmap"], plain["heatmap"]) and np.array_equal(t["offset"], plain["offset"])
    assert np.array_equal(t["heatmap_weight"], plain["heatmap_weight"])


def test_extrapolate_cranial_refuses_gaps_transitional_and_wrong_direction():
    from stage1_localize.targets import extrapolate_cranial
    # L1 and L3 (L2 missing): the step is not one level
    assert extrapolate_cranial(np.array([[0, 0, 0.0], [0, 0, -60.0]]), [20, 22])[0] == []
    # T13 at the top: no standard predecessor step
    assert extrapolate_cranial(np.array([[0, 0, 0.0], [0, 0, -30.0]]), [28, 20])[0] == []
    # L1 below L2 in world space (mislabelled / flipped): nothing added
    assert extrapolate_cranial(np.array([[0, 0, -30.0], [0, 0, 0.0]]), [20, 21])[0] == []
    # one point, or n_levels 0: nothing
    assert extrapolate_cranial(np.array([[0, 0, 0.0]]), [20])[0] == []
    assert extrapolate_cranial(np.array([[0, 0, 0.0], [0, 0, -30.0]]), [20, 21], n_levels=0)[0] == []
    with pytest.raises(ValueError, match="2 points but 1 level ids"):
        extrapolate_cranial(np.zeros((2, 3)), [20])


def test_make_targets_level_only_points_shape_only_the_level_map():
    shape, sp = (5, 5, 20), (3.0, 3.0, 3.0)
    pts = np.array([[2.0, 2.0, 5.0], [2.0, 2.0, 15.0]])  # L2 (real), L1 (pseudo, above)
    kw = dict(levels=[19, 20, 21], sigma_mm=3.0, level_radius_mm=4.0, span_margin_mm=3.0, offset_radius_mm=4.0)
    t = make_targets(shape, pts, [21, 20], sp, level_only=[False, True], **kw)
    assert t["heatmap"][2, 2, 15] < 1e-3 and t["heatmap"][2, 2, 5] == 1.0   # no Gaussian on the pseudo point
    assert t["levels"][2, 2, 15] == 1 and t["levels"][2, 2, 5] == 2          # but its level is taught
    assert not t["offset_mask"][2, 2, 15] and t["offset_mask"][2, 2, 5]
    assert t["heatmap_weight"][2, 2, 15] == 0.0                               # span from real points only
    full = make_targets(shape, pts, [21, 20], sp, **kw)
    assert full["heatmap"][2, 2, 15] == 1.0 and full["heatmap_weight"][2, 2, 15] == 1.0
    with pytest.raises(ValueError, match="expected 2 flags"):
        make_targets(shape, pts, [21, 20], sp, level_only=[True], **kw)
