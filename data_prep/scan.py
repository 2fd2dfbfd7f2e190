"""Scans, geometry, landmarks and vertebra records: the in-memory types every stage shares.

Coordinate conventions (used everywhere in spinepipe)
-----------------------------------------------------
* **Voxel space** ``(i, j, k)``: indices into ``Scan.array``, whose axes are in *SimpleITK index order*
  (``array[i, j, k]`` is the voxel SimpleITK calls index ``(i, j, k)``). Note that this is the
  transpose of ``sitk.GetArrayFromImage`` (which returns ``(k, j, i)``).
* **World space** ``(x, y, z)`` in millimetres, following SimpleITK/DICOM: **LPS** (x grows towards the
  patient's Left, y towards Posterior, z towards Superior)::

      world = origin + direction @ (spacing * ijk)

* Landmarks are :class:`Points`: an ``(N, 3)`` float array with an explicit ``space`` tag
  (``"voxel"`` or ``"world"``), validated on construction, so a voxel index can never be mistaken for mm.

Vertebra identities use the VerSe label convention (see :data:`VERSE_LEVELS`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import SimpleITK as sitk

from data_prep.errors import SpinepipeInputError

Space = Literal["voxel", "world"]

# ---------------------------------------------------------------------------------------------
# VerSe level ids
# ---------------------------------------------------------------------------------------------
#: VerSe id -> level name. 1-7 C1-C7, 8-19 T1-T12, 20-24 L1-L5, 25 L6, 26 S1 (sacrum), 28 T13.
VERSE_LEVELS: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 6)},
    25: "L6",
    26: "S1",
    28: "T13",
}
LEVEL_IDS: dict[str, int] = {name: vid for vid, name in VERSE_LEVELS.items()}

# Head-to-foot order of all VerSe ids (T13 sits between T12 and L1, L6 between L5 and S1).
_ANATOMICAL_ORDER: tuple[int, ...] = tuple(range(1, 20)) + (28,) + tuple(range(20, 25)) + (25, 26)
_RANK = {vid: r for r, vid in enumerate(_ANATOMICAL_ORDER)}

#: Transitional (supernumerary) levels that should be flagged, never silently assumed.
TRANSITIONAL_IDS = frozenset({25, 28})


def level_name(verse_id: int) -> str:
    """VerSe id -> level name (``20 -> "L1"``). Raises ``ValueError`` for unknown ids."""
    try:
        return VERSE_LEVELS[int(verse_id)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"unknown VerSe vertebra id {verse_id!r}; expected one of {sorted(VERSE_LEVELS)}"
        ) from None


def level_id(name: str) -> int:
    """Level name -> VerSe id (``"L1" -> 20``; case-insensitive, ``"S"``/``"sacrum"`` mean S1)."""
    key = str(name).strip().upper()
    if key in ("S", "SACRUM", "S1"):
        return 26
    if key in LEVEL_IDS:
        return LEVEL_IDS[key]
    raise ValueError(f"unknown vertebra level {name!r}; expected a name like T11, T12, L1 .. L6, S1, T13")


def anatomical_rank(verse_id: int) -> int:
    """Position of a VerSe id in head-to-foot order (C1 = 0, ..., T12, T13, L1, ..., L5, L6, S1)."""
    try:
        return _RANK[int(verse_id)]
    except KeyError:
        raise ValueError(f"unknown VerSe vertebra id {verse_id!r}") from None


def sort_head_to_foot(verse_ids: Iterable[int]) -> list[int]:
    """VerSe ids sorted cranial to caudal."""
    return sorted((int(v) for v in verse_ids), key=anatomical_rank)


def standard_neighbour(verse_id: int, direction: int) -> int | None:
    """The standard (non-transitional) level just cranial (``direction=-1``: L1 -> T12, also T13 -> T12) or
    caudal (``+1``: T12 -> L1) of ``verse_id``; None beyond C1 / S1."""
    r = anatomical_rank(verse_id)
    side = [v for v in VERSE_LEVELS if v not in TRANSITIONAL_IDS and (anatomical_rank(v) - r) * direction > 0]
    return min(side, key=lambda v: abs(anatomical_rank(v) - r)) if side else None


# ---------------------------------------------------------------------------------------------
# Points: (N, 3) landmarks with an explicit space tag
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Points:
    """``(N, 3)`` landmark coordinates tagged with their space (``"voxel"`` ijk or ``"world"`` LPS mm).

    Validated on construction: finite floats, exactly 3 columns, known space.
    """

    coords: np.ndarray
    space: Space

    def __post_init__(self) -> None:
        arr = np.asarray(self.coords, dtype=np.float64)
        if arr.ndim == 1 and arr.size == 3:
            arr = arr[None, :]
        if arr.size == 0:
            arr = arr.reshape(0, 3)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"Points expects an (N, 3) array, got shape {np.shape(self.coords)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("Points got non-finite coordinates (NaN or Inf)")
        if self.space not in ("voxel", "world"):
            raise ValueError(f"Points space must be 'voxel' or 'world', got {self.space!r}")
        arr.setflags(write=False)
        object.__setattr__(self, "coords", arr)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def require(self, space: Space) -> np.ndarray:
        """The coordinates, after checking they are in ``space`` (raises ``ValueError`` otherwise)."""
        if self.space != space:
            raise ValueError(f"expected points in {space} space, got {self.space} space")
        return self.coords


# ---------------------------------------------------------------------------------------------
# Scan: array + geometry
# ---------------------------------------------------------------------------------------------
@dataclass
class Scan:
    """A 3D image (or label map) with its physical geometry.

    Attributes
    ----------
    array:
        ``(I, J, K)`` voxel array in SimpleITK index order.
    spacing:
        ``(3,)`` voxel size in mm along i, j, k.
    origin:
        ``(3,)`` world LPS position (mm) of voxel ``(0, 0, 0)``'s centre.
    direction:
        ``(3, 3)`` direction cosines; column ``c`` is the world direction of voxel axis ``c``.
    """

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = ""

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        where = f"{self.name}: " if self.name else ""
        if self.array.ndim != 3:
            raise ValueError(f"{where}expected a 3D image, got {self.array.ndim}D with shape {self.array.shape}")
        if not np.all(np.isfinite(self.spacing)) or np.any(self.spacing <= 0):
            raise ValueError(f"{where}spacing must be positive and finite, got {self.spacing.tolist()}")
        if not np.all(np.isfinite(self.origin)):
            raise ValueError(f"{where}origin must be finite, got {self.origin.tolist()}")
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-4):
            raise ValueError(f"{where}direction must be orthonormal, got {self.direction.tolist()}")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel ``(i, j, k, 1)`` -> world LPS mm."""
        aff = np.eye(4)
        aff[:3, :3] = self.direction * self.spacing[None, :]
        aff[:3, 3] = self.origin
        return aff

    def voxel_to_world(self, ijk: Points | np.ndarray) -> Points:
        """Voxel indices (may be fractional) -> world LPS mm. Input ``(N, 3)`` or ``(3,)``."""
        pts = ijk if isinstance(ijk, Points) else Points(ijk, "voxel")
        v = pts.require("voxel")
        return Points(v @ (self.direction * self.spacing[None, :]).T + self.origin, "world")

    def world_to_voxel(self, xyz: Points | np.ndarray) -> Points:
        """World LPS mm -> continuous voxel indices ``(N, 3)`` (round them to index the array)."""
        pts = xyz if isinstance(xyz, Points) else Points(xyz, "world")
        w = pts.require("world")
        m = self.direction * self.spacing[None, :]
        return Points(np.linalg.solve(m, (w - self.origin).T).T, "voxel")

    def same_geometry(self, other: "Scan", tol: float = 1e-3) -> bool:
        """True when both scans share shape, spacing, origin and direction (within ``tol`` mm/cosine)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Scan":
        """A scan on the same grid holding ``array`` (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"with_array expects shape {self.array.shape}, got {array.shape}")
        return Scan(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), name or self.name)

    def axis_of(self, world_axis: int) -> tuple[int, int]:
        """Which voxel axis runs closest to world axis ``world_axis`` (0=x L, 1=y P, 2=z S), and its sign.

        Returns ``(voxel_axis, sign)`` with ``sign=+1`` when increasing the voxel index moves towards
        +world axis (Left, Posterior, Superior).
        """
        col = int(np.argmax(np.abs(self.direction[world_axis, :])))
        return col, int(np.sign(self.direction[world_axis, col]))

    def orientation_code(self) -> str:
        """DICOM/ITK 3-letter code: the direction each voxel axis points *towards* (identity = ``"LPS"``).

        Computed by SimpleITK (the same rule :func:`reorient` uses), so oblique directions always get a
        valid code (each of L/R, A/P, S/I exactly once), never e.g. ``"LPR"``.
        """
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            tuple(float(d) for d in self.direction.ravel())
        )


