"""Lesion simulator: placement inside the intended body, ASAS polarity, hard negatives, determinism."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from data_prep.errors import SpinepipeInputError
from data_prep.io import read_image, read_labelmap, read_vertebra_labels_csv, write_image
from data_prep.lesions import (
    CLASSES,
    DISTRACTOR,
    FAT,
    HARD_NEGATIVE,
    INFLAMMATION,
    LESION_FAMILIES,
    LesionConfig,
    assign_classes,
    infer_contrast,
    insert_lesions,
    make_semisynthetic,
    plant_in_neighbour,
)
from data_prep.scan import Scan

IDS = (20, 21, 22)
LR_AXIS = 1  # in the test grid below the left-right (sagittal) axis is voxel axis 1


def _rot_x(deg: float) -> np.ndarray:
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def tiny_spine(tilt_deg: float = 10.0, seed: int = 0, marrow_sd: float = 3.0) -> tuple[Scan, Scan]:
    """24x40x80 grid, spacing (2, 1.5, 1.25) mm; axis 0 -> anterior, axis 1 -> left, axis 2 -> inferior,
    rotated by ``tilt_deg`` about world x (so the bodies are tilted in world space). Three box bodies
    (16 x 24 x 22 voxels) L1-L3 with discs between them."""
    base = np.column_stack([[0, -1, 0], [1, 0, 0], [0, 0, -1]]).astype(float)
    direction = _rot_x(tilt_deg) @ base
    spacing = np.array([2.0, 1.5, 1.25])
    shape = (24, 40, 80)
    rng = np.random.default_rng(seed)
    img = 40 + 3 * rng.standard_normal(shape)
    lab = np.zeros(shape, np.uint8)
    for n, vid in enumerate(IDS):
        k0 = 6 + n * 26
        lab[4:20, 8:32, k0:k0 + 22] = vid
        img[4:20, 8:32, k0:k0 + 22] = 100 + marrow_sd * rng.standard_normal((16, 24, 22))
        img[4:20, 8:32, k0 + 22:k0 + 26] = 60
    origin = (10.0, -20.0, 30.0)
    return (Scan(img.astype(np.float32), spacing, origin, direction, name="tiny"),
            Scan(lab, spacing, origin, direction, name="tiny_vertebrae"))


NO_NEG = dict(hard_negative_rate=0.0, distractor_rate=0.0)


def test_grid_lr_axis_is_not_axis_0():
    img, _ = tiny_spine()
    assert img.axis_of(0)[0] == LR_AXIS


@pytest.mark.parametrize("contrast", ["t1", "t2", "stir", "water"])
def test_lesions_inside_intended_vertebra_only(contrast):
    img, lab = tiny_spine()
    cfg = LesionConfig(class_probs=(0.2, 0.4, 0.4), second_lesion_prob=0.5, **NO_NEG)
    n_lesioned = 0
    for seed in range(6):
        res = insert_lesions(img, lab, contrast, np.random.default_rng(seed), cfg)
        L = res.lesions.array
        changed = np.abs(res.image.array - img.array) > 1e-4
        for _, row in res.table.iterrows():
            mask = lab.array == row.label
            code = {1: INFLAMMATION, 2: FAT}.get(int(row["class"]))
            if code is None:
                assert not (L[mask] > 0).any()
                assert not changed[mask].any()
                continue
            n_lesioned += 1
            own = (L == code) & mask
            assert own.any()
        lesioned_masks = np.isin(lab.array, res.table.label[res.table["class"] > 0].to_numpy())
        assert not changed[~lesioned_masks].any(), "image changed outside the lesioned bodies"
        assert not ((L > 0) & ~lesioned_masks).any()
        # lesion codes inside a body match that body's class
        for _, row in res.table.iterrows():
            vals = set(np.unique(L[lab.array == row.label]).tolist()) - {0}
            assert vals == ({1: {INFLAMMATION}, 2: {FAT}}.get(int(row["class"]), set()))
    assert n_lesioned >= 6


def test_lesions_span_two_consecutive_sagittal_slices():
    img, lab = tiny_spine()
    cfg = LesionConfig(class_probs=(0.0, 0.5, 0.5), lr_extent_mm=(0.5, 3.0), **NO_NEG)
    for seed in range(8):
        res = insert_lesions(img, lab, "stir", np.random.default_rng(seed), cfg)
        for _, row in res.table.iterrows():
            les = (res.lesions.array > 0) & (lab.array == row.label)
            per_slice = les.sum(axis=(0, 2))  # sum over the in-plane axes 0 and 2
            on = per_slice >= cfg.min_voxels_per_slice
            runs = max(len(r) for r in "".join("1" if x else "0" for x in on).split("0"))
            assert runs >= 2, f"seed {seed} {row.level}: slices {per_slice.tolist()}"
            assert row.n_slices >= 2


@pytest.mark.parametrize(
    "contrast, infl_sign, fat_sign",
    [("stir", +1, -1), ("water", +1, -1), ("t1", -1, +1), ("t2", +1, +1)],
)
def test_polarity_per_contrast(contrast, infl_sign, fat_sign):
    img, lab = tiny_spine()
    cfg = LesionConfig(subtle_prob=0.0, texture_strength=(0.02, 0.04), **NO_NEG)
    for seed in range(4):
        res = insert_lesions(img, lab, contrast, np.random.default_rng(seed), cfg,
                             classes={20: "inflammation", 21: "fat", 22: "normal"})
        for vid, code, sign in ((20, INFLAMMATION, infl_sign), (21, FAT, fat_sign)):
            mask = lab.array == vid
            les = (res.lesions.array == code) & mask
            marrow = np.median(img.array[mask & ~les])
            ratio = res.image.array[les].mean() / marrow
            assert (ratio - 1.0) * sign > 0.05, f"{contrast} {vid}: ratio {ratio:.3f}"
            row = res.table.set_index("label").loc[vid]
            assert (row.contrast_ratio - 1.0) * sign > 0


def test_min_cnr_lifts_invisible_lesions_above_the_marrow_noise_and_nothing_else():
    img, lab = tiny_spine(marrow_sd=20.0)  # a noisy marrow: subtle ratios sink into it
    body = {vid: img.array[lab.array == vid] for vid in IDS}
    classes = {20: "inflammation", 21: "fat", 22: "inflammation"}
    base, floor = [], []
    for seed in range(4):
        for contrast in ("water", "t1"):
            runs = [insert_lesions(img, lab, contrast, np.random.default_rng(seed),
                                   LesionConfig(subtle_prob=1.0, min_cnr=m, **NO_NEG), classes=classes)
                    for m in (None, 3.0)]
            a, b = runs
            # the floor draws nothing: same classes, same lesion shapes, only the level moves
            assert np.array_equal(a.lesions.array, b.lesions.array)
            ta, tb = a.table.set_index("label"), b.table.set_index("label")
            for vid in classes:
                les = (a.lesions.array > 0) & (lab.array == vid)
                for res, t, out in ((a, ta, base), (b, tb, floor)):
                    med = np.median(body[vid])
                    sd = 1.4826 * np.median(np.abs(body[vid] - med))
                    cnr = (res.image.array[les].mean() - med) / sd
                    assert t.loc[vid, "cnr"] == pytest.approx(cnr, abs=2e-3)  # the table reports it
                    out.append(cnr)
                assert np.sign(ta.loc[vid, "target_ratio"] - 1) == np.sign(tb.loc[vid, "target_ratio"] - 1)
                assert abs(tb.loc[vid, "target_ratio"] - 1) >= abs(ta.loc[vid, "target_ratio"] - 1) - 1e-9
    assert np.median(np.abs(base)) < 1.0  # subtle lesions on this marrow: below one SD
    assert np.min(np.abs(floor)) > 1.5, np.round(floor, 2)  # the floor (3 SD, less partial volume)
    with pytest.raises(SpinepipeInputError, match="min_cnr"):
        LesionConfig(min_cnr=0.0)


def test_lesions_sit_at_the_reported_corner_of_a_tilted_body():
    for tilt in (0.0, 12.0, -15.0):
        img, lab = tiny_spine(tilt_deg=tilt)
        cfg = LesionConfig(class_probs=(0, 1, 0), second_lesion_prob=0.0, **NO_NEG)
        for seed in range(5):
            res = insert_lesions(img, lab, "stir", np.random.default_rng(seed), cfg)
            for _, row in res.table.iterrows():
                mask = lab.array == row.label
                idx = np.argwhere(mask)
                lo, hi = idx.min(0), idx.max(0)
                rel = (np.argwhere((res.lesions.array == INFLAMMATION) & mask).mean(0) - lo) / (hi - lo)
                # axis 0 points anterior, axis 2 inferior in the test grid
                assert (rel[0] > 0.5) == row.corner.startswith("anterior"), (tilt, row.corner, rel)
                assert (rel[2] < 0.5) == ("superior" in row.corner), (tilt, row.corner, rel)
            assert np.allclose(np.abs(res.table.tilt_deg), abs(tilt), atol=1.0)


@pytest.mark.parametrize("family", LESION_FAMILIES)
def test_every_family_stays_in_its_body_on_two_slices(family):
    img, lab = tiny_spine()
    cfg = LesionConfig(families=(family,), class_probs=(0.0, 0.5, 0.5), second_lesion_prob=0.3, **NO_NEG)
    for seed in range(4):
        res = insert_lesions(img, lab, "water", np.random.default_rng(seed), cfg)
        changed = np.abs(res.image.array - img.array) > 1e-4
        assert not changed[lab.array == 0].any(), "image changed outside the bodies"
        for _, row in res.table.iterrows():
            assert row["class"] > 0 and set(row.family.split(";")) == {family}
            own = lab.array == row.label
            les = res.lesions.array > 0
            assert les[own].any() and not (les & ~np.isin(lab.array, IDS)).any()
            on = (les & own).sum(axis=(0, 2)) >= cfg.min_voxels_per_slice
            assert max(len(r) for r in "".join("1" if x else "0" for x in on).split("0")) >= 2


def _body_frame(lab, vid):
    """Lesion-free geometry of a box body of ``tiny_spine(tilt_deg=0)``: its voxel bounds."""
    idx = np.argwhere(lab.array == vid)
    return idx.min(0), idx.max(0)


def test_family_shapes_where_they_should_be():
    img, lab = tiny_spine(tilt_deg=0.0)
    spacing = np.asarray(img.spacing)
    seen = {f: 0 for f in ("endplate", "focal", "diffuse")}
    for family in seen:
        cfg = LesionConfig(families=(family,), class_probs=(0, 1, 0), second_lesion_prob=0.0,
                           edge_irregularity=0.0, **NO_NEG)
        for seed in range(4):
            res = insert_lesions(img, lab, "stir", np.random.default_rng(seed), cfg)
            for _, row in res.table.iterrows():
                own = lab.array == row.label
                les = (res.lesions.array == INFLAMMATION) & own
                lo, hi = _body_frame(lab, row.label)
                k = np.argwhere(les)
                if family == "endplate":  # axis 2 runs inferior: the band touches the reported endplate
                    edge = lo[2] if row.corner.startswith("superior") else hi[2]
                    assert np.abs(k[:, 2] - edge).min() <= 1, (seed, row.corner)
                    height = (hi[2] - lo[2] + 1) * spacing[2]
                    assert np.ptp(k[:, 2]) * spacing[2] <= 0.5 * height  # a band, not the body
                    assert np.ptp(k[:, 0]) + 1 >= 0.4 * (hi[0] - lo[0] + 1)  # over much of the AP depth
                elif family == "focal":  # inside: never on the body's outer voxel layer
                    assert not (les & own & ~ndi.binary_erosion(own)).any(), seed
                else:  # diffuse: a large share of the body
                    assert les.sum() >= 0.2 * own.sum()
                seen[family] += 1
    assert all(n >= 8 for n in seen.values()), seen


def test_a_family_mix_draws_every_family_and_the_default_is_corner_only():
    img, lab = tiny_spine()
    drawn = set()
    cfg = LesionConfig(families=LESION_FAMILIES, class_probs=(0, 0.5, 0.5), **NO_NEG)
    for seed in range(8):
        res = insert_lesions(img, lab, "t1", np.random.default_rng(seed), cfg)
        drawn |= {f for fs in res.table.family for f in fs.split(";")}
    assert drawn == set(LESION_FAMILIES)
    res = insert_lesions(img, lab, "t1", np.random.default_rng(0), LesionConfig(class_probs=(0, 0.5, 0.5)))
    assert {f for fs in res.table.family for f in fs.split(";")} == {"corner"}
    for bad in (dict(families=("ring",)), dict(families="corner"), dict(families=()),
                dict(endplate_thickness_fraction=(0.5, 1.5)), dict(focal_radius_mm=(0.0, 2.0))):
        with pytest.raises(SpinepipeInputError, match="LesionConfig"):
            LesionConfig(**bad)


def test_distractors_never_touch_a_vertebra():
    img, lab = tiny_spine()
    cfg = LesionConfig(distractor_rate=1.0, hard_negative_rate=0.0)
    near = ndi.binary_dilation(lab.array > 0, structure=np.ones((3, 3, 3), bool))
    sites = set()
    for seed in range(10):
        res = insert_lesions(img, lab, "water", np.random.default_rng(seed), cfg)
        dis = res.lesions.array == DISTRACTOR
        assert not (dis & near).any()
        changed = np.abs(res.image.array - img.array) > 1e-4
        assert not (changed & near & (lab.array == 0)).any(), "intensity change touching a body"
        if dis.any():  # lesion-like on a fluid-sensitive image: brighter than the marrow (100)
            assert res.image.array[dis].mean() > 110.0
        sites |= set(res.table.distractor) - {""}
        assert (dis.sum() > 0) == (res.table.distractor != "").any()
    assert len(sites) >= 2, sites


def test_hard_negatives_stay_normal_and_on_one_slice():
    img, lab = tiny_spine()
    cfg = LesionConfig(class_probs=(1.0, 0.0, 0.0), hard_negative_rate=1.0, distractor_rate=0.0)
    for seed in range(5):
        res = insert_lesions(img, lab, "stir", np.random.default_rng(seed), cfg)
        assert (res.table["class"] == 0).all()
        assert res.table.hard_negative.all()
        L = res.lesions.array
        assert not np.isin(L, [INFLAMMATION, FAT]).any()
        for vid in IDS:
            spot = (L == HARD_NEGATIVE) & (lab.array == vid)
            assert spot.any()
            assert np.count_nonzero(spot.any(axis=(0, 2))) == 1  # a single sagittal slice
            # low contrast
            ratio = res.image.array[spot].mean() / np.median(img.array[lab.array == vid])
            assert 1.0 < ratio < 1.3


def test_table_matches_lesion_map_and_vertebrae():
    img, lab = tiny_spine()
    res = insert_lesions(img, lab, "t1", np.random.default_rng(3), LesionConfig(class_probs=(0.3, 0.4, 0.3)))
    t = res.table
    assert t.label.tolist() == list(IDS)
    assert t.level.tolist() == ["L1", "L2", "L3"]
    assert t.class_name.tolist() == [CLASSES[c] for c in t["class"]]
    for _, row in t.iterrows():
        vals = set(np.unique(res.lesions.array[lab.array == row.label]).tolist())
        assert (INFLAMMATION in vals) == (row["class"] == 1)
        assert (FAT in vals) == (row["class"] == 2)
        assert (row.n_lesions > 0) == (row["class"] > 0)
        if row["class"] > 0:
            assert row.large == (row.depth_fraction >= 0.25)
    assert res.classes == dict(zip(t.label, t["class"]))
    assert res.image.array.dtype == np.float32 and res.lesions.same_geometry(img)


def test_deterministic_per_seed():
    img, lab = tiny_spine()
    cfg = LesionConfig(class_probs=(0.2, 0.4, 0.4), distractor_rate=0.5, hard_negative_rate=0.5)
    a = insert_lesions(img, lab, "stir", np.random.default_rng(11), cfg)
    b = insert_lesions(img, lab, "stir", np.random.default_rng(11), cfg)
    c = insert_lesions(img, lab, "stir", np.random.default_rng(12), cfg)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.lesions.array, b.lesions.array)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert not np.array_equal(a.image.array, c.image.array)


def test_assign_classes_follows_probabilities():
    rng = np.random.default_rng(0)
    cfg = LesionConfig(class_probs=(0.5, 0.3, 0.2))
    draws = [c for _ in range(400) for c in assign_classes([20, 21, 22, 23, 24], rng, cfg).values()]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.03)


def test_plant_in_neighbour_changes_only_the_target():
    img, lab = tiny_spine()
    res = plant_in_neighbour(img, lab, 21, "stir", np.random.default_rng(0), cls="fat")
    assert res.classes == {20: 0, 21: 2, 22: 0}
    changed = np.abs(res.image.array - img.array) > 1e-4
    assert changed.any() and not (changed & (lab.array != 21)).any()
    assert set(np.unique(res.lesions.array).tolist()) == {0, FAT}
    with pytest.raises(SpinepipeInputError):
        plant_in_neighbour(img, lab, 24, "stir", np.random.default_rng(0))


def test_bad_inputs_raise():
    img, lab = tiny_spine()
    with pytest.raises(SpinepipeInputError, match="contrast"):
        insert_lesions(img, lab, "flair", np.random.default_rng(0))
    other = Scan(lab.array, lab.spacing * 2, lab.origin, lab.direction)
    with pytest.raises(SpinepipeInputError, match="grid"):
        insert_lesions(img, other, "t1", np.random.default_rng(0))
    with pytest.raises(SpinepipeInputError):
        LesionConfig(class_probs=(0.5, 0.5, 0.5))
    with pytest.raises(SpinepipeInputError):
        insert_lesions(img, lab, "t1", np.random.default_rng(0), classes={20: "tumour"})


def test_make_semisynthetic_writes_a_consistent_folder(tmp_path):
    img, lab = tiny_spine()
    src = tmp_path / "myosegmentum"
    for sid in ("s1", "s2"):
        write_image(img.with_array(np.clip(img.array, 0, 255).astype(np.uint8)), src / f"{sid}_image.nii.gz")
        write_image(lab, src / f"{sid}_vertebrae.nii.gz")
    write_image(lab, src / "s1_outlines.nii.gz")
    out = tmp_path / "semi"
    cfg = LesionConfig(class_probs=(0.3, 0.4, 0.3))
    table = make_semisynthetic(src, out, seed=5, config=cfg)
    assert set(table.contrast) == {"water"}
    from data_prep.dataset import read_subject_contrasts

    assert read_subject_contrasts(out) == {"s1": "water", "s2": "water"}  # subjects.csv says what the lesions assumed
    (src / "subjects.csv").write_text("id,sequence,contrast\ns2,t2-tse,t2\ns1,dixon-water,\n")
    make_semisynthetic(src, tmp_path / "semi2", seed=5, config=cfg, contrast_by_cohort="stir")
    written = pd.read_csv(tmp_path / "semi2" / "subjects.csv", dtype=str)
    assert written["id"].tolist() == ["s2", "s1"] and written["sequence"].tolist() == ["t2-tse", "dixon-water"]
    assert read_subject_contrasts(tmp_path / "semi2") == {"s1": "stir", "s2": "stir"}
    assert (out / "s1_outlines.nii.gz").exists() and not (out / "s2_outlines.nii.gz").exists()
    labels = read_vertebra_labels_csv(out / "vertebra_labels.csv", classes=list(CLASSES))
    assert len(labels) == 6
    for sid in ("s1", "s2"):
        im = read_image(out / f"{sid}_image.nii.gz")
        assert im.array.dtype == np.float32
        les = read_labelmap(out / f"{sid}_lesions.nii.gz", reference=im)
        vert = read_labelmap(out / f"{sid}_vertebrae.nii.gz", reference=im)
        assert np.array_equal(vert.array, lab.array)
        for _, r in labels[labels.id == sid].iterrows():
            vals = set(np.unique(les.array[vert.array == r.label]).tolist())
            assert (INFLAMMATION in vals) == (r["class"] == 1) and (FAT in vals) == (r["class"] == 2)
    again = make_semisynthetic(src, tmp_path / "semi2", seed=5, config=cfg)
    pd.testing.assert_frame_equal(table, again)
    readme = (out / "README_semisynthetic.md").read_text()
    assert "SEMI-SYNTHETIC" in readme and readme.count('"semi_synthetic": true') == 1
    assert len(pd.read_csv(out / "README_lesion_table.csv")) == 6


def test_infer_contrast():
    assert infer_contrast("/x/myosegmentum") == "water"
    assert infer_contrast("/x/chu2015") == "t2"
    assert infer_contrast("/x/site3", "site3-001", {"site3": "STIR"}) == "stir"
    assert infer_contrast("/x/anything", contrast_by_cohort="t1") == "t1"
    with pytest.raises(SpinepipeInputError, match="contrast"):
        infer_contrast("/x/unknown_site")
    with pytest.raises(SpinepipeInputError, match="unknown_site.*'flair'"):
        infer_contrast("/x/unknown_site", contrast_by_cohort="flair")
    with pytest.raises(SpinepipeInputError, match="site3.*no image contrast"):
        infer_contrast("/x/site3", "site3-001", {"site3": ""})


@pytest.mark.slow
def test_real_scan_lesions(shared_data):
    sid = "myosegmentum-001"
    img = read_image(shared_data / "myosegmentum" / f"{sid}_image.nii.gz")
    lab = read_labelmap(shared_data / "myosegmentum" / f"{sid}_vertebrae.nii.gz", reference=img)
    cfg = LesionConfig(subtle_prob=0.0, distractor_rate=1.0, hard_negative_rate=1.0)
    forced = {20: "inflammation", 21: "fat", 22: "normal", 23: "inflammation", 24: "normal"}
    res = insert_lesions(img, lab, "water", np.random.default_rng(0), cfg, classes=forced)
    L, V = res.lesions.array, lab.array
    lr_axis = img.axis_of(0)[0]
    inplane = tuple(a for a in range(3) if a != lr_axis)
    for vid, cls in forced.items():
        mask = V == vid
        if cls == "normal":
            assert not np.isin(L[mask], [INFLAMMATION, FAT]).any()
            continue
        code = INFLAMMATION if cls == "inflammation" else FAT
        les = L == code
        les_here = les & mask
        assert les_here.any()
        assert np.count_nonzero(les_here.sum(axis=inplane) >= cfg.min_voxels_per_slice) >= 2
        ratio = res.image.array[les_here].mean() / np.median(img.array[mask & ~les_here])
        assert ratio > 1.05 if cls == "inflammation" else ratio < 0.95  # water: fat suppressed
    assert not (np.isin(L, [INFLAMMATION, FAT, HARD_NEGATIVE]) & (V == 0)).any()
    near = ndi.binary_dilation(V > 0, structure=np.ones((3, 3, 3), bool))
    assert (L == DISTRACTOR).any() and not ((L == DISTRACTOR) & near).any()
