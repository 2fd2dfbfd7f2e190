"""A corpus of bad inputs. Each maker writes its case under a folder and returns ``(path, expected)``:
``path`` is what the user would pass, ``expected`` a fragment the one-line error must contain.

Scan cases are fed to ``spinepipe predict``; CSV/label cases to the reader or command that takes them.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_prep.io import to_sitk, write_image
from data_prep.scan import Scan


def good_scan(shape=(16, 48, 64), spacing=(3.0, 1.0, 1.0)) -> Scan:
    rng = np.random.default_rng(1)
    arr = rng.normal(100, 20, size=shape).astype(np.float32)
    return Scan(arr, spacing, (0.0, 0.0, 0.0), np.diag([1.0, 1.0, -1.0]))


def _write(scan: Scan, path: Path) -> Path:
    write_image(scan, path)
    return path


# ---- scan files -------------------------------------------------------------------------------
def truncated(d: Path):
    p = _write(good_scan(), d / "trunc.nii.gz")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, "trunc.nii.gz"


def garbage(d: Path):
    p = d / "garbage.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti file" * 20))
    return p, "garbage.nii.gz"


def garbage_plain(d: Path):
    p = d / "noise.mha"
    p.write_bytes(np.random.default_rng(0).bytes(4000))
    return p, "noise.mha"


def empty_file(d: Path):
    p = d / "empty.nii.gz"
    p.write_bytes(b"")
    return p, "empty"


def wrong_extension(d: Path):
    p = d / "scan.txt"
    p.write_text("hello")
    return p, "unsupported"


def png_file(d: Path):
    p = d / "picture.png"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(p))
    return p, "unsupported"


def image_2d(d: Path):
    p = d / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((30, 30), np.float32)), str(p))
    return p, "3D"


def image_4d(d: Path):
    p = d / "fourd.nii.gz"
    vols = [sitk.GetImageFromArray(np.random.rand(8, 20, 20).astype(np.float32)) for _ in range(3)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(p))
    return p, "3D"


def rgb_image(d: Path):
    p = d / "rgb.nii.gz"
    img = sitk.GetImageFromArray(np.random.rand(8, 20, 20, 3).astype(np.float32), isVector=True)
    sitk.WriteImage(img, str(p))
    return p, "scalar"


def nan_voxels(d: Path):
    s = good_scan()
    s.array[3, 4, 5] = np.nan
    return _write(s, d / "nan.nii.gz"), "NaN"


def inf_voxels(d: Path):
    s = good_scan()
    s.array[1, 2, 3] = np.inf
    return _write(s, d / "inf.nii.gz"), "NaN/Inf"


def constant_image(d: Path):
    s = good_scan()
    s.array[:] = 7
    return _write(s, d / "constant.nii.gz"), "constant"


def huge_image(d: Path):
    """A valid NIfTI-1 header announcing 4000^3 float voxels, without the voxels."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, 4000, 4000, 4000, 1, 1, 1, 1)
    struct.pack_into("<h", hdr, 70, 16)  # float32
    struct.pack_into("<h", hdr, 72, 32)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352.0)
    hdr[344:348] = b"n+1\0"
    p = d / "huge.nii"
    p.write_bytes(bytes(hdr) + b"\0" * 4)
    return p, "too large"


def axial_scan(d: Path):
    s = good_scan(shape=(64, 48, 16), spacing=(0.8, 0.8, 5.0))  # thick slices along head-foot
    return _write(s, d / "axial.nii.gz"), "sagittal"


def coronal_scan(d: Path):
    s = good_scan(shape=(64, 12, 64), spacing=(0.8, 5.0, 0.8))
    return _write(s, d / "coronal.nii.gz"), "sagittal"


def wrong_spacing_header(d: Path):
    s = good_scan(spacing=(30.0, 100.0, 100.0))
    return _write(s, d / "spacing.nii.gz"), "field of view"


def tiny_fov(d: Path):
    s = good_scan(shape=(16, 20, 20), spacing=(3.0, 1.0, 1.0))
    return _write(s, d / "tiny.nii.gz"), "head-foot field of view"


def too_few_voxels(d: Path):
    s = good_scan(shape=(2, 48, 64))
    return _write(s, d / "thin.nii.gz"), "too small"


def complex_voxels(d: Path):
    p = d / "complex.mha"
    img = sitk.GetImageFromArray((np.random.rand(8, 20, 20) + 1j * np.random.rand(8, 20, 20)).astype(np.complex64))
    sitk.WriteImage(img, str(p))
    return p, "complex.mha"


def missing_path(d: Path):
    return d / "does_not_exist.nii.gz", "does_not_exist"


def empty_folder(d: Path):
    p = d / "emptydir"
    p.mkdir()
    return p, "empty"


def folder_without_scans(d: Path):
    p = d / "notes"
    p.mkdir()
    (p / "readme.txt").write_text("no scans here")
    return p, "no scans"


def unreadable_dicom(d: Path):
    p = d / "dicom_series"
    p.mkdir()
    for n in range(3):
        (p / f"IM{n}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    return p, "dicom_series"


SCAN_CASES = [
    truncated, garbage, garbage_plain, empty_file, wrong_extension, png_file, image_2d, image_4d, rgb_image,
    nan_voxels, inf_voxels, constant_image, huge_image, axial_scan, coronal_scan, wrong_spacing_header,
    tiny_fov, too_few_voxels, complex_voxels, missing_path, empty_folder, folder_without_scans, unreadable_dicom,
]


# ---- CSV / label cases ------------------------------------------------------------------------
def centroids_unknown_level(d: Path):
    p = d / "bad_centroids.csv"
    p.write_text("level,label,x_mm,y_mm,z_mm,confidence,flags\nL1,20,1,2,3,0.9,\nL9,99,1,2,30,0.9,\n")
    return p, "L9"


def points_nan(d: Path):
    p = d / "x_points.csv"
    p.write_text("level,x_mm,y_mm,z_mm\nL1,1,nan,3\n")
    return p, "non-finite"


def points_missing_column(d: Path):
    p = d / "y_points.csv"
    p.write_text("level,x_mm,y_mm\nL1,1,2\n")
    return p, "z_mm"


def labels_unknown_class(d: Path):
    p = d / "vertebra_labels.csv"
    p.write_text("id,level,class\ns1,L1,normal\ns1,L2,tumour\n")
    return p, "tumour"


def labels_bad_confidence(d: Path):
    p = d / "vertebra_labels.csv"
    p.write_text("id,level,class,confidence\ns1,L1,0,1.7\n")
    return p, "confidence"


def labelmap_other_geometry(d: Path):
    img = _write(good_scan(), d / "g_image.nii.gz")
    lab = good_scan(shape=(16, 48, 60))
    lab.array = np.zeros(lab.shape, np.int16)
    lab.array[5:9, 10:20, 10:20] = 20
    p = d / "g_vertebrae.nii.gz"
    write_image(lab, p)
    return (img, p), "geometry"
