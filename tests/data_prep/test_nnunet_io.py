"""Export to nnU-Net v2 raw format, checked with nnU-Net's own dataset integrity check."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep import io
from data_prep.errors import SpinepipeInputError
from data_prep.nnunet_io import (
    LABEL_MAP_FILE,
    dataset_folder_name,
    export_nnunet_raw,
    nnunet_env,
    points_to_balls,
)
from data_prep.scan import Points, Scan
from tests.data_prep.test_io import OBLIQUE

SHAPE = (9, 10, 6)
SPACING = (0.8, 0.8, 3.0)


def _scan(seed: int, direction=OBLIQUE) -> Scan:
    arr = np.random.default_rng(seed).integers(0, 255, SHAPE).astype(np.uint8)
    return Scan(arr, SPACING, (10.0, -5.0, 40.0), direction)


def _mask(levels: list[int]) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    for n, vid in enumerate(levels):
        lab[2:7, 2:8, n * 2: n * 2 + 2] = vid
    return lab


@pytest.fixture
def source(tmp_path) -> Path:
    d = tmp_path / "canonical"
    d.mkdir()
    a, b = _scan(1), _scan(2)
    io.write_image(a, d / "a_image.nii.gz")
    io.write_image(a.with_array(_mask([19, 20])), d / "a_vertebrae.nii.gz")  # T12, L1
    io.write_image(b, d / "b_image.mha")
    io.write_image(b.with_array(_mask([28, 20, 21])), d / "b_vertebrae.nii.gz")  # T13, L1, L2
    return d


def test_nnunet_env(tmp_path):
    env = nnunet_env(tmp_path / "work")
    assert env == {k: str((tmp_path / "work" / k).resolve()) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    assert not (tmp_path / "work").exists()
    nnunet_env(tmp_path / "work", create=True)
    assert all(Path(v).is_dir() for v in env.values())


def test_export_layout_labels_and_mapping(source, tmp_path):
    raw = tmp_path / "raw"
    out = export_nnunet_raw(source, raw, 7, "Spine")
    assert out == raw / "Dataset007_Spine"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr", LABEL_MAP_FILE]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "MRI"}
    # head-to-foot: T12, T13, L1, L2 -> 1..4 (consecutive, background 0)
    assert ds["labels"] == {"background": 0, "T12": 1, "T13": 2, "L1": 3, "L2": 4}
    assert ds["numTraining"] == 2 and ds["file_ending"] == ".nii.gz"
    mapping = json.loads((out / LABEL_MAP_FILE).read_text())
    assert mapping["verse_to_nnunet"] == {"19": 1, "28": 2, "20": 3, "21": 4}
    assert mapping["nnunet_to_level"] == {"1": "T12", "2": "T13", "3": "L1", "4": "L2"}
    assert mapping["cases"]["b"]["labels_from"] == "vertebrae"
    # voxels: images unchanged (geometry included), labels remapped voxel for voxel
    img_b = io.read_image(out / "imagesTr" / "b_0000.nii.gz")
    src_b = io.read_image(source / "b_image.mha")
    np.testing.assert_array_equal(img_b.array, src_b.array)
    assert img_b.same_geometry(src_b, tol=1e-5)
    lab_b = io.read_labelmap(out / "labelsTr" / "b.nii.gz", reference=img_b)
    assert lab_b.array.dtype == np.uint8
    np.testing.assert_array_equal(lab_b.array, _mask([2, 3, 4]))
    lab_a = io.read_labelmap(out / "labelsTr" / "a.nii.gz")
    np.testing.assert_array_equal(lab_a.array, _mask([1, 3]))


def test_export_passes_nnunet_integrity_check(source, tmp_path, monkeypatch):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    env = nnunet_env(tmp_path / "nnwork", create=True)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = export_nnunet_raw(source, env["nnUNet_raw"], 12, "SpineTiny")
    verify_dataset_integrity(str(out), num_processes=1)  # raises on any problem

    # the check can fail: a label value outside dataset.json's labels is caught by nnU-Net
    lab = io.read_labelmap(out / "labelsTr" / "a.nii.gz")
    io.write_image(lab.with_array(np.where(lab.array > 0, 9, 0).astype(np.uint8)), out / "labelsTr" / "a.nii.gz")
    with pytest.raises(RuntimeError, match="unexpected labels"):
        verify_dataset_integrity(str(out), num_processes=1)


def test_labels_from_points_balls(source, tmp_path):
    c = _scan(3)
    io.write_image(c, source / "c_image.nii.gz")
    p_l1 = c.voxel_to_world([4.0, 5.0, 1.0]).coords[0]
    p_l2 = c.voxel_to_world([4.0, 5.0, 4.0]).coords[0]
    (source / "c_points.csv").write_text(
        "level,x_mm,y_mm,z_mm\n" + "".join(f"{lv},{p[0]},{p[1]},{p[2]}\n" for lv, p in (("L1", p_l1), ("L2", p_l2)))
    )
    # without the option, a points-only subject is skipped
    out = export_nnunet_raw(source, tmp_path / "raw1", 1, "NoPoints")
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2

    out = export_nnunet_raw(source, tmp_path / "raw2", 2, "Points", labels_from_points=2.5)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 3
    assert "2.5 mm" in ds["description"]
    mapping = json.loads((out / LABEL_MAP_FILE).read_text())
    assert mapping["cases"]["c"]["labels_from"] == "points"
    assert mapping["labels_from_points_radius_mm"] == 2.5
    lab = io.read_labelmap(out / "labelsTr" / "c.nii.gz")
    ijk = np.argwhere(np.ones(SHAPE, bool))
    world = c.voxel_to_world(ijk.astype(float)).coords
    d1 = np.linalg.norm(world - p_l1, axis=1)
    d2 = np.linalg.norm(world - p_l2, axis=1)
    expected = np.where((d1 <= 2.5) & (d1 <= d2), 3, np.where(d2 <= 2.5, 4, 0)).reshape(SHAPE)
    np.testing.assert_array_equal(lab.array, expected)
    assert np.count_nonzero(expected == 3) > 10 and np.count_nonzero(expected == 4) > 10


def test_points_to_balls_nearest_wins_and_clips():
    ref = Scan(np.zeros((20, 20, 20), np.uint8))
    pts = Points([[5.0, 10.0, 10.0], [9.0, 10.0, 10.0], [-3.5, 0.0, 0.0]], "world")
    lab = points_to_balls(ref, [20, 21, 22], pts, 3.0)
    assert lab[5, 10, 10] == 20 and lab[9, 10, 10] == 21
    assert lab[7, 10, 10] == 20  # equidistant: first point keeps it
    assert lab[8, 10, 10] == 21  # nearer to the second point although inside the first ball
    assert lab[0, 0, 0] == 0 and not np.any(lab == 22)  # ball entirely outside the grid: nothing
    assert np.count_nonzero(lab == 20) + np.count_nonzero(lab == 21) == np.count_nonzero(
        (np.linalg.norm(np.argwhere(np.ones((20, 20, 20))) - [5, 10, 10], axis=1) <= 3)
        | (np.linalg.norm(np.argwhere(np.ones((20, 20, 20))) - [9, 10, 10], axis=1) <= 3))


def test_export_refuses_existing_and_clashing_datasets(source, tmp_path):
    raw = tmp_path / "raw"
    export_nnunet_raw(source, raw, 3, "Spine")
    with pytest.raises(SpinepipeInputError, match="Dataset003_Spine: nnU-Net dataset folder already exists"):
        export_nnunet_raw(source, raw, 3, "Spine")
    (raw / "Dataset003_Spine" / "stale.txt").write_text("x")
    out = export_nnunet_raw(source, raw, 3, "Spine", overwrite=True)
    assert not (out / "stale.txt").exists()
    with pytest.raises(SpinepipeInputError, match="another nnU-Net dataset already uses id 3"):
        export_nnunet_raw(source, raw, 3, "Other")
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset003_Spine"]  # no partial folder left


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset_id=0), "dataset id must be an integer in 1..999"),
        (dict(dataset_id=1000), "dataset id must be an integer in 1..999"),
        (dict(name="my spine"), "name must use letters"),
        (dict(label_source="lesions"), "label_source must be one of vertebrae, outlines, coarse"),
        (dict(label_source="outlines"), "no subject has a <id>_outlines label map"),
        (dict(labels_from_points=-1.0), "radius must be a positive number"),
    ],
)
def test_export_bad_arguments(source, tmp_path, kwargs, message):
    args = dict(dataset_id=5, name="Spine") | kwargs
    with pytest.raises(SpinepipeInputError, match=message):
        export_nnunet_raw(source, tmp_path / "raw", **args)
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []


def test_export_rejects_non_verse_labels_without_partial_output(source, tmp_path):
    lab = io.read_labelmap(source / "b_vertebrae.nii.gz")
    io.write_image(lab.with_array(np.where(lab.array == 21, 40, lab.array).astype(np.uint8)), source / "b_vertebrae.nii.gz")
    with pytest.raises(SpinepipeInputError, match=r"b_vertebrae.nii.gz: unknown label value\(s\) \[40\]"):
        export_nnunet_raw(source, tmp_path / "raw", 5, "Spine")
    assert not (tmp_path / "raw" / "Dataset005_Spine").exists()


def test_dataset_folder_name():
    assert dataset_folder_name(42, "Lumbar_MRI-v2") == "Dataset042_Lumbar_MRI-v2"
    with pytest.raises(SpinepipeInputError):
        dataset_folder_name(True, "x")
