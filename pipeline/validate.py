"""Input validation for prediction: everything a scan must satisfy before a network sees it.

Each check raises :class:`~data_prep.errors.SpinepipeInputError` naming the file, so the CLI prints a
single line and exits non-zero. Size limits are checked on the header before any voxel is read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data_prep.errors import SpinepipeInputError
from data_prep.io import IMAGE_SUFFIXES, image_suffix, read_image
from data_prep.scan import Scan


@dataclass(frozen=True)
class ScanLimits:
    """What ``spinepipe predict`` accepts (generous for clinical sagittal spine MRI)."""

    max_voxels: int = 400_000_000  # ~1.6 GB as float32
    max_extent_mm: float = 1500.0
    min_extent_mm: float = 40.0  # a field of view smaller than ~1.5 vertebrae holds no usable spine
    min_voxels_per_axis: int = 4


def _header_size(path: Path) -> tuple[int, ...] | None:
    """Image size from the file header only (None for DICOM folders or unknown formats)."""
    if path.is_dir() or image_suffix(path) is None:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # read_image will report the precise problem
    return tuple(int(s) for s in reader.GetSize())


def validate_scan(scan: Scan, path: str | os.PathLike, limits: ScanLimits = ScanLimits()) -> None:
    """Checks on the voxel data and geometry of a scan already in memory."""
    arr = np.asarray(scan.array)
    if any(s < limits.min_voxels_per_axis for s in arr.shape):
        raise SpinepipeInputError(path, f"image too small: shape {arr.shape}; expected a 3D volume with >= {limits.min_voxels_per_axis} voxels per axis")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise SpinepipeInputError(path, f"unsupported voxel type {arr.dtype}; expected real numbers")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            raise SpinepipeInputError(path, f"image holds {int(bad.sum())} NaN/Inf voxels")
    if float(arr.max()) == float(arr.min()):
        raise SpinepipeInputError(path, f"image is constant (every voxel = {float(arr.min()):g}); nothing to analyse")
    extent = np.asarray(scan.shape) * scan.spacing
    if extent.max() > limits.max_extent_mm:
        raise SpinepipeInputError(path, f"field of view {np.round(extent).tolist()} mm exceeds {limits.max_extent_mm:g} mm: wrong spacing in the header?")
    si_axis, _ = scan.axis_of(2)
    if extent[si_axis] < limits.min_extent_mm:
        raise SpinepipeInputError(path, f"head-foot field of view is {extent[si_axis]:.0f} mm; expected >= {limits.min_extent_mm:g} mm of spine")
    # Sagittal check: the slice (thickest) axis of an anisotropic scan must run left-right.
    thick = int(np.argmax(scan.spacing))
    if scan.spacing[thick] > 1.5 * np.median(scan.spacing):
        lr_axis, _ = scan.axis_of(0)
        if thick != lr_axis:
            world = "head-foot (axial slices)" if thick == si_axis else "front-back (coronal slices)"
            raise SpinepipeInputError(
                path,
                f"expected a sagittal scan (thick slices along left-right), got {scan.spacing[thick]:.1f} mm slices along {world}",
            )


def load_scan_for_prediction(path: str | os.PathLike, limits: ScanLimits = ScanLimits()) -> Scan:
    """Read and validate one scan (file or DICOM folder) for ``spinepipe predict``."""
    p = Path(path)
    if p.is_file() and image_suffix(p) is None:
        raise SpinepipeInputError(p, f"unsupported file type; expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder")
    size = _header_size(p) if p.is_file() else None
    if size is not None and len(size) >= 3 and int(np.prod(size, dtype=np.int64)) > limits.max_voxels:
        raise SpinepipeInputError(p, f"image too large: {' x '.join(map(str, size))} voxels (limit {limits.max_voxels:,})")
    scan = read_image(p)
    validate_scan(scan, p, limits)
    return scan


def collect_scans(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand the CLI's SCAN arguments: files, DICOM series folders, or folders of scans (one level)."""
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise SpinepipeInputError(p, "no such file or folder")
        if p.is_file():
            out.append(p)
            continue
        files = sorted(e for e in p.iterdir() if e.is_file() and not e.name.startswith("."))
        if not files and not any(e.is_dir() for e in p.iterdir()):
            raise SpinepipeInputError(p, "folder is empty; expected scans or a DICOM series")
        images = [e for e in files if image_suffix(e) is not None and not _is_annotation(e)]
        if not images and any(_looks_dicom(e) for e in files):
            out.append(p)  # the folder itself is one DICOM series
            continue
        dicom_dirs = [d for d in sorted(p.iterdir()) if d.is_dir() and any(_looks_dicom(f) for f in d.iterdir() if f.is_file())]
        if not images and not dicom_dirs:
            raise SpinepipeInputError(p, "folder holds no scans (expected image files or DICOM series folders)")
        out.extend(images + dicom_dirs)
    if not out:
        raise SpinepipeInputError(None, "no scans given")
    return out


_ANNOTATION_SUFFIXES = ("_vertebrae", "_outlines", "_lesions", "_coarse", "_labels", "_evidence")


def _is_annotation(p: Path) -> bool:
    from data_prep.io import strip_image_suffix

    stem = strip_image_suffix(p)
    return stem.endswith(_ANNOTATION_SUFFIXES) or "_evidence" in stem


def _looks_dicom(p: Path) -> bool:
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False
