"""Patch geometry: a world point lands at the same patch voxel for any input orientation/spacing."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.scan import Scan
from stage2_classify.config import PatchConfig, tiny_config
from stage2_classify.patches import (
    Patch,
    PatchSampler,
    build_targets,
    crop_patch,
    paste_to_reference,
    patch_grid,
    spine_aligned_direction,
)

# odd shape (25, 33, 33) so the centroid falls exactly on a voxel centre
CFG = PatchConfig(size_mm=(50.0, 66.0, 66.0), spacing_mm=2.0)


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


GEOMETRIES = {
    "identity": (np.eye(3), (1.0, 1.0, 1.0)),
    "permuted_sagittal": (np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).T, (0.9, 0.9, 3.5)),
    "flipped": (np.diag([-1.0, -1.0, 1.0]), (1.2, 0.8, 2.0)),
    "oblique": (_rot(0, 17.0) @ _rot(2, -11.0) @ np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float), (0.7, 1.1, 4.0)),
}


def _scan_with_bright_voxel(direction, spacing, shape=(60, 70, 40)):
    arr = np.zeros(shape, np.float32)
    ijk = np.array(shape) // 2 + np.array([3, -5, 2])
    arr[tuple(ijk)] = 1000.0
    scan = Scan(arr, spacing, origin=(-31.0, 12.5, 140.0), direction=direction)
    return scan, scan.voxel_to_world(ijk.astype(float)).coords[0]


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_bright_voxel_lands_at_patch_centre(name):
    direction, spacing = GEOMETRIES[name]
    scan, world = _scan_with_bright_voxel(direction, spacing)
    patch = crop_patch(scan, world, CFG)
    assert patch.shape == (25, 33, 33)
    centre = tuple((np.array(patch.shape) - 1) // 2)
    assert np.unravel_index(np.argmax(patch.array), patch.shape) == centre
    assert patch.array[centre] == pytest.approx(1000.0, rel=1e-4)
    # patch geometry maps the centre voxel back to the world point
    np.testing.assert_allclose(patch.voxel_to_world(np.array(centre, float)).coords[0], world, atol=1e-6)
    np.testing.assert_allclose(patch.direction, np.eye(3))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_offset_point_and_paste_back(name):
    direction, spacing = GEOMETRIES[name]
    scan, world = _scan_with_bright_voxel(direction, spacing)
    # crop 6 mm superior and 4 mm left of the bright voxel: it must appear 3 voxels below / 2 right of centre
    patch = crop_patch(scan, world + np.array([4.0, 0.0, 6.0]), CFG)
    centre = (np.array(patch.shape) - 1) // 2
    assert tuple(np.unravel_index(np.argmax(patch.array), patch.shape)) == tuple(centre + np.array([-2, 0, -3]))
    # paste a one-voxel map back: it lands on the input voxel of the bright point
    m = np.zeros(patch.shape, np.float32)
    m[tuple(centre + np.array([-2, 0, -3]))] = 1.0
    back = paste_to_reference(patch.with_array(m), scan, is_label=True)
    assert back.same_geometry(scan)
    hit = np.argwhere(back.array > 0.5)
    assert len(hit) >= 1
    np.testing.assert_allclose(scan.voxel_to_world(hit.mean(0)).coords[0], world, atol=max(spacing))


def test_sampler_matches_crop_and_labels_stay_integer():
    direction, spacing = GEOMETRIES["oblique"]
    scan, world = _scan_with_bright_voxel(direction, spacing)
    lab = np.zeros(scan.shape, np.int16)
    lab[25:35, 30:40, 15:25] = 20
    labels = scan.with_array(lab)
    sampler = PatchSampler(scan, CFG, {"vertebrae": labels}, normalise=False)
    p = sampler.crop(world)
    np.testing.assert_allclose(p.image, crop_patch(scan, world, CFG).array, atol=1e-3)
    assert set(np.unique(p.labels["vertebrae"]).tolist()) <= {0, 20}
    assert 0.0 < p.fov <= 1.0


def test_patch_grid_centre_and_spine_direction():
    g = patch_grid(np.array([1.0, 2.0, 3.0]), PatchConfig(size_mm=(48, 64, 64), spacing_mm=2.0))
    assert g.shape == (24, 32, 32)
    np.testing.assert_allclose(g.voxel_to_world((np.array(g.shape) - 1) / 2.0).coords[0], [1, 2, 3])
    d = spine_aligned_direction(np.array([0.0, 0.3, 1.0]))
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(d[:, 2], np.array([0, 0.3, 1.0]) / np.linalg.norm([0, 0.3, 1.0]))
    assert np.linalg.det(d) == pytest.approx(1.0)


def test_build_targets_full_masks():
    cfg = tiny_config()
    from tests.stage2_classify.conftest import toy_patch

    patch, label = toy_patch(cfg, 1, np.random.default_rng(3))
    t = build_targets(patch, label, cfg, kind="full")
    body = patch.labels["vertebrae"] == label
    assert np.array_equal(t.body, body)
    assert t.region[body].all() and t.region.sum() > body.sum()
    # labelled voxels have exactly one allowed class except non-body voxels without disc labels: {bg, disc}
    n_allowed = t.seg_allowed.sum(0)
    assert n_allowed[body].max() == 1
    assert np.all(n_allowed[patch.labels["vertebrae"] == 0] == 2)
    assert t.seg_allowed[4][t.lesion].all() and t.lesion.any()
    peak = np.unravel_index(np.argmax(t.heatmap), t.heatmap.shape)
    assert np.linalg.norm(np.array(peak) - np.argwhere(body).mean(0)) <= 1.0


def test_build_targets_box_and_point():
    cfg = tiny_config()
    from tests.stage2_classify.conftest import toy_patch

    patch, label = toy_patch(cfg, 0, np.random.default_rng(4))
    geo = patch.geometry
    c = geo.voxel_to_world((np.array(geo.shape) - 1) / 2.0).coords[0]
    box_mm = np.stack([c - np.array([12.0, 10.0, 8.0]), c + np.array([12.0, 10.0, 8.0])])
    t = build_targets(patch, label, cfg, kind="box", box_mm=box_mm)
    idx = np.argwhere(t.box)
    ext_mm = (idx.max(0) - idx.min(0) + 1) * cfg.patch.spacing_mm
    np.testing.assert_allclose(ext_mm, [24.0, 20.0, 16.0], atol=cfg.patch.spacing_mm)
    assert not t.seg_allowed[1][~t.box].any()  # outside the box it cannot be the centre body
    tp = build_targets(patch, label, cfg, kind="point", point_mm=c)
    assert tp.point_ball.any() and np.all(tp.seg_allowed[[0, 2, 3]][:, tp.point_ball] == 0)


def _outline_patch(cfg):
    from stage2_classify.patches import Patch

    shape = cfg.patch.shape
    geo = patch_grid(np.zeros(3), cfg.patch)
    outl = np.zeros(shape, np.int16)
    outl[5, 4:12, 4:12] = 20  # this body, slice 5
    outl[7, 2:8, 2:8] = 21  # only a neighbour on slice 7
    return Patch(np.zeros(shape, np.float32), geo.with_array(np.zeros(shape, np.float32)), {"outlines": outl})


def test_build_targets_outlines_offset_reads_the_contour_as_outside_the_body():
    cfg = tiny_config()  # 4 mm voxels
    cfg.loss.outline_offset_mm, cfg.loss.outline_band_mm = 6.0, 2.0  # body: erode 8 mm = 2 voxels; not: outside erode 4 mm
    cfg.loss.outline_lateral_margin_mm = None
    t = build_targets(_outline_patch(cfg), 20, cfg, kind="outline")
    a = t.seg_allowed
    centre = [False, True, False, False, True]
    not_centre = [True, False, True, True, True]
    assert a[:, 5, 6, 6].tolist() == centre and a[:, 5, 9, 9].tolist() == centre  # square [6, 10) = 2-voxel erosion
    assert a[:, 5, 5, 5].all() and a[:, 5, 5, 8].all()  # the 1-voxel band (4 mm inside the contour) is free
    assert a[:, 5, 4, 8].tolist() == not_centre  # on the drawn contour itself: surely not the body
    assert a[:, 5, 3, 8].tolist() == not_centre and a[:, 5, 0, 0].tolist() == not_centre
    # the neighbour's eroded interior (2 voxels of a 6-voxel square) is neighbour, beyond it unknown
    assert a[:, 7, 4, 4].tolist() == [False, False, True, False, True]
    assert a[:, 7, 2, 2].all() and a[:, 0].all()


def test_build_targets_outlines_soft_band():
    from scipy.stats import norm

    cfg = tiny_config()  # 4 mm voxels
    cfg.loss.outline_offset_mm, cfg.loss.outline_band_mm, cfg.loss.outline_soft_sigma_mm = 4.0, 4.0, 2.0
    t = build_targets(_outline_patch(cfg), 20, cfg, kind="outline")
    q = t.body_soft
    # band = the two outer rings of the 8 x 8 outline: ring 1 is the drawn contour (depth 0), ring 2 4 mm inside
    np.testing.assert_allclose(q[5, 4, 8], norm.cdf((0.0 - 4.0) / 2.0), atol=1e-6)
    np.testing.assert_allclose(q[5, 5, 8], norm.cdf((4.0 - 4.0) / 2.0), atol=1e-6)
    assert np.isnan(q[5, 7, 7]) and np.isnan(q[5, 0, 0]) and np.isnan(q[0]).all()  # core, outside, other slices
    assert np.isnan(q[7]).all()  # a slice where only the neighbour was outlined
    cfg.loss.outline_soft_sigma_mm = None
    assert build_targets(_outline_patch(cfg), 20, cfg, kind="outline").body_soft is None


def test_build_targets_outlines_lateral_extent():
    cfg = tiny_config()  # 4 mm voxels
    patch = _outline_patch(cfg)
    patch.labels["outlines"][8, 5:11, 5:11] = 20  # this body outlined on slices 5 and 8 ...
    c = (np.array(patch.geometry.shape) - 1) / 2.0
    x = patch.geometry.voxel_to_world(np.array([[5.0, c[1], c[2]], [8.0, c[1], c[2]]])).coords[:, 0]
    lr = (float(x[0]), float(x[1]))  # ... which are its outermost outlined slices in the whole scan
    cfg.loss.outline_lateral_margin_mm = 4.0  # one slice beyond the outermost outlined ones may still be body
    assert build_targets(patch, 20, cfg, kind="outline").seg_allowed[:, 0].all()  # extent unknown: no rule
    a = build_targets(patch, 20, cfg, kind="outline", outline_lr_mm=lr).seg_allowed
    assert a[:, 4].all() and a[:, 9].all() and a[:, 6].all()  # within the margin / between outlined slices: free
    for s in (0, 3, 10, 11):  # beyond it: anything but the centre body
        assert not a[1, s].any() and a[[0, 2, 3, 4], s].all(), s
    # slice 7 lies between the outlined slices: the neighbour's interior stays neighbour, the rest free
    assert a[:, 7, 4, 4].tolist() == [False, False, True, False, True] and a[:, 7, 14, 14].all()
    cfg.loss.outline_lateral_margin_mm = None
    assert build_targets(patch, 20, cfg, kind="outline", outline_lr_mm=lr).seg_allowed[:, 0].all()  # rule off


def test_build_targets_outlines_band_and_unannotated_slices():
    cfg = tiny_config()  # 4 mm voxels
    cfg.loss.outline_offset_mm, cfg.loss.outline_band_mm = 0.0, 4.0  # symmetric band of 1 voxel around the contour
    cfg.loss.outline_lateral_margin_mm = None
    shape = cfg.patch.shape
    geo = patch_grid(np.zeros(3), cfg.patch)
    outl = np.zeros(shape, np.int16)
    outl[5, 4:12, 4:12] = 20  # this body, slice 5
    outl[7, 2:8, 2:8] = 21  # only a neighbour on slice 7
    from stage2_classify.patches import Patch

    p = Patch(np.zeros(shape, np.float32), geo.with_array(np.zeros(shape, np.float32)), {"outlines": outl})
    t = build_targets(p, 20, cfg, kind="outline")
    a = t.seg_allowed
    # slice 5: eroded interior -> {centre, lesion}; the 1-voxel band -> all; beyond -> not centre
    assert a[:, 5, 6, 6].tolist() == [False, True, False, False, True]
    assert a[:, 5, 4, 4].all() and a[:, 5, 3, 8].all()  # band (inside edge, outside edge)
    assert a[:, 5, 0, 0].tolist() == [True, False, True, True, True]
    # slice 7: only the neighbour was outlined -> its interior is not the centre, the rest is unknown
    assert a[:, 7, 4, 4].tolist() == [False, False, True, False, True]
    assert a[:, 7, 14, 14].all()
    # a slice without any outline is unsupervised
    assert a[:, 0].all()
    assert t.region[:, 4:12, 4:12].any(axis=0).all()  # region: outlines extruded left-right


@pytest.mark.parametrize("kind", ["outline", "box", "point", "none"])
def test_given_lesion_map_is_complete_for_weak_body_labels(kind):
    """With a lesion map, 'lesion' is allowed exactly on its lesion voxels, whatever the body annotation:
    otherwise it is allowed (never penalised) in every weak or unannotated voxel and becomes a catch-all."""
    cfg = tiny_config()
    shape = cfg.patch.shape
    geo = patch_grid(np.zeros(3), cfg.patch)
    outl = np.zeros(shape, np.int16)
    outl[5, 4:12, 4:12] = 20
    les = np.zeros(shape, np.uint8)
    les[5, 5:7, 5:7] = 1  # inflammation at a corner
    les[2, 1, 1] = 4  # a distractor outside the body is not a lesion
    from stage2_classify.patches import Patch

    p = Patch(np.zeros(shape, np.float32), geo.with_array(np.zeros(shape, np.float32)),
              {"outlines": outl, "lesions": les})
    c = geo.voxel_to_world((np.array(shape) - 1) / 2.0).coords[0]
    box_mm = np.stack([c - 8.0, c + 8.0])
    t = build_targets(p, 20, cfg, kind=kind, box_mm=box_mm, point_mm=c)
    lesion = les == 1
    assert np.array_equal(t.seg_allowed[4], lesion)
    assert np.all(t.seg_allowed[:, lesion].sum(0) == 1)
    assert np.all(t.seg_allowed.sum(0) >= 1)  # no voxel is left without an allowed class
    assert t.lesion_class[5, 5, 5] == 1 and t.lesion_class[2, 1, 1] == 0


def test_vertebra_region_keeps_the_margin_off_other_bodies():
    from stage2_classify.patches import vertebra_region

    body = np.zeros((1, 1, 9), bool)
    body[0, 0, 2:4] = True
    others = np.zeros_like(body)
    others[0, 0, 5:8] = True  # a neighbour one voxel away
    np.testing.assert_array_equal(vertebra_region(body, 2, None)[0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(vertebra_region(body, 2, others)[0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0])
    clash = others.copy()
    clash[0, 0, 3] = True  # a voxel claimed by both: the body keeps it
    np.testing.assert_array_equal(vertebra_region(body, 2, clash)[0, 0], [1, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(vertebra_region(body, 0, others), body)


def test_build_targets_full_masks_region_stops_at_the_neighbour():
    """Two bodies one patch voxel apart: a 2-voxel margin covers the gap but not the neighbour."""
    cfg = tiny_config(margin_mm=8.0)  # 2 voxels at 4 mm
    shape = cfg.patch.shape
    verts = np.zeros(shape, np.int16)
    verts[3:9, 4:12, 2:7] = 20
    verts[3:9, 4:12, 8:13] = 21
    geometry = Scan(np.zeros(shape, np.float32), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    patch = Patch(np.zeros(shape, np.float32), geometry, {"vertebrae": verts})
    t = build_targets(patch, 20, cfg, kind="full")
    assert t.region[verts == 20].all()
    assert t.region[3:9, 4:12, 7].all()       # the gap (disc) is inside the margin
    assert not t.region[verts == 21].any()    # the neighbour never is
    assert t.region[3:9, 4:12, 0:2].all()     # the margin elsewhere is intact
    np.testing.assert_array_equal(t.others, verts == 21)  # kept for the training's region jitter
    assert build_targets(patch, 20, cfg, kind="point", point_mm=np.zeros(3)).others is None
