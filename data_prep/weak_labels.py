"""Loose (weak) annotations derived from full vertebral-body masks, for label-efficiency experiments.

Four kinds, each with documented parameters in :class:`WeakLabelConfig`:

* ``points``: one point per body (centroid + Gaussian jitter in mm), world LPS, ``<id>_points.csv``;
* ``boxes``: axis-aligned **world** boxes enlarged by random margins, ``<id>_boxes.csv``;
* ``outlines``: closed contour lines on a few sagittal slices, loose (dilated + smoothly perturbed),
  labelled by body, like the real ``<id>_outlines.nii.gz`` files; :func:`fill_outlines` turns
  contours (simulated or real) back into filled per-slice regions;
* ``coarse``: masks systematically dilated (``bias_mm > 0``) or eroded (``bias_mm < 0``) and made
  blocky (block-majority downsampling then nearest upsampling).

Sagittal slices are found from the image direction (:meth:`Scan.axis_of(0) <data_prep.scan.Scan.axis_of>`),
never assumed to be a given array axis.
"""
from __future__ import annotations

import logging
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from data_prep.errors import SpinepipeInputError
from data_prep.io import BOX_COLUMNS, atomic_path, read_labelmap, write_csv, write_image
from data_prep.scan import VERSE_LEVELS, Points, Scan, centroids_from_labelmap, level_name, sort_head_to_foot

log = logging.getLogger(__name__)

WEAK_KINDS: tuple[str, ...] = ("points", "boxes", "outlines", "coarse")


@dataclass
class WeakLabelConfig:
    """Parameters of the weak-label generators (distances in mm).

    ``point_sigma_mm``: std of the Gaussian jitter added to each centroid (per world axis).
    ``box_margin_mm``: ``(low, high)`` uniform range of the margin added on *each* side of each box.
    ``outline_n_slices``: sagittal slices outlined per body (spread over its left-right extent, edge
    slices included, like the real outlines).
    ``outline_dilate_mm``: ``(low, high)`` uniform range of the outward offset of each contour
    (users draw around the body, so contours are mostly too large). Defaults match the real
    ``_outlines`` files: their contour pixels lie on average 3.9 mm (myosegmentum) / 4.1 mm (chu2015)
    outside the expert mask, with about 1.2-1.5 mm spread along a contour.
    ``outline_jitter_mm``: amplitude (std) of the smooth in-plane perturbation of the contour.
    ``outline_jitter_scale_mm``: correlation length of that perturbation.
    ``fill_max_gap_mm``: gaps in a drawn contour up to about this size are closed before filling.
    ``coarse_bias_mm``: signed offset of coarse masks (+ dilate, - erode).
    ``coarse_bias_jitter_mm``: std of a per-body random variation of that offset (0: exact).
    ``coarse_block_mm``: block size of the blocky resampling (0 or less than a voxel: no blocks).
    ``seed_salt``: mixed into per-subject seeds (change to get another draw with the same seed).
    """

    point_sigma_mm: float = 3.0
    box_margin_mm: tuple[float, float] = (1.0, 6.0)
    outline_n_slices: int = 5
    outline_dilate_mm: tuple[float, float] = (2.5, 5.0)
    outline_jitter_mm: float = 1.2
    outline_jitter_scale_mm: float = 6.0
    fill_max_gap_mm: float = 6.0
    coarse_bias_mm: float = 2.0
    coarse_bias_jitter_mm: float = 0.0
    coarse_block_mm: float = 4.0
    seed_salt: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.box_margin_mm
        if not 0 <= lo <= hi:
            raise SpinepipeInputError(None, f"WeakLabelConfig.box_margin_mm must be 0 <= low <= high, got {(lo, hi)}")
        lo, hi = self.outline_dilate_mm
        if not lo <= hi:
            raise SpinepipeInputError(None, f"WeakLabelConfig.outline_dilate_mm must be low <= high, got {(lo, hi)}")
        if self.point_sigma_mm < 0 or self.outline_jitter_mm < 0 or self.coarse_bias_jitter_mm < 0:
            raise SpinepipeInputError(None, "WeakLabelConfig: jitter amplitudes must be >= 0")
        if self.outline_n_slices < 1:
            raise SpinepipeInputError(None, "WeakLabelConfig.outline_n_slices must be >= 1")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _label_ids(labels: Scan) -> list[int]:
    arr = np.asarray(labels.array)
    if arr.dtype.kind == "f" and not np.allclose(arr, np.round(arr)):
        raise SpinepipeInputError(labels.name or None, "label map must hold whole numbers")
    present = np.unique(np.rint(arr[arr > 0]).astype(int))
    ids = [int(v) for v in present if int(v) in VERSE_LEVELS]
    skipped = sorted(set(int(v) for v in present) - set(ids))
    if skipped:
        log.warning("%s: skipping non-VerSe labels %s", labels.name or "label map", skipped)
    return sort_head_to_foot(ids)


