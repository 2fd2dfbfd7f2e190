"""Export a canonical dataset (:mod:`data_prep.dataset`) to nnU-Net v2 "raw" format.

nnU-Net v2 expects, under ``$nnUNet_raw``::

    DatasetXXX_Name/
        dataset.json                # channel_names, labels (background 0, consecutive), numTraining, file_ending
        imagesTr/<case>_0000.nii.gz # one file per channel, 4-digit channel suffix
        labelsTr/<case>.nii.gz      # integer labels 0..L on exactly the image grid

VerSe ids are not consecutive (T13 is 28, S1 26...), so they are remapped to ``1..L`` in head-to-foot
order of the levels present in the exported cohort; ``dataset.json`` names each label by its level
(``{"background": 0, "T12": 1, "L1": 2, ...}``) and ``spinepipe_label_map.json`` stores the mapping both
ways (use it to turn nnU-Net predictions back into VerSe ids).

``labels_from_points=r`` (mm): subjects without a label map of ``label_source`` but with
``<id>_points.csv`` get a label map of balls of radius ``r`` mm around each point, labelled with the
point's level (the nearest point wins where balls overlap). This is meant for *stage-1 comparisons*
(nnU-Net trained on point-derived blobs versus our centroid heatmaps); such labels are not vertebra
segmentations. Subjects with neither are skipped (logged).

The dataset folder is built beside its destination under a hidden name and renamed into place at the
end, so an interrupted export never leaves a half-written ``DatasetXXX_Name`` behind.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from data_prep import io
from data_prep.dataset import VERSE_LABELMAP_KINDS, Subject, discover, read_header
from data_prep.errors import SpinepipeInputError
from data_prep.scan import VERSE_LEVELS, Points, Scan, level_name, sort_head_to_foot

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
LABEL_MAP_FILE = "spinepipe_label_map.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def nnunet_env(base_dir: str | os.PathLike, create: bool = False) -> dict[str, str]:
    """nnU-Net v2 environment variables for a work folder.

    ``{"nnUNet_raw": <base>/nnUNet_raw, "nnUNet_preprocessed": <base>/nnUNet_preprocessed,
    "nnUNet_results": <base>/nnUNet_results}`` as absolute paths (``create=True`` makes the folders).
    Use as ``os.environ.update(nnunet_env(work))`` or ``subprocess.run(..., env={**os.environ, **env})``.
    """
    base = Path(base_dir).expanduser().resolve()
    env = {k: str(base / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    if create:
        for v in env.values():
            Path(v).mkdir(parents=True, exist_ok=True)
    return env


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` (validates the id, 1..999, and the name)."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise SpinepipeInputError(None, f"nnU-Net dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not _NAME_RE.match(str(name)):
        raise SpinepipeInputError(
            None, f"nnU-Net dataset name must use letters, digits, '_' or '-' (no spaces), got {name!r}"
        )
    return f"Dataset{int(dataset_id):03d}_{name}"


def points_to_balls(reference: Scan, verse_ids: list[int], points: Points, radius_mm: float) -> np.ndarray:
    """``(I, J, K)`` uint8-compatible label array: a ball of ``radius_mm`` around each world point.

    Voxels within ``radius_mm`` (physical distance, any spacing/direction) of a point get its VerSe id;
    where balls overlap the nearest point wins. Points (partly) outside the grid are clipped.
    """
    if not np.isfinite(radius_mm) or radius_mm <= 0:
        raise ValueError(f"radius must be positive, got {radius_mm}")
    centres_mm = points.require("world")
    out = np.zeros(reference.shape, dtype=np.int16)
    best = np.full(reference.shape, np.inf)
    centres_ijk = reference.world_to_voxel(points).coords
    half = radius_mm / reference.spacing  # ball extent along each voxel axis (direction is orthonormal)
    m = reference.direction * reference.spacing[None, :]
    for vid, c_mm, c_ijk in zip(verse_ids, centres_mm, centres_ijk):
        lo = np.maximum(np.floor(c_ijk - half).astype(int), 0)
        hi = np.minimum(np.ceil(c_ijk + half).astype(int) + 1, reference.shape)
        if np.any(hi <= lo):
            continue
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
        d = np.linalg.norm((grid - c_ijk) @ m.T, axis=-1)
        block = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        win = (d <= radius_mm) & (d < best[block])
        best[block][win] = d[win]
        out[block][win] = int(vid)
    return out


def _case_id(subject: Subject) -> str:
    if not _CASE_RE.match(subject.id):
        raise SpinepipeInputError(subject.image, f"subject id {subject.id!r} cannot be an nnU-Net case "
                                  "identifier; use letters, digits, '.', '_' or '-'")
    return subject.id


def _source_labels(subject: Subject, label_source: str, image: Scan, radius: float | None) -> tuple[np.ndarray, str] | None:
    path = getattr(subject, label_source)
    if path is not None:
        lab = io.read_labelmap(path, reference=image)
        values = {int(v) for v in np.unique(lab.array) if v != 0}
        unknown = sorted(v for v in values if v not in VERSE_LEVELS)
        if unknown:
            raise SpinepipeInputError(path, f"unknown label value(s) {unknown}; expected VerSe ids "
                                      "(run `spinepipe check-data` on the dataset)")
        return lab.array, label_source
    if radius is not None and subject.points is not None:
        ids, pts = io.read_points_csv(subject.points)
        return points_to_balls(image, ids, pts, radius), "points"
    return None


def export_nnunet_raw(
    dataset_dir: str | os.PathLike,
    nnunet_raw_dir: str | os.PathLike,
    dataset_id: int,
    name: str,
    label_source: str = "vertebrae",
    channel_name: str = "MRI",
    *,
    labels_from_points: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``<nnunet_raw_dir>/DatasetXXX_Name`` (nnU-Net v2 raw format) from a canonical dataset.

    Parameters
    ----------
    label_source:
        which label map becomes ``labelsTr``: ``"vertebrae"`` (default), ``"outlines"`` or ``"coarse"``.
    channel_name:
        the single channel's name in ``dataset.json`` (nnU-Net picks the normalisation from it:
        ``"CT"`` means CT normalisation, anything else z-score; keep ``"MRI"`` for MRI).
    labels_from_points:
        radius in mm; subjects without a ``label_source`` map but with ``<id>_points.csv`` get balls
        of this radius around each point (stage-1 nnU-Net comparisons only). None: such subjects are
        skipped.
    overwrite:
        replace an existing ``DatasetXXX_Name`` folder (otherwise that raises).

    Returns the dataset folder. Raises :class:`SpinepipeInputError` for bad input (unreadable files,
    label maps off the image grid or with non-VerSe values, non-finite images, no exportable subject,
    an existing dataset with the same id).
    """
    if label_source not in VERSE_LABELMAP_KINDS:
        raise SpinepipeInputError(None, f"label_source must be one of {', '.join(VERSE_LABELMAP_KINDS)}, "
                                  f"got {label_source!r}")
    if labels_from_points is not None and not (np.isfinite(labels_from_points) and labels_from_points > 0):
        raise SpinepipeInputError(None, f"labels_from_points radius must be a positive number of mm, "
                                  f"got {labels_from_points!r}")
    folder_name = dataset_folder_name(dataset_id, name)
    raw = Path(nnunet_raw_dir)
    if raw.exists() and not raw.is_dir():
        raise SpinepipeInputError(raw, "expected the nnU-Net raw folder, found a file")
    dest = raw / folder_name
    prefix = f"Dataset{int(dataset_id):03d}_"
    clash = [p for p in raw.glob(prefix + "*") if p.is_dir() and p.name != folder_name] if raw.is_dir() else []
    if clash:
        raise SpinepipeInputError(clash[0], f"another nnU-Net dataset already uses id {int(dataset_id)}; "
                                  f"nnU-Net would not know which to use: pick another id for {folder_name}")
    if dest.exists() and not overwrite:
        raise SpinepipeInputError(dest, "nnU-Net dataset folder already exists (pass overwrite=True to replace it)")

    subjects = discover(dataset_dir)
    _ = [_case_id(s) for s in subjects]

    # Pass 1: which subjects have labels, and the union of levels (label maps are small; read twice).
    cases: list[tuple[Subject, str]] = []
    levels: set[int] = set()
    for s in subjects:
        image = read_header(s.image)  # geometry only (voxels are read once, in pass 2)
        got = _source_labels(s, label_source, image, labels_from_points)
        if got is None:
            log.warning("%s: no %s label map%s; subject skipped", s.id, label_source,
                        " and no points" if labels_from_points is not None else "")
            continue
        arr, source = got
        levels.update(int(v) for v in np.unique(arr) if v != 0)
        cases.append((s, source))
    if not cases:
        raise SpinepipeInputError(Path(dataset_dir), f"no subject has a <id>_{label_source} label map"
                                  + (" or points" if labels_from_points is not None else "")
                                  + "; nothing to export")
    ordered = sort_head_to_foot(levels)
    verse_to_nn = {vid: i + 1 for i, vid in enumerate(ordered)}
    lut = np.zeros(max(VERSE_LEVELS) + 1, dtype=np.uint8)
    for vid, k in verse_to_nn.items():
        lut[vid] = k

    raw.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.", suffix=".partial", dir=raw))
    try:
        os.chmod(tmp, 0o777 & ~io._umask())  # mkdtemp makes it private
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        case_info = {}
        for s, source in cases:
            case = _case_id(s)
            image = io.read_image(s.image)
            if np.issubdtype(image.array.dtype, np.floating) and not np.all(np.isfinite(image.array)):
                raise SpinepipeInputError(s.image, "image holds NaN/Inf voxels; nnU-Net cannot train on them")
            arr, _src = _source_labels(s, label_source, image, labels_from_points)
            io.write_image(image, tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
            io.write_image(image.with_array(lut[arr.astype(np.int64)]), tmp / "labelsTr" / f"{case}{FILE_ENDING}")
            case_info[case] = {"subject": s.id, "image": str(s.image), "labels_from": source,
                               "label_file": str(getattr(s, label_source) or s.points)}
        labels = {"background": 0, **{level_name(vid): k for vid, k in verse_to_nn.items()}}
        _write_dataset_json(tmp, channel_name, labels, len(cases), folder_name, label_source, labels_from_points)
        mapping = {
            "label_source": label_source,
            "labels_from_points_radius_mm": labels_from_points,
            "verse_to_nnunet": {str(v): k for v, k in verse_to_nn.items()},
            "nnunet_to_verse": {str(k): v for v, k in verse_to_nn.items()},
            "nnunet_to_level": {str(k): level_name(v) for v, k in verse_to_nn.items()},
            "cases": case_info,
        }
        io.write_text(json.dumps(mapping, indent=2) + "\n", tmp / LABEL_MAP_FILE)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %d case(s) to %s (labels: %s)", len(cases), dest, labels)
    return dest


def _write_dataset_json(folder: Path, channel_name: str, labels: dict[str, int], n: int, name: str,
                        label_source: str, radius: float | None) -> None:
    """dataset.json through nnU-Net's own ``generate_dataset_json`` (keeps the format in step with it)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    description = f"spinepipe export; labels from <id>_{label_source} (VerSe ids remapped, see {LABEL_MAP_FILE})"
    if radius is not None:
        description += f"; subjects with points only: balls of {radius:g} mm (stage-1 comparison labels)"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        generate_dataset_json(
            tmp,
            channel_names={0: channel_name},
            labels=dict(labels),
            num_training_cases=n,
            file_ending=FILE_ENDING,
            dataset_name=name,
            description=description,
            license="see the source dataset",
            converted_by="spinepipe data_prep.nnunet_io.export_nnunet_raw",
        )
        os.replace(Path(tmp) / "dataset.json", folder / "dataset.json")


__all__ = ["export_nnunet_raw", "nnunet_env", "dataset_folder_name", "points_to_balls", "LABEL_MAP_FILE"]
