"""Does a scan's tissue contrast look like the scans stage 2 was trained on?

The class verdict reads a lesion's brightness *relative to the marrow*, and that sign depends on the MRI
sequence: fat is dark on STIR / Dixon water and bright on T1 / T2-TSE, oedema bright on fluid-sensitive
sequences and dark on T1. A classifier trained on one family of sequences therefore calls lesions of
another family by the wrong name (trained on Dixon water, tested on T2-TSE, the fat AUC fell to 0.27:
``bench/results/stage2_tables_e80.md``), and the user cannot see it from the probabilities. This module
gives every scan a four-number **contrast signature**, compares it with the signatures of the training
scans (saved with the model) and lets :class:`~stage2_classify.infer.Classifier` flag every verdict of a
scan that lies far from all of them (``contrast_unseen``).

All intensities are in window units (the scan's robust 1-99 % window mapped to [0, 1], as the patches
are). The signature has two parts, each ``(body level, log((disc + eps) / (body + eps)))``:

* ``centre_*`` (:func:`centre_signature`), from the vertebral centroids alone: body = within
  ``body_radius_mm`` of each centroid, disc = a short cylinder around the midpoint of two neighbouring
  centroids. It needs no segmentation, so it stays valid exactly when the seg head fails (a scan of a
  contrast the seg head never saw: with the seg head's bodies a synthetic T1 scan looked like the Dixon
  water training scans, region part 0.04-1.2, while this part puts it 3.1-4.5 units away). It separates
  T1 and STIR from Dixon water, but water and T2-TSE less well (0.9-6.0 between the real cohorts).
* ``region_*`` (:func:`patch_signature` + :func:`region_signature`), from the vertebral-body masks
  (given, or the seg head's): body = the whole mask, disc = the voxels between a body and its
  neighbouring body within ``band_mm`` (disc space and endplates, darker than fatty marrow on T2-TSE and
  T1, brighter on water / STIR). It separates the two real cohorts by 1.4-7.1 units (2.8-7.1 with the
  expert masks as regions).

A scan's values are medians over its vertebrae / disc spaces (robust to a degenerated disc or a lesion).
Novelty = per part, the distance to the *nearest* training scan's values in units of ``scales`` (so a
training set that mixes sequences covers each of them; no Gaussian assumption); the scan's novelty is
the larger of the parts it has (a part that cannot be measured, e.g. no body found, is left out).
Measured (``bench/results/contrast_check.md``, 30-epoch models on half of each real cohort): held-out
scans of the training cohort lie 0.1-1.2 units away (one T2-TSE scan 1.8-2.0 with its expert masks as
regions, 1.0 with the seg head's bodies), scans of the other cohort 2.4-7.1, synthetic T1 / STIR 2.1-5.8;
hence the default threshold 1.5.

The check never changes a verdict (the classification path and its evidence guarantee are untouched);
it only adds a flag. Axes: patches are sampled along the world LPS axes, so patch axis 2 (k) is the
world z (inferior -> superior) axis whatever the scan's orientation; centroids are world LPS mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_prep.scan import Scan, anatomical_rank, sort_head_to_foot, standard_neighbour

#: Names of the signature's components (in order).
SIGNATURE_NAMES: tuple[str, ...] = ("centre_body_level", "centre_disc_body_log_ratio",
                                     "region_body_level", "region_disc_body_log_ratio")
#: Flag added to every verdict of a scan whose contrast lies outside the training scans'.
CONTRAST_FLAG = "contrast_unseen"
#: Offset inside the log ratio (window units): keeps the ratio finite on black discs / bodies.
_EPS = 0.02
#: Fewest voxels of body / disc space a patch needs to give a signature.
_MIN_VOXELS = 8
#: VerSe id of S1 / the sacrum (its centroid may be that of the whole sacrum: no disc midpoint from it).
_SACRUM = 26


def patch_signature(image: np.ndarray, body: np.ndarray, others: np.ndarray | None, spacing_mm: float,
                    band_mm: float = 8.0) -> tuple[float, float] | None:
    """Median intensities ``(body, disc space)`` of one vertebra's patch, or ``None``.

    ``image``: ``(I, J, K)`` patch intensities (window units); ``body``: ``(I, J, K)`` bool, this vertebra's
    body; ``others``: ``(I, J, K)`` bool, the other vertebral bodies (given masks or the seg head's
    neighbours; ``None``: unknown, no signature). Axis 2 (k) is head-foot. Disc space = voxels of neither
    mask that lie within ``band_mm`` of ``body`` along k *and* between ``body`` and ``others`` in their
    ``(i, j)`` column (so soft tissue in front of or behind the body is never counted). ``None`` when the
    body or the disc space has fewer than 8 voxels (e.g. a vertebra whose neighbours are out of view).
    """
    if others is None:
        return None
    image = np.asarray(image, dtype=np.float64)
    b = np.asarray(body, dtype=bool)
    o = np.asarray(others, dtype=bool)
    if image.ndim != 3 or b.shape != image.shape or o.shape != image.shape:
        raise ValueError(f"expected image, body and others of one (I, J, K) shape, got "
                         f"{image.shape}, {b.shape}, {o.shape}")
    o = o & ~b
    if b.sum() < _MIN_VOXELS:
        return None
    band = max(1, int(round(band_mm / float(spacing_mm))))
    near = ndimage.maximum_filter1d(b.astype(np.uint8), size=2 * band + 1, axis=2) > 0
    # "at or below k" / "at or above k" along the column (axis 2)
    b_low = np.maximum.accumulate(b, axis=2)
    b_high = np.flip(np.maximum.accumulate(np.flip(b, 2), axis=2), 2)
    o_low = np.maximum.accumulate(o, axis=2)
    o_high = np.flip(np.maximum.accumulate(np.flip(o, 2), axis=2), 2)
    gap = near & ~b & ~o & ((b_low & o_high) | (o_low & b_high))
    if gap.sum() < _MIN_VOXELS:
        return None
    return float(np.median(image[b])), float(np.median(image[gap]))


def _ratio(body: float, disc: float) -> tuple[float, float]:
    return body, float(np.log((disc + _EPS) / (body + _EPS)))


def region_signature(per_vertebra: list[tuple[float, float] | None]) -> np.ndarray | None:
    """``(2,)`` region part (body level, disc/body log ratio) from the vertebrae's :func:`patch_signature`
    values: medians over the vertebrae that have one; ``None`` when none has."""
    vals = np.array([v for v in per_vertebra if v is not None], dtype=np.float64)
    if len(vals) == 0:
        return None
    return np.array(_ratio(float(np.median(vals[:, 0])), float(np.median(vals[:, 1]))))


def _values_near(image: Scan, centre_mm: np.ndarray, radius_mm: float, axis: np.ndarray | None = None,
                 half_length_mm: float = 0.0) -> np.ndarray:
    """Intensities of the voxels whose centres lie within ``radius_mm`` of ``centre_mm`` (world LPS mm);
    with a unit ``axis``: within a cylinder of that radius and ``half_length_mm`` along the axis."""
    c = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    ijk = np.floor(image.world_to_voxel(c[None]).coords[0]).astype(int)
    reach = np.ceil(max(radius_mm, half_length_mm) / image.spacing).astype(int) + 1
    lo = np.maximum(ijk - reach, 0)
    hi = np.minimum(ijk + reach + 1, np.array(image.shape))
    if np.any(hi <= lo):
        return np.empty(0)
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    d = image.voxel_to_world(grid.astype(np.float64)).coords - c
    if axis is None:
        keep = np.linalg.norm(d, axis=1) <= radius_mm
    else:
        t = d @ axis
        keep = (np.abs(t) <= half_length_mm) & (np.linalg.norm(d - t[:, None] * axis[None], axis=1) <= radius_mm)
    return np.asarray(image.array)[tuple(grid[keep].T)].astype(np.float64)


def centre_signature(image: Scan, centroids: dict[int, np.ndarray], body_radius_mm: float = 8.0,
                     disc_radius_mm: float = 10.0, disc_half_length: float = 0.25) -> np.ndarray | None:
    """``(2,)`` centre part (body level, disc/body log ratio) of one scan from its centroids, or ``None``.

    ``image``: the scan in window units (``patches.normalise_intensity``); ``centroids``: ``{VerSe id: (3,)
    world LPS mm}`` (stage-1 output or the annotation's). Body = median over the vertebrae of the median
    within ``body_radius_mm`` of each centroid. Disc = median over neighbouring pairs of the median inside a
    cylinder around their midpoint: radius ``disc_radius_mm``, along the line joining them, half-length
    ``disc_half_length`` x their distance. Pairs: anatomically adjacent levels only (L1 and L3 without L2
    would put the midpoint inside L2's body; T12-L1 also across a T13 slot, L5-L6, L6-S1 ...), S1 left out.
    ``None`` without a pair.
    """
    ids = sort_head_to_foot(centroids)
    pts = {v: np.asarray(centroids[v], dtype=np.float64).reshape(3) for v in ids}
    bodies = [float(np.median(x)) for x in (_values_near(image, pts[v], body_radius_mm) for v in ids) if len(x)]
    pairs = [(a, b) for a, b in zip(ids, ids[1:])
             if _SACRUM not in (a, b) and (standard_neighbour(a, 1) == b or anatomical_rank(b) - anatomical_rank(a) == 1)]
    if not bodies or not pairs:
        return None
    discs = []
    for a, b in pairs:
        step = float(np.linalg.norm(pts[b] - pts[a]))
        if step <= 0:
            continue
        x = _values_near(image, (pts[a] + pts[b]) / 2, disc_radius_mm, (pts[b] - pts[a]) / step,
                         disc_half_length * step)
        if len(x):
            discs.append(float(np.median(x)))
    if not discs:
        return None
    return np.array(_ratio(float(np.median(bodies)), float(np.median(discs))))


def scan_signature(centre: np.ndarray | None, region: np.ndarray | None) -> np.ndarray | None:
    """``(4,)`` signature (:data:`SIGNATURE_NAMES`) from its two parts; a missing part is NaN; ``None``
    when both are missing."""
    if centre is None and region is None:
        return None
    return np.concatenate([np.full(2, np.nan) if p is None else np.asarray(p, dtype=np.float64).reshape(2)
                           for p in (centre, region)])


@dataclass
class ContrastReference:
    """Signatures of the training scans, saved with a stage-2 model (``extra["contrast_reference"]``).

    ``signatures``: ``(N, 4)`` one row per training scan (:data:`SIGNATURE_NAMES`; a part that could not be
    measured is NaN, but every row has at least one part); ``contrasts``: the
    sequences named in the training data (``subjects.csv`` / ``synth_meta.json``; empty when unknown).
    Validated on construction (``ValueError`` saying what was expected and what was received).
    """

    signatures: np.ndarray
    contrasts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = np.asarray(self.signatures, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != len(SIGNATURE_NAMES) or len(s) == 0:
            raise ValueError(f"contrast reference: expected a non-empty (N, {len(SIGNATURE_NAMES)}) array of "
                             f"signatures, got shape {s.shape}")
        parts = np.isfinite(s).reshape(len(s), 2, 2)
        if np.any(parts.any(2) != parts.all(2)) or not np.all(parts.all(2).any(1)) or np.any(np.isinf(s)):
            raise ValueError("contrast reference: expected every row to hold at least one complete part "
                             "(both numbers finite; a missing part is NaN), got rows with partial or no parts")
        self.signatures = s
        self.contrasts = tuple(sorted({str(c) for c in self.contrasts if c}))

    def novelty(self, signature: np.ndarray, scales: tuple[float, float]) -> float:
        """Per part, the distance from ``signature`` ``(4,)`` to the nearest training scan that has that part
        (components divided by ``scales``); the larger over the parts both sides have; NaN when none."""
        q = np.asarray(signature, dtype=np.float64).reshape(2, 2)
        ref = self.signatures.reshape(len(self.signatures), 2, 2)
        sc = np.asarray(scales, dtype=np.float64)
        out = []
        for part in range(2):
            rows = ref[np.isfinite(ref[:, part]).all(1), part]
            if np.isfinite(q[part]).all() and len(rows):
                out.append(float(np.sqrt((((rows - q[part][None]) / sc) ** 2).sum(1)).min()))
        return max(out) if out else float("nan")

    def to_dict(self) -> dict:
        return {"names": list(SIGNATURE_NAMES), "signatures": [[None if not np.isfinite(v) else round(float(v), 5) for v in row]
                                                      for row in self.signatures],
                "contrasts": list(self.contrasts)}

    @classmethod
    def from_dict(cls, data) -> "ContrastReference":
        if not isinstance(data, dict) or "signatures" not in data:
            raise ValueError(f"contrast reference: expected a mapping with 'signatures', got {type(data).__name__}")
        names = tuple(data.get("names", SIGNATURE_NAMES))
        if names != SIGNATURE_NAMES:
            raise ValueError(f"contrast reference: expected signature names {list(SIGNATURE_NAMES)}, got {list(names)}")
        try:
            rows = np.array([[np.nan if v is None else float(v) for v in row] for row in data["signatures"]],
                            dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("contrast reference: expected 'signatures' as a list of rows of numbers (null for a "
                             f"missing part), got {str(data['signatures'])[:80]}") from None
        return cls(rows, tuple(data.get("contrasts", ())))


__all__ = ["SIGNATURE_NAMES", "CONTRAST_FLAG", "ContrastReference", "centre_signature", "patch_signature",
           "region_signature", "scan_signature"]