def _sl(axis: int, s: int) -> tuple:
    out: list = [slice(None)] * 3
    out[axis] = s
    return tuple(out)


def _inplane(axis: int, values: np.ndarray) -> np.ndarray:
    return np.asarray([values[a] for a in range(3) if a != axis], dtype=float)


# ---------------------------------------------------------------------------------------------
# points and boxes
# ---------------------------------------------------------------------------------------------
def jittered_points(
    labels: Scan, rng: np.random.Generator, sigma_mm: float | None = None, config: WeakLabelConfig | None = None
) -> tuple[list[int], Points]:
    """One world point per body: centroid + isotropic Gaussian jitter of std ``sigma_mm`` (head to foot)."""
    sigma = (config or WeakLabelConfig()).point_sigma_mm if sigma_mm is None else float(sigma_mm)
    if sigma < 0:
        raise SpinepipeInputError(None, f"point jitter sigma must be >= 0, got {sigma}")
    ids = _label_ids(labels)
    cents = centroids_from_labelmap(labels, ids)
    xyz = np.array([cents[v] for v in ids], dtype=float).reshape(-1, 3)
    xyz = xyz + rng.normal(0.0, sigma, size=xyz.shape) if sigma > 0 else xyz
    return ids, Points(xyz, "world")


def world_boxes(labels: Scan) -> tuple[list[int], np.ndarray]:
    """Tight axis-aligned world boxes ``(N, 2, 3)`` (min, max corners in mm) around each body's voxels."""
    ids = _label_ids(labels)
    arr = np.rint(np.asarray(labels.array)).astype(np.int64)
    m = labels.direction * labels.spacing[None, :]
    half = np.abs(m) @ np.full(3, 0.5)  # world half-extent of one voxel
    out = np.zeros((len(ids), 2, 3))
    for n, vid in enumerate(ids):
        idx = np.argwhere(arr == vid).astype(float)
        w = idx @ m.T + labels.origin
        out[n, 0] = w.min(axis=0) - half
        out[n, 1] = w.max(axis=0) + half
    return ids, out


def loose_boxes(
    labels: Scan,
    rng: np.random.Generator,
    margin_mm: tuple[float, float] | None = None,
    config: WeakLabelConfig | None = None,
) -> tuple[list[int], np.ndarray]:
    """World axis-aligned boxes around each body, each side enlarged by a uniform margin in ``margin_mm``."""
    lo, hi = (config or WeakLabelConfig()).box_margin_mm if margin_mm is None else margin_mm
    if not 0 <= lo <= hi:
        raise SpinepipeInputError(None, f"box margins must satisfy 0 <= low <= high, got {(lo, hi)}")
    ids, boxes = world_boxes(labels)
    marg = rng.uniform(lo, hi, size=boxes.shape) if hi > lo else np.full(boxes.shape, float(lo))
    boxes = boxes.copy()
    boxes[:, 0] -= marg[:, 0]
    boxes[:, 1] += marg[:, 1]
    return ids, boxes


