"""Toy per-vertebra patches for stage-2 tests (no I/O, milliseconds to build)."""
from __future__ import annotations

import numpy as np

from stage2_classify.patches import Patch, ellipsoid_prior, patch_grid
from stage2_classify.train import Sample, sample_from_patch


def toy_patch(cfg, cls: int, rng: np.random.Generator, distractor: bool = True) -> tuple[Patch, int]:
    """A patch with a centre body (label 20), neighbours (19, 21), discs and a class-dependent lesion.

    inflammation: bright corner blob inside the centre body; fat: dark blob inside it; normal: none.
    A bright blob *outside* the region (in the neighbour above) is added at random to every class, so a
    classifier that looks outside its vertebra is misled.
    """
    shape = cfg.patch.shape
    sp = cfg.patch.spacing_mm
    c = (np.array(shape) - 1) / 2.0 + rng.uniform(-0.5, 0.5, 3)
    half = np.array([20.0, 16.0, 12.0]) / sp
    body = ellipsoid_prior(shape, c, half)
    up = ellipsoid_prior(shape, c + np.array([0, 0, 34.0 / sp]), half)
    down = ellipsoid_prior(shape, c - np.array([0, 0, 34.0 / sp]), half)
    verts = np.zeros(shape, np.int16)
    verts[body], verts[up & ~body], verts[down & ~body] = 20, 21, 19
    img = rng.normal(0.1, 0.03, shape).astype(np.float32)
    img[verts > 0] = 0.5 + rng.normal(0, 0.03, int((verts > 0).sum()))
    lesions = np.zeros(shape, np.int16)
    if cls in (1, 2):
        corner = c + np.array([0.0, -0.6, 0.6 * rng.choice([-1, 1])]) * half
        spot = ellipsoid_prior(shape, corner, np.full(3, 7.0 / sp)) & body
        img[spot] = 0.95 if cls == 1 else 0.15
        lesions[spot] = cls
    if distractor and rng.random() < 0.5:
        spot = ellipsoid_prior(shape, c + np.array([0, 0, 34.0 / sp]), np.full(3, 7.0 / sp))
        img[spot] = 0.95
    geo = patch_grid(np.zeros(3), cfg.patch).with_array(img.astype(np.float32))
    return Patch(img.astype(np.float32), geo, {"vertebrae": verts, "lesions": lesions}), 20


def toy_samples(cfg, n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cls = i % len(cfg.classes)
        patch, label = toy_patch(cfg, cls, rng)
        out.append(sample_from_patch(patch, label, cls, cfg, subject=f"s{i}"))
    return out
