"""Lesion simulator for sagittal spine MRI: corner inflammatory / fat lesions, hard negatives, distractors.

Works on synthetic *and* real scans: it only needs the image and the vertebral-body label map
(VerSe ids). Lesions follow the ASAS-MRI working group definitions for axial spondyloarthritis:

* **Corner inflammatory lesion (CIL)**: bone-marrow oedema at a vertebral corner (anterior more often
  than posterior; superior or inferior endplate corner), often triangular in the sagittal plane,
  **bright** on fluid-sensitive images (T2, STIR, Dixon water) and **dark** on T1.
* **Corner fat lesion (CFL)**: fat metaplasia at a corner, **bright** on T1 and T2-TSE, **dark** on
  fat-suppressed images (STIR, Dixon water).
* A lesion counts when it is seen on **at least 2 consecutive sagittal slices**; it is "large" when it
  reaches >= 25 % of the endplate depth (antero-posterior depth of the body).

Each lesion is built in the local frame of its vertebra (SI from world z, AP from world y, both
projected into the sagittal plane and rotated by the tilt of the body found by PCA of its mask), as a
soft weight map (shape + irregular edge + Gaussian partial volume) that is **clipped to the vertebra's
own mask**, then blended into the image with a varied, sometimes subtle, contrast ratio relative to the
vertebra's marrow (median) intensity and a multiplicative smooth texture.

Other lesion families (``LesionConfig.families``; default ``("corner",)`` only) stand in for lesions the
simulator's default does not draw, as a test of generalization and for training on a wider variety:

* ``endplate``: a band along the superior or inferior endplate over much of its depth (Andersson-type
  inflammation, Modic-type oedema or fat bands);
* ``focal``: an ellipsoidal lesion inside the body, away from the corners (focal oedema, haemangioma-like
  fat);
* ``diffuse``: smooth patches over a large share of the body (diffuse oedema or fatty marrow).

They use the same contrast physics (which sequence shows which kind bright or dark) and the same blending.

Hard negatives that must *not* change a vertebra's class are also inserted:

* label 3: sub-threshold spots inside normal vertebrae (one sagittal slice only, small, low contrast);
* label 4: lesion-like distractors just *outside* the bodies (disc next to an endplate, soft tissue
  anterior or posterior to the body), kept at least ``distractor_gap_vox`` voxels from every body mask.

Results on real scans with inserted lesions are **semi-synthetic** and must be reported as such.
"""
from __future__ import annotations

import json
import logging
import shutil
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from data_prep.dataset import IMAGE_CONTRASTS, parse_contrast
from data_prep.errors import SpinepipeInputError
from data_prep.io import atomic_path, read_image, read_labelmap, write_csv, write_image, write_text
from data_prep.scan import VERSE_LEVELS, Scan, level_name, sort_head_to_foot

log = logging.getLogger(__name__)

#: Per-vertebra classes (index = class id used in tables and ``vertebra_labels.csv``).
CLASSES: tuple[str, ...] = ("normal", "inflammation", "fat")
#: Image contrasts understood by the simulator (the pipeline's :data:`data_prep.dataset.IMAGE_CONTRASTS`).
CONTRASTS: tuple[str, ...] = IMAGE_CONTRASTS

#: Values of the lesion label map.
NO_LESION, INFLAMMATION, FAT, HARD_NEGATIVE, DISTRACTOR = 0, 1, 2, 3, 4
LESION_LABEL_NAMES: dict[int, str] = {
    NO_LESION: "none",
    INFLAMMATION: "inflammation",
    FAT: "fat",
    HARD_NEGATIVE: "hard_negative",
    DISTRACTOR: "distractor",
}

#: Sign of the lesion contrast (+1 brighter, -1 darker than marrow) per (lesion kind, contrast).
POLARITY: dict[tuple[str, str], int] = {
    ("inflammation", "t1"): -1,
    ("inflammation", "t2"): +1,
    ("inflammation", "stir"): +1,
    ("inflammation", "water"): +1,
    ("fat", "t1"): +1,
    ("fat", "t2"): +1,
    ("fat", "stir"): -1,
    ("fat", "water"): -1,
}

#: Contrast of the real cohorts in ``../shared/data`` (inferred from the folder name).
COHORT_CONTRAST: dict[str, str] = {"myosegmentum": "water", "chu2015": "t2"}

DISTRACTOR_SITES: tuple[str, ...] = ("disc", "anterior", "posterior")
#: Lesion families (see the module docstring); ``corner`` is the ASAS corner lesion and the default.
LESION_FAMILIES: tuple[str, ...] = ("corner", "endplate", "focal", "diffuse")