# ---------------------------------------------------------------------------------------------
# outlines
# ---------------------------------------------------------------------------------------------
def _pick_slices(present: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` slices spread over ``present`` (sorted indices), both ends included, interior jittered."""
    if len(present) <= n:
        return [int(s) for s in present]
    pos = np.linspace(0, len(present) - 1, n)
    step = (len(present) - 1) / max(n - 1, 1)
    if n > 2:
        pos[1:-1] += rng.uniform(-0.3 * step, 0.3 * step, size=n - 2)
    picks = sorted(set(int(present[int(round(p))]) for p in pos))
    return picks


def sparse_outlines(
    labels: Scan,
    rng: np.random.Generator,
    n_slices: int | None = None,
    dilate_mm: tuple[float, float] | None = None,
    jitter_mm: float | None = None,
    config: WeakLabelConfig | None = None,
) -> Scan:
    """Loose closed contours around each body on ``n_slices`` sagittal slices, labelled by body id.

    Per slice: the body's cross-section is offset outwards by a random ``dilate_mm`` and its boundary
    perturbed by smooth noise of std ``jitter_mm`` (in-plane signed-distance level set), the largest
    component kept and its boundary (4-connected outer ring, 1 voxel thick) drawn. Returns a uint8/uint16
    label map on the same grid (0 elsewhere).
    """
    cfg = config or WeakLabelConfig()
    n_slices = cfg.outline_n_slices if n_slices is None else int(n_slices)
    dilate = cfg.outline_dilate_mm if dilate_mm is None else dilate_mm
    jitter = cfg.outline_jitter_mm if jitter_mm is None else float(jitter_mm)
    if n_slices < 1:
        raise SpinepipeInputError(None, f"n_slices must be >= 1, got {n_slices}")
    ids = _label_ids(labels)
    arr = np.rint(np.asarray(labels.array)).astype(np.int64)
    lr_axis, _ = labels.axis_of(0)
    sp2 = _inplane(lr_axis, labels.spacing)
    dtype = np.uint8 if (not ids or max(ids) < 256) else np.uint16
    out = np.zeros(arr.shape, dtype=dtype)
    for vid in ids:
        m = arr == vid
        present = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != lr_axis)))
        for s in _pick_slices(present, n_slices, rng):
            m2 = m[_sl(lr_axis, s)]
            d = float(rng.uniform(*dilate)) if dilate[1] > dilate[0] else float(dilate[0])
            pad = int(np.ceil((max(d, 0) + 3 * jitter + 2) / sp2.min()))
            idx = np.argwhere(m2)
            lo = np.maximum(idx.min(0) - pad, 0)
            hi = np.minimum(idx.max(0) + pad + 1, m2.shape)
            sub = m2[lo[0]:hi[0], lo[1]:hi[1]]
            sd = ndi.distance_transform_edt(~sub, sampling=sp2) - ndi.distance_transform_edt(sub, sampling=sp2)
            if jitter > 0:
                z = ndi.gaussian_filter(rng.standard_normal(sub.shape), cfg.outline_jitter_scale_mm / sp2)
                z = z / (z.std() + 1e-12)
                sd = sd + jitter * z
            region = sd <= d
            lab_cc, n_cc = ndi.label(region)
            if n_cc == 0:
                continue
            if n_cc > 1:
                sizes = ndi.sum(region, lab_cc, index=np.arange(1, n_cc + 1))
                region = lab_cc == (1 + int(np.argmax(sizes)))
            region = ndi.binary_fill_holes(region)
            ring = region & ~ndi.binary_erosion(region, border_value=0)
            view = out[_sl(lr_axis, s)][lo[0]:hi[0], lo[1]:hi[1]]
            view[ring & (view == 0)] = vid
    return labels.with_array(out, name=(labels.name or "") + "_outlines")


def _fill_one(contour: np.ndarray, max_gap_vox: int) -> np.ndarray:
    """Fill a (possibly slightly open) 2D contour.

    A contour counts as closed when its filled region covers at least half of its convex hull (a small
    loop in an otherwise open stroke does not). Otherwise gaps are closed by morphological closing of
    growing radius (up to ``max_gap_vox``), and as a last resort the convex hull is returned.
    """
    from skimage.morphology import convex_hull_image

    if contour.sum() < 3:
        return contour.copy()
    hull = convex_hull_image(contour)
    need = 0.5 * hull.sum()
    filled = ndi.binary_fill_holes(contour)
    if filled.sum() >= need:
        return filled
    st = ndi.generate_binary_structure(2, 2)
    for r in range(1, max_gap_vox + 1):
        p = r + 1
        closed = ndi.binary_closing(np.pad(contour, p), structure=st, iterations=r)[p:-p, p:-p]
        filled = ndi.binary_fill_holes(closed)
        if filled.sum() >= need:
            return filled
    return hull


def _is_closed(contour: np.ndarray) -> bool:
    from skimage.morphology import convex_hull_image

    return contour.sum() < 3 or ndi.binary_fill_holes(contour).sum() >= 0.5 * convex_hull_image(contour).sum()


def fill_outlines(outlines: Scan, max_gap_mm: float | None = None) -> Scan:
    """Fill each closed contour per sagittal slice and per label (``binary_fill_holes``).

    Real hand-drawn contours sometimes have small gaps; when a contour encloses nothing, gaps up to about
    ``max_gap_mm`` are closed morphologically first, and as a last resort its convex hull is used. Where
    filled regions of two labels overlap on a slice, the smaller region wins (a nested contour).
    """
    max_gap_mm = WeakLabelConfig().fill_max_gap_mm if max_gap_mm is None else float(max_gap_mm)
    ids = _label_ids(outlines)
    arr = np.rint(np.asarray(outlines.array)).astype(np.int64)
    lr_axis, _ = outlines.axis_of(0)
    sp2 = _inplane(lr_axis, outlines.spacing)
    max_gap_vox = max(1, int(np.ceil(max_gap_mm / sp2.min() / 2)))
    out = np.zeros(arr.shape, dtype=np.asarray(outlines.array).dtype if arr.max(initial=0) < 256 else np.uint16)
    n_open = 0
    for s in range(arr.shape[lr_axis]):
        a2 = arr[_sl(lr_axis, s)]
        labs = [v for v in np.unique(a2) if v > 0 and int(v) in ids]
        if not labs:
            continue
        regions = []
        for vid in labs:
            c = a2 == vid
            idx = np.argwhere(c)
            lo = np.maximum(idx.min(0) - 1, 0)
            hi = np.minimum(idx.max(0) + 2, c.shape)
            sub = c[lo[0]:hi[0], lo[1]:hi[1]]
            if not _is_closed(sub):
                n_open += 1
            f = _fill_one(sub, max_gap_vox)
            full = np.zeros(c.shape, bool)
            full[lo[0]:hi[0], lo[1]:hi[1]] = f
            regions.append((int(f.sum()), vid, full))
        o2 = out[_sl(lr_axis, s)]
        for _, vid, full in sorted(regions, key=lambda t: -t[0]):  # large first, smaller (nested) overwrite
            o2[full] = vid
    if n_open:
        log.info("%s: %d open contour(s) closed before filling", outlines.name or "outlines", n_open)
    return outlines.with_array(out, name=(outlines.name or "") + "_filled")


def thicken_slices(labels: Scan, thickness_mm: float) -> Scan:
    """Extend each labelled sagittal slice of a sparse-slice label map to a slab ``thickness_mm`` thick.

    Outlines live on single native slices (often 1 mm thick). Resampled with nearest neighbour onto a
    coarser grid (stage-2 patches: 2 mm), a 1-mm slice is hit only when a new voxel centre falls on it, so
    about half of the outlined slices vanish at random. Giving each labelled slice the thickness of the
    target grid's voxels (its labels copied to the neighbouring *unlabelled* voxels within
    ``thickness_mm / 2`` along the left-right axis, nearer slices first) makes every one of them land on
    the coarser grid. Voxels that already carry a label keep it. Returns a new scan.
    """
    arr = np.asarray(labels.array)
    lr_axis, _ = labels.axis_of(0)
    sp = float(labels.spacing[lr_axis])
    k = int(np.ceil(thickness_mm / (2 * sp) - 0.5 - 1e-9)) if thickness_mm > sp else 0
    out = arr.copy()
    n = arr.shape[lr_axis]
    for d in range(1, k + 1):
        for sign in (1, -1):
            src = np.zeros_like(arr)
            dst_sl = [slice(None)] * 3
            src_sl = [slice(None)] * 3
            dst_sl[lr_axis] = slice(d, n) if sign > 0 else slice(0, n - d)
            src_sl[lr_axis] = slice(0, n - d) if sign > 0 else slice(d, n)
            src[tuple(dst_sl)] = arr[tuple(src_sl)]
            fill = (out == 0) & (src > 0)
            out[fill] = src[fill]
    return labels.with_array(out, name=labels.name)


def shrink2d(mask: np.ndarray, r_mm: float, spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Erode a 2D boolean mask by ``r_mm`` (> 0) or dilate it by ``-r_mm`` (< 0); ``spacing`` is the pixel
    size (mm) along the two axes, so the structuring element is an ellipse of that radius in mm (a disk of
    ``r`` pixels with the default unit spacing). Erosion treats outside the array as background."""
    m = np.asarray(mask, dtype=bool)
    if r_mm == 0 or not m.any():
        return m.copy()
    r = np.maximum(abs(float(r_mm)) / np.asarray(spacing, dtype=np.float64).reshape(2), 1e-9)
    half = np.ceil(r).astype(int)
    g = np.indices(tuple(2 * half + 1)) - half[:, None, None]
    disk = ((g / r[:, None, None]) ** 2).sum(0) <= 1 + 1e-9
    if r_mm > 0:
        return ndi.binary_erosion(m, structure=disk, border_value=0)
    return ndi.binary_dilation(m, structure=disk)


def outlined_lr_extent(outlines: Scan) -> dict[int, tuple[float, float]]:
    """For each label: world x (LPS, mm; patient left-right) of its first and last outlined sagittal slice."""
    arr = np.rint(np.asarray(outlines.array)).astype(np.int64)
    lr_axis, _ = outlines.axis_of(0)
    other = tuple(a for a in range(3) if a != lr_axis)
    out: dict[int, tuple[float, float]] = {}
    for vid in _label_ids(outlines):
        idx = np.flatnonzero((arr == vid).any(axis=other))
        if idx.size == 0:
            continue
        ijk = np.zeros((2, 3))
        ijk[:, lr_axis] = [idx.min(), idx.max()]
        x = outlines.voxel_to_world(ijk).coords[:, 0]
        out[int(vid)] = (float(x.min()), float(x.max()))
    return out


def outline_dice(filled: Scan, labels: Scan) -> pd.DataFrame:
    """Per (label, sagittal slice) Dice between filled outlines and a full mask, on outlined slices only."""
    if not filled.same_geometry(labels):
        raise SpinepipeInputError(labels.name or None, "mask is not on the outline grid")
    f = np.rint(np.asarray(filled.array)).astype(np.int64)
    m = np.rint(np.asarray(labels.array)).astype(np.int64)
    lr_axis, _ = filled.axis_of(0)
    rows = []
    for vid in _label_ids(filled):
        for s in np.flatnonzero((f == vid).any(axis=tuple(a for a in range(3) if a != lr_axis))):
            a = f[_sl(lr_axis, s)] == vid
            b = m[_sl(lr_axis, s)] == vid
            denom = a.sum() + b.sum()
            rows.append({"label": vid, "slice": int(s), "dice": float(2 * (a & b).sum() / denom) if denom else 1.0,
                         "filled_voxels": int(a.sum()), "mask_voxels": int(b.sum())})
    return pd.DataFrame(rows, columns=["label", "slice", "dice", "filled_voxels", "mask_voxels"])


# ---------------------------------------------------------------------------------------------
# coarse masks
# ---------------------------------------------------------------------------------------------
def _blocky(mask: np.ndarray, factors: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Majority-vote downsample by integer ``factors`` (grid shifted by ``offset``), nearest upsample."""
    if np.all(factors <= 1):
        return mask
    pad_lo = offset.astype(int)
    tot = np.asarray(mask.shape) + pad_lo
    pad_hi = (-tot) % factors
    p = np.pad(mask.astype(np.float32), [(int(a), int(b)) for a, b in zip(pad_lo, pad_hi)])
    sh = np.asarray(p.shape) // factors
    blocks = p.reshape(sh[0], factors[0], sh[1], factors[1], sh[2], factors[2]).mean(axis=(1, 3, 5)) >= 0.5
    up = blocks.repeat(factors[0], 0).repeat(factors[1], 1).repeat(factors[2], 2)
    return up[tuple(slice(int(a), int(a) + n) for a, n in zip(pad_lo, mask.shape))]


def biased_coarse_mask(
    labels: Scan,
    rng: np.random.Generator,
    bias_mm: float | None = None,
    block_mm: float | None = None,
    config: WeakLabelConfig | None = None,
) -> Scan:
    """Systematically dilated (``bias_mm > 0``) or eroded (``bias_mm < 0``) and blocky label map.

    Each body is offset by ``bias_mm`` (+ per-body Gaussian ``coarse_bias_jitter_mm``) through a signed
    distance map in mm (anisotropic spacing respected); voxels claimed by several dilated bodies go to
    the nearest one (the edge of the field of view is not a body surface: a body cut by it is not
    eroded there). Then each body is made blocky by majority vote over blocks of about ``block_mm``
    (random grid offset) and nearest-neighbour upsampling.
    """
    cfg = config or WeakLabelConfig()
    bias = cfg.coarse_bias_mm if bias_mm is None else float(bias_mm)
    block = cfg.coarse_block_mm if block_mm is None else float(block_mm)
    ids = _label_ids(labels)
    arr = np.rint(np.asarray(labels.array)).astype(np.int64)
    sp = np.asarray(labels.spacing, dtype=float)
    pad_vox = np.ceil((abs(bias) + 3 * cfg.coarse_bias_jitter_mm + block + 2) / sp).astype(int) + 1
    best = np.full(arr.shape, np.inf, dtype=np.float32)
    out = np.zeros(arr.shape, dtype=np.asarray(labels.array).dtype if arr.max(initial=0) < 256 else np.uint16)
    for vid in ids:
        m = arr == vid
        idx = np.argwhere(m)
        lo = np.maximum(idx.min(0) - pad_vox, 0)
        hi = np.minimum(idx.max(0) + pad_vox + 1, arr.shape)
        crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        sub = m[crop]
        sd = ndi.distance_transform_edt(~sub, sampling=sp) - ndi.distance_transform_edt(sub, sampling=sp)
        b = bias + (rng.normal(0, cfg.coarse_bias_jitter_mm) if cfg.coarse_bias_jitter_mm > 0 else 0.0)
        # signed distance of each voxel centre to the body *surface* (half a voxel beyond the centres)
        h = 0.5 * float(sp.min())
        surf = np.where(sub, sd + h, sd - h)
        region = surf <= b + 1e-6
        factors = np.maximum(1, np.round(block / sp)).astype(int) if block > 0 else np.ones(3, int)
        offset = np.array([rng.integers(0, f) for f in factors])
        region = _blocky(region, factors, offset)
        bsub, osub = best[crop], out[crop]
        take = region & (sd < bsub)
        osub[take] = vid
        bsub[take] = sd[take]
    return labels.with_array(out, name=(labels.name or "") + "_coarse")


# ---------------------------------------------------------------------------------------------
# CSV writers
# ---------------------------------------------------------------------------------------------
def write_points_csv(ids: Sequence[int], points: Points, path: str | Path) -> Path:
    """Write ``<id>_points.csv`` (``level,x_mm,y_mm,z_mm``, world LPS); read back by ``io.read_points_csv``."""
    xyz = points.require("world")
    if len(ids) != len(xyz):
        raise ValueError(f"{len(ids)} ids for {len(xyz)} points")
    df = pd.DataFrame({"level": [level_name(v) for v in ids], "x_mm": xyz[:, 0], "y_mm": xyz[:, 1], "z_mm": xyz[:, 2]})
    return write_csv(df, path, float_format="%.4f")


def write_boxes_csv(ids: Sequence[int], boxes: np.ndarray, path: str | Path) -> Path:
    """Write ``<id>_boxes.csv`` (``level,x_min_mm,...,z_max_mm``, world LPS); read by ``io.read_boxes_csv``."""
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 2, 3)
    if len(ids) != len(boxes):
        raise ValueError(f"{len(ids)} ids for {len(boxes)} boxes")
    df = pd.DataFrame(boxes.reshape(-1, 6), columns=BOX_COLUMNS[1:])
    df.insert(0, "level", [level_name(v) for v in ids])
    return write_csv(df, path, float_format="%.4f")


# ---------------------------------------------------------------------------------------------
# dataset copy
# ---------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def derive_weak_labels(
    dataset_dir: str | Path,
    out_dir: str | Path,
    kind: str,
    seed: int,
    config: WeakLabelConfig | None = None,
    keep_full_masks: bool = False,
) -> list[str]:
    """Write a weak-label copy of a canonical dataset folder; returns the subject ids written.

    For every ``<id>_image.nii.gz`` with a ``<id>_vertebrae.nii.gz`` the image is copied and, by ``kind``:

    * ``"points"``   -> ``<id>_points.csv``;
    * ``"boxes"``    -> ``<id>_boxes.csv``;
    * ``"outlines"`` -> ``<id>_outlines.nii.gz`` (simulated loose contours);
    * ``"coarse"``   -> ``<id>_coarse.nii.gz`` (biased, blocky masks).

    Full masks (``<id>_vertebrae.nii.gz``) are copied only with ``keep_full_masks`` (for evaluation).
    ``vertebra_labels.csv`` and ``subjects.csv`` are copied when present. Draws are deterministic per
    (seed, ``config.seed_salt``, subject id).
    """
    cfg = config or WeakLabelConfig()
    kind = str(kind).strip().lower()
    if kind not in WEAK_KINDS:
        raise SpinepipeInputError(None, f"unknown weak-label kind {kind!r}; expected one of {WEAK_KINDS}")
    src, dst = Path(dataset_dir), Path(out_dir)
    if not src.is_dir():
        raise SpinepipeInputError(src, "dataset folder not found")
    if src.resolve() == dst.resolve():
        raise SpinepipeInputError(dst, "output folder must differ from the dataset folder")
    ids = sorted(p.name[: -len("_image.nii.gz")] for p in src.glob("*_image.nii.gz"))
    ids = [i for i in ids if (src / f"{i}_vertebrae.nii.gz").exists()]
    if not ids:
        raise SpinepipeInputError(src, "no subjects with both <id>_image.nii.gz and <id>_vertebrae.nii.gz")
    dst.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        rng = np.random.default_rng([int(seed), int(cfg.seed_salt), zlib.crc32(sid.encode("utf-8"))])
        vpath = src / f"{sid}_vertebrae.nii.gz"
        lab = read_labelmap(vpath)
        _copy(src / f"{sid}_image.nii.gz", dst / f"{sid}_image.nii.gz")
        if kind == "points":
            pid, pts = jittered_points(lab, rng, config=cfg)
            write_points_csv(pid, pts, dst / f"{sid}_points.csv")
        elif kind == "boxes":
            bid, boxes = loose_boxes(lab, rng, config=cfg)
            write_boxes_csv(bid, boxes, dst / f"{sid}_boxes.csv")
        elif kind == "outlines":
            write_image(sparse_outlines(lab, rng, config=cfg), dst / f"{sid}_outlines.nii.gz")
        else:
            write_image(biased_coarse_mask(lab, rng, config=cfg), dst / f"{sid}_coarse.nii.gz")
        if keep_full_masks:
            _copy(vpath, dst / f"{sid}_vertebrae.nii.gz")
        log.info("%s: wrote %s weak labels", sid, kind)
    for extra in ("vertebra_labels.csv", "subjects.csv"):
        if (src / extra).exists():
            _copy(src / extra, dst / extra)
    return ids


__all__ = [
    "WEAK_KINDS",
    "WeakLabelConfig",
    "jittered_points",
    "world_boxes",
    "loose_boxes",
    "sparse_outlines",
    "fill_outlines",
    "outlined_lr_extent",
    "thicken_slices",
    "outline_dice",
    "biased_coarse_mask",
    "write_points_csv",
    "write_boxes_csv",
    "derive_weak_labels",
]
