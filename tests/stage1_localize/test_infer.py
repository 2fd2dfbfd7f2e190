"""Inference geometry and outputs, with stand-in networks that output known maps."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep import checkpoint
from data_prep.errors import SpinepipeInputError
from data_prep.scan import Scan, Vertebra, level_id
from stage1_localize.config import NetworkPlan, Stage1Config
from stage1_localize.infer import CENTROID_COLUMNS, CUT_FLAG, Localizer, find_peaks, level_probe, write_centroids_csv
from stage1_localize.model import LocalizerNet
from stage1_localize.preprocess import prepare
from stage1_localize.targets import centre_heatmap, level_indices, level_map

# Sagittal acquisition, anisotropic 0.8 x 0.8 x 4 mm: voxel i runs head->foot (world -z), j anterior->
# posterior (+y), k right->left (+x, the 4 mm slice direction). Oblique-free but fully permuted/flipped.
DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
SPACING = np.array([0.8, 0.8, 4.0])
ORIGIN = np.array([-30.0, -50.0, 120.0])
NAMES = ["L1", "L2", "L3", "L4"]


def _truth_world() -> np.ndarray:
    # x off the slice centres on purpose; bodies 35 mm apart head to foot, slight lordosis in y
    return np.array([[-7.3, 10.0 + 3 * i, 85.0 - 35.0 * i] for i in range(len(NAMES))])


def _scan_with_blobs(world: np.ndarray, shape=(250, 150, 14), sigma_mm=6.0) -> Scan:
    scan = Scan(np.zeros(shape, np.float32), SPACING, ORIGIN, DIRECTION, name="synthetic")
    ijk = scan.world_to_voxel(world).coords
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    arr = np.zeros(shape, np.float64)
    for p in ijk:
        d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, p, SPACING))
        arr = np.maximum(arr, np.exp(-d2 / (2 * sigma_mm**2)))
    return scan.with_array((arr * 200 + 10).astype(np.float32))


class StandIn(torch.nn.Module):
    """Ignores its input; returns fixed heatmap / level logits (on the prepared grid)."""

    divisor = (1, 1, 1)

    def __init__(self, heat: np.ndarray, level_logits: torch.Tensor):
        super().__init__()
        h = np.clip(heat, 1e-4, 1 - 1e-4)
        self.heat_logits = torch.from_numpy(np.log(h / (1 - h))).float()
        self.level_logits = level_logits

    def forward(self, x):
        assert tuple(x.shape[-3:]) == tuple(self.heat_logits.shape)
        return {"heatmap": self.heat_logits[None, None], "levels": self.level_logits[None]}


def _config(**kw):
    # stand-in nets ignore their input, so mirroring it (test-time flip) would not mirror their maps, nor
    # would a de-tilted grid rotate them (de-tilting is tested with a stand-in for the maps below), and
    # their maps have the prepared grid's shape, not the padded patch's (padding is tested in test_model)
    kw.setdefault("detilt_min_deg", 0.0)
    kw.setdefault("pad_to_patch", False)
    return Stage1Config(target_spacing=(3.0, 3.0, 3.0), border_mm=12.0, tta_flip_lr=False, **kw)


def test_peak_world_coordinates_survive_reorientation_and_anisotropy():
    cfg = _config()
    cfg.labelling.extend_inside_mm = None  # detections only (the default would add L5, 25 mm inside the scan)
    truth = _truth_world()
    scan = _scan_with_blobs(truth)
    assert scan.orientation_code() != "LPS"
    grid = prepare(scan, cfg)
    idx = level_indices([level_id(n) for n in NAMES], cfg.levels)
    lmap = level_map(grid.shape, grid.world_to_voxel(truth).coords, idx, grid.spacing, 15.0)
    logits = torch.zeros((len(cfg.levels),) + grid.shape)
    for c in range(len(cfg.levels)):
        logits[c][torch.from_numpy(lmap == c)] = 8.0
    heat = centre_heatmap(grid.shape, grid.world_to_voxel(truth).coords, grid.spacing, 6.0)
    verts = Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)
    assert [v.level for v in verts] == NAMES
    got = np.array([v.centroid_world for v in verts])
    err = np.linalg.norm(got - truth, axis=1)
    assert err.max() < 1.5, err  # half a 3 mm voxel
    assert all(0.0 < v.confidence <= 1.0 for v in verts)
    # L1 sits 35 mm below the top of a 200 mm FOV -> not cut; all are inside the LR slab (56 mm wide)
    assert all(CUT_FLAG not in v.flags for v in verts)


def test_preprocessing_keeps_image_content_at_its_world_position():
    # one blob in a permuted/flipped anisotropic scan: its centre of mass after reorientation,
    # anti-aliasing, resampling and intensity clipping is where it was in world mm
    truth = _truth_world()[1:2]
    scan = _scan_with_blobs(truth)
    grid = prepare(scan, _config())
    a = grid.array.astype(np.float64)
    a = np.where(a > 0.3 * a.max(), a, 0.0)
    com_ijk = (np.indices(a.shape).reshape(3, -1) * a.reshape(-1)).sum(1) / a.sum()
    assert np.linalg.norm(grid.voxel_to_world(com_ijk).coords[0] - truth[0]) < 0.5
    assert np.allclose(grid.spacing, 3.0) and grid.orientation_code() == "LPS"


def test_vertebra_near_the_fov_edge_is_flagged():
    cfg = _config()
    cfg.labelling.extend_inside_mm = None  # detections only (the default would add an L5 without heat below)
    truth = _truth_world()
    truth[:, 2] += 30.0  # L1 now 5 mm below the top edge (z = 120 + 0.4 mm)
    scan = _scan_with_blobs(truth)
    grid = prepare(scan, cfg)
    logits = torch.zeros((len(cfg.levels),) + grid.shape)
    heat = centre_heatmap(grid.shape, grid.world_to_voxel(truth).coords, grid.spacing, 6.0)
    verts = Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)
    assert len(verts) == 4
    top = max(verts, key=lambda v: v.centroid_world[2])
    assert CUT_FLAG in top.flags
    assert sum(CUT_FLAG in v.flags for v in verts) == 1


class OffsetStandIn(StandIn):
    """Fixed heatmap / levels plus a fixed offset map (in units of ``offset_radius_mm``)."""

    def __init__(self, heat, level_logits, offset_units: np.ndarray):
        super().__init__(heat, level_logits)
        self.offset = torch.from_numpy(offset_units).float()

    def forward(self, x):
        out = super().forward(x)
        out["offset"] = self.offset[None]
        return out


def test_offset_head_moves_a_biased_peak_onto_the_centroid():
    from stage1_localize.targets import offset_map

    cfg = _config(offset_radius_mm=12.0)
    truth = _truth_world()
    scan = _scan_with_blobs(truth)
    grid = prepare(scan, cfg)
    true_ijk = grid.world_to_voxel(truth).coords
    idx = level_indices([level_id(n) for n in NAMES], cfg.levels)
    lmap = level_map(grid.shape, true_ijk, idx, grid.spacing, 15.0)
    logits = torch.zeros((len(cfg.levels),) + grid.shape)
    for c in range(len(cfg.levels)):
        logits[c][torch.from_numpy(lmap == c)] = 8.0
    # the heatmap peaks 1.7 voxels (5.1 mm) off every centroid along k; the offsets know the truth
    biased = true_ijk + np.array([0.0, 0.0, 1.7])
    heat = centre_heatmap(grid.shape, biased, grid.spacing, 6.0)
    off, _ = offset_map(grid.shape, true_ijk, grid.spacing, 30.0)
    cfg.labelling.extend_inside_mm = None  # detections only: no L5 without heat below L4
    plain_cfg = _config(offset_radius_mm=None)
    plain_cfg.labelling.extend_inside_mm = None
    plain = Localizer(net=StandIn(heat, logits), config=plain_cfg).localize(scan)
    fixed = Localizer(net=OffsetStandIn(heat, logits, off / 12.0), config=cfg).localize(scan)
    err_plain = np.linalg.norm(np.array([v.centroid_world for v in plain]) - truth, axis=1)
    err_fixed = np.linalg.norm(np.array([v.centroid_world for v in fixed]) - truth, axis=1)
    assert [v.level for v in fixed] == NAMES
    assert err_plain.min() > 4.0, err_plain
    assert err_fixed.max() < 0.05, err_fixed


class _EquivariantNet(torch.nn.Module):
    """Pointwise heatmap / level logits of the input and an offset whose i component is the input's
    centred difference along i: mirroring the input along i negates it, as a true offset would be."""

    divisor = (1, 1, 1)

    def forward(self, x):
        grad_i = torch.zeros_like(x)
        grad_i[:, :, 1:-1] = 0.5 * (x[:, :, 2:] - x[:, :, :-2])
        levels = torch.cat([x * (c - 1) for c in range(3)], dim=1)
        return {"heatmap": x - 1.0, "levels": levels, "offset": torch.cat([grad_i, x, -x], dim=1)}


def test_left_right_test_time_flip_keeps_an_equivariant_network_exact():
    rng = np.random.default_rng(0)
    grid = Scan(rng.random((9, 10, 11)).astype(np.float32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    base = dict(target_spacing=(3.0, 3.0, 3.0), levels=(20, 21, 22), offset_radius_mm=10.0, sliding_window=False)
    plain = Localizer(net=_EquivariantNet(), config=Stage1Config(tta_flip_lr=False, **base)).predict_maps(grid)
    tta = Localizer(net=_EquivariantNet(), config=Stage1Config(tta_flip_lr=True, **base)).predict_maps(grid)
    assert set(plain) == set(tta) == {"heatmap", "levels", "offset"}
    assert plain["heatmap"].shape == (9, 10, 11) and plain["levels"].shape == (3, 9, 10, 11)
    assert plain["offset"].shape == (3, 9, 10, 11) and np.abs(plain["offset"][0]).max() > 0.5
    for name in plain:
        np.testing.assert_allclose(tta[name], plain[name], atol=1e-5, err_msg=name)


def test_find_peaks_nms_in_mm():
    h = np.zeros((10, 10, 30))
    h[5, 5, 5], h[5, 5, 8], h[5, 5, 25] = 0.9, 0.8, 0.7  # 9 mm apart at 3 mm: suppressed by 15 mm NMS
    ijk, vals = find_peaks(h, (3.0, 3.0, 3.0), 0.25, 15.0, 10)
    assert np.allclose(vals, [0.9, 0.7])
    assert np.allclose(ijk, [[5, 5, 5], [5, 5, 25]])
    ijk, vals = find_peaks(h, (3.0, 3.0, 1.0), 0.25, 15.0, 10)  # 3 mm apart along k: still one; 20 mm: two
    assert len(vals) == 2


def test_centroid_csv_columns_exact(tmp_path):
    verts = [Vertebra(level_id("L2"), [1.0, 2.0, 3.0], confidence=0.5, flags=["transitional?", CUT_FLAG]),
             Vertebra(level_id("L1"), [1.0, 2.0, 40.0], confidence=0.9)]
    p = write_centroids_csv(verts, tmp_path / "x_centroids.csv")
    df = pd.read_csv(p, keep_default_na=False)
    assert list(df.columns) == CENTROID_COLUMNS == ["level", "label", "x_mm", "y_mm", "z_mm", "confidence", "flags"]
    assert df["level"].tolist() == ["L1", "L2"] and df["label"].tolist() == [20, 21]
    assert df.loc[1, "flags"] == "transitional?;cut_by_fov" and df.loc[0, "flags"] == ""
    assert np.allclose(df[["x_mm", "y_mm", "z_mm"]].to_numpy()[1], [1, 2, 3])


def test_localizer_loads_saved_model_and_rejects_missing(tmp_path):
    cfg = Stage1Config(plan=NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                                        conv_kernels=((3, 3, 3),) * 3, base_features=4))
    torch.manual_seed(0)
    net = LocalizerNet(cfg)
    checkpoint.save_model(tmp_path / "m", net.state_dict(), cfg, kind="stage1")
    loc = Localizer(tmp_path / "m", device="cpu")
    assert loc.config == cfg
    scan = _scan_with_blobs(_truth_world(), shape=(120, 80, 8))
    verts = loc.localize(scan)  # untrained: any (possibly empty) ordered list, but it must run
    ranks = [v.label for v in verts]
    assert len(ranks) == len(set(ranks))
    with pytest.raises(SpinepipeInputError, match="make train-stage1"):
        Localizer(tmp_path / "nothing")


def test_vote_peaks_split_a_ridge_that_local_maxima_merge():
    """Two centres 24 mm apart whose blobs merge into one ridge with a single maximum between them: local
    maxima give one candidate; the offsets (each voxel pointing to its own centre) give two vote peaks,
    at the true centres."""
    from stage1_localize.infer import vote_peaks
    from stage1_localize.targets import offset_map

    shape, sp = (5, 5, 30), np.array([3.0, 3.0, 3.0])
    centres = np.array([[2.0, 2.0, 11.0], [2.0, 2.0, 19.0]])
    k = np.arange(shape[2])
    ridge = np.where(np.abs(k - 15.0) <= 6, 0.8 - 0.01 * np.abs(k - 15.0), 0.0)  # one maximum, at k = 15
    ij = np.exp(-((np.arange(5) - 2.0) ** 2) / 2.0)
    heat = ij[:, None, None] * ij[None, :, None] * ridge[None, None, :]
    off, _ = offset_map(shape, centres, sp, radius_mm=60.0)
    ijk_max, _ = find_peaks(heat, sp, 0.1, 15.0, 10, refine=False)
    np.testing.assert_allclose(ijk_max, [[2.0, 2.0, 15.0]])
    ijk, scores = vote_peaks(heat, off, sp, 0.1, 15.0, 10)
    assert len(ijk) == 2
    np.testing.assert_allclose(ijk[np.argsort(ijk[:, 2])], centres)
    np.testing.assert_allclose(scores, [0.77, 0.77])
    # nothing above the threshold: no candidate
    assert len(vote_peaks(heat * 0.0, off, sp, 0.1, 15.0, 10)[0]) == 0


def _levels_logits(cfg, grid, truth_ijk, names):
    idx = level_indices([level_id(n) for n in names], cfg.levels)
    lmap = level_map(grid.shape, truth_ijk, idx, grid.spacing, 15.0)
    logits = torch.zeros((len(cfg.levels),) + grid.shape)
    for c in range(len(cfg.levels)):
        logits[c][torch.from_numpy(lmap == c)] = 8.0
    return logits


def test_completion_reports_an_undetected_level_and_a_weak_end_flagged():
    """L1, L3, L4 give clear peaks; L2 has no heat at all and L5 only a weak blob (0.08, below the peak
    threshold 0.1, so no candidate): the labeller names L1, L3, L4; completion adds L2 (interpolated) and
    L5 (extrapolated, heat >= fill_min_heat 0.05) near their true places, and nothing above L1 (no heat)."""
    from stage1_localize.labelling import EXTRAPOLATED_FLAG, INTERPOLATED_FLAG

    base = _config()
    truth = _truth_world()
    scan = _scan_with_blobs(truth)
    grid = prepare(scan, base)
    ijk = grid.world_to_voxel(truth).coords
    logits = _levels_logits(base, grid, ijk[[0, 2, 3]], ["L1", "L3", "L4"])
    heat = centre_heatmap(grid.shape, ijk[[0, 2, 3]], grid.spacing, 6.0)
    l5 = truth[3] + (truth[3] - truth[2])  # one step below L4, inside the scan
    heat = np.maximum(heat, 0.08 * centre_heatmap(grid.shape, grid.world_to_voxel(l5[None]).coords, grid.spacing, 6.0))
    base.labelling.fill_gaps = base.labelling.extend_ends = False
    plain = Localizer(net=StandIn(heat, logits), config=base).localize(scan)
    assert [v.level for v in plain] == ["L1", "L3", "L4"]
    cfg = _config()
    assert cfg.labelling.fill_gaps and cfg.labelling.extend_ends  # the defaults
    cfg.labelling.fill_min_heat = 0.05
    full = Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)
    by = {v.level: v for v in full}
    assert list(by) == ["L1", "L2", "L3", "L4", "L5"]
    assert INTERPOLATED_FLAG in by["L2"].flags and EXTRAPOLATED_FLAG in by["L5"].flags
    assert not by["L1"].flags and not by["L3"].flags
    assert np.linalg.norm(by["L2"].centroid_world - truth[1]) < 4.0  # midpoint of L1 and L3 (no heat there)
    assert np.linalg.norm(by["L5"].centroid_world - l5) < 3.5  # the weak blob's own maximum
    assert by["L5"].confidence == pytest.approx(0.08, abs=0.01) and by["L2"].confidence < 1e-3  # stand-in heat floor


def test_fov_depth_is_the_distance_to_the_nearest_face_in_mm():
    """Hand-computed on the oblique, anisotropic test scan (250 x 150 x 14 voxels of 0.8 x 0.8 x 4 mm;
    voxel axis i runs to world -z from z = 120, k to world +x from x = -30)."""
    from stage1_localize.infer import cut_by_fov, fov_depth_mm

    scan = _scan_with_blobs(_truth_world())
    # L1 at (-7.3, 10, 85): k = 5.675 -> 6.175 x 4 mm = 24.7 mm from the x = -32 face (i: 35.4, j: 59.6 mm)
    assert fov_depth_mm(scan, np.array([-7.3, 10.0, 85.0])) == pytest.approx(24.7)
    # the edge of the first voxel (z = 120 + 0.4) is depth 0; beyond it, negative
    assert fov_depth_mm(scan, np.array([-7.3, 10.0, 120.4])) == pytest.approx(0.0, abs=1e-9)
    assert fov_depth_mm(scan, np.array([-7.3, 10.0, 130.4])) == pytest.approx(-10.0)
    assert cut_by_fov(scan, np.array([-7.3, 10.0, 85.0]), 24.0) is False
    assert cut_by_fov(scan, np.array([-7.3, 10.0, 85.0]), 25.0) is True


def test_end_without_heat_is_added_inside_the_field_of_view_only():
    """``labelling.extend_inside_mm``: heat only at L1, L3, L4. L2 is filled as before; L5 (one step below
    L4, 24.6 mm inside the scan) is added without heat at the repeated step, flagged extrapolated_no_heat;
    T12 (one step above L1) would lie on the scan's top edge and is not added."""
    from stage1_localize.infer import fov_depth_mm
    from stage1_localize.labelling import EXTRAPOLATED_NO_HEAT_FLAG

    truth = _truth_world()
    scan = _scan_with_blobs(truth)
    cfg = _config()
    grid = prepare(scan, cfg)
    ijk = grid.world_to_voxel(truth).coords
    logits = _levels_logits(cfg, grid, ijk[[0, 2, 3]], ["L1", "L3", "L4"])
    heat = centre_heatmap(grid.shape, ijk[[0, 2, 3]], grid.spacing, 6.0)
    l5, t12 = truth[3] + (truth[3] - truth[2]), truth[0] - (truth[2] - truth[0]) / 2
    assert fov_depth_mm(scan, l5) == pytest.approx(24.6, abs=0.5) and fov_depth_mm(scan, t12) < 1.0
    assert cfg.labelling.extend_inside_mm == 15.0  # the default
    by = {v.level: v for v in Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)}
    assert list(by) == ["L1", "L2", "L3", "L4", "L5"]
    cfg.labelling.extend_inside_mm = None  # off: no L5 without heat
    assert [v.level for v in Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)] == ["L1", "L2", "L3", "L4"]
    cfg.labelling.extend_inside_mm = 15.0
    by = {v.level: v for v in Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)}
    assert list(by) == ["L1", "L2", "L3", "L4", "L5"]
    assert EXTRAPOLATED_NO_HEAT_FLAG in by["L5"].flags
    assert np.linalg.norm(by["L5"].centroid_world - l5) < 3.0  # L4 + the L3 -> L4 step (peaks refined)
    cfg.labelling.extend_inside_mm = 30.0  # deeper than L5 lies: nothing without heat
    assert [v.level for v in Localizer(net=StandIn(heat, logits), config=cfg).localize(scan)] == ["L1", "L2", "L3", "L4"]


