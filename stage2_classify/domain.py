"""Does a scan's tissue contrast look like the scans stage 2 was trained on?

The class verdict reads a lesion's brightness *relative to the marrow*, and that sign depends on the MRI
sequence: fat is dark on STIR / Dixon water and bright on T1 / T2-TSE, oedema bright on fluid-sensitive
sequences and dark on T1. A classifier trained on one family of sequences therefore calls lesions of
another family by the wrong name (trained on Dixon water, tested on T2-TSE, the fat AUC fell to 0.27:
``bench/results/stage2_tables_e80.md``), and the user cannot see it from the probabilities. This module
gives every scan a two-number **contrast signature** measured on the stage-2 patches, compares it with the
signatures of the training scans (saved with the model) and lets :class:`~stage2_classify.infer.Classifier`
flag every verdict of a scan that lies far from all of them (``contrast_unseen``).

Signature (both numbers on the patch intensities, i.e. the scan's robust 1-99 % window mapped to [0, 1]):

* ``body_level``: median intensity of the vertebral bodies (bright on T1, dark on STIR / water);
* ``disc_body_log_ratio``: ``log((disc + eps) / (body + eps))`` with ``disc`` the median intensity of the
  voxels *between* a body and its neighbouring body along the head-foot axis, within ``band_mm`` of the
  body (the disc space and endplates; discs are dark against fatty marrow on T1, bright on water / STIR).

A scan's signature is the median of its vertebrae's values (robust to a degenerated disc or a lesion).
Novelty = distance to the *nearest* training scan's signature in units of ``scales`` (so a training set
that mixes sequences covers each of them; no Gaussian assumption). On the real cohorts (whole-scan
version, expert masks) the leave-one-out nearest distances within a cohort are 0.02-0.62 and the distances
between Dixon water and T2-TSE scans 2.5-5.3 in the default units, hence the default threshold 1.5.

The check never changes a verdict (the classification path and its evidence guarantee are untouched);
it only adds a flag. Axes: patches are sampled along the world LPS axes, so patch axis 2 (k) is the
world z (inferior -> superior) axis whatever the scan's orientation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Names of the signature's components (in order).
SIGNATURE_NAMES: tuple[str, ...] = ("body_level", "disc_body_log_ratio")
#: Flag added to every verdict of a scan whose contrast lies outside the training scans'.
CONTRAST_FLAG = "contrast_unseen"
#: Offset inside the log ratio (window units): keeps the ratio finite on black discs / bodies.
_EPS = 0.02
#: Fewest voxels of body / disc space a patch needs to give a signature.
_MIN_VOXELS = 8


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


def scan_signature(per_vertebra: list[tuple[float, float] | None]) -> np.ndarray | None:
    """``(2,)`` signature (:data:`SIGNATURE_NAMES`) from the vertebrae's :func:`patch_signature` values:
    medians over the vertebrae that have one; ``None`` when none has."""
    vals = np.array([v for v in per_vertebra if v is not None], dtype=np.float64)
    if len(vals) == 0:
        return None
    body, disc = np.median(vals[:, 0]), np.median(vals[:, 1])
    return np.array([body, np.log((disc + _EPS) / (body + _EPS))])


@dataclass
class ContrastReference:
    """Signatures of the training scans, saved with a stage-2 model (``extra["contrast_reference"]``).

    ``signatures``: ``(N, 2)`` one row per training scan (:data:`SIGNATURE_NAMES`); ``contrasts``: the
    sequences named in the training data (``subjects.csv`` / ``synth_meta.json``; empty when unknown).
    Validated on construction (``ValueError`` saying what was expected and what was received).
    """

    signatures: np.ndarray
    contrasts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = np.asarray(self.signatures, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != len(SIGNATURE_NAMES) or len(s) == 0 or not np.all(np.isfinite(s)):
            raise ValueError(f"contrast reference: expected a non-empty finite (N, {len(SIGNATURE_NAMES)}) array of "
                             f"signatures, got shape {s.shape}")
        self.signatures = s
        self.contrasts = tuple(sorted({str(c) for c in self.contrasts if c}))

    def novelty(self, signature: np.ndarray, scales: tuple[float, float]) -> float:
        """Distance from ``signature`` ``(2,)`` to the nearest training signature, per component divided by
        ``scales``."""
        d = (self.signatures - np.asarray(signature, dtype=np.float64)[None]) / np.asarray(scales, dtype=np.float64)
        return float(np.sqrt((d**2).sum(1)).min())

    def to_dict(self) -> dict:
        return {"names": list(SIGNATURE_NAMES), "signatures": np.round(self.signatures, 5).tolist(),
                "contrasts": list(self.contrasts)}

    @classmethod
    def from_dict(cls, data) -> "ContrastReference":
        if not isinstance(data, dict) or "signatures" not in data:
            raise ValueError(f"contrast reference: expected a mapping with 'signatures', got {type(data).__name__}")
        names = tuple(data.get("names", SIGNATURE_NAMES))
        if names != SIGNATURE_NAMES:
            raise ValueError(f"contrast reference: expected signature names {list(SIGNATURE_NAMES)}, got {list(names)}")
        return cls(np.asarray(data["signatures"], dtype=np.float64), tuple(data.get("contrasts", ())))


__all__ = ["SIGNATURE_NAMES", "CONTRAST_FLAG", "ContrastReference", "patch_signature", "scan_signature"]
