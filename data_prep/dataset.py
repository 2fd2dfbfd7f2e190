"""The canonical dataset layout, its discovery and its checker (``spinepipe check-data``).

Layout
------
A dataset is one folder holding, per subject ``<id>``:

============================  ===================================================================
``<id>_image.<ext>``          the scan (required); ``<ext>`` is any of :data:`data_prep.io.IMAGE_SUFFIXES`
                              (``.nii.gz``, ``.nii``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``), or a
                              DICOM series folder ``<id>_image/``
``<id>_vertebrae.<ext>``      full vertebral masks, VerSe ids (optional)
``<id>_outlines.<ext>``       loose closed contours labelled with VerSe ids (optional)
``<id>_coarse.<ext>``         coarse masks labelled with VerSe ids (optional)
``<id>_lesions.<ext>``        lesion map written by the lesion simulator (optional)
``<id>_structures.<ext>``     tissue map written by :mod:`data_prep.synth` (optional)
``<id>_points.csv``           ``level,x_mm,y_mm,z_mm`` world LPS centroids (optional)
``<id>_boxes.csv``            ``level,x_min_mm,y_min_mm,z_min_mm,x_max_mm,y_max_mm,z_max_mm`` (optional)
============================  ===================================================================

and optionally, once per folder, ``vertebra_labels.csv`` (``id,level,class[,confidence]``). A folder
level ``subjects.csv`` table, ``README*`` files, ``synth_meta.json`` and ``<id>_overview.png`` previews
are allowed; dot-files are ignored. Anything else is reported as a warning by :func:`check_dataset`.
``subjects.csv`` (column ``id``) may say each scan's image contrast in a ``contrast`` column (``t1``,
``t2``, ``stir``, ``water``, or empty = unknown) or, failing that, a ``sequence`` column whose common names
(``t2-tse``, ``dixon-water`` ...) are read the same way; ``synth_meta.json`` gives it for synthetic cohorts
(:func:`read_subject_contrasts`). Stage 2 uses it to type lesions (fat is dark on STIR / Dixon water and
bright on T1 / T2-TSE).

:func:`discover` lists the subjects, :func:`check_dataset` verifies everything it can and returns one
:class:`Problem` per finding (never raising on a bad file), :func:`load_subject` reads one subject with
geometry checks.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import SimpleITK as sitk

from data_prep import io
from data_prep.errors import SpinepipeInputError
from data_prep.scan import VERSE_LEVELS, Points, Scan, level_id, level_name, sort_head_to_foot

log = logging.getLogger(__name__)

#: Label-map annotation kinds (image files on the subject's grid), in the order they are checked.
LABELMAP_KINDS: tuple[str, ...] = ("vertebrae", "outlines", "coarse", "lesions", "structures")
#: Label maps whose non-zero values must be VerSe ids (lesion and structure maps have their own values).
VERSE_LABELMAP_KINDS: tuple[str, ...] = ("vertebrae", "outlines", "coarse")
#: CSV annotation kinds.
CSV_KINDS: tuple[str, ...] = ("points", "boxes")
#: Folder-level per-vertebra class labels.
VERTEBRA_LABELS_FILE = "vertebra_labels.csv"
#: Folder-level files that are allowed but not interpreted (case-insensitive names / prefixes).
_IGNORED_FILES = ("subjects.csv", "synth_meta.json")
_IGNORED_PREFIXES = ("readme",)
_IGNORED_SUFFIXES = ("_overview.png",)

_IMAGE_KINDS = ("image",) + LABELMAP_KINDS
_IMAGE_RE = re.compile(r"^(?P<id>.+)_(?P<kind>" + "|".join(_IMAGE_KINDS) + r")$")
_CSV_RE = re.compile(r"^(?P<id>.+)_(?P<kind>" + "|".join(CSV_KINDS) + r")$")
_EXPECTED_IMAGE = "<id>_image.nii.gz (or .nii, .mha, .mhd, .nrrd, .nhdr, or a DICOM folder <id>_image/)"


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------
@dataclass
class Subject:
    """One subject of a dataset: its image and whichever annotation files exist (else None)."""

    id: str
    image: Path
    vertebrae: Path | None = None
    outlines: Path | None = None
    coarse: Path | None = None
    lesions: Path | None = None
    structures: Path | None = None
    points: Path | None = None
    boxes: Path | None = None

    def annotations(self) -> dict[str, Path]:
        """``{kind: path}`` of the annotation files present."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("id", "image") and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`check_dataset`: ``str(problem)`` is the line ``<file>: <problem>``.

    ``severity`` is ``"error"`` (the dataset cannot be used as is) or ``"warning"`` (e.g. a file that
    does not belong to the layout and will be ignored).
    """

    path: Path
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "message", " ".join(str(self.message).split()))
        if self.severity not in ("error", "warning"):
            raise ValueError(f"severity must be 'error' or 'warning', got {self.severity!r}")

    def __str__(self) -> str:
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.path}: {tag}{self.message}"


class SubjectData(NamedTuple):
    """What :func:`load_subject` returns (unpack it, or use the names)."""

    image: Scan
    vertebrae: Scan | None
    outlines: Scan | None = None
    coarse: Scan | None = None
    lesions: Scan | None = None
    points: tuple[list[int], Points] | None = None
    boxes: tuple[list[int], np.ndarray] | None = None
    structures: Scan | None = None


# ---------------------------------------------------------------------------------------------
# Per-subject image contrast
# ---------------------------------------------------------------------------------------------
#: Image contrasts the pipeline knows (same names as ``data_prep.lesions.CONTRASTS``).
IMAGE_CONTRASTS: tuple[str, ...] = ("t1", "t2", "stir", "water")
#: Common sequence names (lower case, ``_`` and spaces read as ``-``) -> contrast, for a ``sequence`` column.
SEQUENCE_ALIASES: dict[str, str] = {
    "t1": "t1", "t1w": "t1", "t1-tse": "t1", "t1-fse": "t1", "t1-se": "t1",
    "t2": "t2", "t2w": "t2", "t2-tse": "t2", "t2-fse": "t2",
    "stir": "stir", "tirm": "stir", "t2-stir": "stir", "t2-fs": "stir", "t2-fatsat": "stir",
    "water": "water", "dixon-water": "water", "dixon-w": "water", "t2-dixon-water": "water",
}


def parse_contrast(value, source: str | os.PathLike | None = None) -> str:
    """``value`` as one of :data:`IMAGE_CONTRASTS`, or ``""`` (unknown) for an empty/NaN value; raises
    :class:`SpinepipeInputError` naming ``source`` and the known names for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    v = str(value).strip().lower()
    if v in ("", "unknown", "nan"):
        return ""
    if v not in IMAGE_CONTRASTS:
        raise SpinepipeInputError(source, f"unknown image contrast {value!r}; expected one of {IMAGE_CONTRASTS} "
                                          "or empty for unknown")
    return v