def test_channels_last_layout_gives_the_same_maps(tmp_path):
    """``Stage1Config.channels_last`` changes the memory layout only: the same saved weights give the same
    maps (float rounding) in either layout, and the loaded net really is channels-last."""
    plan = NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2), (2, 2, 2)), conv_kernels=((3, 3, 3),) * 3, base_features=4)
    torch.manual_seed(0)
    cfg = Stage1Config(plan=plan, channels_last=True)
    checkpoint.save_model(tmp_path / "m", LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    last = Localizer(tmp_path / "m", device="cpu")
    plain = Localizer(tmp_path / "m", device="cpu")
    plain.net = plain.net.to(memory_format=torch.contiguous_format)
    conv_weights = [p for p in last.net.parameters() if p.ndim == 5]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in conv_weights)
    assert not all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in plain.net.parameters() if p.ndim == 5)
    scan = _scan_with_blobs(_truth_world(), shape=(120, 80, 8))
    grid = prepare(scan, cfg)
    a, b = last.predict_maps(grid), plain.predict_maps(grid)
    assert a.keys() == b.keys()
    for name in a:
        assert np.abs(a[name] - b[name]).max() < 1e-4, name


def test_ensemble_averages_its_members_maps_and_decodes_with_the_first_config(tmp_path):
    """Two models trained apart (here: two random initialisations, different plans) -> the ensemble's maps are
    the mean of the members' maps (heatmap, level probabilities and offsets alike), decoded with the first
    member's config."""
    small = NetworkPlan(patch_size=(16, 32, 32), pool_kernels=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
                        conv_kernels=((3, 3, 3),) * 3, base_features=4)
    other = NetworkPlan(patch_size=(16, 32, 64), pool_kernels=((1, 1, 1), (2, 2, 2)),
                        conv_kernels=((3, 3, 3),) * 2, base_features=4)
    for name, plan, seed in (("a", small, 0), ("b", other, 1)):
        torch.manual_seed(seed)
        cfg = Stage1Config(plan=plan, peak_threshold=0.2 if name == "a" else 0.3)
        checkpoint.save_model(tmp_path / name, LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    a, b = Localizer(tmp_path / "a", device="cpu"), Localizer(tmp_path / "b", device="cpu")
    ens = Localizer([tmp_path / "a", str(tmp_path / "b")], device="cpu")
    assert len(ens.members) == 2 and ens.config.peak_threshold == 0.2
    scan = _scan_with_blobs(_truth_world(), shape=(120, 80, 8))
    grid = prepare(scan, ens.config)
    ma, mb, me = a.predict_maps(grid), b.predict_maps(grid), ens.predict_maps(grid)
    assert me.keys() == ma.keys() == mb.keys() and "offset" in me
    for name in me:
        assert np.abs(ma[name] - mb[name]).max() > 1e-3, name  # the members really differ
        np.testing.assert_allclose(me[name], 0.5 * (ma[name] + mb[name]), atol=1e-5, err_msg=name)
    assert Localizer([tmp_path / "a"], device="cpu").members[0][1] == (16, 32, 32)


def test_ensemble_members_must_see_and_mean_the_same(tmp_path):
    plan = NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2)), conv_kernels=((3, 3, 3),) * 2, base_features=4)
    base = Stage1Config(plan=plan)
    for name, cfg in (("a", base), ("spacing", Stage1Config(plan=plan, target_spacing=(2.0, 2.0, 2.0))),
                      ("levels", Stage1Config(plan=plan, levels=(19, 20, 21, 22, 23, 24, 26)))):
        checkpoint.save_model(tmp_path / name, LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    with pytest.raises(SpinepipeInputError, match=r"spacing.*config\.json.*target_spacing differ"):
        Localizer([tmp_path / "a", tmp_path / "spacing"], device="cpu")
    with pytest.raises(SpinepipeInputError, match=r"levels.*config\.json.*levels differ"):
        Localizer([tmp_path / "a", tmp_path / "levels"], device="cpu")
    with pytest.raises(SpinepipeInputError, match="config.json missing"):
        Localizer([tmp_path / "a", tmp_path / "nothing"], device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        Localizer([], device="cpu")


def test_localizer_rejects_an_unknown_precision_in_the_models_config(tmp_path):
    plan = NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2)), conv_kernels=((3, 3, 3),) * 2, base_features=4)
    cfg = Stage1Config(plan=plan, precision="float16")
    checkpoint.save_model(tmp_path / "m", LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    with pytest.raises(SpinepipeInputError, match=r"m[/\\]config\.json.*expected one of float32, bfloat16, auto, got 'float16'"):
        Localizer(tmp_path / "m", device="cpu")


def test_model_folders_reads_an_ensemble_file_and_rejects_a_bad_one(tmp_path):
    from stage1_localize.infer import model_folders

    plan = NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2)), conv_kernels=((3, 3, 3),) * 2, base_features=4)
    cfg = Stage1Config(plan=plan)
    checkpoint.save_model(tmp_path / "single", LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    assert model_folders(tmp_path / "single") == [tmp_path / "single"]
    assert model_folders(tmp_path / "nothing") == [tmp_path / "nothing"]
    ens = tmp_path / "ens"
    for m in ("m0", "m1"):
        checkpoint.save_model(ens / m, LocalizerNet(cfg).state_dict(), cfg, kind="stage1")
    (ens / "ensemble.json").write_text('{"kind": "stage1-ensemble", "members": ["m1", "m0"]}')
    assert model_folders(ens) == [ens / "m1", ens / "m0"]
    assert len(Localizer(ens, device="cpu").members) == 2
    for bad in ('{"members": []}', '{"members": ["../single"]}', '{"folders": ["m0"]}', "not json"):
        (ens / "ensemble.json").write_text(bad)
        with pytest.raises(SpinepipeInputError, match=r"ensemble\.json: expected"):
            model_folders(ens)


# ---------------------------------------------------------------------------------------------------
# De-tilting (``detilt_min_deg``): a spine lying at an unusual angle in the image grid
# ---------------------------------------------------------------------------------------------------
def _lps_grid(shape=(20, 60, 80), spacing=3.0) -> Scan:
    return Scan(np.zeros(shape, np.float32), np.full(3, spacing), np.array([-30.0, -90.0, -120.0]), np.eye(3))


def _tilted_points(grid: Scan, deg: float, n: int = 5, step: float = 35.0) -> np.ndarray:
    """World points ``step`` mm apart, head to foot, along an axis ``deg`` off the grid's k axis towards +j."""
    t = np.radians(deg)
    centre = grid.voxel_to_world(np.array([10.0, 30.0, 40.0])).coords[0]
    return np.array([centre + ((n - 1) / 2 - i) * step * np.array([0.0, np.sin(t), np.cos(t)]) for i in range(n)])


@pytest.mark.parametrize("deg", [-25.0, 0.0, 8.0, 31.0])
def test_spine_tilt_deg_hand_made(deg):
    from stage1_localize.infer import spine_tilt_deg

    grid = _lps_grid()
    pts = _tilted_points(grid, deg)
    assert spine_tilt_deg(pts, grid) == pytest.approx(deg, abs=1e-9)
    assert spine_tilt_deg(pts[::-1], grid) == pytest.approx(deg, abs=1e-9)  # order does not matter
    assert spine_tilt_deg(pts[:2], grid) is None


def test_detilt_direction_puts_the_axis_at_the_reference_and_keeps_world_positions():
    from data_prep.scan import resample_to_spacing
    from stage1_localize.infer import detilt_direction, spine_tilt_deg

    grid = _lps_grid()
    pts = _tilted_points(grid, 30.0, n=3, step=40.0)
    heat = centre_heatmap(grid.shape, grid.world_to_voxel(pts).coords, grid.spacing, 6.0)
    grid = grid.with_array(heat.astype(np.float32))
    direction = detilt_direction(grid, pts, 8.0)
    np.testing.assert_allclose(direction[:, 0], grid.direction[:, 0], atol=1e-12)  # rotated about i
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    out = resample_to_spacing(grid, grid.spacing, direction=direction)
    assert spine_tilt_deg(pts, out) == pytest.approx(8.0, abs=1e-6)
    a = np.asarray(out.array, np.float64)
    for p in pts:  # each blob's maximum is still at its world position (within a voxel)
        ijk = np.round(out.world_to_voxel(p).coords[0]).astype(int)
        box = tuple(slice(max(c - 3, 0), c + 4) for c in ijk)
        k = np.unravel_index(int(np.argmax(a[box])), a[box].shape)
        peak = out.voxel_to_world((np.array([s.start for s in box]) + np.asarray(k))[None]).coords[0]
        assert np.linalg.norm(peak - p) <= 3.0 * np.sqrt(3) / 2 + 1e-6
    with pytest.raises(ValueError, match="at least 3 points"):
        detilt_direction(grid, pts[:2], 8.0)


def test_a_spine_tilted_in_the_grid_is_named_again_on_a_detilted_grid(monkeypatch):
    """Maps stand-in that, like the trained network, names every body one level high (a T12 read as L1,
    as the trained network reads the sacrum as L5) when the spine lies more than 12 deg off 8 deg in the grid it is given: de-tilting re-runs it on a
    grid where the axis lies at 8 deg and gets the names right, at the same world positions."""
    from stage1_localize.infer import spine_tilt_deg

    names = ["L1", "L2", "L3", "L4", "L5"]
    cfg = _config(detilt_min_deg=10.0, detilt_reference_deg=8.0)
    cfg.labelling.extend_inside_mm = None
    cfg.labelling.fill_gaps = cfg.labelling.extend_ends = False
    base = _lps_grid(shape=(20, 90, 90))
    box = [_tilted_points(base, 30.0)]  # the spine the stand-in sees
    scan = base.with_array(np.ones(base.shape, np.float32))
    seen = []

    def fake_maps(self, grid):
        seen.append(spine_tilt_deg(box[0], grid))
        ijk = grid.world_to_voxel(box[0]).coords
        shifted = abs(seen[-1] - 8.0) > 12.0
        given = ["T12", "L1", "L2", "L3", "L4"] if shifted else names
        logits = _levels_logits(cfg, grid, ijk, given)
        return {"heatmap": centre_heatmap(grid.shape, ijk, grid.spacing, 6.0),
                "levels": torch.softmax(logits, 0).numpy()}

    monkeypatch.setattr(Localizer, "predict_maps", fake_maps)
    net = StandIn(np.zeros((1, 1, 1)), torch.zeros(1))
    off = dataclasses.replace(cfg, detilt_min_deg=0.0)
    assert [v.level for v in Localizer(net=net, config=off).localize(scan)] == ["T12", "L1", "L2", "L3", "L4"]
    assert len(seen) == 1 and seen[0] == pytest.approx(30.0, abs=1e-6)
    seen.clear()
    verts = Localizer(net=net, config=cfg).localize(scan)
    assert [v.level for v in verts] == names
    assert len(seen) == 2 and seen[1] == pytest.approx(8.0, abs=1.5)  # from the detected positions
    err = np.linalg.norm(np.array([v.centroid_world for v in verts]) - box[0], axis=1)
    assert err.max() < 1.5, err
    seen.clear()  # an axis within detilt_min_deg of the reference is decoded once
    box[0] = _tilted_points(base, 15.0)
    Localizer(net=net, config=cfg).localize(scan)
    assert len(seen) == 1


def test_level_probe_reads_the_level_map_at_a_world_point_in_any_geometry():
    """The caudal check's probe: log of the 3x3x3 mean around the nearest voxel, None outside the grid."""
    grid = Scan(np.zeros((6, 5, 4), np.float32), SPACING, ORIGIN, DIRECTION)
    rng = np.random.default_rng(3)
    p = rng.random((3, 6, 5, 4)) + 0.01
    p /= p.sum(0, keepdims=True)
    probe = level_probe(p.astype(np.float32), grid)
    ijk = np.array([2, 3, 1])
    world = grid.voxel_to_world(ijk[None].astype(float)).coords[0] + np.array([0.1, -0.2, 0.3])  # off-centre
    expected = np.log(p[:, 1:4, 2:5, 0:3].reshape(3, -1).mean(1))
    assert np.allclose(probe(world), expected, atol=1e-6)
    corner = grid.voxel_to_world(np.array([[0.0, 0.0, 0.0]])).coords[0]  # neighbourhood clipped at the edge
    assert np.allclose(probe(corner), np.log(p[:, 0:2, 0:2, 0:2].reshape(3, -1).mean(1)), atol=1e-6)
    outside = grid.voxel_to_world(np.array([[-1.0, 0.0, 0.0]])).coords[0]
    assert probe(outside) is None
    assert probe(grid.voxel_to_world(np.array([[5.0, 4.0, 4.0]])).coords[0]) is None  # k = 4 is past the last voxel
