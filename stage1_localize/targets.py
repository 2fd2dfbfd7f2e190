"""Training targets from points alone (centroid + level name): pure functions on voxel grids.

Design: **one level-agnostic centre heatmap + a per-voxel level map**, not one Gaussian channel per level.

* ``heatmap`` ``(I, J, K)`` float in [0, 1]: the maximum over vertebrae of an isotropic Gaussian (sigma in
  **mm**, so the target does not change with the voxel size) centred on each annotated centroid.
  Finding "a vertebral body centre" is local and translation-equivariant: every annotated vertebra of
  every level is a positive example for the same channel, so the detector learns from all the data
  (important with few scans and with points-only labels).
* ``offset`` ``(3, I, J, K)`` float: the vector (mm, voxel axes i, j, k) from each voxel to the nearest
  annotated centroid inside a ball of ``offset_radius_mm`` (``offset_mask`` marks those voxels). A
  coarse heatmap peak is biased (the 3 mm grid quantises it, and a smooth network output leans towards
  the neighbouring vertebrae, e.g. L5's peak towards L4); the offset regression (as in CenterNet,
  Zhou et al. 2019) corrects the peak position with a locally learnt vector instead.
* ``levels`` ``(I, J, K)`` int: index into ``config.levels`` inside a ball of ``level_radius_mm`` around
  each centroid (nearest centroid wins where balls overlap), ``IGNORE`` (-1) elsewhere. Trained with
  softmax cross-entropy, it gives every detected peak a *probability vector over levels*, which is
  exactly the input the anatomical labeller (``labelling.py``) needs to pick a globally consistent,
  ordered naming. With one-Gaussian-per-level channels, by contrast, each channel sees only one
  example per scan, an unseen level (T13 / L6) is just a dead channel, and the network alone would
  have to solve ordering and duplicates; here the labeller does that with explicit anatomy.

Both targets need only centroids, so spatial augmentation can move points and rebuild targets on the
augmented grid (no label-map interpolation). Masks, when present, are only used to compute centroids.

Points annotate a *contiguous run* of levels, which says nothing about vertebrae beyond it (e.g. a
cohort annotating L1-L5 leaves the visible T12 unlabelled, while another annotates T11-L5). Penalising
the heatmap there teaches contradictions, so :func:`annotated_span_weight` gives the heatmap loss zero
weight beyond ``margin`` above the most cranial annotated centroid, and below the most caudal one unless
that one is L5 / L6 / S1 (then what lies below is the sacrum, a true negative for a free-vertebra detector
when S1 is not annotated, and is kept).

The same partial annotation also leaves the level head blind beyond the run: trained on L1-L5 only, it
learns "the top-most body in view is L1" and names a visible T12 "L1", shifting the whole run (seen on
myosegmentum). :func:`extrapolate_cranial` therefore adds pseudo-points above the most cranial annotated
level by repeating the last inter-centroid step (T12 = L1 + (L1 - L2)); at the thoraco-lumbar junction
the spine is nearly straight, and on chu2015 (T11-L5 annotated) this places T12 within 2.6 mm median /
5.9 mm max of the expert centroid and T11 (from T12, L1) within 2.9 / 10.0 mm (17 scans).

At the caudal end the heatmap already treats the sacrum below an annotated L5 as background
(:data:`CLOSED_BELOW`), but the *level head* is never told what that body is: when the detector still fires
on the sacrum, the level head, which has only seen L5 as the lowest level, calls it "L5" and the labeller
shifts the whole run one level up (the commonest whole-scan error on the real benchmark: myosegmentum-010,
-013 and chu2015-019 in ``stage1_e80_tilt1``). :func:`extrapolate_caudal` adds an S1 pseudo-point one step
below L5 (L5 + (L5 - L4)); the lordosis and the sacral angle make that position approximate (L5 from
L3-L4: 8.6 / 15.7 mm), so it is meant to supervise the level map only (``level_only``), not the heatmap.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data_prep.scan import TRANSITIONAL_IDS, anatomical_rank, standard_neighbour

IGNORE = -1
#: VerSe id of S1 / the sacrum
SACRUM_ID = 26


def _box(center: np.ndarray, radius_vox: np.ndarray, shape: Sequence[int]) -> tuple[slice, slice, slice] | None:
    lo = np.maximum(np.floor(center - radius_vox).astype(int), 0)
    hi = np.minimum(np.ceil(center + radius_vox).astype(int) + 1, np.asarray(shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _sq_dist_mm(box: tuple[slice, slice, slice], center: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    axes = [(np.arange(s.start, s.stop) - c) * sp for s, c, sp in zip(box, center, spacing)]
    return axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2


def centre_heatmap(
    shape: Sequence[int], points_ijk: np.ndarray, spacing: Sequence[float], sigma_mm: float
) -> np.ndarray:
    """``(I, J, K)`` float32: max over points of ``exp(-d^2 / 2 sigma^2)`` (d in mm; peak 1 at a point).

    ``points_ijk`` ``(N, 3)`` are continuous voxel indices; points outside the grid still contribute
    their visible tail (a vertebra cut by the field of view).
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    out = np.zeros(shape, dtype=np.float32)
    radius_vox = 3.0 * sigma_mm / spacing
    for p in np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3):
        box = _box(p, radius_vox, shape)
        if box is None:
            continue
        g = np.exp(-_sq_dist_mm(box, p, spacing) / (2.0 * sigma_mm**2)).astype(np.float32)
        np.maximum(out[box], g, out=out[box])
    return out


