"""Preprocessing shared by training and inference: canonical orientation, coarse grid, robust intensities.

1. **Reorient** to LPS voxel axes (``data_prep.scan.reorient``: pure permutation/flips, no interpolation),
   so the network always sees i = right->left, j = anterior->posterior, k = inferior->superior whatever
   the acquisition (sagittal, axial, oblique within 45 degrees).
2. **Resample** to ``config.target_spacing`` (``data_prep.scan.resample_to_spacing``, any anisotropy, e.g.
   0.7 x 0.7 x 4 mm). Axes that are downsampled are first Gaussian-smoothed (anti-aliasing, sigma =
   half the downsampling factor in input voxels). The resampled :class:`Scan` keeps origin/direction
   exactly, so ``grid.voxel_to_world(peak_ijk)`` is the world LPS position of a predicted peak.
3. **Intensities**: clip to robust percentiles and map to [0, 1] (``unit_range``); the network input is
   the z-score of that (``zscore``). Percentile clipping removes the dependence on scanner scaling and
   outliers; z-scoring removes the remaining offset/scale, so T1, T2, STIR, Dixon or uint8-rescaled
   data all arrive with comparable statistics. Augmentations (contrast remaps, inversion) act on the
   [0, 1] image before the z-score, exactly as at inference.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from data_prep.scan import Scan, reorient, resample_to_spacing
from stage1_localize.config import Stage1Config

CANONICAL = "LPS"


def unit_range(array: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip to the given percentiles and rescale to [0, 1] (float32). Constant images map to 0."""
    a = np.asarray(array, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a, dtype=np.float32)
    lo, hi = np.percentile(finite, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    out = (np.nan_to_num(a, nan=float(lo)) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def zscore(array: np.ndarray | "torch.Tensor"):  # noqa: F821
    """``(x - mean) / std`` over the whole array (numpy or torch)."""
    m = array.mean()
    s = array.std()
    return (array - m) / (s + 1e-6)


def prepare(scan: Scan, config: Stage1Config, direction: np.ndarray | None = None) -> Scan:
    """Canonical, coarse, [0, 1]-intensity version of ``scan`` (a new :class:`Scan`, geometry exact).

    ``direction`` ``(3, 3)``: axes of the output grid (default: the canonical scan's own); another one,
    e.g. rotated (``infer.detilt_direction``), resamples the whole field of view onto it in the same single
    interpolation (zero outside the scan)."""
    can = reorient(scan, CANONICAL)
    arr = np.asarray(can.array, dtype=np.float32)
    target = np.asarray(config.target_spacing, dtype=np.float64)
    factor = target / can.spacing
    sigma = np.where(factor > 1.0, 0.5 * factor, 0.0)
    if np.any(sigma > 0):
        arr = ndimage.gaussian_filter(arr, sigma=sigma, mode="nearest")
    grid = resample_to_spacing(can.with_array(arr), target, direction=direction)
    grid.array = unit_range(grid.array, tuple(config.clip_percentiles))  # type: ignore[arg-type]
    return grid


def extent_mm(scan: Scan) -> np.ndarray:
    """Physical size (mm) of the scan along its voxel axes after canonical reorientation."""
    can_dirs = np.abs(scan.direction)  # voxel axis c mostly along world axis argmax(col c)
    out = np.zeros(3)
    for c in range(3):
        out[int(np.argmax(can_dirs[:, c]))] = scan.shape[c] * scan.spacing[c]
    return out
