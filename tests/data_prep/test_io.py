"""Readers/writers (data_prep.io) and the geometry they must preserve (data_prep.scan)."""
from __future__ import annotations

import gzip
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import io
from data_prep.errors import SpinepipeInputError
from data_prep.scan import Points, Scan, reorient, resample_to_spacing, to_sitk

RNG_SEED = 20260101


def rotation(seed: int, proper: bool = True) -> np.ndarray:
    """Random orthonormal 3x3 (det +1 if ``proper`` else -1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if (np.linalg.det(q) > 0) != proper:
        q[:, 2] *= -1
    return q


OBLIQUE = rotation(1)
# Sagittal-like permutation (like the real data: i = left-right, j = anterior->posterior, k = head->foot)
PERMUTED = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]) @ np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
SPACING = (0.7, 0.7, 4.0)
ORIGIN = (12.5, -30.25, 101.0)


def make_scan(direction=OBLIQUE, spacing=SPACING, dtype=np.int16, shape=(5, 6, 7)) -> Scan:
    arr = (np.arange(np.prod(shape)).reshape(shape) * 3 - 40).astype(dtype)
    return Scan(arr, spacing, ORIGIN, direction, name="t")


def assert_same_scan(a: Scan, b: Scan, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


def write_dicom_series(scan: Scan, folder: Path) -> None:
    """Write a DICOM series (one file per k slice) the way SimpleITK documents it.

    ``sitk.ImageSeriesWriter`` refuses DICOM ("does not support writing a DICOM series"), so each slice
    is written with ``ImageFileWriter`` and its position/orientation tags set explicitly.
    """
    folder.mkdir(parents=True)
    img = to_sitk(scan)
    d = img.GetDirection()
    uid = f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1000)}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": f"{img.GetSpacing()[2]:.6f}",
            "0028|0030": f"{img.GetSpacing()[1]:.6f}\\{img.GetSpacing()[0]:.6f}",
        }
        for key, v in tags.items():
            sl.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mha", ".nrrd"])
@pytest.mark.parametrize("direction", [OBLIQUE, PERMUTED, rotation(2, proper=False)], ids=["oblique", "permuted", "improper"])
def test_round_trip_file_formats(tmp_path, suffix, direction):
    scan = make_scan(direction)
    out = io.write_image(scan, tmp_path / f"x_image{suffix}")
    back = io.read_image(out)
    assert back.array.dtype == np.int16
    assert back.name == "x_image"
    assert_same_scan(back, scan)


def test_round_trip_dicom_series(tmp_path):
    scan = make_scan(OBLIQUE)  # proper rotation: DICOM derives the slice normal as row x column
    write_dicom_series(scan, tmp_path / "s_image")
    back = io.read_image(tmp_path / "s_image")
    assert back.array.dtype == np.int16
    assert_same_scan(back, scan, atol=1e-4)


def test_dicom_folder_without_series(tmp_path):
    (tmp_path / "empty_image").mkdir()
    (tmp_path / "empty_image" / "notes.txt").write_text("hello")
    with pytest.raises(SpinepipeInputError, match="empty_image.*no readable DICOM series"):
        io.read_image(tmp_path / "empty_image")


def test_array_order_is_sitk_index_order(tmp_path):
    arr_kji = np.random.default_rng(0).integers(0, 1000, size=(4, 5, 6)).astype(np.int16)  # numpy (k, j, i)
    img = sitk.GetImageFromArray(arr_kji)
    sitk.WriteImage(img, str(tmp_path / "o.nii.gz"))
    scan = io.read_image(tmp_path / "o.nii.gz")
    assert scan.shape == img.GetSize() == (6, 5, 4)
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (3, 2, 1), (5, 4, 3)]:
        assert scan.array[i, j, k] == img.GetPixel(i, j, k)
    # and back: to_sitk keeps the index order
    assert to_sitk(scan).GetPixel(3, 2, 1) == scan.array[3, 2, 1]


# ---------------------------------------------------------------------------------------------
# Voxel <-> world
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_voxel_world_matches_simpleitk(seed):
    rng = np.random.default_rng(RNG_SEED + seed)
    direction = rotation(seed + 10, proper=bool(seed % 2))
    spacing = rng.uniform(0.3, 5.0, size=3)
    origin = rng.uniform(-200, 200, size=3)
    scan = Scan(np.zeros((7, 8, 9), np.uint8), spacing, origin, direction)
    img = to_sitk(scan)
    ijk = rng.uniform(-3, 12, size=(20, 3))
    world = scan.voxel_to_world(ijk)
    assert world.space == "world"
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(world.coords, expected, atol=1e-9)
    back = scan.world_to_voxel(world)
    assert back.space == "voxel"
    np.testing.assert_allclose(back.coords, ijk, atol=1e-9)
    expected_idx = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in expected])
    np.testing.assert_allclose(back.coords, expected_idx, atol=1e-7)


def test_points_validation():
    assert Points([1.0, 2.0, 3.0], "voxel").coords.shape == (1, 3)
    assert len(Points(np.zeros((0, 3)), "world")) == 0
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        Points(np.zeros((4, 2)), "world")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        Points(np.zeros((2, 3, 1)), "world")
    with pytest.raises(ValueError, match="non-finite"):
        Points([[0.0, np.nan, 1.0]], "world")
    with pytest.raises(ValueError, match="non-finite"):
        Points([[0.0, np.inf, 1.0]], "voxel")
    with pytest.raises(ValueError, match="space"):
        Points([[0.0, 0.0, 1.0]], "mm")
    pts = Points([[1.0, 2.0, 3.0]], "voxel")
    with pytest.raises(ValueError, match="expected points in world space"):
        pts.require("world")
    scan = Scan(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="expected points in world space"):
        scan.world_to_voxel(pts)  # a voxel index cannot be passed as mm
    with pytest.raises(ValueError):
        pts.coords[0, 0] = 5.0  # read-only


# ---------------------------------------------------------------------------------------------
# Resampling and reorientation
# ---------------------------------------------------------------------------------------------
def _labelled_scan(direction: np.ndarray, spacing, shape=(30, 30, 8)) -> tuple[Scan, np.ndarray]:
    lab = np.zeros(shape, np.uint8)
    lab[7:19, 11:24, 2:5] = 20  # an off-centre box
    scan = Scan(lab, spacing, ORIGIN, direction)
    centroid = scan.voxel_to_world(np.argwhere(lab == 20).mean(axis=0)).coords[0]
    return scan, centroid


@pytest.mark.parametrize("direction", [np.eye(3), OBLIQUE, PERMUTED], ids=["identity", "oblique", "permuted"])
@pytest.mark.parametrize("new_spacing", [(1.0, 1.0, 1.0), (2.0, 1.5, 3.0)])
def test_resample_keeps_centroid_and_extent(direction, new_spacing):
    scan, centroid = _labelled_scan(direction, SPACING)
    out = resample_to_spacing(scan, new_spacing, is_label=True)
    np.testing.assert_allclose(out.spacing, new_spacing)
    np.testing.assert_allclose(out.direction, direction, atol=1e-12)
    assert set(np.unique(out.array)) == {0, 20}  # nearest neighbour: no new labels
    new_centroid = out.voxel_to_world(np.argwhere(out.array == 20).mean(axis=0)).coords[0]
    shift_along_axes = np.abs(direction.T @ (new_centroid - centroid))
    assert np.all(shift_along_axes <= 0.5 * np.asarray(new_spacing) + 1e-6), shift_along_axes
    # physical extent: first corner unchanged, size within half a new voxel of the input's extent
    corner_in = scan.voxel_to_world([-0.5, -0.5, -0.5]).coords[0]
    corner_out = out.voxel_to_world([-0.5, -0.5, -0.5]).coords[0]
    np.testing.assert_allclose(corner_out, corner_in, atol=1e-6)
    extent_in = np.array(scan.shape) * scan.spacing
    extent_out = np.array(out.shape) * out.spacing
    assert np.all(np.abs(extent_out - extent_in) <= 0.5 * np.asarray(new_spacing) + 1e-9)


def test_resample_oblique_to_identity_grid_keeps_centroid():
    scan, centroid = _labelled_scan(OBLIQUE, SPACING)
    out = resample_to_spacing(scan, (1.0, 1.0, 1.0), is_label=True, direction=np.eye(3))
    np.testing.assert_allclose(out.direction, np.eye(3))
    new_centroid = out.voxel_to_world(np.argwhere(out.array == 20).mean(axis=0)).coords[0]
    assert np.all(np.abs(new_centroid - centroid) <= 0.5), new_centroid - centroid
    # the resampled box keeps its volume within 15 % (12*13*3 voxels of 0.7*0.7*4 mm)
    assert abs(np.count_nonzero(out.array) - 12 * 13 * 3 * 0.7 * 0.7 * 4.0) < 0.15 * 12 * 13 * 3 * 1.96


def test_resample_image_is_clamped_and_float():
    scan = Scan(np.full((6, 6, 3), 7, np.uint8), SPACING, ORIGIN, OBLIQUE)
    out = resample_to_spacing(scan, (1.0, 1.0, 1.0))
    assert out.array.dtype == np.float32
    np.testing.assert_allclose(out.array, 7.0, atol=1e-4)


@pytest.mark.parametrize("direction", [PERMUTED, OBLIQUE, rotation(3, proper=False)], ids=["permuted", "oblique", "improper"])
def test_reorient_keeps_world_positions(direction):
    arr = np.zeros((5, 6, 7), np.int16)
    marks = {(0, 0, 0): 1, (4, 1, 2): 2, (2, 5, 6): 3, (1, 3, 5): 4}
    for ijk, v in marks.items():
        arr[ijk] = v
    scan = Scan(arr, SPACING, ORIGIN, direction)
    code = scan.orientation_code()  # valid even for oblique directions: each world axis exactly once
    assert sorted(len(set(pair) & set(code)) for pair in ("LR", "PA", "SI")) == [1, 1, 1]
    out = reorient(scan, "LPS")
    assert out.orientation_code() == "LPS"
    assert sorted(out.array.shape) == sorted(scan.shape)
    np.testing.assert_allclose(sorted(out.spacing), sorted(scan.spacing))
    for ijk, v in marks.items():
        world = scan.voxel_to_world(np.array(ijk, float)).coords[0]
        new_ijk = np.argwhere(out.array == v)[0]
        np.testing.assert_allclose(out.voxel_to_world(new_ijk.astype(float)).coords[0], world, atol=1e-6)
    if np.allclose(np.abs(direction), np.round(np.abs(direction))):
        np.testing.assert_allclose(out.direction, np.eye(3), atol=1e-12)  # signed permutation -> identity


# ---------------------------------------------------------------------------------------------
# Read errors: always SpinepipeInputError naming the file
# ---------------------------------------------------------------------------------------------
def _bad_missing(d: Path) -> Path:
    return d / "missing_image.nii.gz"


def _bad_empty(d: Path) -> Path:
    p = d / "empty_image.nii.gz"
    p.write_bytes(b"")
    return p


def _bad_truncated(d: Path) -> Path:
    p = d / "trunc_image.nii.gz"
    io.write_image(make_scan(shape=(20, 20, 20)), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _bad_garbage(d: Path) -> Path:
    p = d / "garbage_image.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    return p


def _bad_extension(d: Path) -> Path:
    p = d / "scan_image.txt"
    p.write_text("1 2 3")
    return p


def _bad_2d(d: Path) -> Path:
    p = d / "flat_image.nii.gz"
    sitk.WriteImage(sitk.Image(4, 5, sitk.sitkInt16), str(p))
    return p


def _bad_4d(d: Path) -> Path:
    p = d / "series_image.nii.gz"
    sitk.WriteImage(sitk.Image([3, 4, 5, 2], sitk.sitkInt16), str(p))
    return p


def _bad_vector(d: Path) -> Path:
    p = d / "rgb_image.mha"
    sitk.WriteImage(sitk.Image([3, 4, 5], sitk.sitkVectorUInt8, 3), str(p))
    return p


@pytest.mark.parametrize(
    "make, message",
    [
        (_bad_missing, "not found"),
        (_bad_empty, "empty"),
        (_bad_truncated, "truncated"),
        (_bad_garbage, "cannot read"),
        (_bad_extension, "unsupported image format"),
        (_bad_2d, "expected a 3D image, got 2D"),
        (_bad_4d, "expected a 3D image, got 4D"),
        (_bad_vector, "expected a scalar image, got 3 components"),
    ],
    ids=["missing", "empty", "truncated", "garbage", "extension", "2d", "4d", "multicomponent"],
)
def test_read_errors_name_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SpinepipeInputError) as info:
        io.read_image(path)
    text = str(info.value)
    assert path.name in text
    assert message in text
    assert "\n" not in text


def test_4d_with_one_volume_is_read_as_3d(tmp_path):
    img = sitk.Image([3, 4, 5, 1], sitk.sitkInt16)
    img.SetPixel([2, 3, 4, 0], 9)
    sitk.WriteImage(img, str(tmp_path / "one.nii.gz"))
    scan = io.read_image(tmp_path / "one.nii.gz")
    assert scan.shape == (3, 4, 5)
    assert scan.array[2, 3, 4] == 9


def test_read_labelmap_checks_values_and_geometry(tmp_path):
    ref = make_scan()
    io.write_image(ref.with_array(np.full(ref.shape, 20.0, np.float32)), tmp_path / "f_vertebrae.nii.gz")
    lab = io.read_labelmap(tmp_path / "f_vertebrae.nii.gz", reference=ref)
    assert np.issubdtype(lab.array.dtype, np.integer) and np.all(lab.array == 20)
    io.write_image(ref.with_array(np.full(ref.shape, 0.5, np.float32)), tmp_path / "h_vertebrae.nii.gz")
    with pytest.raises(SpinepipeInputError, match="h_vertebrae.nii.gz: label map must hold whole numbers"):
        io.read_labelmap(tmp_path / "h_vertebrae.nii.gz")
    moved = Scan(np.zeros(ref.shape, np.uint8), ref.spacing, ref.origin + [0, 0, 3.0], ref.direction)
    io.write_image(moved, tmp_path / "m_vertebrae.nii.gz")
    with pytest.raises(SpinepipeInputError, match=r"m_vertebrae.nii.gz: geometry does not match the image: origin"):
        io.read_labelmap(tmp_path / "m_vertebrae.nii.gz", reference=ref)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------
def test_atomic_write_leaves_nothing_when_writer_raises(tmp_path, monkeypatch):
    def failing_write(img, path, useCompression=True):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_image(make_scan(), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_previous_file_when_writer_raises(tmp_path):
    dest = tmp_path / "table.csv"
    dest.write_text("old\n")
    with pytest.raises(ValueError, match="boom"):
        with io.atomic_path(dest) as tmp:
            tmp.write_text("new partial")
            raise ValueError("boom")
    assert dest.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_atomic_write_uses_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = io.write_text("x", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert p.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# CSV annotations
# ---------------------------------------------------------------------------------------------
def test_points_csv_reads_levels_and_world_points(tmp_path):
    p = tmp_path / "a_points.csv"
    p.write_text("level,x_mm,y_mm,z_mm\nL1,1.5,2,3\n21, 4,5,6\nS1,7,8,9\n")
    ids, pts = io.read_points_csv(p)
    assert ids == [20, 21, 26]
    assert pts.space == "world"
    np.testing.assert_allclose(pts.coords, [[1.5, 2, 3], [4, 5, 6], [7, 8, 9]])


@pytest.mark.parametrize(
    "text, message",
    [
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\nL9,1,2,3\n", "line 3: unknown vertebra level 'L9'"),
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\n27,1,2,3\n", "line 3: unknown VerSe vertebra id 27"),
        ("level,x_mm,y_mm\nL1,1,2\n", "missing column(s) z_mm"),
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\nL2,1,,3\n", "line 3: non-finite value"),
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\nL2,1,nan,3\n", "line 3: non-finite value"),
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\nL2,1,abc,3\n", "line 3: y_mm is 'abc'; expected a number"),
        ("level,x_mm,y_mm,z_mm\nL1,1,2,3\nL2,1,2,3\nL1,4,5,6\n", "line 4: level L1 appears more than once"),
        ("", "cannot parse CSV"),
    ],
    ids=["unknown-level", "unknown-id", "missing-column", "empty-cell", "nan", "not-a-number", "duplicate", "empty"],
)
def test_points_csv_errors_name_file_and_line(tmp_path, text, message):
    p = tmp_path / "s_points.csv"
    p.write_text(text)
    with pytest.raises(SpinepipeInputError) as info:
        io.read_points_csv(p)
    assert str(info.value).startswith(str(p) + ": ")
    assert message in str(info.value)


def test_boxes_csv(tmp_path):
    p = tmp_path / "b_boxes.csv"
    header = ",".join(io.BOX_COLUMNS)
    p.write_text(f"{header}\nL1,0,0,0,1,2,3\n")
    ids, boxes = io.read_boxes_csv(p)
    assert ids == [20] and boxes.shape == (1, 2, 3)
    np.testing.assert_allclose(boxes[0, 1], [1, 2, 3])
    p.write_text(f"{header}\nL1,0,0,0,1,2,3\nL2,0,0,5,1,2,3\n")
    with pytest.raises(SpinepipeInputError, match="b_boxes.csv: a box has max < min"):
        io.read_boxes_csv(p)
    p.write_text(f"{header}\nX1,0,0,0,1,2,3\n")
    with pytest.raises(SpinepipeInputError, match="b_boxes.csv: line 2: unknown vertebra level 'X1'"):
        io.read_boxes_csv(p)


def test_vertebra_labels_csv(tmp_path):
    p = tmp_path / "vertebra_labels.csv"
    p.write_text("id,level,class,confidence\n007,L1,fat,0.5\n007,L2,0,1\n1e3,T12,normal,1\n")
    df = io.read_vertebra_labels_csv(p, classes=["normal", "inflammation", "fat"])
    assert df["id"].tolist() == ["007", "007", "1e3"]  # ids are text, never numbers
    assert df["label"].tolist() == [20, 21, 19]
    assert df["class"].tolist() == [2, 0, 0]
    np.testing.assert_allclose(df["confidence"], [0.5, 1.0, 1.0])


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a,L1,0,1.5\n", "line 2: confidence 1.5 must lie in [0, 1]"),
        ("a,L1,0,1\na,L1,1,1\n", "line 3: duplicate row for subject a level L1"),
        ("a,L1,0,1\na,Q1,1,1\n", "line 3: unknown vertebra level 'Q1'"),
        ("a,L1,bone,1\n", "line 2: unknown class 'bone'"),
        ("a,L1,5,1\n", "line 2: class index 5 out of range"),
        ("a,L1,0,\n", "line 2: non-finite value in confidence"),
        (",L1,0,1\n", "line 2: empty subject id"),
    ],
    ids=["confidence", "duplicate", "level", "class-name", "class-index", "confidence-empty", "empty-id"],
)
def test_vertebra_labels_csv_errors(tmp_path, rows, message):
    p = tmp_path / "vertebra_labels.csv"
    p.write_text("id,level,class,confidence\n" + rows)
    with pytest.raises(SpinepipeInputError) as info:
        io.read_vertebra_labels_csv(p, classes=["normal", "inflammation", "fat"])
    assert str(info.value).startswith(str(p) + ": ")
    assert message in str(info.value)


def test_as_paths_takes_one_path_or_a_sequence(tmp_path):
    from pathlib import Path

    from data_prep.io import as_paths

    assert as_paths(str(tmp_path)) == [tmp_path] and as_paths(tmp_path) == [tmp_path]
    assert as_paths([str(tmp_path), tmp_path / "b"]) == [tmp_path, tmp_path / "b"]
    assert as_paths(("a",)) == [Path("a")] and as_paths([]) == []