def nearest_point_index(
    shape: Sequence[int], points_ijk: np.ndarray, spacing: Sequence[float], radius_mm: float
) -> np.ndarray:
    """``(I, J, K)`` int64: index of the nearest point within ``radius_mm`` (mm), ``-1`` outside every
    ball; on equal distance the earlier point wins. Points outside the grid still reach into it."""
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    out = np.full(shape, -1, dtype=np.int64)
    best = np.full(shape, np.inf, dtype=np.float64)
    radius_vox = radius_mm / spacing
    for n, p in enumerate(pts):
        box = _box(p, radius_vox, shape)
        if box is None:
            continue
        d2 = _sq_dist_mm(box, p, spacing)
        win = (d2 <= radius_mm**2) & (d2 < best[box])
        best[box][win] = d2[win]
        out[box][win] = n
    return out


def level_map(
    shape: Sequence[int],
    points_ijk: np.ndarray,
    class_index: Sequence[int],
    spacing: Sequence[float],
    radius_mm: float,
) -> np.ndarray:
    """``(I, J, K)`` int64: ``class_index[n]`` within ``radius_mm`` of point n (nearest wins), else ``IGNORE``."""
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    if len(pts) != len(class_index):
        raise ValueError(f"{len(pts)} points but {len(class_index)} class indices")
    idx = nearest_point_index(shape, pts, spacing, radius_mm)
    classes = np.append(np.asarray(class_index, dtype=np.int64).reshape(-1), IGNORE)
    return classes[idx]  # idx -1 picks the appended IGNORE


