"""Stage-1 inference: ``localize(scan, model_dir) -> list[Vertebra]`` and the centroid CSV writer.

Pipeline per scan:

1. ``preprocess.prepare`` (canonical LPS, 3 mm grid, [0, 1] intensities) then z-score;
2. the network, by sliding window with the training patch size (``sliding_window``; else the whole
   volume padded at the high end to the pooling divisor, cropped back) -> sigmoid heatmap, softmax
   level map and (with an offset head) the offset map;
3. peaks: local maxima of the heatmap within ``nms_radius_mm`` (ellipsoidal footprint in voxels, so the
   suppression radius is in mm whatever the spacing), above ``peak_threshold``, at most
   ``max_candidates``; sub-voxel position from the offset head (heatmap-weighted mean of
   ``voxel + offset`` over the 3x3x3 neighbourhood) or, without one, the heatmap-weighted mean of the
   neighbourhood; level probabilities averaged over the same neighbourhood. With ``tta_flip_lr`` the
   maps are the mean of the scan's and its left-right mirror's;
4. peak voxel -> world LPS mm through the prepared grid's own geometry (``Scan.voxel_to_world``), which
   is exact for any orientation and spacing of the input;
5. ``labelling.assign_levels`` names the candidates (anatomical order, spacing prior, transitional
   flags; the caudal end checked against the level map through :func:`level_probe`); with
   ``labelling.fill_gaps`` / ``extend_ends``, ``labelling.complete_run`` adds the levels the
   named run skipped or that continue it where the heatmap supports them (:func:`heat_probe`); centroids
   within ``border_mm`` of the input volume's edge get ``"cut_by_fov"``;
6. de-tilting (``detilt_min_deg``): when the axis of the named run lies far from the training scans'
   usual tilt in the grid (:func:`spine_tilt_deg`), steps 1-5 run again with the prepared grid rotated
   about its left-right axis (:func:`detilt_direction`), and that naming is returned (``candidates`` stays
   the first pass).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_prep import checkpoint
from data_prep import precision as precision_mod
from data_prep.errors import SpinepipeInputError
from data_prep.io import as_paths, write_csv
from data_prep.scan import Scan, Vertebra, sort_head_to_foot
from stage1_localize.config import Stage1Config
from stage1_localize.labelling import AMBIGUOUS_FLAG, LevelProbe, Probe, assign_levels, complete_run
from stage1_localize.model import LocalizerNet, activate, memory_format, predict_sliding_window, predict_volume
from stage1_localize.preprocess import prepare, zscore

log = logging.getLogger(__name__)

CENTROID_COLUMNS = ["level", "label", "x_mm", "y_mm", "z_mm", "confidence", "flags"]
CUT_FLAG = "cut_by_fov"


def find_peaks(heatmap: np.ndarray, spacing, threshold: float, radius_mm: float, max_peaks: int,
               refine: bool = True):
    """Local maxima of ``heatmap (I, J, K)``: ``(ijk (M, 3) float, values (M,))``, best first.

    ``refine``: sub-voxel position (heatmap-weighted mean of the 3x3x3 neighbourhood); else the
    integer peak voxel."""
    spacing = np.asarray(spacing, dtype=np.float64)
    r = np.maximum(np.floor(radius_mm / spacing), 1).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, spacing)], indexing="ij")
    footprint = sum(g**2 for g in grids) <= radius_mm**2
    maxf = ndimage.maximum_filter(heatmap, footprint=footprint, mode="constant", cval=-np.inf)
    idx = np.argwhere((heatmap >= maxf) & (heatmap >= threshold))
    if len(idx) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    vals = heatmap[tuple(idx.T)]
    order = np.argsort(-vals, kind="stable")
    idx, vals = idx[order], vals[order]
    # greedy suppression in mm: plateaus (e.g. a saturated sigmoid) leave several equal maxima
    kept: list[int] = []
    for n in range(len(idx)):
        if len(kept) >= max_peaks:
            break
        if kept and np.min(np.linalg.norm((idx[kept] - idx[n]) * spacing, axis=1)) <= radius_mm:
            continue
        kept.append(n)
    idx, vals = idx[kept], vals[kept]
    if not refine:
        return idx.astype(np.float64), vals
    refined = np.array([_refine(heatmap, p) for p in idx])
    return refined, vals


def vote_peaks(heatmap: np.ndarray, offset_mm: np.ndarray, spacing, threshold: float, radius_mm: float,
               max_peaks: int, vote_sigma_vox: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Candidates by offset voting: ``(ijk (M, 3) integer voxel float, scores (M,))``, best first.

    Every voxel with ``heatmap >= threshold`` adds its heat at the voxel its offset points to
    (``voxel + offset_mm / spacing``, rounded; ``offset_mm`` ``(3, I, J, K)`` mm along i, j, k); the vote
    map is smoothed (Gaussian, ``vote_sigma_vox``) and its local maxima (``radius_mm`` suppression, as
    :func:`find_peaks`) are the candidates. A candidate's score is the heat maximum in its 3x3x3
    neighbourhood and must reach ``threshold``. Two vertebrae whose heat blobs merge into one ridge still
    give two vote peaks, because each side's offsets point to its own centre.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    vox = np.argwhere(heat >= threshold)
    if len(vox) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    w = heat[tuple(vox.T)]
    target = np.round(vox + np.asarray(offset_mm)[(slice(None),) + tuple(vox.T)].T / spacing).astype(np.int64)
    inside = np.all((target >= 0) & (target < np.asarray(heat.shape)), axis=1)
    votes = np.zeros(heat.shape, dtype=np.float64)
    np.add.at(votes, tuple(target[inside].T), w[inside])
    votes = ndimage.gaussian_filter(votes, vote_sigma_vox)
    ijk, _ = find_peaks(votes, spacing, 1e-6, radius_mm, 4 * max_peaks, refine=False)
    if len(ijk) == 0:
        return np.zeros((0, 3)), np.zeros(0)
    scores = np.array([heat[_neighbourhood(heat.shape, p)].max() for p in ijk])
    keep = scores >= threshold
    ijk, scores = ijk[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:max_peaks]
    return ijk[order], scores[order]


def refine_with_offsets(heatmap: np.ndarray, offset_mm: np.ndarray, spacing, peaks_ijk: np.ndarray) -> np.ndarray:
    """``(M, 3)`` voxel positions: for each integer peak, the mean of ``voxel + offset / spacing`` over its
    3x3x3 neighbourhood, weighted by the heatmap (``offset_mm`` ``(3, I, J, K)``, mm along i, j, k)."""
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    out = []
    for p in np.asarray(peaks_ijk, dtype=np.float64).reshape(-1, 3):
        box = _neighbourhood(heatmap.shape, np.round(p))
        w = np.clip(heatmap[box], 0, None).astype(np.float64)
        if w.sum() <= 0:
            w = np.ones_like(w)
        coords = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
        est = [((coords[a] + offset_mm[a][box] / spacing[a]) * w).sum() / w.sum() for a in range(3)]
        out.append(est)
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def _neighbourhood(shape, p):
    return tuple(slice(max(0, int(c) - 1), min(int(s), int(c) + 2)) for c, s in zip(p, shape))


def _level_logprobs(levels_map: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """``(L,)`` log of the level map ``(L, I, J, K)`` averaged over the 3x3x3 neighbourhood of voxel ``ijk``
    (integer-valued; clipped at the grid's edge): a candidate's level vector, and the caudal check's."""
    p = levels_map[(slice(None),) + _neighbourhood(levels_map.shape[1:], ijk)].reshape(len(levels_map), -1).mean(1)
    return np.log(np.clip(p, 1e-6, 1.0))


def _refine(heatmap: np.ndarray, p: np.ndarray) -> np.ndarray:
    box = _neighbourhood(heatmap.shape, p)
    w = np.clip(heatmap[box], 0, None).astype(np.float64)
    if w.sum() <= 0:
        return p.astype(np.float64)
    coords = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    return np.array([(c * w).sum() / w.sum() for c in coords])


def fov_depth_mm(scan: Scan, world_mm: np.ndarray) -> float:
    """How far (mm) a world LPS point lies inside ``scan``'s field of view: the distance to the nearest face
    of the image volume (voxel edges, along the voxel axes); negative outside."""
    ijk = scan.world_to_voxel(np.asarray(world_mm, dtype=np.float64).reshape(1, 3)).coords[0]
    shape = np.asarray(scan.shape, dtype=np.float64)
    return float(np.min(np.minimum(ijk + 0.5, shape - 0.5 - ijk) * np.asarray(scan.spacing, dtype=np.float64)))


def cut_by_fov(scan: Scan, world_mm: np.ndarray, border_mm: float) -> bool:
    """True when the centroid lies within ``border_mm`` of the edge of ``scan``'s field of view."""
    return fov_depth_mm(scan, world_mm) < border_mm


#: Stage1Config fields that must agree between the members of an ensemble: what the networks are fed
#: (grid, intensity normalisation) and what their maps mean (levels, offset scale).
ENSEMBLE_FIELDS = ("target_spacing", "levels", "in_channels", "clip_percentiles", "offset_radius_mm")


def holds_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a stage-1 model (``config.json``) or an ensemble of them (``ensemble.json``)."""
    return any((Path(path) / name).is_file() for name in (checkpoint.CONFIG, checkpoint.ENSEMBLE))


def model_folders(path: str | os.PathLike) -> list[Path]:
    """The model folders ``path`` stands for: itself when it holds a model (``config.json``), or the members
    listed in its ``ensemble.json`` (``train.train_stage1_ensemble``); ``path`` itself otherwise (so that
    loading it reports what is missing)."""
    path = Path(path)
    if (path / checkpoint.CONFIG).is_file() or not holds_model(path):
        return [path]
    try:
        members = json.loads((path / checkpoint.ENSEMBLE).read_text())["members"]
        if not members or not all(isinstance(m, str) and m and "/" not in m and "\\" not in m and m not in (".", "..")
                                  for m in members):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise SpinepipeInputError(path / checkpoint.ENSEMBLE, 'expected {"members": [folder names in this folder, ...]}') from None
    return [path / m for m in members]


def _load_stage1(model_dir: Path) -> tuple[torch.nn.Module, Stage1Config, dict]:
    if not (model_dir / checkpoint.CONFIG).is_file():
        raise SpinepipeInputError(model_dir, "no stage-1 model here (config.json missing); run `make train-stage1`")
    state, config, extra = checkpoint.load_model(model_dir, Stage1Config, kind="stage1")
    try:
        precision_mod.validate(config.precision)
    except ValueError as e:
        raise SpinepipeInputError(model_dir / checkpoint.CONFIG, str(e)) from None
    net = LocalizerNet(config)
    checkpoint.load_state_into(net, state, model_dir / checkpoint.WEIGHTS)
    return net, config, extra


class Localizer:
    """Loads a stage-1 model once and localises many scans (``Localizer(model_dir).localize(scan)``).

    ``model_dir`` may also be a sequence of model folders trained on the same data, or a folder written by
    ``train.train_stage1_ensemble`` (:func:`model_folders`): an ensemble. Each network predicts its maps
    with its own plans (patch size, topology), the activated maps are averaged, and the first model's
    config decodes them (its ``precision`` applies to every member). The members must agree on
    :data:`ENSEMBLE_FIELDS`.
    """

    def __init__(self, model_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                 device: str | torch.device | None = None,
                 net: torch.nn.Module | None = None, config: Stage1Config | None = None):
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if net is not None:
            if config is None:
                raise ValueError("Localizer(net=...) also needs config=")
            members = [(net, config)]
            self.extra, self.model_dirs = {}, []
        else:
            if model_dir is None:
                raise ValueError("Localizer needs model_dir (or net= and config=)")
            dirs = [d for g in as_paths(model_dir) for d in model_folders(g)]
            if not dirs:
                raise ValueError("Localizer needs at least one model folder")
            members, extras = [], []
            for d in dirs:
                m_net, m_cfg, m_extra = _load_stage1(d)
                if members:
                    bad = [f for f in ENSEMBLE_FIELDS if getattr(m_cfg, f) != getattr(members[0][1], f)]
                    if bad:
                        raise SpinepipeInputError(d / checkpoint.CONFIG, f"cannot join an ensemble with {dirs[0]}: "
                                                  f"{', '.join(bad)} differ ({', '.join(f'{getattr(members[0][1], f)} vs {getattr(m_cfg, f)}' for f in bad)})")
                members.append((m_net, m_cfg))
                extras.append(m_extra)
            self.extra = extras[0]
            #: The member model folders, in order (run records name them, ``pipeline.predict``).
            self.model_dirs = dirs
            if any(e.get("synthetic_only") for e in extras):
                log.warning("%s: stage-1 model trained on built-in synthetic scans only: fine for synthetic "
                            "scans, but it names real scans poorly (identification 0.47 on 16 real scans for "
                            "the demo's model); train it on annotated real scans (make train-stage1 DATA=DIR)",
                            dirs[0])
        self.config = members[0][1]
        #: (network, patch size, divisor) per member, first = ``self.net``
        self.members = []
        for m_net, m_cfg in members:
            m_net = m_net.to(self.device, memory_format=memory_format(m_cfg)).eval()
            divisor = tuple(getattr(m_net, "divisor", m_cfg.plan.divisor))
            self.members.append((m_net, tuple(m_cfg.plan.patch_size), divisor))
        self.divisor = self.members[0][2]

    @property
    def net(self) -> torch.nn.Module:
        """The (first) network; assigning replaces the first member."""
        return self.members[0][0]

    @net.setter
    def net(self, value: torch.nn.Module) -> None:
        self.members[0] = (value,) + tuple(self.members[0][1:])

    @torch.no_grad()
    def _forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activated maps of ``x`` ``(1, C, I, J, K)``, averaged over the ensemble's members."""
        acc: dict[str, torch.Tensor] = {}
        for net, patch_size, divisor in self.members:
            if self.config.sliding_window:
                maps = predict_sliding_window(net, x, patch_size, divisor, precision=self.config.precision,
                                              pad_to_patch=self.config.pad_to_patch)
            else:
                maps = activate(predict_volume(net, x, divisor, self.config.precision))  # type: ignore[arg-type]
            for name, t in maps.items():
                acc[name] = t if name not in acc else acc[name] + t
        return {name: t / len(self.members) for name, t in acc.items()}

    @torch.no_grad()
    def predict_maps(self, grid: Scan) -> dict[str, np.ndarray]:
        """Maps on a prepared grid: ``"heatmap" (I, J, K)`` in [0, 1], ``"levels" (L, I, J, K)``
        probabilities and, with an offset head, ``"offset" (3, I, J, K)`` in mm along (i, j, k).

        With ``config.tta_flip_lr`` the left-right mirrored grid (axis i of the canonical LPS grid) is
        predicted too, mirrored back (offset i component negated) and averaged.
        """
        x = torch.from_numpy(zscore(np.asarray(grid.array, dtype=np.float32)))[None, None].to(self.device)
        maps = self._forward_maps(x)
        if self.config.tta_flip_lr:
            mirrored = self._forward_maps(torch.flip(x, dims=[2]))
            for name, t in mirrored.items():
                t = torch.flip(t, dims=[2])
                if name == "offset":
                    t = t * torch.tensor([-1.0, 1.0, 1.0], device=t.device).view(1, 3, 1, 1, 1)
                maps[name] = 0.5 * (maps[name] + t)
        out = {name: t[0].float().cpu().numpy() for name, t in maps.items()}
        out["heatmap"] = out["heatmap"][0]
        if "offset" in out:
            out["offset"] = out["offset"] * np.float32(self.config.offset_radius_mm)
        return out

    def candidates(self, scan: Scan):
        """``(world (M, 3), scores (M,), level_logprobs (M, L), grid)`` before labelling.

        Peak positions: with an offset head, the heatmap-weighted mean over the peak's 3x3x3
        neighbourhood of ``voxel + offset`` (:func:`refine_with_offsets`); else the heatmap-weighted
        mean of the voxel positions (:func:`find_peaks`).
        """
        world, scores, logprobs, grid, _ = self._candidates_and_maps(scan)
        return world, scores, logprobs, grid

    def _candidates_and_maps(self, scan: Scan):
        grid = prepare(scan, self.config)
        maps = self.predict_maps(grid)
        world, scores, logprobs = self._peaks(maps, grid)
        return world, scores, logprobs, grid, maps

    def _peaks(self, maps: dict[str, np.ndarray], grid: Scan):
        heat, levels = maps["heatmap"], maps["levels"]
        use_offset = "offset" in maps and self.config.use_offsets
        if use_offset and self.config.offset_voting:
            ijk, scores = vote_peaks(heat, maps["offset"], grid.spacing, self.config.peak_threshold,
                                     self.config.nms_radius_mm, self.config.max_candidates)
        else:
            ijk, scores = find_peaks(heat, grid.spacing, self.config.peak_threshold, self.config.nms_radius_mm,
                                     self.config.max_candidates, refine=not use_offset)
        if len(ijk) == 0:
            return np.zeros((0, 3)), np.zeros(0), np.zeros((0, len(self.config.levels)))
        logprobs = np.stack([_level_logprobs(levels, np.round(p)) for p in ijk])
        if use_offset:
            ijk = refine_with_offsets(heat, maps["offset"], grid.spacing, ijk)
        world = grid.voxel_to_world(ijk).coords
        return world, scores, logprobs

    def localize(self, scan: Scan) -> list[Vertebra]:
        """Every vertebra in view, head to foot (see module docstring)."""
        world, scores, logprobs, grid, maps = self._candidates_and_maps(scan)
        lab_cfg = dataclasses.replace(self.config.labelling, score_floor=self.config.peak_threshold)
        res = assign_levels(world, scores, logprobs, self.config.levels, lab_cfg,
                            level_probe=level_probe(maps["levels"], grid))
        ref = self.config.detilt_reference_deg
        if (self.config.detilt_min_deg > 0 and ref is not None
                and len(res.assignments) >= max(3, self.config.detilt_min_named)):
            named_mm = world[[a.index for a in res.assignments]]
            tilt = spine_tilt_deg(named_mm, grid)
            if tilt is not None and abs(tilt - ref) > self.config.detilt_min_deg:
                grid = prepare(scan, self.config, direction=detilt_direction(grid, named_mm, ref))
                log.info("%s: spine axis at %.0f deg in the image grid (usual %.0f): localised again on a "
                         "grid rotated to it", scan.name or "scan", tilt, ref)
                maps = self.predict_maps(grid)
                world, scores, logprobs = self._peaks(maps, grid)
                res = assign_levels(world, scores, logprobs, self.config.levels, lab_cfg,
                                    level_probe=level_probe(maps["levels"], grid))
        named = [(a.label, world[a.index], a.confidence, list(a.flags)) for a in res.assignments]
        if named and (lab_cfg.fill_gaps or lab_cfg.extend_ends):
            offsets = maps.get("offset") if self.config.use_offsets else None
            probe = heat_probe(maps["heatmap"], grid, offsets)
            run_flags = [AMBIGUOUS_FLAG] if any(AMBIGUOUS_FLAG in f for *_, f in named) else []
            for c in complete_run(np.array([w for _, w, _, _ in named]), [lab for lab, *_ in named], probe,
                                  self.config.levels, lab_cfg, fov_depth=lambda w: fov_depth_mm(scan, w)):
                named.append((c.label, c.position_mm, c.score, [c.flag] + run_flags))
        out = []
        for label, w, conf, flags in named:
            if cut_by_fov(scan, w, self.config.border_mm):
                flags.append(CUT_FLAG)
            out.append(Vertebra(label, w, confidence=conf, flags=flags))
        by_id = {v.label: v for v in out}
        out = [by_id[i] for i in sort_head_to_foot(by_id)]
        log.info("%s: %d candidates, %d vertebrae named (%d added by completion)", scan.name or "scan",
                 len(world), len(out), len(out) - len(res.assignments))
        return out


def spine_tilt_deg(world_mm: np.ndarray, grid: Scan) -> float | None:
    """Tilt of the spine's axis in the sagittal plane of ``grid`` (degrees; None for fewer than 3 points).

    ``world_mm`` ``(N, 3)``: world LPS centroids of the named vertebrae; ``grid``: a canonical (LPS-ordered)
    grid, i = left-right, j = anterior -> posterior, k = inferior -> superior. The points are ordered along
    k; each step between neighbours, in mm of (j, k) and oriented towards +k, makes an angle with the k axis
    (positive when it leans towards +j, posterior); the tilt is the median step angle, so one odd step (a
    sacrum named as a lumbar body sits behind the lumbar line) does not move it."""
    pts = np.asarray(world_mm, dtype=np.float64).reshape(-1, 3)
    if len(pts) < 3:
        return None
    jk = (grid.world_to_voxel(pts).coords * np.asarray(grid.spacing, dtype=np.float64))[:, 1:]
    jk = jk[np.argsort(jk[:, 1])]
    d = np.diff(jk, axis=0)
    return float(np.median(np.degrees(np.arctan2(d[:, 0], d[:, 1]))))


def detilt_direction(grid: Scan, world_mm: np.ndarray, reference_deg: float) -> np.ndarray:
    """Axes ``(3, 3)`` of a grid rotated from ``grid``'s about its own left-right (i) axis so that the spine
    through ``world_mm`` (:func:`spine_tilt_deg`) lies at ``reference_deg`` in it (``preprocess.prepare``'s
    ``direction``). Both rotation senses are tried on the points themselves, so no sign convention of the
    input's axes can turn the spine the wrong way."""
    tilt = spine_tilt_deg(world_mm, grid)
    if tilt is None:
        raise ValueError(f"detilt_direction needs at least 3 points, got {len(np.asarray(world_mm).reshape(-1, 3))}")
    axis = grid.direction[:, 0]
    best = None
    for sign in (1.0, -1.0):
        turn = Rotation.from_rotvec(np.radians(sign * (tilt - reference_deg)) * axis / np.linalg.norm(axis))
        direction = turn.as_matrix() @ grid.direction
        probe = Scan(np.zeros((1, 1, 1), np.float32), grid.spacing.copy(), grid.origin.copy(), direction)
        err = abs(float(spine_tilt_deg(world_mm, probe)) - reference_deg)
        if best is None or err < best[0]:
            best = (err, direction)
    return best[1]


def level_probe(levels_map: np.ndarray, grid: Scan) -> LevelProbe:
    """The labeller's view of the level map ``levels_map`` ``(L, I, J, K)`` on ``grid``: world mm (3,) ->
    log-probabilities ``(L,)`` averaged over the 3x3x3 neighbourhood of the nearest voxel (read as a
    candidate's, :func:`_level_logprobs`), None outside the grid."""
    shape = levels_map.shape[1:]

    def probe(world_mm: np.ndarray) -> np.ndarray | None:
        ijk = np.round(grid.world_to_voxel(np.asarray(world_mm, dtype=np.float64).reshape(1, 3)).coords[0])
        if np.any(ijk < 0) or np.any(ijk > np.array(shape) - 1):
            return None
        return _level_logprobs(levels_map, ijk)

    return probe


def heat_probe(heat: np.ndarray, grid: Scan, offset_mm: np.ndarray | None = None) -> Probe:
    """A :data:`labelling.Probe` on a prepared grid's ``heat (I, J, K)``: the heat maximum within a ball of
    ``radius_mm`` (world mm) around a world point, placed like a peak (offset-refined with ``offset_mm``
    ``(3, I, J, K)``, else the heat-weighted 3x3x3 mean); ``(point, 0.0)`` if the ball misses the grid."""
    spacing = np.asarray(grid.spacing, dtype=np.float64).reshape(3)
    shape = np.asarray(heat.shape)

    def probe(world_mm: np.ndarray, radius_mm: float) -> tuple[np.ndarray, float]:
        point = np.asarray(world_mm, dtype=np.float64).reshape(3)
        ijk = grid.world_to_voxel(point.reshape(1, 3)).coords[0]
        r = np.ceil(radius_mm / spacing).astype(int)
        lo = np.maximum(np.floor(ijk).astype(int) - r, 0)
        hi = np.minimum(np.ceil(ijk).astype(int) + r + 1, shape)
        if np.any(hi <= lo):
            return point, 0.0
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        axes = np.meshgrid(*[(np.arange(a, b) - c) * sp for a, b, c, sp in zip(lo, hi, ijk, spacing)], indexing="ij")
        inside = sum(g**2 for g in axes) <= radius_mm**2
        if not inside.any():
            return point, 0.0
        vals = np.where(inside, heat[box], -np.inf)
        k = np.unravel_index(int(np.argmax(vals)), vals.shape)
        peak = lo + np.asarray(k)
        if offset_mm is not None:
            where = refine_with_offsets(heat, offset_mm, spacing, peak[None])[0]
        else:
            where = _refine(heat, peak)
        return grid.voxel_to_world(np.asarray(where).reshape(1, 3)).coords[0], float(vals[k])

    return probe


def localize(scan: Scan, model_dir: str | os.PathLike) -> list[Vertebra]:
    """One-off convenience wrapper: ``Localizer(model_dir).localize(scan)``."""
    return Localizer(model_dir).localize(scan)


def centroids_table(vertebrae: Iterable[Vertebra]) -> pd.DataFrame:
    """DataFrame with columns exactly ``level,label,x_mm,y_mm,z_mm,confidence,flags`` (flags ``;``-joined)."""
    verts = list(vertebrae)
    by_id = {v.label: v for v in verts}
    ordered = [by_id[i] for i in sort_head_to_foot(by_id)] if len(by_id) == len(verts) else verts
    rows = [{"level": v.level, "label": v.label, "x_mm": round(float(v.centroid_world[0]), 3),
             "y_mm": round(float(v.centroid_world[1]), 3), "z_mm": round(float(v.centroid_world[2]), 3),
             "confidence": round(float(v.confidence), 4), "flags": ";".join(v.flags)} for v in ordered]
    return pd.DataFrame(rows, columns=CENTROID_COLUMNS)


def write_centroids_csv(vertebrae: Iterable[Vertebra], path: str | os.PathLike) -> Path:
    """Write ``<name>_centroids.csv`` atomically (columns ``level,label,x_mm,y_mm,z_mm,confidence,flags``)."""
    return write_csv(centroids_table(vertebrae), path)
