"""Readers and writers. Everything goes through SimpleITK so spacing, origin and direction survive.

Supported images: ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr`` files and DICOM
series folders. All readers return a :class:`~data_prep.scan.Scan` (array in ``(i, j, k)`` order) and
raise :class:`~data_prep.errors.SpinepipeInputError` naming the file on any problem.

Writers are atomic: they write to a temporary name in the destination folder and rename, so an
interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import zlib
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from data_prep.errors import SpinepipeInputError
from data_prep.scan import LEVEL_IDS, VERSE_LEVELS as LEVEL_NAMES, Points, Scan, from_sitk, level_id, to_sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One path or a sequence of them (e.g. several dataset folders, ensemble members) as a list of Paths."""
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def image_suffix(path: str | os.PathLike) -> str | None:
    """The recognised image suffix of ``path`` (``".nii.gz"``...), or None."""
    name = os.fspath(path).lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def strip_image_suffix(path: str | os.PathLike) -> str:
    """File name without its image suffix (``"a/b_image.nii.gz" -> "b_image"``)."""
    name = Path(path).name
    s = image_suffix(name)
    return name[: -len(s)] if s else name


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SpinepipeInputError(folder, "folder contains no readable DICOM series")
    if len(series) > 1:
        raise SpinepipeInputError(
            folder, f"folder holds {len(series)} DICOM series; expected exactly one (split them into folders)"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    # Only geometry and pixels are kept: no DICOM tag (patient name, ids, dates) ever leaves this function.
    reader.MetaDataDictionaryArrayUpdateOff()
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise SpinepipeInputError(folder, f"unreadable DICOM series ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # SimpleITK messages start with a source location; the last informative line says what went wrong.
    for ln in reversed(lines):
        if "ITK ERROR" in ln or "Exception" in ln or "error" in ln.lower():
            return ln[-200:]
    return (lines[-1] if lines else type(exc).__name__)[-200:]


def read_image(path: str | os.PathLike, *, kind: str = "image") -> Scan:
    """Read a 3D image or label map (file or DICOM folder) into a :class:`Scan`.

    Raises :class:`SpinepipeInputError` for a missing/unreadable file, an unsupported format, a
    non-3D or multi-component image, or non-finite geometry. ``kind`` only words the messages.
    """
    p = Path(path)
    if not p.exists():
        raise SpinepipeInputError(p, f"{kind} not found")
    if p.is_dir():
        img = _read_dicom_series(p)
    else:
        if image_suffix(p) is None and p.suffix.lower() != ".dcm":
            raise SpinepipeInputError(
                p, f"unsupported {kind} format; expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder"
            )
        if p.stat().st_size == 0:
            raise SpinepipeInputError(p, f"{kind} file is empty")
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise SpinepipeInputError(p, f"cannot read {kind} (corrupt or truncated file?): {_first_line(exc)}") from None
    if image_suffix(p) in (".nii", ".nii.gz"):
        _check_nifti_payload(p, img)
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise SpinepipeInputError(p, f"expected a 3D {kind}, got {img.GetDimension()}D of size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise SpinepipeInputError(
            p, f"expected a scalar {kind}, got {img.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    try:
        return from_sitk(img, name=strip_image_suffix(p))
    except ValueError as exc:
        raise SpinepipeInputError(p, str(exc)) from None


def _check_nifti_payload(p: Path, img: sitk.Image) -> None:
    """Catch what SimpleITK's NIfTI reader silently accepts: truncated data and NaN/Inf voxels.

    ITK zero-fills a truncated ``.nii.gz`` and reads NaN voxels as 0, so both are checked on the raw
    file (nibabel, already a dependency of nnunetv2) before the data is trusted.
    """
    import nibabel as nib

    if p.name.lower().endswith(".gz"):
        try:
            with gzip.open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        except (EOFError, OSError, zlib.error) as exc:
            raise SpinepipeInputError(p, f"truncated or corrupt compressed file ({exc})") from None
    try:
        nii = nib.load(str(p))
        if not p.name.lower().endswith(".gz"):
            hdr = nii.header
            need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
            if p.stat().st_size < need:
                raise SpinepipeInputError(p, f"truncated file: {p.stat().st_size} bytes, header needs {need}")
        if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) or nii.header.get_data_dtype().kind == "f":
            raw = np.asanyarray(nii.dataobj)
            bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
            if bad:
                raise SpinepipeInputError(p, f"image holds {bad} NaN/Inf voxels")
    except SpinepipeInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken files
        raise SpinepipeInputError(p, f"cannot read image data: {str(exc).splitlines()[0][:200]}") from None


def read_labelmap(path: str | os.PathLike, reference: Scan | None = None) -> Scan:
    """Read an integer label map; check it lies on ``reference``'s grid when given."""
    lab = read_image(path, kind="label map")
    arr = lab.array
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise SpinepipeInputError(path, "label map must hold whole numbers")
        lab = lab.with_array(np.round(arr).astype(np.int16))
    if reference is not None and not lab.same_geometry(reference):
        raise SpinepipeInputError(path, _geometry_mismatch(lab, reference))
    return lab


def _geometry_mismatch(a: Scan, ref: Scan) -> str:
    parts = []
    if a.shape != ref.shape:
        parts.append(f"shape {a.shape} vs image {ref.shape}")
    if not np.allclose(a.spacing, ref.spacing, atol=1e-3):
        parts.append(f"spacing {np.round(a.spacing, 3).tolist()} vs image {np.round(ref.spacing, 3).tolist()}")
    if not np.allclose(a.origin, ref.origin, atol=1e-2):
        parts.append(f"origin {np.round(a.origin, 2).tolist()} vs image {np.round(ref.origin, 2).tolist()}")
    if not np.allclose(a.direction, ref.direction, atol=1e-3):
        parts.append("direction differs from the image")
    return "geometry does not match the image: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Writing (atomic)
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = image_suffix(dest) or dest.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".part{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp creates 0600 files; give the result the usual permissions (umask applied).
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image(scan: Scan, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a scan (any supported file format, chosen by suffix) atomically."""
    if image_suffix(path) is None:
        raise ValueError(f"{path}: unsupported output format; use one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        sitk.WriteImage(to_sitk(scan), str(tmp), useCompression=compress)
    return Path(path)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    """Write a DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# CSV annotations
# ---------------------------------------------------------------------------------------------
def _read_csv(path: str | os.PathLike, required: list[str], as_text: bool = False) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise SpinepipeInputError(p, "CSV file not found")
    try:
        if as_text:  # keep every cell as written ("007" stays "007"); empty cells are NaN
            df = pd.read_csv(p, skipinitialspace=True, dtype=str, keep_default_na=False, na_values=[""])
        else:
            df = pd.read_csv(p, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpinepipeInputError(p, f"cannot parse CSV: {_first_line(exc)}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SpinepipeInputError(
            p, f"missing column(s) {', '.join(missing)}; expected {', '.join(required)}, got {', '.join(df.columns)}"
        )
    return df


def _levels_column(df: pd.DataFrame, path, col: str = "level") -> list[int]:
    out = []
    for row, v in enumerate(df[col].tolist(), start=2):
        try:
            out.append(level_id(v) if not _is_int_like(v) else _known_id(v))
        except ValueError as exc:
            raise SpinepipeInputError(path, f"line {row}: {exc}") from None
    return out


def _is_int_like(v) -> bool:
    try:
        return float(v) == int(float(v))
    except (TypeError, ValueError):
        return False


def _known_id(v) -> int:
    vid = int(float(v))
    if vid not in LEVEL_IDS.values():
        raise ValueError(f"unknown VerSe vertebra id {vid}")
    return vid


def _finite_columns(df: pd.DataFrame, path, cols: list[str]) -> np.ndarray:
    try:
        arr = df[cols].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        for row, rec in enumerate(df[cols].itertuples(index=False), start=2):
            for col, v in zip(cols, rec):
                try:
                    float(v)
                except (TypeError, ValueError):
                    raise SpinepipeInputError(path, f"line {row}: {col} is {v!r}; expected a number") from None
        raise SpinepipeInputError(path, f"columns {', '.join(cols)} must be numbers") from None
    bad = ~np.all(np.isfinite(arr), axis=1)
    if bad.any():
        raise SpinepipeInputError(path, f"line {int(np.argmax(bad)) + 2}: non-finite value in {', '.join(cols)}")
    return arr


def read_points_csv(path: str | os.PathLike) -> tuple[list[int], Points]:
    """``<id>_points.csv`` (``level,x_mm,y_mm,z_mm``, world LPS) -> (VerSe ids, world Points)."""
    df = _read_csv(path, ["level", "x_mm", "y_mm", "z_mm"])
    ids = _levels_column(df, path)
    first: dict[int, int] = {}
    for row, vid in enumerate(ids, start=2):
        if vid in first:
            raise SpinepipeInputError(
                path, f"line {row}: level {LEVEL_NAMES[vid]} appears more than once (first on line {first[vid]})"
            )
        first[vid] = row
    return ids, Points(_finite_columns(df, path, ["x_mm", "y_mm", "z_mm"]), "world")


BOX_COLUMNS = ["level", "x_min_mm", "y_min_mm", "z_min_mm", "x_max_mm", "y_max_mm", "z_max_mm"]


def read_boxes_csv(path: str | os.PathLike) -> tuple[list[int], np.ndarray]:
    """``<id>_boxes.csv`` -> (VerSe ids, ``(N, 2, 3)`` world LPS min/max corners in mm)."""
    df = _read_csv(path, BOX_COLUMNS)
    ids = _levels_column(df, path)
    arr = _finite_columns(df, path, BOX_COLUMNS[1:]).reshape(-1, 2, 3)
    if np.any(arr[:, 1] < arr[:, 0]):
        raise SpinepipeInputError(path, "a box has max < min in some axis")
    return ids, arr


def read_vertebra_labels_csv(path: str | os.PathLike, classes: list[str] | None = None) -> pd.DataFrame:
    """``vertebra_labels.csv`` (``id,level,class[,confidence]``) -> DataFrame with a ``label`` column.

    ``class`` may be an index or a class name (mapped through ``classes``). ``confidence`` defaults
    to 1 and must lie in [0, 1].
    """
    df = _read_csv(path, ["id", "level", "class"], as_text=True)
    ids = df["id"].fillna("").astype(str).str.strip()
    if (ids == "").any():
        raise SpinepipeInputError(path, f"line {int(np.argmax((ids == '').to_numpy())) + 2}: empty subject id")
    df["id"] = ids
    df["label"] = _levels_column(df, path)
    cls_idx = []
    for row, v in enumerate(df["class"].tolist(), start=2):
        if _is_int_like(v):
            c = int(float(v))
            if c < 0 or (classes is not None and c >= len(classes)):
                raise SpinepipeInputError(path, f"line {row}: class index {c} out of range")
        elif classes is not None and str(v).strip() in classes:
            c = classes.index(str(v).strip())
        else:
            raise SpinepipeInputError(
                path, f"line {row}: unknown class {v!r}; expected an index or one of {classes}"
            )
        cls_idx.append(c)
    df["class"] = cls_idx
    if "confidence" in df.columns:
        conf = _finite_columns(df, path, ["confidence"])[:, 0]
        bad = (conf < 0) | (conf > 1)
        if np.any(bad):
            row = int(np.argmax(bad))
            raise SpinepipeInputError(path, f"line {row + 2}: confidence {conf[row]:g} must lie in [0, 1]")
        df["confidence"] = conf
    else:
        df["confidence"] = 1.0
    dup = df.duplicated(["id", "label"])
    if dup.any():
        row = int(np.argmax(dup.to_numpy()))
        r = df.iloc[row]
        raise SpinepipeInputError(path, f"line {row + 2}: duplicate row for subject {r['id']} level {r['level']}")
    return df