# ---------------------------------------------------------------------------------------------
# Configuration and result
# ---------------------------------------------------------------------------------------------
@dataclass
class LesionConfig:
    """Parameters of the simulator (all distances in mm, ranges are ``(low, high)`` uniform draws).

    Class assignment
        ``class_probs``: probability of each class in :data:`CLASSES` per vertebra (sums to 1).
    Lesion placement and shape
        ``anterior_prob``: P(anterior corner) (CIL/CFL are more often anterior);
        ``superior_prob``: P(superior endplate corner);
        ``triangle_prob``: P(triangular sagittal shape), otherwise a rounded quarter-ellipse;
        ``second_lesion_prob``: P(a second corner lesion of the same class in an affected vertebra);
        ``depth_fraction``: AP size of the lesion as a fraction of the endplate depth;
        ``aspect``: SI height / AP size of the lesion;
        ``lr_extent_mm``: left-right extent (converted to >= ``min_slices`` sagittal slices);
        ``min_slices`` / ``min_voxels_per_slice``: a lesion must show on that many consecutive
        sagittal slices with at least that many labelled voxels each (ASAS: >= 2 slices);
        ``large_fraction``: "large" when the lesion reaches this fraction of the endplate depth;
        ``edge_irregularity``: amplitude of the smooth noise added to the shape function;
        ``families``: lesion families drawn from (uniformly, per lesion) among :data:`LESION_FAMILIES`;
        with the single default ``("corner",)`` nothing is drawn, so copies made before this option
        existed are reproduced byte for byte;
        ``endplate_thickness_fraction`` / ``endplate_span_fraction``: SI thickness of an endplate band
        (fraction of the body height) and its AP span (fraction of the endplate depth);
        ``focal_radius_mm``: radius of a focal lesion (each axis varied by 0.8-1.25x);
        ``diffuse_fraction``: share of the body covered by a diffuse lesion's patches.
    Appearance (ratio = lesion intensity / marrow median of the vertebra)
        ``inflammation_bright`` (STIR / water), ``inflammation_t2`` (T2 without fat suppression),
        ``inflammation_dark`` (T1), ``fat_bright`` (T1 / T2-TSE), ``fat_dark`` (STIR / water);
        ``subtle_prob``: P(drawing from the quarter of the range closest to 1, i.e. a subtle lesion);
        ``min_cnr``: ``None`` (default: ratios as drawn) or a visibility floor: a drawn ratio whose lesion
        level lies closer to the marrow median than ``min_cnr`` robust standard deviations of the
        vertebra's marrow (1.4826 x MAD) is moved out to that distance, same polarity. On a noisy,
        heterogeneous marrow (Dixon water) many drawn ratios are otherwise faint against the marrow's own
        variation, yet labelled as lesions. Every lesion row reports its measured ``cnr`` either way;
        ``texture_strength`` / ``texture_sigma_mm``: multiplicative smooth noise (std, correlation);
        ``pv_sigma_mm``: Gaussian partial-volume smoothing of the weight map (soft edges).
    Hard negatives
        ``hard_negative_rate``: P(a sub-threshold spot in a normal vertebra) (one slice, low contrast:
        ``hard_negative_ratio`` with inflammation polarity, radius ``hard_negative_radius_mm``);
        ``distractor_rate``: P(a lesion-like blob outside a vertebra, next to it), at ``distractor_sites``,
        ratio ``distractor_ratio``, radius ``distractor_radius_mm``, kept ``distractor_gap_vox`` voxels
        away from every vertebral body mask.
    Robustness
        ``max_tries``: attempts per lesion before giving up (the vertebra then stays normal, logged);
        ``min_body_voxels``: smaller bodies (cut by the field of view) never get lesions.
    """

    class_probs: tuple[float, ...] = (0.6, 0.25, 0.15)
    anterior_prob: float = 0.75
    superior_prob: float = 0.5
    triangle_prob: float = 0.65
    second_lesion_prob: float = 0.2
    depth_fraction: tuple[float, float] = (0.15, 0.45)
    aspect: tuple[float, float] = (0.6, 1.3)
    lr_extent_mm: tuple[float, float] = (4.0, 14.0)
    min_slices: int = 2
    min_voxels_per_slice: int = 3
    large_fraction: float = 0.25
    edge_irregularity: float = 0.15
    families: tuple[str, ...] = ("corner",)
    endplate_thickness_fraction: tuple[float, float] = (0.08, 0.3)
    endplate_span_fraction: tuple[float, float] = (0.5, 1.0)
    focal_radius_mm: tuple[float, float] = (3.0, 7.0)
    diffuse_fraction: tuple[float, float] = (0.3, 0.7)
    inflammation_bright: tuple[float, float] = (1.15, 2.0)
    inflammation_t2: tuple[float, float] = (1.10, 1.6)
    inflammation_dark: tuple[float, float] = (0.5, 0.87)
    fat_bright: tuple[float, float] = (1.25, 2.0)
    fat_dark: tuple[float, float] = (0.35, 0.8)
    subtle_prob: float = 0.2
    min_cnr: float | None = None
    texture_strength: tuple[float, float] = (0.04, 0.12)
    texture_sigma_mm: float = 1.5
    pv_sigma_mm: float = 1.0
    hard_negative_rate: float = 0.3
    hard_negative_ratio: tuple[float, float] = (1.05, 1.2)
    hard_negative_radius_mm: tuple[float, float] = (1.0, 2.5)
    distractor_rate: float = 0.2
    distractor_sites: tuple[str, ...] = DISTRACTOR_SITES
    distractor_ratio: tuple[float, float] = (1.3, 2.2)
    distractor_radius_mm: tuple[float, float] = (2.0, 4.5)
    distractor_gap_vox: int = 1
    max_tries: int = 12
    min_body_voxels: int = 50

    def __post_init__(self) -> None:
        probs = np.asarray(self.class_probs, dtype=float)
        if probs.shape != (len(CLASSES),) or np.any(probs < 0) or not np.isclose(probs.sum(), 1.0):
            raise SpinepipeInputError(
                None, f"LesionConfig.class_probs must be {len(CLASSES)} non-negative numbers summing to 1, "
                f"got {list(self.class_probs)}"
            )
        for name in ("anterior_prob", "superior_prob", "triangle_prob", "second_lesion_prob", "subtle_prob",
                     "hard_negative_rate", "distractor_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SpinepipeInputError(None, f"LesionConfig.{name} must lie in [0, 1], got {v}")
        for name in ("depth_fraction", "aspect", "lr_extent_mm", "inflammation_bright", "inflammation_t2",
                     "inflammation_dark", "fat_bright", "fat_dark", "texture_strength", "hard_negative_ratio",
                     "hard_negative_radius_mm", "distractor_ratio", "distractor_radius_mm",
                     "endplate_thickness_fraction", "endplate_span_fraction", "focal_radius_mm", "diffuse_fraction"):
            lo, hi = getattr(self, name)
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo <= hi):
                raise SpinepipeInputError(None, f"LesionConfig.{name} must be a (low, high) range, got {(lo, hi)}")
        bad = [s for s in self.distractor_sites if s not in DISTRACTOR_SITES]
        if bad or not self.distractor_sites:
            raise SpinepipeInputError(
                None, f"LesionConfig.distractor_sites must come from {DISTRACTOR_SITES}, got {bad}"
            )
        bad = [f for f in self.families if f not in LESION_FAMILIES]
        if bad or not self.families or isinstance(self.families, str):
            raise SpinepipeInputError(
                None, f"LesionConfig.families must be a non-empty list from {LESION_FAMILIES}, got {self.families!r}"
            )
        for name in ("endplate_thickness_fraction", "endplate_span_fraction", "diffuse_fraction"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise SpinepipeInputError(None, f"LesionConfig.{name} must be a (low, high) range in (0, 1], got {(lo, hi)}")
        if self.focal_radius_mm[0] <= 0:
            raise SpinepipeInputError(None, f"LesionConfig.focal_radius_mm must be positive, got {self.focal_radius_mm}")
        if self.min_cnr is not None and not (np.isfinite(self.min_cnr) and self.min_cnr > 0):
            raise SpinepipeInputError(None, "LesionConfig.min_cnr must be None or a positive number, "
                                      f"got {self.min_cnr}")
        if self.min_slices < 1 or self.distractor_gap_vox < 1 or self.max_tries < 1:
            raise SpinepipeInputError(None, "LesionConfig: min_slices, distractor_gap_vox and max_tries must be >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class LesionResult:
    """Output of :func:`insert_lesions`.

    ``image``: modified float32 copy of the input; ``lesions``: uint8 label map on the same grid
    (see :data:`LESION_LABEL_NAMES`); ``table``: one row per vertebra present (head to foot).
    """

    image: Scan
    lesions: Scan
    table: pd.DataFrame

    @property
    def classes(self) -> dict[int, int]:
        """``{verse_id: class index}``."""
        return {int(r.label): int(r["class"]) for _, r in self.table.iterrows()}


# ---------------------------------------------------------------------------------------------
# Class assignment
# ---------------------------------------------------------------------------------------------
def class_index(cls: int | str) -> int:
    """Class name or index -> index into :data:`CLASSES` (raises ``SpinepipeInputError``)."""
    if isinstance(cls, (int, np.integer)) and 0 <= int(cls) < len(CLASSES):
        return int(cls)
    if isinstance(cls, str) and cls.strip().lower() in CLASSES:
        return CLASSES.index(cls.strip().lower())
    raise SpinepipeInputError(None, f"unknown lesion class {cls!r}; expected one of {CLASSES} or an index")


def assign_classes(
    labels: Sequence[int], rng: np.random.Generator, config: LesionConfig | None = None
) -> dict[int, int]:
    """Draw a class index per vertebra (``{verse_id: class}``) from ``config.class_probs``, head to foot."""
    config = config or LesionConfig()
    p = np.asarray(config.class_probs, dtype=float)
    p = p / p.sum()
    return {int(v): int(rng.choice(len(CLASSES), p=p)) for v in sort_head_to_foot(labels)}


# ---------------------------------------------------------------------------------------------
# Geometry: local frame of each vertebra
# ---------------------------------------------------------------------------------------------
def _sagittal_frame(image: Scan) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(LR voxel axis, sagittal normal n, SI unit vector (superior), AP unit vector (posterior)), world."""
    lr_axis, _ = image.axis_of(0)
    n = image.direction[:, lr_axis].astype(float)
    n = n / np.linalg.norm(n)
    z = np.array([0.0, 0.0, 1.0]) - n[2] * n
    if np.linalg.norm(z) < 0.3:
        raise SpinepipeInputError(image.name or None, "cannot find a sagittal plane: the left-right voxel axis runs "
                                  "along world z")
    si = z / np.linalg.norm(z)
    ap = np.cross(si, n)
    ap = ap / np.linalg.norm(ap)
    if ap[1] < 0:
        ap = -ap
    return lr_axis, n, si, ap


@dataclass
class _Body:
    label: int
    crop: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, crop
    u: np.ndarray  # AP coordinate (mm, + posterior) relative to the centroid, crop grid
    v: np.ndarray  # SI coordinate (mm, + superior)
    x: np.ndarray  # LR coordinate (mm along the sagittal normal)
    lr_axis: int
    marrow: float
    marrow_sd: float  # robust (1.4826 x MAD) standard deviation of the marrow intensities
    depth: float
    height: float
    tilt_deg: float
    slices: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # crop slice indices with mask
    central: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # central slices (large area)
    soft: np.ndarray | None = None  # soft version of the mask (0 outside), fades lesions at the cortex


def _crop_box(mask: np.ndarray, pad_vox: np.ndarray) -> tuple[slice, slice, slice]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad_vox, 0)
    hi = np.minimum(idx.max(0) + pad_vox + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _world_grid(scan: Scan, crop: tuple[slice, slice, slice]) -> np.ndarray:
    """World coordinates ``(ni, nj, nk, 3)`` of the voxels of a crop."""
    rng_ = [np.arange(s.start, s.stop, dtype=float) for s in crop]
    ii, jj, kk = np.meshgrid(*rng_, indexing="ij")
    m = scan.direction * scan.spacing[None, :]
    return (ii[..., None] * m[:, 0] + jj[..., None] * m[:, 1] + kk[..., None] * m[:, 2]) + scan.origin


def _neighbour_axis(cents: dict[int, np.ndarray], vid: int) -> np.ndarray | None:
    order = sort_head_to_foot(cents)
    pos = order.index(vid)
    above = cents[order[pos - 1]] if pos > 0 else cents[vid]
    below = cents[order[pos + 1]] if pos + 1 < len(order) else cents[vid]
    d = above - below
    return None if np.linalg.norm(d) < 1e-6 else d / np.linalg.norm(d)


def _build_bodies(image: Scan, vertebrae: Scan, pad_mm: float, min_voxels: int, pv_sigma_mm: float = 1.0
                  ) -> dict[int, _Body]:
    lab = np.asarray(vertebrae.array)
    img = np.asarray(image.array, dtype=np.float32)
    lr_axis, n, si0, ap0 = _sagittal_frame(image)
    ids = [int(v) for v in np.unique(lab[lab > 0]) if int(v) in VERSE_LEVELS]
    pad_vox = np.ceil(pad_mm / image.spacing).astype(int)
    cents: dict[int, np.ndarray] = {}
    prelim = {}
    for vid in ids:
        m = lab == vid
        crop = _crop_box(m, pad_vox)
        mc = m[crop]
        w = _world_grid(image, crop)
        c = w[mc].mean(axis=0)
        cents[vid] = c
        prelim[vid] = (crop, mc, w, c)
    bodies: dict[int, _Body] = {}
    for vid in sort_head_to_foot(ids):
        crop, mc, w, c = prelim[vid]
        if mc.sum() < min_voxels:
            log.info("vertebra %s: only %d voxels, no lesion will be placed", level_name(vid), int(mc.sum()))
        rel = w - c
        # PCA of the body in the sagittal plane -> tilt of the endplates (lordosis)
        pts = rel[mc]
        p2 = np.stack([pts @ ap0, pts @ si0], axis=1)
        si, ap, tilt = si0, ap0, 0.0
        if len(p2) >= 10:
            cov = np.cov(p2.T)
            evals, evecs = np.linalg.eigh(cov)
            ratio = evals[1] / max(evals[0], 1e-9)
            # eigenvector closest to SI
            k = int(np.argmax(np.abs(evecs[1, :])))
            e = evecs[:, k] * np.sign(evecs[1, k])
            ang = float(np.degrees(np.arctan2(e[0], e[1])))  # rotation of SI towards AP
            if ratio < 1.15:  # near-isotropic section: PCA tilt unreliable, use the spine axis
                ax = _neighbour_axis(cents, vid)
                if ax is not None:
                    ang = float(np.degrees(np.arctan2(ax @ ap0, ax @ si0)))
                else:
                    ang = 0.0
            tilt = float(np.clip(ang, -40.0, 40.0))
            t = np.radians(tilt)
            si = np.cos(t) * si0 + np.sin(t) * ap0
            ap = np.cross(si, n)
            ap = ap / np.linalg.norm(ap)
            if ap @ ap0 < 0:
                ap = -ap
        u, v, x = rel @ ap, rel @ si, rel @ n
        area = mc.sum(axis=tuple(a for a in range(3) if a != lr_axis))
        slices = np.flatnonzero(area > 0)
        central = np.flatnonzero(area >= 0.6 * area.max()) if area.max() > 0 else slices
        cm = _take(mc, central, lr_axis)
        uu, vv = _take(u, central, lr_axis)[cm], _take(v, central, lr_axis)[cm]
        depth = float(np.percentile(uu, 99) - np.percentile(uu, 1)) if uu.size else 0.0
        height = float(np.percentile(vv, 99) - np.percentile(vv, 1)) if vv.size else 0.0
        marrow = float(np.median(img[crop][mc])) if mc.any() else 0.0
        marrow_sd = 1.4826 * float(np.median(np.abs(img[crop][mc] - marrow))) if mc.any() else 0.0
        if pv_sigma_mm > 0:
            inner = ndi.binary_erosion(mc)
            soft = np.clip(2.0 * ndi.gaussian_filter(inner.astype(np.float32), pv_sigma_mm / image.spacing), 0, 1) * mc
        else:
            soft = mc.astype(np.float32)
        bodies[vid] = _Body(vid, crop, mc, u, v, x, lr_axis, marrow, marrow_sd, max(depth, 1e-3), max(height, 1e-3),
                            tilt, slices, central, soft.astype(np.float32))
    return bodies


def _take(a: np.ndarray, idx, axis: int) -> np.ndarray:
    return np.take(a, idx, axis=axis)


def _sl(axis: int, s: int) -> tuple:
    out: list = [slice(None)] * 3
    out[axis] = s
    return tuple(out)


def _smooth_noise(shape: tuple[int, ...], sigma_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="nearest")
    sd = float(z.std())
    return z / sd if sd > 0 else z


def _draw(rng: np.random.Generator, rng_range: tuple[float, float]) -> float:
    lo, hi = rng_range
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def _ratio_range(kind: str, contrast: str, cfg: LesionConfig) -> tuple[float, float]:
    pol = POLARITY[(kind, contrast)]
    if kind == "inflammation":
        if pol < 0:
            return cfg.inflammation_dark
        return cfg.inflammation_t2 if contrast == "t2" else cfg.inflammation_bright
    return cfg.fat_bright if pol > 0 else cfg.fat_dark


def _draw_ratio(kind: str, contrast: str, cfg: LesionConfig, rng: np.random.Generator,
                b: _Body | None = None) -> tuple[float, bool]:
    """``(ratio, subtle)`` for a lesion of ``kind`` on ``contrast``; ``cfg.min_cnr`` floors it against body ``b``'s
    marrow (no floor without ``b``: ``bench/stage2_ceiling.py`` samples the drawn ratios alone)."""
    lo, hi = _ratio_range(kind, contrast, cfg)
    subtle = bool(rng.random() < cfg.subtle_prob)
    bright = POLARITY[(kind, contrast)] > 0
    if subtle:  # the quarter of the range closest to 1
        q = (hi - lo) / 4.0
        lo, hi = (lo, lo + q) if bright else (hi - q, hi)
    ratio = _draw(rng, (lo, hi))
    if cfg.min_cnr is not None and b is not None and b.marrow > 0:  # the floor: no extra draw; none on a flat marrow
        step = cfg.min_cnr * b.marrow_sd / b.marrow
        ratio = max(ratio, 1.0 + step) if bright else min(ratio, max(1.0 - step, 0.05))
    return ratio, subtle


def _runs(counts: np.ndarray, min_count: int) -> int:
    """Longest run of consecutive entries with ``counts >= min_count``."""
    best = cur = 0
    for c in counts:
        cur = cur + 1 if c >= min_count else 0
        best = max(best, cur)
    return best


# ---------------------------------------------------------------------------------------------
# Lesion shapes (weight maps on a body's crop)
# ---------------------------------------------------------------------------------------------
def _corner_edges(b: _Body, s: int, anterior: bool, superior: bool) -> tuple[float, float] | None:
    m2 = b.mask[_sl(b.lr_axis, s)]
    if m2.sum() < 3:
        return None
    u2, v2 = b.u[_sl(b.lr_axis, s)][m2], b.v[_sl(b.lr_axis, s)][m2]
    u_edge = float(np.percentile(u2, 1 if anterior else 99))
    v_edge = float(np.percentile(v2, 99 if superior else 1))
    return u_edge, v_edge


def _lr_slab(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
             ) -> tuple[list[int], int, int] | None:
    """Sagittal slices of one lesion (``lr_extent_mm`` around a central slice): ``(slices, start, n)``."""
    lr_sp = float(spacing[b.lr_axis])
    n_sl = max(cfg.min_slices, int(round(_draw(rng, cfg.lr_extent_mm) / lr_sp)))
    if len(b.central) == 0:
        return None
    centre = int(rng.choice(b.central))
    lo_s, hi_s = int(b.slices.min()), int(b.slices.max())
    start = int(np.clip(centre - n_sl // 2, lo_s, max(lo_s, hi_s - n_sl + 1)))
    return [s for s in range(start, start + n_sl) if lo_s <= s <= hi_s], start, n_sl


def _finish_weight(b: _Body, w: np.ndarray, cfg: LesionConfig, spacing: np.ndarray, info: dict
                   ) -> tuple[np.ndarray, dict] | None:
    """Partial-volume blur, clip to the body, check the ASAS slice rule; ``(w, info)`` or None."""
    if cfg.pv_sigma_mm > 0:
        w = ndi.gaussian_filter(w, sigma=cfg.pv_sigma_mm / spacing, mode="constant")
    w *= b.soft if b.soft is not None else b.mask
    lab = w >= 0.5
    counts = lab.sum(axis=tuple(a for a in range(3) if a != b.lr_axis))
    if _runs(counts, cfg.min_voxels_per_slice) < cfg.min_slices:
        return None
    uu = b.u[lab]
    reach = float(uu.max() - uu.min() + spacing.min()) / b.depth
    return w, {
        **info,
        "depth_fraction": round(reach, 3),
        "large": bool(reach >= cfg.large_fraction),
        "n_slices": int(np.count_nonzero(counts >= cfg.min_voxels_per_slice)),
        "n_voxels": int(lab.sum()),
    }


def _slab_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray, anterior: bool,
                 superior: bool, shape) -> np.ndarray | None:
    """Weight map (crop grid, before blur and clipping) of a lesion drawn slice by slice over an LR slab.

    ``shape(sl, edges, taper, noise)`` returns the lesion (bool) on sagittal slice ``sl`` given the slice's
    corner ``edges`` (``(u, v)`` of the chosen corner), the taper (1 at the slab's centre, 0.7 at its ends)
    and the slice's edge noise."""
    slab = _lr_slab(b, rng, cfg, spacing)
    if slab is None:
        return None
    chosen, start, n_sl = slab
    noise = _smooth_noise(b.mask.shape, 2.0 / spacing, rng)
    w = np.zeros(b.mask.shape, dtype=np.float32)
    half = max(n_sl / 2.0, 1.0)
    for s in chosen:
        edges = _corner_edges(b, s, anterior, superior)
        if edges is None:
            continue
        taper = 1.0 - 0.3 * ((s - (start + (n_sl - 1) / 2.0)) / half) ** 2
        sl = _sl(b.lr_axis, s)
        w[sl] = shape(sl, edges, taper, noise[sl]).astype(np.float32)
    return w


def _corner_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
                   ) -> tuple[np.ndarray, dict] | None:
    """Soft weight map (crop grid, 0..1, zero outside the body) of one corner lesion, or None."""
    anterior = bool(rng.random() < cfg.anterior_prob)
    superior = bool(rng.random() < cfg.superior_prob)
    triangle = bool(rng.random() < cfg.triangle_prob)
    frac = _draw(rng, cfg.depth_fraction)
    a_mm = frac * b.depth
    b_mm = a_mm * _draw(rng, cfg.aspect)

    def shape(sl, edges, taper, noise):
        A, B = a_mm * taper, b_mm * taper
        aa = (b.u[sl] - edges[0]) * (1.0 if anterior else -1.0)
        bb = (edges[1] - b.v[sl]) * (1.0 if superior else -1.0)
        f = (aa / A + bb / B) if triangle else np.sqrt(np.maximum(aa, 0) ** 2 / A**2 + np.maximum(bb, 0) ** 2 / B**2)
        f = f + cfg.edge_irregularity * noise
        return (f <= 1.0) & (aa >= -A) & (bb >= -B)

    w = _slab_weight(b, rng, cfg, spacing, anterior, superior, shape)
    if w is None:
        return None
    return _finish_weight(b, w, cfg, spacing, {
        "corner": f"{'anterior' if anterior else 'posterior'}-{'superior' if superior else 'inferior'}",
        "shape": "triangle" if triangle else "rounded",
        "size_fraction": round(frac, 3),
    })


def _endplate_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
                     ) -> tuple[np.ndarray, dict] | None:
    """A band along one endplate: SI thickness a fraction of the height, AP span a fraction of the depth."""
    superior = bool(rng.random() < cfg.superior_prob)
    thick = _draw(rng, cfg.endplate_thickness_fraction) * b.height
    span = _draw(rng, cfg.endplate_span_fraction) * b.depth
    centre_u = _draw(rng, (-0.5, 0.5)) * (b.depth - span)  # the band stays within the endplate's depth

    def shape(sl, edges, taper, noise):
        bb = (edges[1] - b.v[sl]) * (1.0 if superior else -1.0)  # depth below the endplate (mm)
        aa = np.abs(b.u[sl] - centre_u) / (0.5 * span * taper)
        f = bb / (thick * taper) + cfg.edge_irregularity * noise
        return (f <= 1.0) & (aa <= 1.0) & (bb >= -thick)

    w = _slab_weight(b, rng, cfg, spacing, True, superior, shape)
    if w is None:
        return None
    return _finish_weight(b, w, cfg, spacing, {
        "corner": f"{'superior' if superior else 'inferior'}-endplate", "shape": "endplate",
        "size_fraction": round(span / b.depth, 3),
    })


def _focal_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
                  ) -> tuple[np.ndarray, dict] | None:
    """An ellipsoid inside the body, its centre farther from the body's border than its largest radius + 1 mm
    (else at the body's deepest point)."""
    r = _draw(rng, cfg.focal_radius_mm)
    ru, rv = r * _draw(rng, (0.8, 1.25)), r * _draw(rng, (0.8, 1.25))
    rx = max(r * _draw(rng, (0.8, 1.25)), 1.01 * float(spacing[b.lr_axis]))  # >= 2 sagittal slices
    depth_in = ndi.distance_transform_edt(b.mask, sampling=spacing)
    central = np.zeros_like(b.mask)  # the body on its central sagittal slices
    idx: list = [slice(None)] * 3
    idx[b.lr_axis] = b.central
    central[tuple(idx)] = b.mask[tuple(idx)]
    cand = np.argwhere(central & (depth_in >= max(ru, rv, rx) + 1.0))  # the whole ellipsoid inside
    if len(cand) == 0:  # a small body: as deep as it goes
        cand = np.argwhere(depth_in == depth_in.max()) if depth_in.max() > 0 else cand
    if len(cand) == 0:
        return None
    p = tuple(cand[rng.integers(len(cand))])
    noise = _smooth_noise(b.mask.shape, 2.0 / spacing, rng)
    f = (((b.u - b.u[p]) / ru) ** 2 + ((b.v - b.v[p]) / rv) ** 2 + ((b.x - b.x[p]) / rx) ** 2
         + cfg.edge_irregularity * noise)
    w = (f <= 1.0).astype(np.float32)
    return _finish_weight(b, w, cfg, spacing, {"corner": "central", "shape": "focal",
                                                "size_fraction": round(2 * ru / b.depth, 3)})


