"""Weak labels: points, world boxes, loose outlines (+ filling, also of the real outlines), coarse masks."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import SpinepipeInputError
from data_prep.io import read_boxes_csv, read_image, read_labelmap, read_points_csv, write_image
from data_prep.scan import Scan, centroids_from_labelmap
from data_prep.weak_labels import (
    WeakLabelConfig,
    biased_coarse_mask,
    derive_weak_labels,
    fill_outlines,
    jittered_points,
    loose_boxes,
    outline_dice,
    sparse_outlines,
    world_boxes,
    write_boxes_csv,
    write_points_csv,
)

LR_AXIS = 1


def _direction(tilt_deg: float = 8.0) -> np.ndarray:
    t = np.radians(tilt_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rot @ np.column_stack([[0, -1, 0], [1, 0, 0], [0, 0, -1]]).astype(float)


def tiny_labels(spacing=(2.0, 1.5, 1.25), tilt_deg: float = 8.0) -> Scan:
    """Three box bodies (L1-L3) in a 24x40x80 grid; voxel axis 1 is left-right."""
    lab = np.zeros((24, 40, 80), np.uint8)
    for n, vid in enumerate((20, 21, 22)):
        k0 = 6 + n * 26
        lab[4:20, 8:32, k0:k0 + 22] = vid
    return Scan(lab, spacing, (5.0, -7.0, 12.0), _direction(tilt_deg), name="tiny")


def _voxel_corners_world(scan: Scan, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).astype(float)
    offs = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    return scan.voxel_to_world((idx[:, None, :] + offs[None]).reshape(-1, 3)).coords


def test_boxes_contain_the_mask_with_requested_margins():
    lab = tiny_labels()
    ids, tight = world_boxes(lab)
    assert ids == [20, 21, 22]
    for n, vid in enumerate(ids):
        corners = _voxel_corners_world(lab, lab.array == vid)
        assert np.allclose(tight[n, 0], corners.min(0)) and np.allclose(tight[n, 1], corners.max(0))
    ids2, loose = loose_boxes(lab, np.random.default_rng(0), margin_mm=(1.0, 4.0))
    assert ids2 == ids
    lo_marg = tight[:, 0] - loose[:, 0]
    hi_marg = loose[:, 1] - tight[:, 1]
    for m in (lo_marg, hi_marg):
        assert np.all(m >= 1.0 - 1e-9) and np.all(m <= 4.0 + 1e-9)
    assert np.std(np.concatenate([lo_marg.ravel(), hi_marg.ravel()])) > 0.3  # margins vary


def test_points_are_within_jitter():
    lab = tiny_labels()
    cents = centroids_from_labelmap(lab)
    ids, exact = jittered_points(lab, np.random.default_rng(0), sigma_mm=0.0)
    assert np.allclose(exact.coords, [cents[v] for v in ids])
    deltas = []
    for seed in range(200):
        _, p = jittered_points(lab, np.random.default_rng(seed), sigma_mm=2.0)
        assert p.space == "world"
        deltas.append(p.coords - exact.coords)
    d = np.concatenate(deltas)
    assert np.all(np.linalg.norm(d, axis=1) < 2.0 * 6)
    assert np.allclose(d.std(axis=0), 2.0, atol=0.25)


def _slice_scan(n_i=20, n_lr=6, n_k=30) -> Scan:
    arr = np.zeros((n_i, n_lr, n_k), np.uint8)
    return Scan(arr, (1.0, 3.0, 1.0), (0, 0, 0), _direction(0.0))


def test_fill_hand_drawn_square_equals_square():
    base = _slice_scan()
    arr = base.array.copy()
    square = np.zeros((20, 30), bool)
    square[3:13, 5:17] = True
    ring = square.copy()
    ring[4:12, 6:16] = False
    arr[:, 2, :][ring] = 20
    # a second body on the same slice, and a third contour with a 1-voxel gap on another slice
    sq2 = np.zeros((20, 30), bool)
    sq2[3:10, 20:28] = True
    ring2 = sq2 & ~np.pad(np.ones((5, 6), bool), ((4, 11), (21, 3)))
    arr[:, 2, :][ring2] = 21
    gap = ring.copy()
    gap[3, 10] = False
    arr[:, 4, :][gap] = 22
    filled = fill_outlines(base.with_array(arr)).array
    assert np.array_equal(filled[:, 2, :] == 20, square)
    assert np.array_equal(filled[:, 2, :] == 21, sq2)
    assert np.array_equal(filled[:, 4, :] == 22, square)
    assert not filled[:, [0, 1, 3, 5], :].any()


def test_sparse_outlines_are_closed_loose_and_on_few_sagittal_slices():
    lab = tiny_labels()
    cfg = WeakLabelConfig(outline_n_slices=4, outline_dilate_mm=(2.0, 3.0), outline_jitter_mm=0.3)
    out = sparse_outlines(lab, np.random.default_rng(1), config=cfg)
    filled = fill_outlines(out)
    for vid in (20, 21, 22):
        on = (out.array == vid).any(axis=(0, 2))
        assert 2 <= on.sum() <= 4  # outlined only on a few sagittal slices
        assert on[8] and on[31]  # edge slices of the body included
        for s in np.flatnonzero(on):
            m = lab.array[:, s, :] == vid
            f = filled.array[:, s, :] == vid
            assert (m & f).sum() >= 0.97 * m.sum()  # the loose region encloses the body
            assert f.sum() > 1.1 * m.sum()  # ...and is larger
            contour = out.array[:, s, :] == vid
            assert contour.sum() < 0.5 * f.sum()  # lines, not filled
    dice = outline_dice(filled, lab)
    assert 0.6 < dice.dice.mean() < 0.95


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.5, 1.25)])
def test_coarse_masks_dilate_and_erode(spacing):
    lab = tiny_labels(spacing=spacing)
    vol = {v: (lab.array == v).sum() for v in (20, 21, 22)}
    rng = np.random.default_rng(0)
    dil = biased_coarse_mask(lab, rng, bias_mm=2.0, block_mm=0.0)
    ero = biased_coarse_mask(lab, rng, bias_mm=-2.0, block_mm=0.0)
    same = biased_coarse_mask(lab, rng, bias_mm=0.0, block_mm=0.0)
    assert np.array_equal(same.array, lab.array)
    for v in vol:
        if v != 22:  # (L3 touches the end of the field of view, which is not eroded)
            # erosion of a box by 2 mm removes whole layers: exact expected voxel count
            depth = [(np.arange(n) + 0.5) * sp for n, sp in zip((16, 24, 22), spacing)]  # centre to face, mm
            keep = [int(np.sum((d >= 2.0 - 1e-9) & (d <= d[-1] + 0.5 * sp - 2.0 + 1e-9)))
                    for d, sp in zip(depth, spacing)]
            assert (ero.array == v).sum() == int(np.prod(keep))
        assert (ero.array == v).sum() / vol[v] < 0.8
        assert 1.2 < (dil.array == v).sum() / vol[v] < 2.0
        assert np.all(lab.array[ero.array == v] == v)  # eroded inside, dilated around
        assert np.all(dil.array[lab.array == v] == v)
    blocky_dil = biased_coarse_mask(lab, rng, bias_mm=2.0, block_mm=4.0)
    blocky_ero = biased_coarse_mask(lab, rng, bias_mm=-2.0, block_mm=4.0)
    for v in vol:
        assert (blocky_dil.array == v).sum() > 1.15 * vol[v]
        assert (blocky_ero.array == v).sum() < 0.85 * vol[v]


def test_csv_round_trip(tmp_path):
    lab = tiny_labels()
    ids, pts = jittered_points(lab, np.random.default_rng(3))
    write_points_csv(ids, pts, tmp_path / "s_points.csv")
    rid, rpts = read_points_csv(tmp_path / "s_points.csv")
    assert rid == ids and np.allclose(rpts.coords, pts.coords, atol=1e-3)
    bids, boxes = loose_boxes(lab, np.random.default_rng(3))
    write_boxes_csv(bids, boxes, tmp_path / "s_boxes.csv")
    rb_ids, rboxes = read_boxes_csv(tmp_path / "s_boxes.csv")
    assert rb_ids == bids and np.allclose(rboxes, boxes, atol=1e-3)
    assert (tmp_path / "s_points.csv").read_text().splitlines()[0] == "level,x_mm,y_mm,z_mm"


def test_derive_weak_labels_all_kinds(tmp_path):
    lab = tiny_labels()
    src = tmp_path / "ds"
    img = lab.with_array(lab.array.astype(np.float32) * 3)
    write_image(img, src / "a_image.nii.gz")
    write_image(lab, src / "a_vertebrae.nii.gz")
    for kind in ("points", "boxes", "outlines", "coarse"):
        out = tmp_path / kind
        assert derive_weak_labels(src, out, kind, seed=1) == ["a"]
        assert (out / "a_image.nii.gz").exists()
    assert read_points_csv(tmp_path / "points" / "a_points.csv")[0] == [20, 21, 22]
    assert read_boxes_csv(tmp_path / "boxes" / "a_boxes.csv")[0] == [20, 21, 22]
    assert not (tmp_path / "points" / "a_vertebrae.nii.gz").exists()
    o = read_labelmap(tmp_path / "outlines" / "a_outlines.nii.gz")
    assert set(np.unique(o.array)) == {0, 20, 21, 22}
    c = read_labelmap(tmp_path / "coarse" / "a_coarse.nii.gz")
    assert (c.array > 0).sum() > (lab.array > 0).sum()
    assert not (tmp_path / "coarse" / "a_vertebrae.nii.gz").exists()
    derive_weak_labels(src, tmp_path / "boxes_full", "boxes", seed=1, keep_full_masks=True)
    full = read_labelmap(tmp_path / "boxes_full" / "a_vertebrae.nii.gz")
    assert np.array_equal(full.array, lab.array)
    # deterministic per seed
    derive_weak_labels(src, tmp_path / "points2", "points", seed=1)
    assert (tmp_path / "points2" / "a_points.csv").read_text() == (tmp_path / "points" / "a_points.csv").read_text()
    with pytest.raises(SpinepipeInputError):
        derive_weak_labels(src, tmp_path / "x", "scribbles", seed=1)
    with pytest.raises(SpinepipeInputError):
        derive_weak_labels(tmp_path / "missing", tmp_path / "x", "points", seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("cohort, sid, expected", [
    ("myosegmentum", "myosegmentum-001", 0.74),
    ("chu2015", "chu2015-002", 0.60),
])
def test_real_outlines_fill_to_readme_dice(shared_data, cohort, sid, expected):
    folder = shared_data / cohort
    img = read_image(folder / f"{sid}_image.nii.gz")
    mask = read_labelmap(folder / f"{sid}_vertebrae.nii.gz", reference=img)
    real = read_labelmap(folder / f"{sid}_outlines.nii.gz", reference=img)
    filled = fill_outlines(real)
    d = outline_dice(filled, mask)
    assert len(d) >= 20
    assert (d.dice > 0.2).all()  # every contour filled (no open contour left as a line)
    assert abs(d.dice.mean() - expected) < 0.06, d.dice.mean()
    # the simulated loose outlines are about as loose as the real ones
    sim = outline_dice(fill_outlines(sparse_outlines(mask, np.random.default_rng(0))), mask)
    assert abs(sim.dice.mean() - d.dice.mean()) < 0.08, (sim.dice.mean(), d.dice.mean())


def test_thicken_slices_keeps_every_outlined_slice_on_a_coarser_grid():
    from data_prep.scan import resample_to_spacing
    from data_prep.weak_labels import thicken_slices

    arr = np.zeros((30, 8, 8), np.int16)  # axis 0 = left-right (identity direction), 1 mm
    drawn = [5, 12, 13, 20, 27]
    for i, s in enumerate(drawn):
        arr[s, 2:6, 2:6] = 20 + i
    scan = Scan(arr, spacing=(1.0, 1.0, 1.0))
    thick = thicken_slices(scan, 2.0)
    t = np.asarray(thick.array)
    assert t[4, 3, 3] == 20 and t[6, 3, 3] == 20 and t[3, 3, 3] == 0  # +-1 slice around slice 5, no further
    assert t[12, 3, 3] == 21 and t[13, 3, 3] == 22  # drawn slices keep their own labels
    assert t[11, 3, 3] == 21 and t[14, 3, 3] == 22
    assert (t[:, 0, 0] == 0).all()  # nothing appears outside the drawn regions
    assert np.array_equal(np.asarray(thicken_slices(scan, 1.0).array), arr)  # already as thick as the grid
    # nearest-neighbour onto 2-mm voxels: without thickening some drawn slices vanish, with it none does
    def labels_after(s):
        return set(np.unique(np.asarray(resample_to_spacing(s, (2.0, 1.0, 1.0), is_label=True).array))) - {0}

    assert labels_after(thick) == {20, 21, 22, 23, 24}
    assert labels_after(scan) != {20, 21, 22, 23, 24}


def test_outlined_lr_extent_in_world_mm():
    from data_prep.weak_labels import outlined_lr_extent

    arr = np.zeros((30, 8, 8), np.int16)  # axis 0 = left-right, 2 mm, origin x = -10 mm
    arr[[4, 9, 15], 2:6, 2:6] = 20
    arr[[6, 11], 3:5, 3:5] = 21
    ext = outlined_lr_extent(Scan(arr, spacing=(2.0, 1.0, 1.0), origin=(-10.0, 0.0, 0.0)))
    assert ext == {20: (-2.0, 20.0), 21: (2.0, 12.0)}
    flipped = Scan(arr, spacing=(2.0, 1.0, 1.0), origin=(50.0, 0.0, 0.0), direction=np.diag([-1.0, 1.0, 1.0]))
    assert outlined_lr_extent(flipped)[20] == (20.0, 42.0)  # x = 50 - 2 i for i = 15 .. 4


def test_shrink2d_uses_a_radius_in_mm_on_anisotropic_pixels():
    from data_prep.weak_labels import shrink2d

    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    # dilate 2 mm with 1 x 2 mm pixels: 2 rows up/down, 1 column left/right (an ellipse, not a square)
    d = shrink2d(m, -2.0, (1.0, 2.0))
    assert np.argwhere(d[:, 4]).ravel().tolist() == [2, 3, 4, 5, 6]
    assert np.argwhere(d[4]).ravel().tolist() == [3, 4, 5]
    assert not d[3, 3] and d.sum() == 7  # (1, 1) px = (1, 2) mm is sqrt(5) mm away: outside the 2-mm ellipse
    # erode back: a 5 x 3 block loses its border ring with unit pixels; 0 mm and empty masks are copies
    block = np.zeros((9, 9), bool)
    block[2:7, 3:6] = True
    assert np.argwhere(shrink2d(block, 1.0)).tolist() == [[3, 4], [4, 4], [5, 4]]
    assert np.array_equal(shrink2d(block, 0.0), block) and shrink2d(block, 0.0) is not block
    assert not shrink2d(np.zeros((4, 4), bool), -3.0).any()
    # the border counts as background when eroding
    full = np.ones((5, 5), bool)
    assert np.argwhere(shrink2d(full, 1.0)).min() == 1