def read_subject_contrasts(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """``{subject id: contrast}`` of a dataset folder (contrast in :data:`IMAGE_CONTRASTS`; subjects without
    one are left out).

    Sources, later ones winning: ``synth_meta.json`` (``subjects.<id>.contrast``, synthetic cohorts), then
    ``subjects.csv``: its ``contrast`` column (an unknown value is an error naming the file), else its
    ``sequence`` column read through :data:`SEQUENCE_ALIASES` (an unrecognised sequence name = unknown).
    """
    import json

    root = Path(dataset_dir)
    out: dict[str, str] = {}
    meta = root / "synth_meta.json"
    if meta.is_file():
        try:
            subjects = json.loads(meta.read_text()).get("subjects", {})
        except (OSError, ValueError) as exc:
            raise SpinepipeInputError(meta, f"cannot read JSON: {exc}") from None
        for sid, rec in subjects.items():
            c = parse_contrast(rec.get("contrast") if isinstance(rec, dict) else None, meta)
            if c:
                out[str(sid)] = c
    table = root / "subjects.csv"
    if table.is_file():
        try:
            df = pd.read_csv(table, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise SpinepipeInputError(table, f"cannot read CSV: {exc}") from None
        if "id" in df.columns and ("contrast" in df.columns or "sequence" in df.columns):
            for rec in df.to_dict("records"):
                if "contrast" in df.columns:
                    c = parse_contrast(rec["contrast"], table)
                else:
                    key = re.sub(r"[\s_]+", "-", str(rec["sequence"]).strip().lower())
                    c = SEQUENCE_ALIASES.get(key, "")
                if c:
                    out[str(rec["id"])] = c
    return out


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """Raw result of listing a dataset folder (no file is opened)."""

    root: Path
    # id -> kind -> all candidate paths (several = duplicates), preferred first
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    vertebra_labels: Path | None = None
    unmatched: list[Path] = field(default_factory=list)

    def subject_ids(self) -> list[str]:
        return sorted(i for i, kinds in self.files.items() if "image" in kinds)


def _suffix_rank(p: Path) -> int:
    if p.is_dir():
        return len(io.IMAGE_SUFFIXES)
    s = io.image_suffix(p)
    return io.IMAGE_SUFFIXES.index(s) if s in io.IMAGE_SUFFIXES else len(io.IMAGE_SUFFIXES) + 1


def _check_folder(dataset_dir: str | os.PathLike) -> Path:
    root = Path(dataset_dir)
    if not root.exists():
        raise SpinepipeInputError(root, "dataset folder not found")
    if not root.is_dir():
        raise SpinepipeInputError(root, "expected a dataset folder, found a file")
    return root


def _list_layout(root: Path) -> _Layout:
    layout = _Layout(root)

    def add(sid: str, kind: str, p: Path) -> None:
        layout.files.setdefault(sid, {}).setdefault(kind, []).append(p)

    for p in sorted(root.iterdir()):
        name = p.name
        low = name.lower()
        if name.startswith("."):
            continue  # hidden files, partial atomic writes
        if p.is_dir():
            if name.endswith("_image") and len(name) > len("_image"):
                add(name[: -len("_image")], "image", p)
            else:
                layout.unmatched.append(p)
            continue
        if name == VERTEBRA_LABELS_FILE:
            layout.vertebra_labels = p
            continue
        if low in _IGNORED_FILES or low.startswith(_IGNORED_PREFIXES) or low.endswith(_IGNORED_SUFFIXES):
            continue
        if io.image_suffix(name) is not None:
            m = _IMAGE_RE.match(io.strip_image_suffix(name))
        elif low.endswith(".csv"):
            m = _CSV_RE.match(name[: -len(".csv")])
        else:
            m = None
        if m is None:
            layout.unmatched.append(p)
        else:
            add(m["id"], m["kind"], p)
    for kinds in layout.files.values():
        for paths in kinds.values():
            paths.sort(key=lambda q: (_suffix_rank(q), q.name))
    return layout


def _subject(layout: _Layout, sid: str) -> Subject:
    kinds = layout.files[sid]
    return Subject(sid, kinds["image"][0], **{k: v[0] for k, v in kinds.items() if k != "image"})


def discover(dataset_dir: str | os.PathLike) -> list[Subject]:
    """The subjects of a dataset folder, sorted by id.

    Raises :class:`SpinepipeInputError` for a missing or empty folder, a folder without any
    ``<id>_image`` file, or an ambiguous subject (two images, or two annotation files of one kind, for
    the same id, e.g. ``a_image.nii.gz`` and ``a_image.mha``). Annotation files without an image and
    files outside the layout are ignored (logged; :func:`check_dataset` reports them).
    """
    root = _check_folder(dataset_dir)
    layout = _list_layout(root)
    if not any(True for _ in root.iterdir()):
        raise SpinepipeInputError(root, "dataset folder is empty; expected " + _EXPECTED_IMAGE + " files")
    ids = layout.subject_ids()
    if not ids:
        raise SpinepipeInputError(root, f"no subject image found; expected {_EXPECTED_IMAGE}")
    for sid in ids:
        for kind, paths in layout.files[sid].items():
            if len(paths) > 1:
                raise SpinepipeInputError(paths[1], _duplicate_message(sid, kind, paths))
    orphans = [i for i in layout.files if i not in ids]
    if orphans:
        log.warning("%s: ignoring annotations without an image for subject(s) %s", root, ", ".join(sorted(orphans)))
    if layout.unmatched:
        log.warning("%s: ignoring %d file(s) outside the dataset layout", root, len(layout.unmatched))
    return [_subject(layout, sid) for sid in ids]


def count_subjects(dataset_dir: str | os.PathLike) -> int:
    """Number of distinct subject ids with an image (lists the folder only; never raises on content)."""
    return len(_list_layout(_check_folder(dataset_dir)).subject_ids())


def _duplicate_message(sid: str, kind: str, paths: list[Path]) -> str:
    what = "subject id" if kind == "image" else f"{kind} file for subject"
    names = " and ".join(p.name for p in paths)
    return f"duplicate {what} {sid!r}: {names} both exist; keep exactly one"


# ---------------------------------------------------------------------------------------------
# Loading one subject
# ---------------------------------------------------------------------------------------------
def load_subject(subject: Subject) -> SubjectData:
    """Read a subject: image, label maps (checked to lie on the image grid) and CSV annotations.

    Raises :class:`SpinepipeInputError` naming the file on any problem (unreadable file, geometry
    mismatch, unknown level...).
    """
    image = io.read_image(subject.image)
    maps = {k: io.read_labelmap(getattr(subject, k), reference=image) if getattr(subject, k) else None
            for k in LABELMAP_KINDS}
    points = io.read_points_csv(subject.points) if subject.points else None
    boxes = io.read_boxes_csv(subject.boxes) if subject.boxes else None
    return SubjectData(image, maps["vertebrae"], maps["outlines"], maps["coarse"], maps["lesions"], points, boxes,
                       maps["structures"])


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike, kind: str = "image") -> Scan:
    """Geometry of an image from its header only, without reading the voxels.

    The returned :class:`Scan` has the right shape, spacing, origin and direction but its ``array`` is a
    read-only zero-stride dummy (all zeros): use it for geometry only. DICOM folders are read in full.
    Raises :class:`SpinepipeInputError` like :func:`data_prep.io.read_image`.
    """
    path = Path(path)
    if path.is_dir():  # DICOM: no cheap header path; read it
        return io.read_image(path, kind=kind)
    if not path.exists():
        raise SpinepipeInputError(path, f"{kind} not found")
    if path.stat().st_size == 0:
        raise SpinepipeInputError(path, f"{kind} file is empty")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise SpinepipeInputError(path, f"cannot read {kind} header (corrupt or truncated file?): "
                                  f"{io._first_line(exc)}") from None
    size = list(reader.GetSize())
    dim = reader.GetDimension()
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]
        spacing, origin = reader.GetSpacing()[:3], reader.GetOrigin()[:3]
        d4 = np.array(reader.GetDirection()).reshape(4, 4)
        direction = d4[:3, :3]
    else:
        spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    if dim != 3:
        raise SpinepipeInputError(path, f"expected a 3D {kind}, got {dim}D of size {tuple(size)}")
    if reader.GetNumberOfComponents() != 1:
        raise SpinepipeInputError(path, f"expected a scalar {kind}, got {reader.GetNumberOfComponents()} "
                                  "components per voxel")
    try:
        return Scan(np.broadcast_to(np.zeros((), np.uint8), tuple(size)), spacing, origin, direction,
                    name=io.strip_image_suffix(path))
    except ValueError as exc:
        raise SpinepipeInputError(path, str(exc)) from None