def _diffuse_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
                    ) -> tuple[np.ndarray, dict] | None:
    """Smooth patches (3 mm correlation) over a drawn share of the body."""
    frac = _draw(rng, cfg.diffuse_fraction)
    noise = _smooth_noise(b.mask.shape, 3.0 / spacing, rng)
    inside = noise[b.mask]
    if inside.size == 0:
        return None
    w = ((noise >= np.quantile(inside, 1.0 - frac)) & b.mask).astype(np.float32)
    return _finish_weight(b, w, cfg, spacing, {"corner": "diffuse", "shape": "diffuse",
                                                "size_fraction": round(frac, 3)})


_FAMILY_WEIGHT = {"corner": _corner_weight, "endplate": _endplate_weight, "focal": _focal_weight,
                  "diffuse": _diffuse_weight}


def _lesion_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray
                   ) -> tuple[np.ndarray, dict] | None:
    """One lesion of a family drawn from ``cfg.families`` (no draw when there is only one)."""
    family = cfg.families[0] if len(cfg.families) == 1 else str(rng.choice(list(cfg.families)))
    res = _FAMILY_WEIGHT[family](b, rng, cfg, spacing)
    if res is None:
        return None
    w, info = res
    return w, {**info, "family": family}


def _spot_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray) -> np.ndarray | None:
    """Sub-threshold spot: one sagittal slice, small radius, inside the body."""
    if len(b.central) == 0:
        return None
    s = int(rng.choice(b.central))
    sl = _sl(b.lr_axis, s)
    m2 = b.mask[sl]
    inner = ndi.binary_erosion(m2, iterations=2)
    cand = np.argwhere(inner if inner.any() else m2)
    if len(cand) == 0:
        return None
    p = cand[rng.integers(len(cand))]
    u0, v0 = b.u[sl][tuple(p)], b.v[sl][tuple(p)]
    r = _draw(rng, cfg.hard_negative_radius_mm)
    w = np.zeros(b.mask.shape, dtype=np.float32)
    w[sl] = (((b.u[sl] - u0) ** 2 + (b.v[sl] - v0) ** 2) <= r**2).astype(np.float32)
    if cfg.pv_sigma_mm > 0:  # in-plane only: the spot stays on one slice
        sig = cfg.pv_sigma_mm / spacing
        sig[b.lr_axis] = 0.0
        w = ndi.gaussian_filter(w, sigma=sig, mode="constant")
    w *= b.soft if b.soft is not None else b.mask
    return w if (w >= 0.5).any() else None


