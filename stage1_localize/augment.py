"""Patch sampling + augmentation for points-only training (numpy / torch, CPU-friendly).

Spatial transforms move the *points* with the image and targets are rebuilt on the patch grid
(``targets.make_targets``), so no label map is ever interpolated.

* spatial: rotations about all axes (sagittal tilt up to ``max_rotation_deg``, the others 0.4 of it),
  isotropic scaling, **left-right flips only** (axis i after canonical LPS reorientation; levels
  unchanged). Head-to-foot is never flipped.
* thick-slice simulation: average ``f`` consecutive slices along one axis and stretch back (what a
  0.8 x 0.8 x 4 mm sagittal acquisition looks like on the 3 mm grid).
* partial field of view: blank a head or foot slab of the patch (points inside are dropped; a vertebra
  cut by the new border keeps its visible tail in the heatmap only if its centre is visible).
* intensity, on the [0, 1] image before the z-score: gamma, random monotone piecewise-linear remaps,
  contrast inversion of the foreground, smooth multiplicative bias field, Gaussian blur, noise.
  Together they make the absolute contrast (T1 vs T2 vs STIR vs Dixon) uninformative, so the network
  has to rely on shape and layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation

from stage1_localize.config import AugmentConfig


@dataclass
class Patch:
    """One training sample: ``image (I, J, K)`` float32 in [0, 1], points ``(M, 3)`` patch voxels, ids."""

    image: np.ndarray
    points_ijk: np.ndarray
    level_ids: list[int]


def sample_patch(
    image: np.ndarray,
    points_ijk: np.ndarray,
    level_ids: list[int],
    patch_size: tuple[int, int, int],
    spacing: np.ndarray,
    rng: np.random.Generator,
    aug: AugmentConfig | None,
    point_weights: np.ndarray | None = None,
) -> Patch:
    """Cut an augmented patch from a prepared ``(I, J, K)`` [0, 1] image (``aug=None``: plain crop).

    ``point_weights`` (``(N,)``, one per point, non-negative, any scale; None: uniform) is the probability
    with which a foreground patch is centred on each point (see ``train.level_balanced_weights``); a
    zero-weight point is never a centre (but still moves with the patch).
    """
    shape = np.asarray(image.shape, dtype=np.float64)
    P = np.asarray(patch_size, dtype=np.float64)
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    use_aug = aug is not None
    p_fg = aug.p_foreground if use_aug else 0.5
    # --- centre in the input volume (foreground oversampling as in nnU-Net)
    if len(pts) and rng.random() < p_fg:
        if point_weights is None:
            n = int(rng.integers(len(pts)))
        else:
            w = np.asarray(point_weights, dtype=np.float64).reshape(-1)
            if w.shape != (len(pts),) or not np.all(w >= 0) or not w.sum() > 0:
                raise ValueError(f"point_weights: expected {len(pts)} non-negative weights with a positive sum, "
                                 f"got {w.tolist()}")
            n = int(rng.choice(len(pts), p=w / w.sum()))
        c_in = pts[n] + rng.uniform(-0.25, 0.25, 3) * P
    else:
        c_in = np.array([rng.uniform(min(p / 2, s / 2), max(s - p / 2, s / 2)) for s, p in zip(shape, P)])
    c_in = np.clip(c_in, 0, shape - 1)
    # --- affine (in mm, converted to voxel units of the input grid)
    m = np.eye(3)
    if use_aug:
        if rng.random() < aug.p_rotate:
            lim = np.deg2rad(aug.max_rotation_deg)
            # sagittal tilt (about the left-right axis i) is the common one; others smaller
            m = Rotation.from_euler("xyz", rng.uniform(-lim, lim, 3) * np.array([1.0, 0.4, 0.4])).as_matrix() @ m
        if rng.random() < aug.p_scale:
            m = m * rng.uniform(*aug.scale_range)
        if rng.random() < aug.p_flip_lr:
            m = m @ np.diag([-1.0, 1.0, 1.0])
    sp = np.asarray(spacing, dtype=np.float64)
    a = np.diag(1.0 / sp) @ m @ np.diag(sp)  # patch voxel offset -> input voxel offset
    c_out = (P - 1) / 2
    # --- resample the image through the affine with grid_sample
    axes = [np.arange(int(p), dtype=np.float64) - c for p, c in zip(P, c_out)]
    u = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (PI, PJ, PK, 3)
    v = u @ a.T + c_in
    norm = 2.0 * v / np.maximum(shape - 1, 1) - 1.0
    grid = torch.from_numpy(norm[..., ::-1].copy()).float()[None]  # (1, PI, PJ, PK, 3) as (k, j, i)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0].numpy()
    # --- points into patch voxels
    new_pts = (pts - c_in) @ np.linalg.inv(a).T + c_out if len(pts) else pts
    ids = list(level_ids)
    if use_aug:
        out, new_pts, ids = _thick_and_fov(out, new_pts, ids, rng, aug)
        out = _intensity(out, rng, aug)
    return Patch(out.astype(np.float32), new_pts, ids)


def thick_slices(img: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """``(I, J, K)`` image averaged over blocks of ``factor`` voxels along ``axis`` and interpolated back
    (linear) to the same shape: a thick-slice acquisition with the same world geometry.

    The axis is padded (edge values) to a multiple of ``factor`` first, so the block centres sit exactly
    at ``(b + 0.5) * factor - 0.5`` and content does not drift along the axis (with a size that is not a
    multiple of ``factor``, pooling with ``ceil_mode`` and resizing would stretch it by up to a block).
    """
    n = img.shape[axis]
    padded_n = -(-n // factor) * factor
    pad = [(0, 0)] * 3
    pad[axis] = (0, padded_n - n)
    t = torch.from_numpy(np.ascontiguousarray(np.pad(img, pad, mode="edge")))[None, None]
    k = [1, 1, 1]
    k[axis] = factor
    small = F.avg_pool3d(t, kernel_size=k, stride=k)
    up = F.interpolate(small, size=tuple(t.shape[-3:]), mode="trilinear", align_corners=False)[0, 0].numpy()
    return np.ascontiguousarray(up[tuple(slice(0, s) for s in img.shape)])


def _thick_and_fov(img, pts, ids, rng, aug: AugmentConfig):
    if rng.random() < aug.p_thick_slices:
        axis = 0 if rng.random() < 0.6 else int(rng.integers(3))
        f = int(rng.integers(aug.thick_factor[0], aug.thick_factor[1] + 1))
        img = thick_slices(img, axis, f)
    if rng.random() < aug.p_partial_fov and len(pts):
        n = img.shape[2]
        low, high = aug.partial_fov_fraction
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"augment.partial_fov_fraction must satisfy 0 <= low <= high < 1, got {(low, high)}")
        cut = int(rng.uniform(low, high) * n)
        img = img.copy()
        if rng.random() < 0.5:  # blank the head end (high k = superior)
            img[:, :, n - cut:] = 0.0
            keep = pts[:, 2] < n - cut - 0.5
        else:
            img[:, :, :cut] = 0.0
            keep = pts[:, 2] > cut - 0.5
        pts = pts[keep]
        ids = [i for i, k in zip(ids, keep) if k]
    return img, pts, ids


def _intensity(img: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    x = np.clip(img, 0.0, 1.0)
    fg = x > 0.02
    if rng.random() < aug.p_gamma:
        x = x ** rng.uniform(*aug.gamma_range)
    if rng.random() < aug.p_remap:
        knots_x = np.linspace(0, 1, 6)
        knots_y = np.sort(rng.uniform(0, 1, 6))
        knots_y = (knots_y - knots_y[0]) / max(knots_y[-1] - knots_y[0], 1e-3)
        x = np.interp(x, knots_x, knots_y)
    if rng.random() < aug.p_invert:
        x = np.where(fg, 1.0 - x, x)
    if rng.random() < aug.p_bias:
        axes = [np.linspace(-1, 1, s) for s in x.shape]
        g = np.meshgrid(*axes, indexing="ij")
        field = sum(rng.normal() * gi for gi in g) + sum(0.5 * rng.normal() * gi**2 for gi in g)
        field = field / (np.abs(field).max() + 1e-6)
        x = x * np.exp(aug.bias_strength * field)
    if rng.random() < aug.p_blur:
        x = ndimage.gaussian_filter(x, sigma=rng.uniform(*aug.blur_sigma_vox))
    if rng.random() < aug.p_noise:
        x = x + rng.normal(0.0, aug.noise_std * rng.uniform(0.3, 1.0), x.shape)
    return x.astype(np.float32)