def offset_map(
    shape: Sequence[int], points_ijk: np.ndarray, spacing: Sequence[float], radius_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(offset (3, I, J, K) float32 mm, mask (I, J, K) bool)``: vector from each voxel to the nearest point.

    The vector is ``(point - voxel) * spacing`` per voxel axis (i, j, k), in mm; ``mask`` is True within
    ``radius_mm`` of a point (nearest point wins, :func:`nearest_point_index`), where the offset loss is
    applied. Points outside the grid still reach into it with their ball.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    idx = nearest_point_index(shape, pts, spacing, radius_mm)
    mask = idx >= 0
    off = np.zeros((3,) + shape, dtype=np.float32)
    if mask.any():
        voxels = np.argwhere(mask)
        off[(slice(None),) + tuple(voxels.T)] = ((pts[idx[mask]] - voxels) * spacing).T
    return off, mask


#: Lowest annotated levels after which the spine ends (the sacrum follows): no ignore band below them.
CLOSED_BELOW = frozenset({24, 25, 26})


def annotated_span_weight(
    shape: Sequence[int],
    points_ijk: np.ndarray,
    level_ids: Sequence[int],
    spacing: Sequence[float],
    margin_mm: float,
    superior_axis: int = 2,
) -> np.ndarray:
    """``(I, J, K)`` float32 heatmap-loss weight: 1 inside the annotated head-to-foot span (+ margin), else 0.

    ``points_ijk`` are *all* annotated centroids of the subject in this grid's voxels (also those
    outside the grid); voxel axis ``superior_axis`` must point to the head (canonical LPS: k). With no
    points the weight is 1 everywhere (nothing is known to be unannotated).
    """
    shape = tuple(int(s) for s in shape)
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    w = np.ones(shape, dtype=np.float32)
    if len(pts) == 0:
        return w
    sp = float(np.asarray(spacing, dtype=np.float64).reshape(3)[superior_axis])
    pos_mm = np.arange(shape[superior_axis]) * sp
    coord = pts[:, superior_axis] * sp
    keep = pos_mm <= coord.max() + margin_mm
    lowest = int(np.asarray(level_ids)[int(np.argmin(coord))]) if len(level_ids) == len(pts) else None
    if lowest not in CLOSED_BELOW:
        keep &= pos_mm >= coord.min() - margin_mm
    view = [None, None, None]
    view[superior_axis] = slice(None)
    return w * keep.astype(np.float32)[tuple(view)]


def _rotate_about_x(v: np.ndarray, deg: float) -> np.ndarray:
    """``v`` (3,) rotated by ``deg`` about the LPS x (left) axis: a positive angle turns a foot-ward (-z) vector
    towards posterior (+y), e.g. (0, 0, -1) by 90 deg -> (0, 1, 0)."""
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([v[0], c * v[1] - s * v[2], s * v[1] + c * v[2]])


def _extrapolate(world_mm: np.ndarray, level_ids: Sequence[int], n_levels: int, direction: int,
                 superior: Sequence[float], sacral_bend_deg: Sequence[float] = (0.0,),
                 sacral_step_scale: float = 1.0) -> tuple[list[int], np.ndarray]:
    """Shared body of :func:`extrapolate_cranial` (``direction=-1``) and :func:`extrapolate_caudal` (``+1``)."""
    pts = np.asarray(world_mm, dtype=np.float64).reshape(-1, 3)
    ids = [int(v) for v in level_ids]
    if len(ids) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(ids)} level ids")
    if len(ids) < 2 or n_levels <= 0:
        return [], np.zeros((0, 3))
    # end = the annotated level at the extrapolated end of the run, inner = its neighbour inside the run
    order = sorted(range(len(ids)), key=lambda n: direction * anatomical_rank(ids[n]), reverse=True)
    end_id, inner_id = ids[order[0]], ids[order[1]]
    end, inner = pts[order[0]], pts[order[1]]
    # the step must point head-wards when extending cranially, foot-wards when extending caudally
    toward = -direction * np.asarray(superior, dtype=np.float64).reshape(3)
    new_ids, new_pts = [], []
    for _ in range(n_levels):
        nxt = standard_neighbour(end_id, direction)
        if end_id in TRANSITIONAL_IDS or inner_id in TRANSITIONAL_IDS or nxt is None \
                or standard_neighbour(inner_id, direction) != end_id or float((end - inner) @ toward) <= 0:
            break
        step = end - inner
        if nxt == SACRUM_ID:  # nothing below it: one point per bend angle, then stop
            for deg in sacral_bend_deg:
                new_ids.append(nxt)
                new_pts.append(end + sacral_step_scale * _rotate_about_x(step, deg))
            break
        p = end + step
        new_ids.append(nxt)
        new_pts.append(p)
        end_id, inner_id, end, inner = nxt, end_id, p, end
    return new_ids, np.asarray(new_pts, dtype=np.float64).reshape(-1, 3)


def extrapolate_cranial(
    world_mm: np.ndarray, level_ids: Sequence[int], n_levels: int = 1, superior: Sequence[float] = (0.0, 0.0, 1.0)
) -> tuple[list[int], np.ndarray]:
    """Pseudo-centroids for the ``n_levels`` standard levels above the most cranial annotated one.

    ``world_mm`` ``(N, 3)`` world (LPS) centroids with VerSe ``level_ids``. Each new point repeats the
    last step, ``new = top + (top - next)``, where ``top`` and ``next`` must be consecutive standard
    levels and the step must point towards the head (``superior``, LPS +z); otherwise nothing is added.
    Returns ``(ids, (M, 3) world mm)`` of the *added* points only (M <= n_levels), head-most last.
    E.g. L1 at z = 0 and L2 at z = -30 -> ``([19], [[0, 0, 30]])`` (T12).
    """
    return _extrapolate(world_mm, level_ids, n_levels, -1, superior)