def _distractor_weight(b: _Body, rng: np.random.Generator, cfg: LesionConfig, spacing: np.ndarray,
                       forbidden: np.ndarray) -> tuple[np.ndarray, str] | None:
    """Lesion-like blob just outside the body (never within ``forbidden``, the dilated union of bodies)."""
    site = str(rng.choice(list(cfg.distractor_sites)))
    anterior = site == "anterior" or (site == "disc" and rng.random() < cfg.anterior_prob)
    superior = bool(rng.random() < 0.5)
    if len(b.central) == 0:
        return None
    s = int(rng.choice(b.central))
    edges = _corner_edges(b, s, anterior, superior)
    if edges is None:
        return None
    r = _draw(rng, cfg.distractor_radius_mm)
    ap_out = -1.0 if anterior else 1.0  # direction (sign of u) leaving the body at that side
    si_out = 1.0 if superior else -1.0
    gap = float(spacing.max()) * (cfg.distractor_gap_vox + 0.5)
    if site == "disc":
        u0 = edges[0] - ap_out * _draw(rng, (0.1, 0.4)) * b.depth
        v0 = edges[1] + si_out * (gap + 0.8 * r)
        ru, rv = r, 0.7 * r
    else:
        u0 = edges[0] + ap_out * (gap + 0.8 * r)
        v0 = edges[1] - si_out * _draw(rng, (0.0, 0.35)) * b.height
        ru, rv = 0.7 * r, r
    x0 = float(np.median(b.x[_sl(b.lr_axis, s)]))
    rx = max(r, 1.01 * float(spacing[b.lr_axis]))
    noise = _smooth_noise(b.mask.shape, 2.0 / spacing, rng)
    f = ((b.u - u0) / ru) ** 2 + ((b.v - v0) / rv) ** 2 + ((b.x - x0) / rx) ** 2 + cfg.edge_irregularity * noise
    w = (f <= 1.0).astype(np.float32)
    if cfg.pv_sigma_mm > 0:
        w = ndi.gaussian_filter(w, sigma=cfg.pv_sigma_mm / spacing, mode="constant")
    w *= ~forbidden[b.crop]
    lab = w >= 0.5
    if lab.sum() < 2 * cfg.min_voxels_per_slice:
        return None
    return w, site