class _Checker:
    """Collects problems; every file check is wrapped so a bad file becomes a Problem, never a crash."""

    def __init__(self, classes: list[str] | None, voxels: bool):
        self.classes = classes
        self.voxels = voxels
        self.problems: list[Problem] = []
        self.vertebra_levels: dict[str, set[int] | None] = {}  # sid -> VerSe ids in its mask (None: unknown)

    def add(self, path: Path, message: str, severity: str = "error") -> None:
        self.problems.append(Problem(path, message, severity))

    def guard(self, path: Path, fn: Callable, *args):
        """Run ``fn``; record a Problem (and return None) if it fails."""
        try:
            return fn(*args)
        except SpinepipeInputError as exc:
            self.add(Path(exc.path) if exc.path else path, exc.problem)
        except MemoryError:
            self.add(path, "file too large to check in memory")
        except Exception as exc:  # noqa: BLE001 - a checker must never crash on a bad file
            log.debug("unexpected error checking %s", path, exc_info=True)
            self.add(path, f"cannot check file ({type(exc).__name__}: {_one_line(exc)})")
        return None

    # -- per subject --------------------------------------------------------------------------
    def subject(self, s: Subject) -> None:
        image = self.guard(s.image, self.image, s.image)
        for kind in LABELMAP_KINDS:
            p = getattr(s, kind)
            if p is not None:
                levels = self.guard(p, self.labelmap, p, kind, image)
                if kind == "vertebrae":
                    self.vertebra_levels[s.id] = levels
        if s.vertebrae is None:
            self.vertebra_levels[s.id] = None
        for kind in CSV_KINDS:
            p = getattr(s, kind)
            if p is not None:
                self.guard(p, self.csv_annotation, p, kind, image)

    def image(self, path: Path) -> Scan:
        if not self.voxels:
            return read_header(path, "image")
        scan = io.read_image(path)
        a = scan.array
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
            bad = ~np.isfinite(a)
            n_bad = int(np.count_nonzero(bad))
            if n_bad:
                self.add(path, f"image holds {n_bad} non-finite voxel(s) (NaN/Inf); expected finite intensities")
                lo, hi = (float(a[~bad].min()), float(a[~bad].max())) if n_bad < a.size else (0.0, 0.0)
            else:
                lo, hi = float(a.min()), float(a.max())
        else:
            lo, hi = float(a.min()), float(a.max())
        if lo == hi:
            self.add(path, f"image is constant (every voxel is {lo:g}); expected varying intensities")
        # keep only the geometry (drop the voxels: a cohort must not pile up in memory)
        return Scan(np.broadcast_to(np.zeros((), np.uint8), scan.shape), scan.spacing, scan.origin,
                    scan.direction, name=scan.name)

    def labelmap(self, path: Path, kind: str, image: Scan | None) -> set[int] | None:
        what = f"{kind} label map"
        if not self.voxels:
            lab = read_header(path, what)
            if image is not None and not lab.same_geometry(image):
                raise SpinepipeInputError(path, io._geometry_mismatch(lab, image))
            return None
        lab = io.read_labelmap(path, reference=image)
        values = np.unique(lab.array)
        present = {int(v) for v in values if v != 0}
        if kind in VERSE_LABELMAP_KINDS:
            unknown = sorted(v for v in present if v not in VERSE_LEVELS)
            if unknown:
                shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                self.add(path, f"unknown label value(s) {shown}; expected 0 (background) or VerSe ids "
                               f"{_verse_ids_text()}")
        else:
            neg = sorted(v for v in present if v < 0)
            if neg:
                self.add(path, f"negative label value(s) {', '.join(map(str, neg[:10]))}; expected values >= 0")
        return {v for v in present if v in VERSE_LEVELS}

    def csv_annotation(self, path: Path, kind: str, image: Scan | None) -> None:
        if kind == "points":
            ids, pts = io.read_points_csv(path)
            centers, what = pts.coords, "point"
        else:
            ids, boxes = io.read_boxes_csv(path)
            centers, what = boxes.mean(axis=1), "box centre"
        if image is None or len(ids) == 0:
            return
        ijk = image.world_to_voxel(Points(centers, "world")).coords
        shape = np.array(image.shape, dtype=np.float64)
        tol = 1e-3
        outside = np.any((ijk < -0.5 - tol) | (ijk > shape - 0.5 + tol), axis=1)
        for row in np.flatnonzero(outside):
            xyz = ", ".join(f"{c:.1f}" for c in centers[row])
            self.add(path, f"line {row + 2}: {level_name(ids[row])} {what} ({xyz}) mm lies outside the image "
                           f"extent (voxel index {np.round(ijk[row], 1).tolist()}, image shape {list(image.shape)})")

    # -- folder level -------------------------------------------------------------------------
    def vertebra_labels(self, path: Path, subject_ids: set[str]) -> None:
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        except Exception as exc:  # noqa: BLE001
            self.add(path, f"cannot parse CSV: {_one_line(exc)}")
            return
        df.columns = [str(c).strip().lower() for c in df.columns]
        required = ["id", "level", "class"]
        missing = [c for c in required if c not in df.columns]
        if missing:
            self.add(path, f"missing column(s) {', '.join(missing)}; expected id,level,class[,confidence], "
                           f"got {','.join(df.columns)}")
            return
        seen: dict[tuple[str, int], int] = {}
        n_before = len(self.problems)
        for i, row in enumerate(df.to_dict("records")):
            line = i + 2
            sid = str(row["id"]).strip()
            if not sid:
                self.add(path, f"line {line}: empty subject id")
                continue
            try:
                vid = _parse_level(row["level"])
            except ValueError as exc:
                self.add(path, f"line {line}: {exc}")
                vid = None
            msg = _class_problem(row["class"], self.classes)
            if msg:
                self.add(path, f"line {line}: {msg}")
            if "confidence" in row:
                msg = _confidence_problem(row["confidence"])
                if msg:
                    self.add(path, f"line {line}: {msg}")
            if sid not in subject_ids:
                self.add(path, f"line {line}: subject {sid!r} does not exist in the dataset "
                               f"(no {sid}_image file)")
                continue
            if vid is None:
                continue
            key = (sid, vid)
            if key in seen:
                self.add(path, f"line {line}: duplicate row for subject {sid!r} level {level_name(vid)} "
                               f"(first given on line {seen[key]})")
                continue
            seen[key] = line
            levels = self.vertebra_levels.get(sid)
            if levels is not None and vid not in levels:
                have = ", ".join(level_name(v) for v in sort_head_to_foot(levels)) or "none"
                self.add(path, f"line {line}: level {level_name(vid)} of subject {sid!r} is absent from its "
                               f"vertebra mask (levels present: {have})")
        named = any(not _is_number(c) for c in df["class"].tolist())
        if len(self.problems) == n_before and (self.classes is not None or not named):
            # the row checks found nothing: the reader the pipeline uses must agree
            self.guard(path, io.read_vertebra_labels_csv, path, self.classes)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _is_number(v) -> bool:
    try:
        float(str(v).strip())
        return True
    except ValueError:
        return False


