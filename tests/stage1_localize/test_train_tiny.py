"""A tiny stage-1 training on synthetic scans: it must learn, resume exactly, and write its files."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from data_prep import checkpoint
from data_prep.io import read_image, read_points_csv
from data_prep.scan import TRANSITIONAL_IDS
from pipeline.metrics import identification, summarize_identification
from stage1_localize.config import AugmentConfig, Stage1Config
from stage1_localize.infer import Localizer
from stage1_localize.model import LocalizerNet
from stage1_localize.plan import plan_network
from stage1_localize.train import LOG_FILE, load_subjects, make_batch, spine_tilts_deg, train_stage1

N_SUBJECTS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    synth = pytest.importorskip("data_prep.synth")
    out = tmp_path_factory.mktemp("synth_cohort")
    # no transitional anatomy in this tiny cohort: chance baselines below assume standard spines
    cfg = synth.SynthConfig(l6_rate=0.0, t13_rate=0.0, missing_lumbar_rate=0.0)
    synth.write_cohort(out, N_SUBJECTS, seed=3, config=cfg)
    return out


def _tiny_config(**kw) -> Stage1Config:
    """5 mm grid, one conv per stage, ~20 k-voxel patches: ~0.5 s per step on a shared 2-core CPU.

    Decoded at the former 0.25 peak threshold: after 8 epochs the heatmap background is still noisy, and the
    low default (0.1, tuned for fully trained models) would let that noise in as candidates. Rotations up
    to 12 deg, the default before session 39: within 160 steps the default 30 deg has not yet learnt
    positions (median error 22.9 mm on the training scans against 15 mm here); the wider default is
    measured where it is meant to work, on real data over full training (bench/results/stage1_rot30_seed1.md)."""
    kw.setdefault("peak_threshold", 0.25)
    kw.setdefault("augment", AugmentConfig(max_rotation_deg=12.0))
    cfg = Stage1Config(target_spacing=(5.0, 5.0, 5.0), sigma_mm=8.0, lr=5e-3, batch_size=2, **kw)
    cfg.plan = plan_network([[90.0, 160.0, 260.0]], cfg.target_spacing, max_patch_voxels=20_000)
    cfg.plan.n_conv_per_stage = 1
    return cfg


@pytest.fixture(scope="module")
def subjects(cohort):
    return load_subjects(cohort, _tiny_config())


def _evaluate(localizer: Localizer, cohort, ids) -> tuple[dict, float]:
    results, det = [], []
    for sid in ids:
        img = read_image(cohort / f"{sid}_image.nii.gz")
        levels, pts = read_points_csv(cohort / f"{sid}_points.csv")
        verts = localizer.localize(img)
        results.append(identification({v.label: v.centroid_world for v in verts}, dict(zip(levels, pts.coords))))
        world = localizer.candidates(img)[0]
        det += [bool(len(world)) and float(np.min(np.linalg.norm(world - p, axis=1))) < 20.0 for p in pts.coords]
    return summarize_identification(results), float(np.mean(det))


def _chance_id_rate(cohort, ids, levels) -> float:
    """Right positions, a uniformly random contiguous run of (standard) level names."""
    std = [v for v in levels if v not in TRANSITIONAL_IDS]
    hits = total = 0.0
    for sid in ids:
        n = len(read_points_csv(cohort / f"{sid}_points.csv")[0])
        hits += n * (1.0 / max(1, len(std) - n + 1))
        total += n
    return hits / total


@pytest.mark.slow
def test_tiny_training_learns(cohort, subjects, tmp_path):
    cfg = _tiny_config(epochs=8, steps_per_epoch=20)
    train_ids = [s.id for s in subjects[:4]]
    out = train_stage1(cohort, tmp_path / "stage1", cfg, subjects=subjects[:4], auto_plan=False)
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG, checkpoint.TRAIN_STATE, LOG_FILE):
        assert (out / name).is_file(), name
    log = pd.read_csv(out / LOG_FILE)
    assert log["epoch"].tolist() == list(range(1, 9))
    assert log["heatmap_loss"].iloc[-1] < 0.85 * log["heatmap_loss"].iloc[0], log["heatmap_loss"].tolist()
    assert log["level_loss"].iloc[-1] < 0.85 * log["level_loss"].iloc[0], log["level_loss"].tolist()

    trained, det = _evaluate(Localizer(out, device="cpu"), cohort, train_ids)
    held_out, det_ho = _evaluate(Localizer(out, device="cpu"), cohort, [s.id for s in subjects[4:]])
    torch.manual_seed(cfg.seed)
    untrained, det0 = _evaluate(Localizer(net=LocalizerNet(cfg), config=cfg, device="cpu"), cohort, train_ids)
    chance = _chance_id_rate(cohort, train_ids, cfg.levels)
    print(f"\ntiny stage-1 on its 4 training scans: {trained}, detection {det:.2f}; held-out 2 scans: "
          f"{held_out}, detection {det_ho:.2f}; untrained id {untrained['id_rate']:.2f} detection {det0:.2f}; "
          f"chance id (true positions, random run of names) {chance:.2f}")
    assert det >= 0.5 and det > det0 + 0.3
    assert trained["id_rate"] > chance + 0.1
    assert trained["id_rate"] > untrained["id_rate"] + 0.2
    assert trained["median_error_mm"] < 15.0


def test_training_is_deterministic_and_resumes_exactly(cohort, subjects, tmp_path):
    cfg = _tiny_config(epochs=2, steps_per_epoch=2)
    cfg.plan.patch_size = (16, 16, 24)  # tiny: this test is about bookkeeping, not learning
    sub = subjects[:2]
    full = train_stage1(cohort, tmp_path / "full", cfg, subjects=sub, auto_plan=False)
    half = train_stage1(cohort, tmp_path / "half", dataclasses.replace(cfg, epochs=1), subjects=sub, auto_plan=False)
    assert len(pd.read_csv(half / LOG_FILE)) == 1
    resumed = train_stage1(cohort, tmp_path / "half", cfg, resume=True, subjects=sub, auto_plan=False)
    a, cfg_a, extra_a = checkpoint.load_model(full, Stage1Config, kind="stage1")
    b, cfg_b, extra_b = checkpoint.load_model(resumed, Stage1Config, kind="stage1")
    assert cfg_a == cfg_b and extra_b["epochs_done"] == 2
    # the de-tilt reference is the median tilt of the training scans' spines, kept on resume
    tilts = spine_tilts_deg(sub)
    assert len(tilts) == 2 and cfg_a.detilt_reference_deg == round(float(np.median(tilts)), 2)
    assert cfg_a.detilt_reference_deg != cfg.detilt_reference_deg  # measured, not the 8.0 default
    assert extra_a["synthetic_only"] is True  # trained on a synth.write_cohort folder
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = pd.read_csv(full / LOG_FILE), pd.read_csv(resumed / LOG_FILE)
    assert np.allclose(la["loss"], lb["loss"])
    # a different config cannot silently resume
    from data_prep.errors import SpinepipeInputError

    with pytest.raises(SpinepipeInputError, match="cannot resume"):
        train_stage1(cohort, tmp_path / "half", dataclasses.replace(cfg, lr=1e-2), resume=True,
                     subjects=sub, auto_plan=False)


def test_spine_tilts_use_annotated_points_only(subjects):
    """Hand-made: three annotated points 30 deg off the grid's k axis towards +j, plus a pseudo-point far off
    the line (ignored); a subject with two annotated points gives no tilt."""
    from stage1_localize.train import TrainSubject

    grid = subjects[0].grid
    t = np.radians(30.0)
    ijk = np.array([[5.0, 20.0, 30.0]]) + np.arange(4)[:, None] * np.array([0.0, np.sin(t), np.cos(t)]) * 10.0 / grid.spacing
    ijk[3] = [5.0, 0.0, 0.0]
    s = TrainSubject("a", grid, ijk, [22, 21, 20, 26], pseudo_ids=(26,))
    two = TrainSubject("b", grid, ijk[:2], [21, 20])
    np.testing.assert_allclose(spine_tilts_deg([s, two]), [30.0], atol=1e-9)


def test_load_subjects_extrapolate_cranial_adds_one_level_above_the_run(cohort, subjects):
    """``extrapolate_cranial=1``: each subject gains exactly the standard level above its top annotated one."""
    from data_prep.scan import anatomical_rank
    ext = load_subjects(cohort, _tiny_config(extrapolate_cranial=1))
    assert [s.id for s in ext] == [s.id for s in subjects]
    for plain, more in zip(subjects, ext):
        assert list(more.level_ids[:len(plain.level_ids)]) == list(plain.level_ids)
        np.testing.assert_allclose(more.points_ijk[:len(plain.level_ids)], plain.points_ijk)
        added = list(more.level_ids[len(plain.level_ids):])
        assert len(added) == 1
        top = min(plain.level_ids, key=anatomical_rank)
        assert anatomical_rank(added[0]) < anatomical_rank(top)


def test_load_subjects_extrapolate_caudal_adds_the_level_below_the_run(cohort, subjects):
    """``extrapolate_caudal=1``: a subject gains the standard level below its lowest annotated one (S1 below
    L5), none when S1 is annotated."""
    from data_prep.scan import anatomical_rank, standard_neighbour
    ext = load_subjects(cohort, _tiny_config(extrapolate_caudal=1))
    for plain, more in zip(subjects, ext):
        assert list(more.level_ids[:len(plain.level_ids)]) == list(plain.level_ids)
        added = list(more.level_ids[len(plain.level_ids):])
        bottom = max(plain.level_ids, key=anatomical_rank)
        assert added == ([] if bottom == 26 else [standard_neighbour(bottom, +1)])
        assert tuple(added) == more.pseudo_ids


def test_level_only_pseudo_points_change_only_the_level_targets(cohort, subjects):
    """With ``extrapolated_level_only`` the pseudo-points are never patch centres (zero draw weight, after
    the real points): the same RNG gives the same patches, heatmaps and offsets as without them; only the
    level map gains the pseudo-levels."""
    cfg = _tiny_config(extrapolate_cranial=1, extrapolated_level_only=True)
    ext = load_subjects(cohort, cfg)
    assert any(s.pseudo_ids for s in ext)
    pseudo_index = {cfg.levels.index(v) for s in ext for v in s.pseudo_ids}
    gained = 0
    for seed in range(6):
        a = make_batch(subjects, _tiny_config(), np.random.default_rng(seed))
        b = make_batch(ext, cfg, np.random.default_rng(seed))
        for key in ("image", "heatmap", "heatmap_weight", "offset", "offset_mask"):
            assert torch.equal(a[key], b[key]), key
        changed = a["levels"] != b["levels"]
        assert set(b["levels"][changed].tolist()) <= pseudo_index  # only pseudo-levels were added
        gained += int(changed.sum())
    assert gained > 0


def test_centre_weights_hand_made(subjects):
    """Balanced weights for the real points, zero for level-only pseudo-points, None (uniform) without
    balancing or pseudo-points, and an empty array for a subject without points."""
    from stage1_localize.train import TrainSubject, centre_weights
    grid = subjects[0].grid
    a = TrainSubject("a", grid, np.zeros((3, 3)), [20, 21, 26], pseudo_ids=(26,))
    b = TrainSubject("b", grid, np.zeros((2, 3)), [20, 22])
    empty = TrainSubject("e", grid, np.zeros((0, 3)), [])
    cfg = _tiny_config(extrapolated_level_only=True, level_balance_power=1.0)
    w = centre_weights([a, b, empty], cfg)
    np.testing.assert_allclose(w[id(a)], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(w[id(b)], [0.5, 1.0])
    assert w[id(empty)].shape == (0,)
    w = centre_weights([a, b], dataclasses.replace(cfg, balance_levels=False))
    np.testing.assert_allclose(w[id(a)], [1.0, 1.0, 0.0])
    assert w[id(b)] is None
    # without extrapolated_level_only the pseudo-point is an ordinary point
    w = centre_weights([a, b], dataclasses.replace(cfg, extrapolated_level_only=False))
    np.testing.assert_allclose(w[id(a)], [0.5, 1.0, 1.0])


def test_weight_average_is_saved_and_resumes_exactly(cohort, subjects, tmp_path):
    """ema_decay > 0: model.safetensors holds the average, train_state.pt the raw weights and the average;
    a resumed run ends with the same average as an uninterrupted one."""
    cfg = _tiny_config(epochs=2, steps_per_epoch=2, ema_decay=0.5)
    cfg.plan.patch_size = (16, 16, 24)
    sub = subjects[:2]
    full = train_stage1(cohort, tmp_path / "full", cfg, subjects=sub, auto_plan=False)
    saved, _, extra = checkpoint.load_model(full, Stage1Config, kind="stage1")
    state = checkpoint.load_train_state(full)
    assert extra["weights"] == "ema"
    averaged = state["ema"]["weights"]
    assert set(averaged) == set(saved) == set(state["model"])
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert any(not torch.equal(saved[k], state["model"][k]) for k in saved)  # 4 steps at decay 0.5: not the raw
    assert state["ema"]["updates"] == 4
    train_stage1(cohort, tmp_path / "half", dataclasses.replace(cfg, epochs=1), subjects=sub, auto_plan=False)
    resumed = train_stage1(cohort, tmp_path / "half", cfg, resume=True, subjects=sub, auto_plan=False)
    again, _, _ = checkpoint.load_model(resumed, Stage1Config, kind="stage1")
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_training_precision_is_resolved_recorded_and_checked_first(cohort, subjects, tmp_path):
    """The saved model says which arithmetic trained it; bfloat16 and float32 steps really differ; a bad
    setting stops before any file is written, with an error naming the model's config file."""
    from data_prep.errors import SpinepipeInputError

    cfg = _tiny_config(epochs=1, steps_per_epoch=2)
    cfg.plan.patch_size = (16, 16, 24)
    sub = subjects[:2]
    weights = {}
    for prec in ("bfloat16", "float32"):
        out = train_stage1(cohort, tmp_path / prec, dataclasses.replace(cfg, train_precision=prec), subjects=sub,
                           auto_plan=False)
        weights[prec], saved_cfg, extra = checkpoint.load_model(out, Stage1Config, kind="stage1")
        assert extra["train_precision"] == prec and saved_cfg.train_precision == prec
    assert any(not torch.equal(weights["bfloat16"][k], weights["float32"][k]) for k in weights["float32"])
    with pytest.raises(SpinepipeInputError, match=r"bad[/\\]config\.json.*expected one of float32, bfloat16, auto, got 'half'"):
        train_stage1(cohort, tmp_path / "bad", dataclasses.replace(cfg, train_precision="half"), subjects=sub, auto_plan=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("parallel", [False, True])
def test_ensemble_training_writes_seeded_members_that_load_as_one_ensemble(cohort, tmp_path, parallel):
    """``train_stage1_ensemble``: member m trains with seed + m (in its own process when parallel: the
    same files), ``ensemble.json`` appears once all are done, and a Localizer given the folder averages the
    members; single models and ensembles do not overwrite each other's folders."""
    from data_prep.errors import SpinepipeInputError
    from stage1_localize.infer import model_folders
    from stage1_localize.train import train_stage1_ensemble

    cfg = _tiny_config(epochs=1, steps_per_epoch=1, seed=5)
    cfg.plan.patch_size = (16, 16, 24)
    out = train_stage1_ensemble(cohort, tmp_path / "ens", cfg, members=2, parallel=parallel)
    assert (out / checkpoint.ENSEMBLE).is_file()
    assert model_folders(out) == [out / "member0", out / "member1"]
    weights = []
    for m, seed in ((0, 5), (1, 6)):
        w, saved, extra = checkpoint.load_model(out / f"member{m}", Stage1Config, kind="stage1")
        assert saved.seed == seed and extra["epochs_done"] == 1
        weights.append(w)
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len(Localizer(out, device="cpu").members) == 2
    with pytest.raises(SpinepipeInputError, match="holds a stage-1 ensemble"):
        train_stage1(cohort, out, cfg, auto_plan=False)
    if not parallel:
        train_stage1(cohort, tmp_path / "single", cfg, auto_plan=False)
        with pytest.raises(SpinepipeInputError, match="holds a single stage-1 model"):
            train_stage1_ensemble(cohort, tmp_path / "single", cfg, members=2, parallel=False)


def test_a_model_trained_on_synthetic_scans_only_says_so_when_loaded(cohort, subjects, tmp_path, caplog):
    """``extra["synthetic_only"]``: every training folder holds ``synth_meta.json``; the Localizer warns."""
    import logging
    import shutil

    from stage1_localize.train import synthetic_only

    real_like = tmp_path / "real_like"
    real_like.mkdir()
    assert synthetic_only(cohort) and synthetic_only([cohort, str(cohort)])
    assert not synthetic_only(real_like) and not synthetic_only([cohort, real_like]) and not synthetic_only(None)
    cfg = _tiny_config(epochs=1, steps_per_epoch=1)
    cfg.plan.patch_size = (16, 16, 24)
    synth_model = train_stage1(cohort, tmp_path / "synth", cfg, subjects=subjects[:1], auto_plan=False)
    other = train_stage1(real_like, tmp_path / "other", cfg, subjects=subjects[:1], auto_plan=False)
    assert checkpoint.load_model(other, Stage1Config, kind="stage1")[2]["synthetic_only"] is False
    with caplog.at_level(logging.WARNING, logger="stage1_localize.infer"):
        Localizer(other, device="cpu")
        assert not caplog.records
        Localizer(synth_model, device="cpu")
    assert len(caplog.records) == 1 and "synthetic scans only" in caplog.records[0].getMessage()
    assert str(synth_model) in caplog.records[0].getMessage()
    # an ensemble warns when any member was trained on synthetic scans only
    caplog.clear()
    ens = tmp_path / "ens"
    shutil.copytree(other, ens / "a")
    shutil.copytree(synth_model, ens / "b")
    with caplog.at_level(logging.WARNING, logger="stage1_localize.infer"):
        Localizer([ens / "a", ens / "b"], device="cpu")
    assert len(caplog.records) == 1