# ---------------------------------------------------------------------------------------------
# Blending
# ---------------------------------------------------------------------------------------------
def _blend(out: np.ndarray, b: _Body, w: np.ndarray, ratio: float, rng: np.random.Generator, cfg: LesionConfig,
           spacing: np.ndarray, local: float = 0.75) -> None:
    """In place: ``out[crop] = (1-w) img + w * ratio * texture * (marrow median + local * fine detail)``.

    The lesion level is ``ratio`` times the vertebra's marrow median; ``fine detail`` (the image minus its
    2 mm Gaussian blur) keeps the trabecular texture underneath a marrow lesion. Distractors outside the
    body use ``local=0`` so they look like a lesion of *this* vertebra's marrow whatever tissue they sit in.
    """
    region = out[b.crop]
    tex_sd = _draw(rng, cfg.texture_strength)
    tex = 1.0 + tex_sd * _smooth_noise(region.shape, cfg.texture_sigma_mm / spacing, rng)
    tex = np.clip(tex, 0.5, 1.5)
    detail = region - ndi.gaussian_filter(region, 2.0 / spacing, mode="nearest") if local > 0 else 0.0
    target = ratio * tex * (b.marrow + local * detail)
    region[...] = (1.0 - w) * region + w * target
    np.maximum(region, 0.0, out=region)