# ---------------------------------------------------------------------------------------------
# Resampling and reorientation (any orientation, any anisotropy)
# ---------------------------------------------------------------------------------------------
def reorient(scan: Scan, code: str = "LPS") -> Scan:
    """Permute/flip voxel axes so they point towards ``code`` (e.g. ``"LPS"`` = identity direction).

    Pure axis permutation and flips (no interpolation); world positions of all voxels are unchanged.
    """
    return from_sitk(sitk.DICOMOrient(to_sitk(scan), code), name=scan.name)


def resample_to_spacing(
    scan: Scan,
    spacing: Sequence[float],
    *,
    is_label: bool = False,
    direction: np.ndarray | None = None,
    default_value: float = 0.0,
) -> Scan:
    """Resample ``scan`` to voxel size ``spacing`` (mm), covering the same physical extent.

    Works for any direction and any anisotropy: the output grid keeps the input direction (or the given
    ``direction``), its first voxel centre sits at the input's first voxel *corner* plus half the new
    voxel, so the physical field of view is preserved and world coordinates stay exact.
    Labels use nearest-neighbour, images B-spline (clamped to the input range to avoid overshoot).
    """
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise ValueError(f"target spacing must be positive, got {spacing.tolist()}")
    out_dir = scan.direction if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    # Physical bounding box of the input (voxel corners), expressed along the output axes.
    corners = np.array([[a, b, c] for a in (-0.5, scan.shape[0] - 0.5)
                        for b in (-0.5, scan.shape[1] - 0.5) for c in (-0.5, scan.shape[2] - 0.5)])
    world = scan.voxel_to_world(corners).coords
    local = (world - scan.origin) @ out_dir  # coordinates along output axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    size = np.maximum(1, np.round((hi - lo) / spacing).astype(int))
    origin = scan.origin + out_dir @ (lo + 0.5 * spacing)
    ref = Scan(np.zeros(1, dtype=np.uint8).reshape(1, 1, 1), spacing, origin, out_dir)
    return resample_like(scan, ref, size=tuple(int(s) for s in size), is_label=is_label, default_value=default_value)


