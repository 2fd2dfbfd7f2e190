"""Synthetic spine generator: determinism, label order, geometry, variants, FOV cuts, contrasts, CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from data_prep.errors import SpinepipeInputError
from data_prep.io import read_image, read_labelmap, read_points_csv, read_vertebra_labels_csv, write_image
from data_prep.scan import anatomical_rank, centroids_from_labelmap, level_id, reorient
from data_prep.synth import STRUCTURES, SynthConfig, generate_subject, subject_seed, write_cohort

# Small grids keep every subject well under 0.3 s.
FAST = dict(max_voxels=200_000)
FULL_FOV = dict(partial_top_rate=0.0, partial_bottom_rate=0.0, fov_si_mm=(300.0, 320.0))


def cfg(**kw) -> SynthConfig:
    return SynthConfig(**{**FAST, **kw})


def test_same_seed_identical_different_seed_differs():
    a = generate_subject(11, cfg())
    b = generate_subject(11, cfg())
    c = generate_subject(12, cfg())
    for x, y in ((a.image, b.image), (a.labels, b.labels), (a.structures, b.structures)):
        assert x.array.dtype == y.array.dtype
        assert x.array.tobytes() == y.array.tobytes()
        assert x.same_geometry(y, tol=0)
    assert a.contrast == b.contrast and a.meta == b.meta
    assert a.image.shape != c.image.shape or a.image.array.tobytes() != c.image.array.tobytes()
    assert subject_seed(0, 1) == subject_seed(0, 1) != subject_seed(0, 2) != subject_seed(1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_labels_are_verse_ids_head_to_foot(seed):
    s = generate_subject(seed, cfg())
    ids = [v.label for v in s.vertebrae]
    assert len(ids) >= 3
    assert set(np.unique(s.labels.array)) - {0} == set(ids)
    assert set(ids) <= {17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 28}
    assert ids == sorted(ids, key=anatomical_rank)  # head to foot
    z = [float(v.centroid_world[2]) for v in s.vertebrae]
    assert all(z0 > z1 + 10 for z0, z1 in zip(z, z[1:])), z  # LPS: superior = larger z
    # vertebral bodies only: posterior elements have their own structure, never a body label
    assert np.all(s.structures.array[s.labels.array > 0] == 1)
    assert (s.structures.array == 5).sum() > 0
    assert set(np.unique(s.structures.array)) <= set(STRUCTURES)


def test_world_geometry_independent_of_stored_orientation():
    a = generate_subject(5, cfg(orientations=("LPS",)))
    b = generate_subject(5, cfg(orientations=("PIL",)))
    assert a.image.orientation_code() == "LPS" and b.image.orientation_code() == "PIL"
    assert not np.allclose(b.image.direction, np.eye(3))
    back = reorient(b.image, "LPS")
    assert back.same_geometry(a.image) and np.array_equal(back.array, a.image.array)
    for va, vb in zip(a.vertebrae, b.vertebrae):
        assert va.label == vb.label
        np.testing.assert_allclose(va.centroid_world, vb.centroid_world, atol=1e-6)


def test_non_identity_direction_round_trips(tmp_path):
    s = generate_subject(7, cfg(orientations=("ASL",)))
    write_image(s.image, tmp_path / "img.nii.gz")
    write_image(s.labels, tmp_path / "lab.nii.gz")
    img = read_image(tmp_path / "img.nii.gz")
    lab = read_labelmap(tmp_path / "lab.nii.gz", reference=img)
    assert img.orientation_code() == "ASL"
    np.testing.assert_allclose(img.direction, s.image.direction, atol=1e-6)
    np.testing.assert_allclose(img.origin, s.image.origin, atol=1e-4)
    assert np.array_equal(img.array, s.image.array)
    cents = centroids_from_labelmap(lab)
    for v in s.vertebrae:
        np.testing.assert_allclose(cents[v.label], v.centroid_world, atol=1e-3)


def test_cohort_layout_points_match_label_centroids(tmp_path):
    calls = []

    def fake_lesions(image, labels, contrast, rng):
        calls.append(contrast)
        mask = labels.with_array((labels.array == 21).astype(np.uint8), name="lesions")
        return image, mask, {21: 1}

    ids = write_cohort(tmp_path, 2, seed=4, config=cfg(**FULL_FOV), lesion_fn=fake_lesions)
    assert ids == ["synth-000", "synth-001"] and len(calls) == 2
    table = read_vertebra_labels_csv(tmp_path / "vertebra_labels.csv")
    meta = json.loads((tmp_path / "synth_meta.json").read_text())
    assert meta["seed"] == 4 and set(meta["subjects"]) == set(ids)
    for sid in ids:
        img = read_image(tmp_path / f"{sid}_image.nii.gz")
        lab = read_labelmap(tmp_path / f"{sid}_vertebrae.nii.gz", reference=img)
        read_labelmap(tmp_path / f"{sid}_structures.nii.gz", reference=img)
        les = read_labelmap(tmp_path / f"{sid}_lesions.nii.gz", reference=img)
        assert les.array.sum() > 0
        levels, pts = read_points_csv(tmp_path / f"{sid}_points.csv")
        cents = centroids_from_labelmap(lab)
        assert sorted(levels) == sorted(cents)
        for vid, xyz in zip(levels, pts.coords):
            dv = img.world_to_voxel(xyz).coords[0] - img.world_to_voxel(cents[vid]).coords[0]
            assert np.all(np.abs(dv) < 0.5)
        rows = table[table["id"] == sid]
        assert sorted(rows["label"]) == sorted(levels)
        assert dict(zip(rows["label"], rows["class"])) == {v: int(v == 21) for v in levels}
        assert meta["subjects"][sid]["levels"] == [r for r in pd.read_csv(tmp_path / f"{sid}_points.csv")["level"]]


def _order_by_z(s):
    return [v.label for v in sorted(s.vertebrae, key=lambda v: -v.centroid_world[2])]


def test_variant_l6():
    s = generate_subject(3, cfg(l6_rate=1.0, **FULL_FOV))
    assert "L6" in s.variants
    order = _order_by_z(s)
    assert 25 in order and order.index(24) + 1 == order.index(25) and order.index(25) + 1 == order.index(26)
    assert "transitional" in next(v for v in s.vertebrae if v.label == 25).flags


def test_variant_t13():
    s = generate_subject(3, cfg(t13_rate=1.0, **FULL_FOV))
    assert "T13" in s.variants
    order = _order_by_z(s)
    assert order.index(19) + 1 == order.index(28) and order.index(28) + 1 == order.index(20)


def test_variant_missing_lumbar():
    s = generate_subject(3, cfg(l6_rate=0.0, missing_lumbar_rate=1.0, **FULL_FOV))
    assert "4_lumbar" in s.variants
    order = _order_by_z(s)
    assert 24 not in order and order.index(23) + 1 == order.index(26)


def test_partial_fov_cuts_levels():
    s = generate_subject(8, cfg(partial_bottom_rate=1.0, partial_top_rate=1.0))
    assert s.cut_levels, "a forced partial view must cut at least one body"
    lab = reorient(s.labels, "LPS").array
    for vid in s.cut_levels:
        m = lab == vid
        # a cut body touches the top or bottom of the grid (superior-inferior axis)
        assert m[:, :, 0].any() or m[:, :, -1].any()
        assert "cut_by_fov" in next(v for v in s.vertebrae if v.label == vid).flags
    full = generate_subject(8, cfg(**FULL_FOV))
    assert full.labels.array.max() == 26 and 26 not in full.cut_levels  # S1 fully visible


@pytest.mark.parametrize("contrast", ["t1", "t2", "stir", "water"])
def test_contrast_polarity(contrast):
    s = generate_subject(21, cfg(contrasts=(contrast,), contrast_weights=None, **FULL_FOV))
    assert s.contrast == contrast
    img = s.image.array.astype(np.float64)
    st = s.structures.array
    med = {k: float(np.median(img[st == k])) for k in (1, 3, 7)}
    if contrast == "t1":
        assert med[3] < med[1] < med[7]  # fluid dark, marrow intermediate, fat bright
    else:
        assert med[3] > med[1]  # fluid bright
    if contrast in ("stir", "water"):
        assert med[7] < 0.5 * med[3]  # fat suppressed


def test_config_validation():
    with pytest.raises(SpinepipeInputError, match="l6_rate"):
        SynthConfig(l6_rate=1.5)
    with pytest.raises(SpinepipeInputError, match="orientations"):
        SynthConfig(orientations=("LPX",))
    with pytest.raises(SpinepipeInputError, match="contrasts"):
        SynthConfig(contrasts=("flair",), contrast_weights=None)


def test_cli_writes_cohort(tmp_path):
    from pipeline.cli import main

    out = tmp_path / "cohort"
    res = CliRunner().invoke(main, ["synth", "-n", "2", "-o", str(out), "--seed", "1", "--overview",
                                    "--contrast", "t2", "--no-lesions"])
    assert res.exit_code == 0, res.output
    assert str(out.resolve()) in res.output
    for sid in ("synth-000", "synth-001"):
        for suffix in ("_image.nii.gz", "_vertebrae.nii.gz", "_points.csv"):
            assert (out / f"{sid}{suffix}").is_file()
        png = out / f"{sid}_overview.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    meta = json.loads((out / "synth_meta.json").read_text())
    assert {m["contrast"] for m in meta["subjects"].values()} == {"t2"}
    df = pd.read_csv(out / "vertebra_labels.csv")
    assert list(df.columns) == ["id", "level", "class", "confidence"] and (df["class"] == 0).all()
    bad = CliRunner().invoke(main, ["synth", "-n", "0", "-o", str(out)])
    assert bad.exit_code != 0


def test_cli_lesion_family_focal_keeps_lesions_off_the_body_border(tmp_path):
    from scipy import ndimage as ndi

    from pipeline.cli import main

    out = tmp_path / "cohort"
    res = CliRunner().invoke(main, ["synth", "-n", "2", "-o", str(out), "--seed", "3", "--lesion-family", "focal"])
    assert res.exit_code == 0, res.output
    labels = pd.read_csv(out / "vertebra_labels.csv")
    assert (labels["class"] > 0).sum() >= 1
    for sid in ("synth-000", "synth-001"):
        img = read_image(out / f"{sid}_image.nii.gz")
        vert = read_labelmap(out / f"{sid}_vertebrae.nii.gz", img).array
        les = read_labelmap(out / f"{sid}_lesions.nii.gz", img).array
        for _, row in labels[(labels.id == sid) & (labels["class"] > 0)].iterrows():
            own = vert == level_id(row.level)
            lesion = (les == row["class"]) & own
            assert lesion.any() and not (lesion & ~ndi.binary_erosion(own)).any(), (sid, row.level)
    bad = CliRunner().invoke(main, ["synth", "-n", "1", "-o", str(out), "--no-lesions", "--lesion-family", "focal"])
    assert bad.exit_code != 0 and "--lesion-family" in bad.output
    from data_prep.lesions import LESION_FAMILIES
    from pipeline.commands.synth import LESION_FAMILY_CHOICES

    assert LESION_FAMILY_CHOICES == LESION_FAMILIES


def test_overview_png_with_lesions_and_annotations(tmp_path):
    from data_prep.overview import draw_sagittal, save_overview

    s = generate_subject(2, cfg(orientations=("PIL",), **FULL_FOV))
    les = s.labels.with_array((s.labels.array == 22).astype(np.uint8))
    ann = [dict(level="L3", centroid=None, text="class 1"), dict(level=24, centroid=s.vertebrae[-1].centroid_world,
                                                                   text="x")]
    out = save_overview(s.image, s.labels, tmp_path / "o.png", lesions=les, title="t", annotations=ann)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    # the chosen slice runs through the bodies: every labelled level is visible on it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    i = draw_sagittal(ax, s.image, s.labels)
    plt.close(fig)
    lab = reorient(s.labels, "LPS").array
    assert set(np.unique(lab[i])) - {0} == {v.label for v in s.vertebrae}