# ---------------------------------------------------------------------------------------------
# Main API
# ---------------------------------------------------------------------------------------------
def known_contrast(value, source=None) -> str:
    """``value`` as one of :data:`CONTRASTS` (case-insensitive, :func:`data_prep.dataset.parse_contrast`);
    the simulator needs a known contrast, so an empty or unknown one is a :class:`SpinepipeInputError`
    naming ``source``."""
    c = parse_contrast(value, source)
    if not c:
        raise SpinepipeInputError(source, f"no image contrast given ({value!r}); the lesion simulator needs one of {CONTRASTS}")
    return c


def _check_inputs(image: Scan, vertebrae: Scan, contrast: str) -> str:
    c = known_contrast(contrast, image.name or None)
    if not image.same_geometry(vertebrae):
        raise SpinepipeInputError(vertebrae.name or None, "vertebra label map is not on the image grid")
    arr = np.asarray(vertebrae.array)
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if not np.allclose(arr, np.round(arr)):
            raise SpinepipeInputError(vertebrae.name or None, "vertebra label map must hold whole numbers")
    if not np.all(np.isfinite(np.asarray(image.array, dtype=np.float64))):
        raise SpinepipeInputError(image.name or None, "image holds non-finite values")
    return c


def insert_lesions(
    image: Scan,
    vertebrae: Scan,
    contrast: str,
    rng: np.random.Generator,
    config: LesionConfig | None = None,
    classes: Mapping[int, int | str] | None = None,
) -> LesionResult:
    """Insert lesions (corner lesions by default, see ``LesionConfig.families``), hard negatives and
    distractors into a copy of ``image``.

    Parameters
    ----------
    image, vertebrae:
        Scan and its vertebral-body label map (VerSe ids) on the same grid, any orientation/spacing.
    contrast:
        ``"t1"``, ``"t2"`` (T2-TSE, no fat suppression), ``"stir"`` or ``"water"`` (Dixon water).
    rng:
        Source of randomness (results are deterministic per generator state).
    config:
        :class:`LesionConfig`.
    classes:
        Optional ``{verse_id: class index or name}`` forcing the class of those vertebrae; vertebrae
        not listed are drawn from ``config.class_probs``.

    Returns
    -------
    LesionResult with the float32 image, the uint8 lesion label map and a per-vertebra table with
    columns ``label, level, class, class_name, n_lesions, family, corner, shape, size_fraction,
    depth_fraction, large, n_slices, contrast_ratio, target_ratio, cnr, subtle, hard_negative,
    distractor, marrow, tilt_deg, note``.
    """
    config = config or LesionConfig()
    contrast = _check_inputs(image, vertebrae, contrast)
    lab = np.rint(np.asarray(vertebrae.array)).astype(np.int32)
    out = np.asarray(image.array, dtype=np.float32).copy()
    lesion_map = np.zeros(lab.shape, dtype=np.uint8)
    spacing = np.asarray(image.spacing, dtype=float)
    pad = 4.0 * max(config.distractor_radius_mm[1], 2.0) + 4.0 * float(spacing.max())
    bodies = _build_bodies(image, vertebrae.with_array(lab), pad, config.min_body_voxels, config.pv_sigma_mm)
    ids = sort_head_to_foot(bodies)
    drawn = assign_classes(ids, rng, config)
    if classes:
        for vid, c in classes.items():
            if int(vid) not in bodies:
                raise SpinepipeInputError(
                    vertebrae.name or None, f"forced class for {vid}: vertebra not in the label map"
                )
            drawn[int(vid)] = class_index(c)
    forbidden = None
    rows = []
    for vid in ids:
        b = bodies[vid]
        cls = drawn[vid]
        row = {"label": vid, "level": level_name(vid), "class": 0, "class_name": CLASSES[0], "n_lesions": 0,
               "family": "", "corner": "", "shape": "", "size_fraction": 0.0, "depth_fraction": 0.0, "large": False,
               "n_slices": 0, "contrast_ratio": 1.0, "target_ratio": 1.0, "cnr": 0.0, "subtle": False,
               "hard_negative": False, "distractor": "", "marrow": round(b.marrow, 3),
               "tilt_deg": round(b.tilt_deg, 2), "note": ""}
        usable = int(b.mask.sum()) >= config.min_body_voxels
        if cls != 0 and not usable:
            row["note"] = "body too small for a lesion; kept normal"
            log.warning("vertebra %s: %s", level_name(vid), row["note"])
            cls = 0
        if cls != 0:
            kind = CLASSES[cls]
            code = INFLAMMATION if kind == "inflammation" else FAT
            n_wanted = 1 + int(rng.random() < config.second_lesion_prob)
            infos, lesion_vox = [], np.zeros(b.mask.shape, dtype=bool)
            ratio, subtle = _draw_ratio(kind, contrast, config, rng, b)
            for _ in range(n_wanted):
                for _try in range(config.max_tries):
                    res = _lesion_weight(b, rng, config, spacing)
                    if res is not None:
                        break
                if res is None:
                    continue
                w, info = res
                _blend(out, b, w, ratio, rng, config, spacing)
                lesion_vox |= w >= 0.5
                infos.append(info)
            if not infos:
                row["note"] = f"could not place a {kind} lesion on >= {config.min_slices} slices; kept normal"
                log.warning("vertebra %s: %s", level_name(vid), row["note"])
                cls = 0
            else:
                region = lesion_map[b.crop]
                region[lesion_vox] = code
                first = infos[0]
                level = float(out[b.crop][lesion_vox].mean())
                measured = level / b.marrow if b.marrow > 0 else float("nan")
                cnr = (level - b.marrow) / b.marrow_sd if b.marrow_sd > 0 else float("nan")
                row.update(
                    {"class": cls, "class_name": kind, "n_lesions": len(infos),
                     "family": ";".join(i["family"] for i in infos),
                     "corner": ";".join(i["corner"] for i in infos), "shape": ";".join(i["shape"] for i in infos),
                     "size_fraction": first["size_fraction"],
                     "depth_fraction": max(i["depth_fraction"] for i in infos),
                     "large": any(i["large"] for i in infos),
                     "n_slices": max(i["n_slices"] for i in infos),
                     "contrast_ratio": round(measured, 4), "target_ratio": round(ratio, 4), "cnr": round(cnr, 3),
                     "subtle": subtle}
                )
        if cls == 0 and usable and rng.random() < config.hard_negative_rate:
            w = None
            for _try in range(config.max_tries):
                w = _spot_weight(b, rng, config, spacing)
                if w is not None:
                    break
            if w is not None:
                pol = POLARITY[("inflammation", contrast)]
                r = _draw(rng, config.hard_negative_ratio)
                _blend(out, b, w, r if pol > 0 else 1.0 / r, rng, config, spacing)
                region = lesion_map[b.crop]
                region[(w >= 0.5) & (region == 0)] = HARD_NEGATIVE
                row["hard_negative"] = True
        if usable and rng.random() < config.distractor_rate:
            if forbidden is None:
                forbidden = ndi.binary_dilation(lab > 0, structure=np.ones((3, 3, 3), bool),
                                                iterations=config.distractor_gap_vox)
            res2 = None
            for _try in range(config.max_tries):
                res2 = _distractor_weight(b, rng, config, spacing, forbidden)
                if res2 is not None:
                    break
            if res2 is not None:
                w, site = res2
                # bright on every contrast (T1: fat-like), sometimes dark on T1 (oedema-like)
                dark = contrast == "t1" and rng.random() < 0.5
                r = _draw(rng, config.distractor_ratio)
                _blend(out, b, w, 1.0 / r if dark else r, rng, config, spacing, local=0.0)
                region = lesion_map[b.crop]
                region[(w >= 0.5) & (region == 0)] = DISTRACTOR
                row["distractor"] = site
        rows.append(row)
    table = pd.DataFrame(rows, columns=None if rows else ["label", "level", "class", "class_name"])
    log.debug("inserted lesions (%s): %s", contrast,
             ", ".join(f"{r['level']}={r['class_name']}" for r in rows) or "no vertebrae")
    return LesionResult(image.with_array(out.astype(np.float32)), image.with_array(lesion_map), table)