def resample_like(
    scan: Scan,
    reference: Scan,
    *,
    size: tuple[int, int, int] | None = None,
    is_label: bool = False,
    default_value: float = 0.0,
) -> Scan:
    """Resample ``scan`` onto ``reference``'s grid (or a grid with ``reference``'s geometry and ``size``)."""
    img = to_sitk(scan)
    if not is_label and img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        img = sitk.Cast(img, sitk.sitkFloat32)
    rs = sitk.ResampleImageFilter()
    rs.SetOutputSpacing(tuple(float(s) for s in reference.spacing))
    rs.SetOutputOrigin(tuple(float(o) for o in reference.origin))
    rs.SetOutputDirection(tuple(float(d) for d in reference.direction.ravel()))
    rs.SetSize(tuple(int(s) for s in (size or reference.shape)))
    rs.SetDefaultPixelValue(float(default_value))
    rs.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkBSpline)
    out = from_sitk(rs.Execute(img), name=scan.name)
    if not is_label:
        a = np.asarray(scan.array)
        lo, hi = float(a.min()), float(a.max())
        out.array = np.clip(out.array, min(lo, default_value), max(hi, default_value)).astype(np.float32)
    return out


def from_sitk(img: sitk.Image, name: str = "") -> Scan:
    """Convert a 3D SimpleITK image to a :class:`Scan` (array transposed to ``(i, j, k)``)."""
    if img.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {img.GetDimension()}D of size {img.GetSize()}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    return Scan(
        np.ascontiguousarray(arr),
        np.array(img.GetSpacing()),
        np.array(img.GetOrigin()),
        np.array(img.GetDirection()).reshape(3, 3),
        name=name,
    )