def extrapolate_caudal(
    world_mm: np.ndarray, level_ids: Sequence[int], n_levels: int = 1, superior: Sequence[float] = (0.0, 0.0, 1.0),
    sacral_bend_deg: Sequence[float] = (0.0,), sacral_step_scale: float = 1.0,
) -> tuple[list[int], np.ndarray]:
    """Pseudo-centroids for the ``n_levels`` standard levels below the most caudal annotated one, repeating the
    last step towards the feet (L4 at z = 0, L5 at z = -30 -> ``([26], [[0, 0, -60]])``, S1: the standard
    level after L5; nothing after S1). Same rules and return value as :func:`extrapolate_cranial`, foot-most
    last. The lordosis makes the position approximate (L5 from L3-L4: 8.6 mm median, 15.7 mm max on chu2015),
    so these points are meant for the level head only (``Stage1Config.extrapolated_level_only``): a body
    seen below an annotated L5 is the sacrum, and the level head should call it S1, not L5.

    The step *into S1* gives one S1 point per angle of ``sacral_bend_deg``, each the step turned by that
    angle about the left-right (LPS x) axis towards posterior and scaled by ``sacral_step_scale``: the
    sacrum lies behind the line of the lumbar bodies by a lumbosacral angle that varies between people, so
    an arc of points (e.g. 15 / 30 / 45 deg) covers where its upper body may be. It assumes ``superior`` is
    LPS +z (a sagittal plane y-z). E.g. L4 at z = 0, L5 at z = -30, angle 90 deg -> S1 at y = +30, z = -30;
    with scale 0.5 at y = +15, z = -30; angles (0, 90) -> both (0, 0, -60) and (0, 30, -30).
    """
    if not sacral_step_scale > 0:
        raise ValueError(f"sacral_step_scale: expected a positive factor, got {sacral_step_scale}")
    return _extrapolate(world_mm, level_ids, n_levels, +1, superior, sacral_bend_deg, sacral_step_scale)


def level_indices(level_ids: Sequence[int], levels: Sequence[int]) -> np.ndarray:
    """VerSe ids -> indices into ``levels`` (the level head's vocabulary); unknown ids -> ``IGNORE``."""
    lut = {int(v): i for i, v in enumerate(levels)}
    return np.array([lut.get(int(v), IGNORE) for v in level_ids], dtype=np.int64)


def make_targets(
    shape: Sequence[int],
    points_ijk: np.ndarray,
    level_ids: Sequence[int],
    spacing: Sequence[float],
    *,
    levels: Sequence[int],
    sigma_mm: float,
    level_radius_mm: float,
    span_margin_mm: float | None = None,
    offset_radius_mm: float | None = None,
    level_only: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """``{"heatmap": (I,J,K) float32, "levels": (I,J,K) int64, "heatmap_weight": (I,J,K) float32}``,
    plus ``"offset": (3,I,J,K) float32 mm`` and ``"offset_mask": (I,J,K) bool`` when ``offset_radius_mm``
    is given (:func:`offset_map`; every vertebra counts, whatever its level).

    Vertebrae whose level is not in ``levels`` still appear in the heatmap (they are vertebrae) but
    leave the level map at ``IGNORE``. ``span_margin_mm`` (None: weight 1 everywhere) enables
    :func:`annotated_span_weight` along the canonical superior axis k. ``level_only`` (``(N,)`` bool)
    marks points that shape only the level map (extrapolated pseudo-centroids whose position is too
    approximate for the heatmap and offsets); they are also left out of the span.
    """
    pts = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
    ids = [int(v) for v in level_ids]
    idx = level_indices(ids, levels)
    real = np.ones(len(pts), dtype=bool) if level_only is None else ~np.asarray(level_only, dtype=bool).reshape(-1)
    if real.shape != (len(pts),):
        raise ValueError(f"level_only: expected {len(pts)} flags, got {real.shape[0]}")
    rp, rids = pts[real], [v for v, keep in zip(ids, real) if keep]
    weight = (annotated_span_weight(shape, rp, rids, spacing, span_margin_mm)
              if span_margin_mm is not None else np.ones(tuple(int(s) for s in shape), dtype=np.float32))
    out = {
        "heatmap": centre_heatmap(shape, rp, spacing, sigma_mm),
        "levels": level_map(shape, pts, idx, spacing, level_radius_mm),
        "heatmap_weight": weight,
    }
    if offset_radius_mm is not None:
        out["offset"], out["offset_mask"] = offset_map(shape, rp, spacing, offset_radius_mm)
    return out