def _verse_ids_text() -> str:
    return "1-26, 28"


def _parse_level(v) -> int:
    s = str(v).strip()
    if not s:
        raise ValueError("empty level")
    try:
        f = float(s)
    except ValueError:
        return level_id(s)
    if not math.isfinite(f) or f != int(f) or int(f) not in VERSE_LEVELS:
        raise ValueError(f"unknown VerSe vertebra id {s!r}; expected a level name (T12, L1 ...) or an id "
                         f"{_verse_ids_text()}")
    return int(f)


def _class_problem(v, classes: list[str] | None) -> str | None:
    s = str(v).strip()
    if not s:
        return "empty class"
    try:
        f = float(s)
    except ValueError:
        if classes is not None and s not in classes:
            return f"unknown class {s!r}; expected an index or one of {', '.join(classes)}"
        if classes is None:
            return None if re.match(r"^[A-Za-z][\w-]*$", s) else f"malformed class {s!r}"
        return None
    if not math.isfinite(f) or f != int(f) or f < 0:
        return f"class {s!r} is not a class index (expected an integer >= 0)"
    if classes is not None and int(f) >= len(classes):
        return f"class index {int(f)} out of range; expected 0..{len(classes) - 1} ({', '.join(classes)})"
    return None


def _confidence_problem(v) -> str | None:
    s = str(v).strip()
    if not s:
        return "empty confidence; expected a value in [0, 1] (or drop the column: confidence defaults to 1)"
    try:
        f = float(s)
    except ValueError:
        return f"confidence {s!r} is not a number; expected a value in [0, 1]"
    if not (math.isfinite(f) and 0.0 <= f <= 1.0):
        return f"confidence {s} out of range; expected a value in [0, 1]"
    return None