def to_sitk(scan: Scan) -> sitk.Image:
    """Convert a :class:`Scan` to a SimpleITK image with the same geometry."""
    arr = np.asarray(scan.array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in scan.spacing))
    img.SetOrigin(tuple(float(o) for o in scan.origin))
    img.SetDirection(tuple(float(d) for d in scan.direction.ravel()))
    return img


# ---------------------------------------------------------------------------------------------
# Vertebra records
# ---------------------------------------------------------------------------------------------
@dataclass
class Vertebra:
    """One vertebra: VerSe id, world centroid (LPS mm), and optional extras.

    ``mask`` (bool, on the scan grid) and ``cls`` / ``confidence`` (class index and its certainty) are
    optional; ``flags`` collects human-readable warnings (e.g. ``"transitional"``, ``"cut_by_fov"``).
    """

    label: int
    centroid_world: np.ndarray
    confidence: float = 1.0
    mask: np.ndarray | None = None
    cls: int | None = None
    cls_confidence: float = 1.0
    flags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        level_name(self.label)  # validates
        self.label = int(self.label)
        c = np.asarray(self.centroid_world, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(c)):
            raise ValueError(f"vertebra {self.level}: centroid must be finite, got {c.tolist()}")
        self.centroid_world = c

    @property
    def level(self) -> str:
        return level_name(self.label)


@dataclass
class VertebraVerdict:
    """Stage-2 result for one vertebra: class probabilities (in the model's class order), the fraction
    of attribution inside the vertebra (``evidence_inside``), flags and the scan's contrast novelty
    (``contrast_novelty``: distance to the nearest training scan's contrast signature, NaN when not
    measured; ``stage2_classify.domain``) and, when stage 2 found the vertebral body, that body's centroid
    (``centroid_world``, world LPS mm; None: stage 2 kept the centroid it was given)."""

    label: int
    probabilities: np.ndarray
    evidence_inside: float = float("nan")
    flags: list[str] = field(default_factory=list)
    contrast_novelty: float = float("nan")
    centroid_world: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.centroid_world is not None:
            c = np.asarray(self.centroid_world, dtype=np.float64).reshape(3)
            if not np.all(np.isfinite(c)):
                raise ValueError(f"verdict for label {self.label}: centroid must be finite, got {c.tolist()}")
            self.centroid_world = c


def centroids_from_labelmap(labels: Scan, ids: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """World LPS centroids (mm) of every non-zero label in a label map: ``{verse_id: (3,)}``.

    Unknown (non-VerSe) labels are skipped when ``ids`` is None.
    """
    arr = np.asarray(labels.array)
    present = np.unique(arr[arr > 0]).astype(int)
    if ids is None:
        ids = [int(v) for v in present if int(v) in VERSE_LEVELS]
    out: dict[int, np.ndarray] = {}
    for vid in ids:
        idx = np.argwhere(arr == vid)
        if len(idx) == 0:
            continue
        out[int(vid)] = labels.voxel_to_world(idx.mean(axis=0)).coords[0]
    return out


def vertebrae_from_labelmap(labels: Scan, with_masks: bool = False) -> list[Vertebra]:
    """Vertebra records (head to foot) for each VerSe label present in ``labels``."""
    cents = centroids_from_labelmap(labels)
    arr = np.asarray(labels.array)
    return [
        Vertebra(vid, cents[vid], mask=(arr == vid) if with_masks else None)
        for vid in sort_head_to_foot(cents)
    ]


__all__ = [
    "VERSE_LEVELS",
    "LEVEL_IDS",
    "TRANSITIONAL_IDS",
    "Points",
    "Scan",
    "Vertebra",
    "VertebraVerdict",
    "SpinepipeInputError",
    "from_sitk",
    "to_sitk",
    "reorient",
    "resample_to_spacing",
    "resample_like",
    "level_name",
    "level_id",
    "anatomical_rank",
    "sort_head_to_foot",
    "centroids_from_labelmap",
    "vertebrae_from_labelmap",
]