def plant_in_neighbour(
    image: Scan,
    vertebrae: Scan,
    target: int,
    contrast: str,
    rng: np.random.Generator,
    cls: int | str = "inflammation",
    config: LesionConfig | None = None,
) -> LesionResult:
    """Leakage probe: a lesion of class ``cls`` in vertebra ``target`` **only**.

    Every other vertebra is forced normal, and no hard negatives or distractors are added, so the image
    differs from the input only inside ``target``'s mask: a per-vertebra classifier whose verdicts on the
    neighbours move is looking outside its vertebra.
    """
    config = replace(config or LesionConfig(), hard_negative_rate=0.0, distractor_rate=0.0, second_lesion_prob=0.0)
    lab = np.asarray(vertebrae.array)
    present = [int(v) for v in np.unique(lab[lab > 0]) if int(v) in VERSE_LEVELS]
    if int(target) not in present:
        raise SpinepipeInputError(
            vertebrae.name or None, f"vertebra {target} is not in the label map (present: {present})"
        )
    forced = {v: 0 for v in present}
    forced[int(target)] = class_index(cls)
    return insert_lesions(image, vertebrae, contrast, rng, config, classes=forced)


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------
def subject_rng(seed: int, subject_id: str) -> np.random.Generator:
    """Per-subject generator: deterministic and independent of processing order."""
    return np.random.default_rng([int(seed), zlib.crc32(subject_id.encode("utf-8"))])