def check_dataset(
    dataset_dir: str | os.PathLike,
    classes: list[str] | None = None,
    *,
    voxels: bool = True,
    progress: Callable[[Subject], None] | None = None,
) -> list[Problem]:
    """Check a dataset folder against the canonical layout; one :class:`Problem` per finding.

    Verifies: annotation files without an image (orphans), duplicate subject ids / annotation files,
    files outside the layout (warnings), unreadable or corrupt files, non-3D images, geometry of every
    label map against the image (shape, spacing, origin, direction), NaN/Inf and constant images,
    label values that are not VerSe ids, unknown levels and bad values in CSV files, points and box
    centres outside the image, and ``vertebra_labels.csv`` (unknown subjects, levels absent from the
    subject's vertebra mask, duplicate rows, bad class or confidence). ``classes`` names the classes
    that ``vertebra_labels.csv`` may use.

    Each file is read once. ``voxels=False`` reads image headers only (geometry checks, fast for big
    cohorts) and skips the voxel checks (NaN/Inf, constant images, label values, mask levels).
    ``progress`` is called with each subject before it is checked (for progress bars). Problems are
    returned grouped by file path.

    Raises :class:`SpinepipeInputError` only when ``dataset_dir`` is missing or not a folder; every
    problem inside the folder is returned, never raised.
    """
    root = _check_folder(dataset_dir)
    if classes is not None:
        classes = [str(c).strip() for c in classes]
    layout = _list_layout(root)
    chk = _Checker(classes, voxels)
    ids = layout.subject_ids()
    if not ids:
        empty = not any(True for _ in root.iterdir())
        chk.add(root, ("dataset folder is empty" if empty else "no subject image found")
                + f"; expected {_EXPECTED_IMAGE}")
    for sid in sorted(layout.files):
        kinds = layout.files[sid]
        if "image" not in kinds:
            for paths in kinds.values():
                for p in paths:
                    chk.add(p, f"annotation without an image: expected {sid}_image.nii.gz (or another image "
                               f"format, or a DICOM folder {sid}_image/) beside it")
            continue
        for kind, paths in kinds.items():
            for p in paths[1:]:
                chk.add(p, _duplicate_message(sid, kind, paths) + f" (checking {paths[0].name})")
    for p in layout.unmatched:
        chk.add(p, "not part of the dataset layout (expected <id>_image, _vertebrae, _outlines, _coarse, "
                   "_lesions, _structures images, <id>_points.csv, <id>_boxes.csv or vertebra_labels.csv); "
                   "ignored",
                "warning")
    for sid in ids:
        s = _subject(layout, sid)
        if progress is not None:
            progress(s)
        chk.subject(s)
    if layout.vertebra_labels is not None:
        if not voxels:
            chk.vertebra_levels = {}  # mask levels unknown in header-only mode
        chk.vertebra_labels(layout.vertebra_labels, set(ids))
    # grouped by file (stable: a file's problems keep their order)
    return sorted(chk.problems, key=lambda p: str(p.path))


__all__ = [
    "Subject",
    "Problem",
    "SubjectData",
    "LABELMAP_KINDS",
    "CSV_KINDS",
    "VERTEBRA_LABELS_FILE",
    "discover",
    "count_subjects",
    "check_dataset",
    "load_subject",
    "read_header",
]