def infer_contrast(src_dir: str | Path, subject_id: str = "",
                   contrast_by_cohort: Mapping[str, str] | str | None = None) -> str:
    """Contrast of a dataset folder: explicit (str or ``{cohort: contrast}``), else from the folder/id name."""
    if isinstance(contrast_by_cohort, str):
        return known_contrast(contrast_by_cohort, src_dir)
    table = {k.lower(): v for k, v in COHORT_CONTRAST.items()}
    if contrast_by_cohort:
        table = {**table, **{k.lower(): v for k, v in contrast_by_cohort.items()}}
    keys = [Path(src_dir).name.lower(), subject_id.lower()]
    for name in sorted(table, key=len, reverse=True):
        if any(name in k for k in keys):
            return known_contrast(table[name], src_dir)
    raise SpinepipeInputError(
        src_dir, f"cannot infer the image contrast from the folder name; pass contrast_by_cohort "
        f"(known cohorts: {sorted(table)}; contrasts: {CONTRASTS})"
    )


def make_semisynthetic(
    src_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    config: LesionConfig | None = None,
    contrast_by_cohort: Mapping[str, str] | str | None = None,
    ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Insert lesions into every scan of a canonical dataset folder; write a **semi-synthetic** copy.

    Reads ``<id>_image.nii.gz`` + ``<id>_vertebrae.nii.gz`` from ``src_dir`` and writes to ``out_dir``:
    ``<id>_image.nii.gz`` (float32), ``<id>_vertebrae.nii.gz`` (copy), ``<id>_lesions.nii.gz``,
    ``<id>_outlines.nii.gz`` (copied when present), ``vertebra_labels.csv`` (``id,level,class,confidence``),
    ``subjects.csv`` (the source's rows of the processed subjects, when it has one, with a ``contrast``
    column: the contrast the lesions were made for), ``README_lesion_table.csv``
    (all per-vertebra lesion details) and ``README_semisynthetic.md`` (provenance: semi-synthetic, seed,
    contrasts, configuration). The ``README*`` names are ignored by ``check-data``. Returns the
    concatenated table (with ``id`` and ``contrast`` columns).
    """
    config = config or LesionConfig()
    src, dst = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise SpinepipeInputError(src, "dataset folder not found")
    if src.resolve() == dst.resolve():
        raise SpinepipeInputError(dst, "output folder must differ from the source folder")
    all_ids = sorted(p.name[: -len("_image.nii.gz")] for p in src.glob("*_image.nii.gz"))
    if ids is not None:
        missing = sorted(set(ids) - set(all_ids))
        if missing:
            raise SpinepipeInputError(src, f"subject(s) not found: {', '.join(missing)}")
        all_ids = [i for i in all_ids if i in set(ids)]
    if not all_ids:
        raise SpinepipeInputError(src, "no <id>_image.nii.gz files found")
    log.info("writing a SEMI-SYNTHETIC dataset (inserted lesions) from %s to %s: %d scans, seed %d",
             src, dst, len(all_ids), seed)
    dst.mkdir(parents=True, exist_ok=True)
    tables, label_rows, contrasts = [], [], {}
    for sid in all_ids:
        contrast = infer_contrast(src, sid, contrast_by_cohort)
        contrasts[sid] = contrast
        img = read_image(src / f"{sid}_image.nii.gz")
        vpath = src / f"{sid}_vertebrae.nii.gz"
        if not vpath.exists():
            raise SpinepipeInputError(vpath, "vertebra label map not found (needed to place lesions)")
        vert = read_labelmap(vpath, reference=img)
        res = insert_lesions(img, vert, contrast, subject_rng(seed, sid), config)
        write_image(res.image.with_array(res.image.array.astype(np.float32)), dst / f"{sid}_image.nii.gz")
        write_image(res.lesions, dst / f"{sid}_lesions.nii.gz")
        _copy(vpath, dst / f"{sid}_vertebrae.nii.gz")
        opath = src / f"{sid}_outlines.nii.gz"
        if opath.exists():
            _copy(opath, dst / f"{sid}_outlines.nii.gz")
        t = res.table.copy()
        t.insert(0, "id", sid)
        t.insert(1, "contrast", contrast)
        tables.append(t)
        for _, r in res.table.iterrows():
            label_rows.append({"id": sid, "level": r["level"], "class": int(r["class"]), "confidence": 1.0})
        log.info("%s: %s (semi-synthetic)", sid, ", ".join(f"{r.level}={r.class_name}" for r in res.table.itertuples()))
    full = pd.concat(tables, ignore_index=True)
    write_csv(pd.DataFrame(label_rows, columns=["id", "level", "class", "confidence"]), dst / "vertebra_labels.csv")
    write_csv(full, dst / "README_lesion_table.csv")
    # the contrast the lesions were inserted for, per subject (read back by data_prep.dataset.read_subject_contrasts)
    subjects = pd.DataFrame({"id": all_ids})
    if (src / "subjects.csv").exists():
        given = pd.read_csv(src / "subjects.csv", dtype=str)
        if "id" in given.columns:
            given = given.assign(id=given["id"].str.strip())
            subjects = given[given["id"].isin(all_ids)].drop(columns=["contrast"], errors="ignore")
    subjects = subjects.assign(contrast=subjects["id"].map(contrasts))
    write_csv(subjects, dst / "subjects.csv")
    prov = json.dumps({"semi_synthetic": True, "source": str(src), "seed": int(seed), "classes": list(CLASSES),
                       "contrast": contrasts, "config": asdict(config)}, indent=2, default=list)
    write_text(
        "# SEMI-SYNTHETIC dataset\n\nReal scans with lesions inserted by `data_prep.lesions.make_semisynthetic`. "
        "Class labels (`vertebra_labels.csv`) and `<id>_lesions` maps come from the simulator, not from "
        "radiologists: report every result on this folder as **semi-synthetic**.\n\n"
        "Lesion map values: " + ", ".join(f"{k} {v}" for k, v in LESION_LABEL_NAMES.items()) + ".\n\n"
        "```json\n" + prov + "\n```\n",
        dst / "README_semisynthetic.md",
    )
    return full


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


__all__ = [
    "CLASSES",
    "CONTRASTS",
    "POLARITY",
    "COHORT_CONTRAST",
    "LESION_LABEL_NAMES",
    "LESION_FAMILIES",
    "NO_LESION",
    "INFLAMMATION",
    "FAT",
    "HARD_NEGATIVE",
    "DISTRACTOR",
    "LesionConfig",
    "LesionResult",
    "assign_classes",
    "class_index",
    "insert_lesions",
    "plant_in_neighbour",
    "infer_contrast",
    "known_contrast",
    "subject_rng",
    "make_semisynthetic",
]


def cohort_hook(config: LesionConfig | None = None):
    """A ``lesion_fn`` for :func:`data_prep.synth.write_cohort`: inserts lesions into every synthetic subject.

    Returns ``fn(image, labels, contrast, rng) -> (image, lesion map, {verse_id: class index})``.
    """

    def fn(image: Scan, labels: Scan, contrast: str, rng: np.random.Generator):
        res = insert_lesions(image, labels, contrast, rng, config)
        return res.image, res.lesions, res.classes

    return fn
