"""Benchmark helpers: config overrides, the low-resolution dataset copy, the stage-2 sample cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench.overrides import override_config
from bench.lowres_copy import copy_cohort
from data_prep.io import read_image, read_labelmap, write_image
from data_prep.scan import Scan, centroids_from_labelmap
from stage1_localize.config import Stage1Config


def test_override_config_nested_and_typed():
    cfg = override_config(Stage1Config(), ["plan.base_features=16", "epochs=7", "augment.p_rotate=0.2",
                                           "peak_threshold=0.3"])
    assert (cfg.plan.base_features, cfg.epochs, cfg.augment.p_rotate, cfg.peak_threshold) == (16, 7, 0.2, 0.3)
    assert Stage1Config().plan.base_features != 16  # the default object is untouched


@pytest.mark.parametrize("item", ["epochs", "no_such_field=1", "plan.nope=2", "epochs.x=1"])
def test_override_config_rejects_bad_items(item):
    with pytest.raises(SystemExit):
        override_config(Stage1Config(), [item])


def test_lowres_copy_keeps_geometry_and_centroids(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    arr = np.zeros((20, 30, 40), np.uint8)
    lab = np.zeros((20, 30, 40), np.uint8)
    lab[6:14, 8:18, 10:20] = 20  # L1
    lab[6:14, 8:18, 24:34] = 21  # L2
    arr[lab > 0] = 200
    direction = np.diag([1.0, 1.0, -1.0])
    img = Scan(arr, (1.0, 1.0, 1.0), (3.0, -2.0, 50.0), direction)
    write_image(img, src / "s1_image.nii.gz")
    write_image(img.with_array(lab), src / "s1_vertebrae.nii.gz")
    assert copy_cohort(src, dst, 2.0) == 1
    low = read_image(dst / "s1_image.nii.gz")
    assert low.array.dtype == np.uint8
    np.testing.assert_allclose(low.spacing, 2.0)
    np.testing.assert_allclose(low.direction, direction)
    # same physical extent: first voxel corner unchanged
    np.testing.assert_allclose(low.origin - direction @ (low.spacing / 2), img.origin - direction @ (img.spacing / 2))
    c_hi = centroids_from_labelmap(img.with_array(lab))
    c_lo = centroids_from_labelmap(read_labelmap(dst / "s1_vertebrae.nii.gz", reference=low))
    assert set(c_lo) == {20, 21}
    for k in c_hi:
        assert np.linalg.norm(c_hi[k] - c_lo[k]) < 1.0


def test_typing_auc_and_cohort_of():
    from bench.bench_stage2 import cohort_of, typing_auc

    classes = ["normal", "inflammation", "fat"]
    y = np.array([0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.1, .8, .1], [.2, .5, .3], [.1, .2, .7], [.3, .3, .4]])
    assert typing_auc(y, p, classes) == 1.0          # every inflammation scored above every fat
    assert typing_auc(y, p[:, [0, 2, 1]], classes) == 0.0  # swapped columns: perfectly wrong
    assert typing_auc(y[:3], p[:3], classes) is None     # no fat vertebra: undefined
    assert typing_auc(y, p, ["normal", "lesion", "other"]) is None
    assert cohort_of("chu2015-004") == "chu2015" and cohort_of("myosegmentum-010") == "myosegmentum"


def test_override_config_works_for_stage2():
    from stage2_classify.config import Stage2Config

    cfg = override_config(Stage2Config(), ["patch.spacing_mm=1.5", "model.base_channels=16", "loss.weighting=fixed"])
    assert (cfg.patch.spacing_mm, cfg.model.base_channels, cfg.loss.weighting) == (1.5, 16, "fixed")
    assert cfg.patch.shape == (32, 43, 43)


def test_sample_cache_round_trip(tmp_path):
    from bench.bench_stage2 import load_sample_cache, save_sample_cache
    from stage2_classify.config import tiny_config
    from stage2_classify.patches import PatchTargets
    from stage2_classify.train import Sample

    cfg = tiny_config()
    shape = cfg.patch.shape
    rng = np.random.default_rng(0)
    body = np.zeros(shape, bool)
    body[3:9, 4:12, 4:12] = True
    lesion_class = np.zeros(shape, np.int64)
    lesion_class[3:5, 4:6, 4:6] = 2
    allowed = np.zeros((5, *shape), bool)
    allowed[1][body] = True
    allowed[0][~body] = True
    t = PatchTargets("full", body, body.copy(), allowed, rng.random(shape).astype(np.float32), lesion_class > 0,
                     None, None, lesion_class)
    image = rng.uniform(-1.0, 3.0, shape).astype(np.float32)
    samples = [Sample(image, t, 2, 0.8, "myosegmentum-007", 21, centre_signature=np.array([0.4, 0.3]))]
    path = tmp_path / "cache.pkl.xz"
    save_sample_cache(samples, cfg, path)
    (back,) = load_sample_cache(path, cfg)
    inside = (image >= -0.25) & (image <= 2.25)
    assert np.abs(back.image - image)[inside].max() <= 0.5 / 102 + 1e-6  # 8-bit step 2.5 / 255
    assert np.allclose(back.image[image > 2.25], 2.25) and np.allclose(back.image[image < -0.25], -0.25)
    assert (back.cls, back.confidence, back.subject, back.label) == (2, 0.8, "myosegmentum-007", 21)
    assert np.array_equal(back.centre_signature, [0.4, 0.3])  # the contrast check's reference needs it
    assert np.array_equal(back.targets.lesion_class, lesion_class) and back.targets.lesion_class.dtype == np.int64
    assert np.array_equal(back.targets.seg_allowed, allowed) and back.targets.body.dtype == bool
    assert np.allclose(back.targets.heatmap, t.heatmap, atol=1e-3) and back.targets.box is None
    other = tiny_config()
    other.patch.spacing_mm = 3.0
    with pytest.raises(SystemExit, match="built for patch"):
        load_sample_cache(path, other)


def test_pipeline_bench_reads_per_scan_times_by_name():
    from bench.bench_pipeline import _SUMMARY

    out = ("myosegmentum-001: 5 vertebrae L1-L5; normal 4, fat 1; 1 flagged (3.4 s) -> /o/myosegmentum-001_vertebrae.csv\n"
           "progress 50%\n"
           "chu2015-002: 7 vertebrae T11-L5; normal 7 (12 s) -> /o/chu2015-002_vertebrae.csv\n")
    assert {m.group(1): float(m.group(2)) for m in _SUMMARY.finditer(out)} == {"myosegmentum-001": 3.4,
                                                                                "chu2015-002": 12.0}


def test_stage1_fold_runs_merge_into_one_table(tmp_path):
    import json

    import bench.bench_stage1 as b1

    gt = {20: (0.0, 0.0, 100.0), 21: (0.0, 0.0, 65.0)}
    case = {"id": "s1", "cohort": "myosegmentum"}
    right = b1.record("spinepipe_stage1", 0, case, "original", {**gt, 19: (0.0, 0.0, 135.0)}, gt, 0.5,
                      naming_flagged=False, completed=[19, 21])  # T12 beyond the annotated run, L2 identified
    wrong = b1.record("spinepipe_stage1", 1, dict(case, id="s2"), "original", {21: gt[20]}, gt, 0.7, naming_flagged=True)
    assert right["n_unscored"] == 1 and wrong["n_unscored"] == 0
    files = []
    for fold, rec in [(0, right), (1, wrong)]:
        meta = {"k": 5, "seed": 0, "config": {"x": 1}, "date": f"d{fold}", "note": "n", "name": f"part{fold}",
                **({"pretrained": "/m/fold{fold}"} if fold == 0 else {"members": 2})}
        doc = {"meta": meta, "folds": [{"fold": fold, "method": "spinepipe_stage1", "n_train": 3,
                                        "train_seconds": 1.0, "infer_seconds": 0.1}], "scans": [rec]}
        files.append(tmp_path / f"part{fold}.json")
        files[-1].write_text(json.dumps(doc))
    assert b1.main(["--merge", *map(str, files), "--name", "joined", "--out", str(tmp_path)]) == 0
    joined = json.loads((tmp_path / "joined.json").read_text())
    s = joined["summary"]["spinepipe_stage1"]["original"]["pooled"]
    assert s["n_scans"] == 2 and s["id_rate"] == 0.5
    assert s["all_correct"] == 0.0 and s["all_correct_annotated_run"] == 0.5 and s["n_unscored"] == 1
    assert "| 0.000 / 0.500 |" in (tmp_path / "joined.md").read_text()
    # the header names every part with its own date and models, not the first part's alone
    md = (tmp_path / "joined.md").read_text()
    assert "- `part0.json` (fold 0; d0): models `/m/fold{fold}` evaluated without training" in md
    assert "- `part1.json` (fold 1; d1): trained in that run, 2 members each" in md
    assert "Models evaluated without training" not in md and "pretrained" not in joined["meta"]
    # the wrong scan carried a naming flag, the right one did not
    assert (s["wrong_flagged"], s["n_wrong_scans"], s["right_flagged"], s["n_right_scans"]) == (1, 1, 0, 1)
    assert "| 1 / 1 | 0 / 1 |" in (tmp_path / "joined.md").read_text()
    # per level: s1 found L1 and L2; s2's only prediction, "L2", sits on L1, so it found neither
    assert s["by_level"] == {"L1": {"n_gt": 2, "identified": 1, "id_rate": 0.5},
                             "L2": {"n_gt": 2, "identified": 1, "id_rate": 0.5}}
    assert "| spinepipe_stage1 | myosegmentum | - | - | 1 / 2 | 1 / 2 | - | - | - |" in (tmp_path / "joined.md").read_text()
    # run completion: two predictions added on s1, of which L2 is identified (T12 has no ground truth)
    assert s["completed"] == {"n": 2, "identified": 1}
    assert "| spinepipe_stage1 | original | pooled | 2 | 1 |" in (tmp_path / "joined.md").read_text()
    # a run from before a config field existed merges with one that has it at its default, not at another value
    from stage1_localize.config import Stage1Config

    for fold, path in enumerate(files):
        doc = json.loads(path.read_text())
        doc["meta"]["config"] = {"epochs": 60, **({"level_balance_power": Stage1Config().level_balance_power}
                                                   if fold else {})}
        path.write_text(json.dumps(doc))
    assert b1.main(["--merge", *map(str, files), "--name", "joined2", "--out", str(tmp_path)]) == 0
    doc = json.loads(files[1].read_text())
    doc["meta"]["config"]["level_balance_power"] = Stage1Config().level_balance_power + 0.25
    files[1].write_text(json.dumps(doc))
    assert b1.main(["--merge", *map(str, files), "--name", "x", "--out", str(tmp_path)]) == 2
    doc["meta"]["config"]["level_balance_power"] = Stage1Config().level_balance_power
    files[1].write_text(json.dumps(doc))
    # decoding overrides are part of the protocol: shown in the table header, and a mixture is refused
    doc = json.loads(files[0].read_text())
    doc["meta"].update(decode=["labelling.fill_gaps=true"], pretrained="/m/fold{fold}/model")
    files[0].write_text(json.dumps(doc))
    assert b1.main(["--merge", *map(str, files), "--name", "x", "--out", str(tmp_path)]) == 2
    files[1].write_text(json.dumps(dict(json.loads(files[1].read_text()), meta=doc["meta"])))
    assert b1.main(["--merge", *map(str, files), "--name", "joined3", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "joined3.md").read_text()
    assert "Decoding overrides of the saved configs: `labelling.fill_gaps=true`." in md
    assert "- `part0.json` (fold 0; d0): models `/m/fold{fold}/model` evaluated without training" in md
    bad = json.loads(files[1].read_text())
    bad["meta"]["seed"] = 7
    files[1].write_text(json.dumps(bad))
    assert b1.main(["--merge", *map(str, files), "--name", "x", "--out", str(tmp_path)]) == 2


def _fold_result(tmp_path, fold: int, preds: list[dict], config: dict):
    import json

    from bench.bench_stage2 import Results

    res = Results(tmp_path, {"seed": 0, "config": config}, name=f"run_f{fold}")
    res.add("cv_curve", [{"fold": fold, "epoch": 2, "auc": [0.5, 0.5, 0.5]}])
    res.add("cv_folds", [{"fold": fold, "evidence_inside_mean": 0.5 + 0.2 * fold}])
    res.add("evidence_depth", [{"fold": fold, "n_evidence": 2, "body_1": 0.1 * fold}])
    res.add("cv_pooled", {"folds": 2, "auc": [0.0, 0.0, 0.0]})  # a single fold's pooled row: must be recomputed
    res.add("cv_predictions", preds)
    path = tmp_path / f"run_f{fold}.json"
    assert json.loads(path.read_text())["sections"]["cv_predictions"] == preds
    return path


def test_merge_fold_runs_pools_predictions_and_refuses_mixtures(tmp_path):
    from bench.bench_stage2 import merge_fold_runs

    cfg = {"classes": ["normal", "inflammation", "fat"]}
    p0 = _fold_result(tmp_path, 0, [{"subject": "chu2015-001", "label": 20, "cls": 0, "p": [0.9, 0.05, 0.05]},
                                    {"subject": "chu2015-001", "label": 21, "cls": 1, "p": [0.2, 0.7, 0.1]}], cfg)
    p1 = _fold_result(tmp_path, 1, [{"subject": "myosegmentum-002", "label": 20, "cls": 2, "p": [0.1, 0.2, 0.7]},
                                    {"subject": "myosegmentum-002", "label": 22, "cls": 0, "p": [0.6, 0.3, 0.1]}], cfg)
    res = merge_fold_runs([p1, p0], tmp_path, "merged")
    sec = res.data["sections"]
    assert sec["cv_pooled"]["n"] == 4 and sec["cv_pooled"]["folds_run"] == [0, 1]
    assert sec["cv_pooled"]["auc"] == [1.0, 1.0, 1.0] and sec["cv_pooled"]["balanced_accuracy"] == 1.0
    assert sec["cv_pooled"]["evidence_inside_mean"] == 0.6  # mean of the folds' 0.5 and 0.7
    assert [r["fold"] for r in sec["cv_folds"]] == [0, 1] and len(sec["cv_curve"]) == 2
    assert [r["body_1"] for r in sec["evidence_depth"]] == [0.0, 0.1]
    assert [r["cohort"] for r in sec["cv_by_cohort"]] == ["chu2015", "myosegmentum", "pooled"]
    assert (tmp_path / "merged.md").is_file()
    with pytest.raises(SystemExit, match="more than one file"):
        merge_fold_runs([p0, p0], tmp_path, "dup")
    other = _fold_result(tmp_path / "o", 1, [], {"classes": ["a", "b", "c"]})
    with pytest.raises(SystemExit, match="configuration or seed differs"):
        merge_fold_runs([p0, other], tmp_path, "mixed")


def test_table_rows_from_parallel_runs_merge_and_duplicates_are_refused(tmp_path):
    from bench.bench_stage2 import Results, merge_fold_runs

    meta = {"seed": 0, "config": {"classes": ["normal", "inflammation", "fat"]}}
    a = Results(tmp_path, meta, name="a")
    a.add("data", {"n_vertebrae": 3})
    a.add("ablation", [{"heads": "cls", "n_subjects": 33, "given_mask_auc": [0.9, 0.8, 0.7]}])
    a.add("site_shift", [{"train": "myosegmentum", "test": "chu2015"}])
    b = Results(tmp_path, meta, name="b")
    b.add("ablation", [{"heads": "cls", "n_subjects": 10}, {"heads": "all", "n_subjects": 10}])
    res = merge_fold_runs([tmp_path / "a.json", tmp_path / "b.json"], tmp_path, "ab")
    sec = res.data["sections"]
    assert [(r["heads"], r["n_subjects"]) for r in sec["ablation"]] == [("cls", 10), ("all", 10), ("cls", 33)]
    assert sec["site_shift"] == [{"train": "myosegmentum", "test": "chu2015"}] and sec["data"] == {"n_vertebrae": 3}
    assert "cv_pooled" not in sec and "| all | 10 |" in (tmp_path / "ab.md").read_text()
    with pytest.raises(SystemExit, match=r"ablation row\(s\) \[\('cls', 33\)\]"):
        merge_fold_runs([tmp_path / "a.json", tmp_path / "a.json"], tmp_path, "aa")


def test_ablation_and_site_shift_row_selection(tmp_path, monkeypatch):
    import argparse

    import bench.bench_stage2 as b2
    from bench.bench_stage2 import Results
    from stage2_classify.config import tiny_config

    trained = []
    monkeypatch.setattr(b2, "train", lambda s, c, runs, tag, device: (trained.append((tag, len(s))), 0.0)[::-1])
    monkeypatch.setattr(b2, "evaluate", lambda module, test, cfg: {"n_test": len(test)})
    samples = [argparse.Namespace(subject=f"{c}-{i:03d}") for c in b2.COHORTS for i in range(20)]
    args = argparse.Namespace(seed=0, quick=False, runs=tmp_path, device="cpu", ablation_sizes=["10", "all"],
                              ablation_heads=["cls", "all"], site_shift_train=["chu2015"])
    res = Results(tmp_path, {}, name="sel")
    b2.section_ablation(samples, tiny_config(), tmp_path, args, res)
    b2.section_site_shift(samples, tiny_config(), tmp_path, args, res)
    rows = res.data["sections"]["ablation"]
    assert [(r["heads"], r["n_subjects"]) for r in rows] == [("cls", 10), ("all", 10), ("cls", 20), ("all", 20)]
    assert all(r["n_test"] == 20 for r in rows)  # the other half of the 40 subjects, one sample each
    assert [t for t, n in trained][:2] == ["abl_cls_10", "abl_all_10"] and trained[0][1] == 10
    assert res.data["sections"]["site_shift"] == [{"train": "chu2015", "test": "myosegmentum", "n_test": 20}]
    args.ablation_sizes = ["21"]
    with pytest.raises(SystemExit, match="only 20 training subjects"):
        b2.section_ablation(samples, tiny_config(), tmp_path, args, res)


def test_load_trained_round_trip_and_refuses_other_config(tmp_path):
    import torch

    from bench.bench_stage2 import load_trained
    from data_prep.checkpoint import save_model
    from stage2_classify.config import tiny_config
    from stage2_classify.train import Stage2Trainable

    cfg = tiny_config()
    torch.manual_seed(0)
    module = Stage2Trainable(cfg)
    save_model(tmp_path / "cv0", module.net.state_dict(), cfg, kind="stage2")
    other_epochs = tiny_config()
    other_epochs.train.epochs = cfg.train.epochs + 5  # the epoch count alone may differ
    back = load_trained(tmp_path / "cv0", other_epochs, "cpu")
    for k, v in module.net.state_dict().items():
        assert torch.equal(back.net.state_dict()[k], v), k
    assert not back.training
    blur4 = tiny_config()
    blur4.ig_baseline_sigma_mm, blur4.ig_steps = 4.0, 3  # evidence settings: taken from this run
    back4 = load_trained(tmp_path / "cv0", blur4, "cpu")
    assert back4.net.cfg.ig_baseline_sigma_mm == 4.0 and back4.net.cfg.ig_steps == 3
    wider = tiny_config()
    wider.margin_mm = cfg.margin_mm + 2.0
    with pytest.raises(SystemExit, match="configuration differs"):
        load_trained(tmp_path / "cv0", wider, "cpu")


def test_lesion_cnr_and_visibility_table():
    from bench.bench_stage2 import _by_visibility, lesion_cnr, lesion_contrast
    from stage2_classify.patches import PatchTargets
    from stage2_classify.train import Sample

    shape = (8, 12, 12)
    body = np.zeros(shape, bool)
    body[1:7, 1:11, 1:11] = True
    image = np.where(np.indices(shape).sum(0) % 2 == 0, 0.9, 1.1).astype(np.float32)  # marrow: median 1, sd 0.1
    lesion_class = np.zeros(shape, np.int64)
    lesion_class[1:3, 1:3, 1:3] = 1
    image[lesion_class > 0] = 1.5
    allowed = np.ones((5, *shape), bool)

    def sample(cls, lc):
        t = PatchTargets("full", body, body, allowed, np.zeros(shape, np.float32), lc > 0 if lc is not None else body & False,
                         None, None, lc)
        return Sample(image, t, cls)

    assert abs(lesion_cnr(sample(1, lesion_class)) - 5.0) < 1e-3  # |1.5 - 1.0| / 0.1
    image[lesion_class > 0] = 0.7  # a dark lesion: signed contrast -3, visibility 3
    assert abs(lesion_contrast(sample(2, lesion_class)) + 3.0) < 1e-3 and abs(lesion_cnr(sample(2, lesion_class)) - 3.0) < 1e-3
    image[lesion_class > 0] = 1.5
    assert lesion_cnr(sample(0, np.zeros(shape, np.int64))) is None and lesion_cnr(sample(0, None)) is None
    preds = [{"subject": "a-1", "cls": 0, "p": [0.9, 0.05, 0.05]}, {"subject": "b-1", "cls": 0, "p": [0.4, 0.3, 0.3]},
             {"subject": "a-2", "cls": 1, "cnr": 0.5, "p": [0.6, 0.3, 0.1]},   # between the two normals
             {"subject": "b-2", "cls": 2, "cnr": 4.0, "p": [0.1, 0.1, 0.8]}]   # above both
    table = _by_visibility(preds)
    rows = {r["cnr"]: r for r in table if r["cohort"] == "pooled"}
    assert rows["[0, 1)"]["detection_auc"] == 0.5 and rows["[3, inf)"]["detection_auc"] == 1.0
    assert rows["[1, 2)"]["n_lesion_vertebrae"] == 0 and rows["[1, 2)"]["detection_auc"] is None
    # per cohort, against that cohort's normals only: a's lesion is above a's normal (0.4 > 0.1)
    per = {(r["cohort"], r["cnr"]): r for r in table}
    assert per[("a", "[0, 1)")]["detection_auc"] == 1.0 and per[("a", "[0, 1)")]["n_normal"] == 1
    assert per[("b", "[3, inf)")]["detection_auc"] == 1.0 and per[("b", "[0, 1)")]["n_lesion_vertebrae"] == 0


def test_detection_by_level_table():
    from bench.bench_stage2 import _by_level

    preds = [{"subject": "myosegmentum-001", "label": 24, "cls": 0, "p": [0.2, 0.5, 0.3]},  # p(lesion) 0.8
             {"subject": "myosegmentum-002", "label": 24, "cls": 1, "p": [0.4, 0.5, 0.1]},  # 0.6: below the normal
             {"subject": "myosegmentum-003", "label": 24, "cls": 2, "p": [0.1, 0.1, 0.8]},  # 0.9: above it
             {"subject": "myosegmentum-001", "label": 20, "cls": 0, "p": [0.9, 0.05, 0.05]},
             {"subject": "chu2015-001", "label": 18, "cls": 1, "p": [0.5, 0.5, 0.0]}]
    rows = _by_level(preds)
    assert [(r["cohort"], r["level"]) for r in rows] == [("chu2015", "T11"), ("myosegmentum", "L1"), ("myosegmentum", "L5")]
    l5 = rows[2]
    assert (l5["n_normal"], l5["n_lesion"], l5["detection_auc"]) == (1, 2, 0.5)
    assert l5["normal_mean_p_lesion"] == 0.8 and l5["lesion_mean_p_lesion"] == 0.75
    assert rows[0]["detection_auc"] is None and rows[0]["normal_mean_p_lesion"] is None  # no normal T11
    assert rows[1]["n_lesion"] == 0 and rows[1]["normal_mean_p_lesion"] == 0.1


def test_stage2_bench_rejects_unknown_annotation_kind(tmp_path, capsys):
    from bench.bench_stage2 import main

    with pytest.raises(SystemExit) as exc:
        main(["--sections", "annotation", "--annotation-kinds", "full,scribble", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown ['scribble']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_outline_rules_on_a_hand_made_slice():
    from bench.outline_rules import contour_offsets, rule_counts
    from data_prep.weak_labels import shrink2d

    sp2 = np.array([1.0, 0.5])  # anisotropic pixels: 1 mm x 0.5 mm
    body = np.zeros((60, 120), bool)
    body[20:40, 40:80] = True  # 20 mm x 20 mm
    drawn = shrink2d(body, -4.0, sp2)  # a user outline 4 mm around the body
    off = contour_offsets(drawn, body, sp2)
    assert off.size and 3.0 <= off.min() and off.max() <= 5.7 and abs(np.median(off) - 4.0) <= 0.6
    c = rule_counts(drawn, body, sp2, offset_mm=4.0, band_mm=2.0)
    assert c[1] == c[0] > 0 and c[3] == c[2] > 0  # every positive is body, every negative is not
    assert c[4] == body.sum() and c[5] == 16 * 32  # 16 mm x 16 mm of pixels 1 x 0.5 mm: erode 6 mm from the outline = erode 2 mm from the body
    tight = rule_counts(body, body, sp2, offset_mm=4.0, band_mm=2.0)  # an outline on the body edge itself
    assert tight[3] < tight[2]  # now some "negatives" (inside the outline) are body: the rule can be wrong


@pytest.mark.parametrize("argv", [["--ablation-sizes", "0"], ["--ablation-sizes", "ten"],
                                  ["--ablation-heads", "cls,seg"], ["--site-shift-train", "verse"]])
def test_bench_stage2_rejects_bad_row_selections(argv, capsys):
    import bench.bench_stage2 as b2

    with pytest.raises(SystemExit) as exc:
        b2.main(argv + ["--sections", "ablation"])
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_paired_variants_section_scores_each_prediction_key(tmp_path):
    from bench.bench_stage2 import merge_fold_runs

    cfg = {"classes": ["normal", "inflammation", "fat"]}
    good, bad = [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]
    rows = [{"subject": "chu2015-001", "label": 20, "cls": 0, "p": good, "p_flip": good, "p_raw": bad, "p_raw_flip": good},
            {"subject": "chu2015-001", "label": 21, "cls": 2, "p": bad, "p_flip": bad, "p_raw": good, "p_raw_flip": bad}]
    res = merge_fold_runs([_fold_result(tmp_path, 0, rows, cfg)], tmp_path, "paired")
    table = {r["variant"]: r for r in res.data["sections"]["cv_paired"]}
    assert list(table) == ["saved model", "saved model + left-right flip TTA", "last raw weights",
                           "last raw weights + left-right flip TTA"]
    assert table["saved model"]["balanced_accuracy"] == 1.0 and table["last raw weights"]["balanced_accuracy"] == 0.0
    del rows[1]["p_raw"]  # a key missing from any row: that variant is not scored
    res = merge_fold_runs([_fold_result(tmp_path / "b", 0, rows, cfg)], tmp_path, "paired_b")
    assert "last raw weights" not in {r["variant"] for r in res.data["sections"]["cv_paired"]}


def test_predict_with_flip_averages_the_mirror():
    """A stand-in whose logits read only the left half of the patch: the flip TTA averages left and right."""
    import torch

    from bench.bench_stage2 import predict
    from stage2_classify.config import tiny_config
    from stage2_classify.train import Stage2Trainable
    from tests.stage2_classify.conftest import toy_samples

    cfg = tiny_config()
    samples = toy_samples(cfg, 2, seed=0)

    class Left(torch.nn.Module):
        heads: dict = {}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward_cls(self, image, region, contrast=None):
            half = image.shape[2] // 2
            s = image[:, 0, :half].flatten(1).mean(1)
            return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], 1)

    module = Stage2Trainable(cfg)
    module.net = Left()
    p, _ = predict(module, samples)
    pf, _ = predict(module, samples, flip_lr=True)
    for n, s in enumerate(samples):
        half = s.image.shape[0] // 2
        left = torch.tensor(s.image[:half].mean())
        right = torch.tensor(s.image[::-1][:half].mean())
        expect = 0.5 * (torch.softmax(torch.stack([left, torch.tensor(0.0), torch.tensor(0.0)]), 0)
                        + torch.softmax(torch.stack([right, torch.tensor(0.0), torch.tensor(0.0)]), 0))
        assert np.allclose(pf[n], expect.numpy(), atol=1e-5)
        assert np.allclose(p[n][0], torch.softmax(torch.stack([left, torch.tensor(0.0), torch.tensor(0.0)]), 0)[0], atol=1e-5)


def test_md_table_union_of_keys_and_formatter():
    from bench.mdtable import md_table

    assert md_table([]) == []
    lines = md_table([{"a": 1, "b": None}, {"a": 2.5, "c": "x"}])
    assert lines == ["| a | b | c |", "|---|---|---|", "| 1 |  |  |", "| 2.5 |  | x |"]
    assert md_table([{"a": 0.12345}], lambda v: f"{v:.2f}")[2] == "| 0.12 |"


def test_predict_lesion_head_reads_the_top_voxels_inside_the_pool():
    import torch

    from bench.bench_stage2 import LESION_TOP_K, predict_lesion_head
    from stage2_classify.config import tiny_config
    from stage2_classify.train import Stage2Trainable
    from tests.stage2_classify.conftest import toy_samples

    cfg = tiny_config()
    samples = toy_samples(cfg, 2, seed=0)

    class Planted(torch.nn.Module):
        """Lesion logits: 'fat' certain on LESION_TOP_K voxels inside the pool, 'no lesion' elsewhere."""
        lesion_typing = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def classification_path(self, image, region, contrast=None):
            pool = (region > 0.5).float()
            logits = torch.zeros(image.shape[0], 3, *image.shape[2:])
            logits[:, 0] = 20.0
            for b in range(image.shape[0]):
                idx = torch.nonzero(pool[b, 0])[:LESION_TOP_K]
                logits[b, 0, idx[:, 0], idx[:, 1], idx[:, 2]] = -20.0
                logits[b, 2, idx[:, 0], idx[:, 1], idx[:, 2]] = 20.0
            return {"lesion": logits, "pool": pool}

    module = Stage2Trainable(cfg)
    module.net = Planted()
    p = predict_lesion_head(module, samples)
    assert p.shape == (2, 3)
    assert np.allclose(p, [[0.0, 0.0, 1.0]] * 2, atol=1e-6)
    module.net.lesion_typing = False
    assert predict_lesion_head(module, samples) is None


def test_stage2_baseline_tail_features():
    from bench.stage2_baseline import FEATURES, tail_features

    rng = np.random.default_rng(0)
    img = rng.normal(1.0, 0.05, (12, 12, 12))
    body = np.zeros(img.shape, bool)
    body[2:10, 2:10, 2:10] = True
    base = tail_features(img, body)
    assert base.shape == (len(FEATURES),)
    assert np.allclose(tail_features(3.0 * img + 7.0, body), base)  # robust standardisation: affine-invariant
    spot = img.copy()
    spot[4:6, 4:6, 4:6] += 1.0  # a bright 8-voxel lesion inside the body
    lit = tail_features(spot, body)
    for name, rise in (("max_sigma0", 10.0), ("max_sigma1", 2.0), ("p99.5_sigma0", 5.0)):
        i = FEATURES.index(name)
        assert lit[i] > base[i] + rise, name
    outside = img.copy()
    outside[0, 0, 0] = 100.0  # outside the mask: no effect
    assert np.allclose(tail_features(outside, body), base)
    assert np.all(tail_features(img, np.zeros_like(body)) == 0.0)


def test_inverted_variant_flips_the_foreground_and_keeps_geometry_and_ground_truth():
    import bench.bench_stage1 as b1

    arr = np.zeros((3, 4, 5), np.float32)
    arr[1, 1:3, 1:4] = 100.0  # bright
    arr[1, 1, 1] = 25.0       # dim foreground
    arr[0, 0, 0] = 0.5        # below 2 % of the range: background, kept
    img = Scan(arr, np.array([1.0, 2.0, 3.0]), np.array([5.0, -2.0, 7.0]), np.eye(3)[[2, 0, 1]], name="s")
    gt = {20: np.array([1.0, 2.0, 3.0])}
    (name, inv, g), = b1.variants(img, gt, ("inverted",))
    assert name == "inverted" and g is gt
    assert np.array_equal(inv.spacing, img.spacing) and np.array_equal(inv.origin, img.origin)
    assert np.array_equal(inv.direction, img.direction) and inv.array.shape == arr.shape
    lo, hi = np.percentile(arr, [0.5, 99.5])
    y = (arr - lo) / (hi - lo)
    assert np.isclose(inv.array[0, 0, 0], arr[0, 0, 0], atol=1e-5)        # background unchanged
    assert np.isclose(inv.array[1, 1, 1], lo + (1 - y[1, 1, 1]) * (hi - lo), atol=1e-4)  # dim -> bright
    assert inv.array[1, 1, 1] > inv.array[1, 2, 2]                        # order reversed in the foreground
    with pytest.raises(ValueError, match="unknown test variant"):
        list(b1.variants(img, gt, ("upside_down",)))


def test_bench_stage1_rejects_unknown_variants(capsys, tmp_path):
    import bench.bench_stage1 as b1

    (tmp_path / "myosegmentum").mkdir()
    code = b1.main(["--data", str(tmp_path), "--variants", "original,sideways", "--out", str(tmp_path / "o")])
    assert code == 2 and "--variants original,sideways" in capsys.readouterr().err


def test_margin_reach_volumes_on_a_hand_made_label_map():
    from bench.margin_reach import reach_volumes

    lab = np.zeros((3, 3, 12), np.int16)
    lab[:, :, 1:4] = 20
    lab[:, :, 6:9] = 21   # voxel centres 3 -> 6: 6 mm from 20 at 2 mm spacing
    lab[:, :, 10:12] = 22  # one voxel gap after 21: centres 8 -> 10 are 4 mm apart
    sp = np.array([1.0, 1.0, 2.0])
    v = reach_volumes(lab, sp, 4.0)
    assert v[20] == 0.0                 # nearest 21 voxel is 6 mm away
    assert v[21] == 9 * 2.0             # one plane of 22 (3 x 3 voxels of 2 mm^3) at 4 mm
    assert v[22] == 9 * 2.0
    assert reach_volumes(lab, sp, 6.0)[20] == 9 * 2.0
    assert reach_volumes(lab, sp, 1.0) == {20: 0.0, 21: 0.0, 22: 0.0}


def test_evidence_stats_depth_profile_agrees_with_the_mass_inside():
    import torch

    from bench.bench_stage2 import evidence_stats
    from stage2_classify.config import tiny_config
    from stage2_classify.train import Stage2Trainable
    from tests.stage2_classify.conftest import toy_samples

    cfg = tiny_config()
    torch.manual_seed(0)
    samples = toy_samples(cfg, 3, seed=2)
    ev = evidence_stats(Stage2Trainable(cfg).eval(), samples, 3, 4)
    prof = ev["depth_profile"]
    assert ev["n_evidence"] == 3 and sum(prof.values()) == pytest.approx(1.0, abs=1e-3)
    body = sum(v for k, v in prof.items() if k.startswith("body_"))
    assert body == pytest.approx(ev["evidence_inside_mean"], abs=1e-3)
    assert prof["margin_3+"] == 0.0  # tiny_config's margin is one voxel: nothing beyond it is seen
    assert 0.0 < ev["shapley_body_share_mean"] < 1.0 and 0.0 < ev["baseline_difference_inside_mean"] < 1.0


def test_contrast_check_summary_shares_and_parts():
    """bench/contrast_check.py: flagged share at the model's threshold from the flags, at the others from the
    novelties; per-part ranges; unmeasured scans count as not flagged (as the user sees them)."""
    from bench.contrast_check import _summary

    rows = [{"set": "a", "regions": "given", "novelty": 0.5, "novelty_centre": 0.5, "novelty_region": 0.2, "flagged": False},
            {"set": "a", "regions": "given", "novelty": 2.5, "novelty_centre": 0.4, "novelty_region": 2.5, "flagged": True},
            {"set": "a", "regions": "given", "novelty": None, "novelty_centre": None, "novelty_region": None, "flagged": False},
            {"set": "b", "regions": "given", "novelty": 1.2, "novelty_centre": 1.2, "novelty_region": None, "flagged": False}]
    a, b = _summary("m", "x", rows, 1.5)
    assert (a["scans"], a["n"], a["n_measured"]) == ("a", 3, 2)
    assert a["flagged_at_1.5"] == 0.333 and a["flagged_at_1"] == 0.333 and a["flagged_at_3"] == 0.0
    assert a["novelty min/median/max"] == "0.50 / 1.50 / 2.50"
    assert a["region part min/median/max"] == "0.20 / 1.35 / 2.50"
    assert b["region part min/median/max"] == "not measured" and b["flagged_at_1"] == 1.0


def test_ig_steps_compare_to_the_reference_run():
    from bench.ig_steps import compare

    inside = {8: [0.5, 0.3], 64: [0.45, 0.5]}
    flags = {8: [False, True], 64: [False, False]}
    seconds = {8: [1.0, 3.0], 64: [8.0, 8.0]}
    r8, r64 = compare(inside, flags, seconds, 64)
    assert (r8["ig_steps"], r8["mean_abs_diff"], r8["max_abs_diff"], r8["flags_changed"]) == (8, 0.125, 0.2, 1)
    assert r8["s_per_scan"] == 2.0 and r8["time_vs_64"] == 0.25
    assert (r64["mean_abs_diff"], r64["flags_changed"], r64["time_vs_64"]) == (0.0, 0, 1.0)


def test_pipeline_bench_names_the_ig_steps_it_ran_with(tmp_path):
    """The table says which Integrated-Gradients steps stage 2 ran with: the override, else the saved value."""
    import json

    from bench.bench_pipeline import models_info

    for stage, cfg, extra in (("stage1", {}, {"epochs_done": 3}), ("stage2", {"ig_steps": 32}, {"epochs_done": 5})):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text(json.dumps({"config": cfg, "extra": extra}))
    assert models_info(tmp_path) == "stage1 3 epochs; stage2 5 epochs, 32 IG steps"
    assert models_info(tmp_path, 16).endswith("stage2 5 epochs, 16 IG steps")


def test_recentre_bench_scores_both_positions_and_halves(tmp_path):
    """Hand-made centroids: stage 1 off by 3 and 4 mm, the body centroids by 1 and 0 mm."""
    from bench.recentre import class_rows, second_halves, summary_rows

    scan = {"subject": "a", "cohort": "chu2015",
            "gt": {"20": [0, 0, 0], "21": [0, 0, 30]},
            "stage1": {"20": [3, 0, 0], "21": [0, 0, 34]},
            "reported": {"20": [1, 0, 0], "21": [0, 0, 30]}}
    rows = {(r["cohort"], r["positions"]): r for r in summary_rows([scan])}
    assert set(rows) == {("chu2015", "stage 1"), ("chu2015", "reported (re-centred)"), ("pooled", "stage 1"),
                         ("pooled", "reported (re-centred)")}
    assert rows[("chu2015", "stage 1")]["mean_err_mm"] == 3.5 and rows[("chu2015", "stage 1")]["id_rate"] == 1.0
    assert rows[("pooled", "reported (re-centred)")]["mean_err_mm"] == 0.5
    crows = class_rows([0, 1, 1], {"off": [np.array([.9, .1]), np.array([.6, .4]), np.array([.2, .8])],
                                   "on": [np.array([.9, .1]), np.array([.3, .7]), np.array([.2, .8])]}, ["n", "l"])
    assert [r["balanced_accuracy"] for r in crows] == [0.75, 1.0] and crows[1]["auc_l"] == 1.0
    for c in ("myosegmentum", "chu2015"):
        (tmp_path / c).mkdir()
        for i in range(5):
            (tmp_path / c / f"{c}-{i:03d}_image.nii.gz").touch()
    assert second_halves(tmp_path) == {f"{c}-{i:03d}" for c in ("myosegmentum", "chu2015") for i in (2, 3, 4)}


def test_real_data_guard_names_the_folder(tmp_path, capsys):
    from bench.realdata import cohort_halves, real_data_missing

    assert real_data_missing(tmp_path / "nowhere")
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "myosegmentum/" in err and err.count("\n") == 1
    (tmp_path / "myosegmentum").mkdir()
    for i in range(3):
        (tmp_path / "myosegmentum" / f"m-{i}_image.nii.gz").touch()
    assert not real_data_missing(tmp_path) and capsys.readouterr().err == ""
    assert cohort_halves(tmp_path) == {"myosegmentum": (["m-0"], ["m-1", "m-2"]), "chu2015": ([], [])}


def test_lesion_families_bench_scores_per_model_family_and_cohort(tmp_path, capsys):
    """Hand-made predictions: one model perfect on 'focal', the other with the lesion kinds swapped."""
    from bench.lesion_families import main, score_rows
    from bench.realdata import merge_folders

    classes = ["normal", "inflammation", "fat"]
    truth = [0, 0, 1, 2, 1, 2]
    good = [[.8, .1, .1], [.7, .2, .1], [.1, .8, .1], [.1, .1, .8], [.2, .7, .1], [.2, .1, .7]]
    swapped = [[p[0], p[2], p[1]] for p in good]
    preds = [{"model": m, "trained_on": "x", "family": "focal", "cohort": c, "truth": t, "p": p}
             for m, ps in (("a", good), ("b", swapped)) for k, (t, p) in enumerate(zip(truth, ps))
             for c in (("chu2015",) if k < 3 else ("myosegmentum",))]
    rows = {(r["model"], r["cohort"]): r for r in score_rows(preds, classes)}
    assert set(rows) == {(m, c) for m in "ab" for c in ("chu2015", "myosegmentum", "pooled")}
    a, b = rows[("a", "pooled")], rows[("b", "pooled")]
    assert a["vertebrae"] == 6 and (a["n_normal"], a["n_inflammation"], a["n_fat"]) == (2, 2, 2)
    assert a["auc_normal"] == a["auc_fat"] == a["typing_auc"] == a["balanced_accuracy"] == 1.0
    assert b["auc_normal"] == 1.0 and b["typing_auc"] == 0.0 and b["balanced_accuracy"] == round(1 / 3, 3)
    # the merged training folder of the benchmark: every scan linked, the tables concatenated
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        (tmp_path / c / f"{c}1_image.nii.gz").write_bytes(b"1")
        (tmp_path / c / "vertebra_labels.csv").write_text(f"id,level,class\n{c}1,L1,0\n")
        (tmp_path / c / "subjects.csv").write_text(f"id,contrast\n{c}1,t2\n")
    out = merge_folders([tmp_path / "x", tmp_path / "y"], tmp_path / "m")
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["x1_image.nii.gz", "y1_image.nii.gz"]
    assert (out / "vertebra_labels.csv").read_text().count("L1") == 2
    with pytest.raises(SystemExit):
        main(["--train", "m=corner,ring", "--data", str(tmp_path)])
    assert "ring" in capsys.readouterr().err
    for argv, words in ((["--train", "m=corner:x"], "positive integer"), (["--model", "m=d", "--test-seed", "0"], "seed"),
                        ([], "--model, --train or --pool")):
        with pytest.raises(SystemExit):
            main([*argv, "--data", str(tmp_path)])
        assert words in capsys.readouterr().err
    # --pool: two runs' predictions (test seeds 1 and 2) scored as one set; the same seed twice is refused
    from bench.lesion_families import _write

    for seed, ps in ((1, good), (2, swapped)):
        part = [{**r, "model": "a"} for r in preds if r["model"] == ("a" if seed == 1 else "b")]
        _write(tmp_path, f"run{seed}", {"meta": {"test_seed": seed, "classes": classes},
                                        "summary": score_rows(part, classes), "predictions": part}, "test")
    assert main(["--pool", str(tmp_path / "run1.json"), str(tmp_path / "run2.json"), "--out", str(tmp_path),
                 "--name", "both"]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    row = [r for r in both["summary"] if r["cohort"] == "pooled"][0]
    assert both["meta"]["test_seeds"] == [1, 2] and row["vertebrae"] == 12 and row["auc_normal"] == 1.0
    assert row["typing_auc"] == 0.5  # right in one run, swapped in the other
    assert main(["--pool", str(tmp_path / "run1.json"), str(tmp_path / "run1.json"), "--out", str(tmp_path)]) == 2
    assert "same test seed twice" in capsys.readouterr().err


def test_visibility_bench_bins_lesions_by_cnr_and_pairs_them_with_the_clean_scan(tmp_path, capsys, monkeypatch):
    """Hand-made predictions: a model that sees the visible lesion only."""
    import bench.visibility
    from bench.visibility import main, visibility_rows

    monkeypatch.setattr(bench.visibility, "quiet_logging", lambda: None)  # it would silence other tests' loggers

    normal = [{"model": "m", "cohort": "water", "truth": 0, "cnr": None, "p": [q, 1 - q, 0.0], "p_clean": [q, 1 - q, 0]}
              for q in (0.9, 0.6, 0.5)]
    faint = {"model": "m", "cohort": "water", "truth": 1, "cnr": -0.5, "p": [0.7, 0.3, 0], "p_clean": [0.7, 0.3, 0]}
    seen = {"model": "m", "cohort": "t2", "truth": 2, "cnr": 5.0, "p": [0.1, 0.1, 0.8], "p_clean": [0.8, 0.1, 0.1]}
    rows = {(r["cohort"], r["cnr"]): r for r in visibility_rows([*normal, faint, seen])}
    assert rows[("water", "[0, 1)")]["n"] == 1 and rows[("water", "[0, 1)")]["median_paired_change"] == 0.0
    # p(lesion) 0.3 against normals at 0.1, 0.4, 0.5: above one of three
    assert rows[("water", "[0, 1)")]["detection_auc"] == round(1 / 3, 4)
    assert rows[("t2", "[4, inf)")]["median_paired_change"] == 0.7
    assert rows[("t2", "[4, inf)")]["detection_auc"] is None  # no normal vertebra in that cohort
    assert rows[("pooled", "[4, inf)")]["detection_auc"] == 1.0 and rows[("pooled", "[4, inf)")]["n"] == 1
    assert rows[("water", "[1, 2)")]["n"] == 0 and rows[("water", "[1, 2)")]["detection_auc"] is None
    assert rows[("water", "normal")]["mean_p_lesion"] == round((0.1 + 0.4 + 0.5) / 3, 3)
    assert rows[("pooled", "normal")]["mean_p_lesion_clean"] == round((0.1 + 0.4 + 0.5 + 0.3 + 0.2) / 5, 3)
    for argv, words in ((["--train", "m=abc"], "number or 'none'"), (["--train", "m=-1"], "positive"),
                        (["--train", "m=2:0"], "positive integer"), (["--train", "m=2:80:x"], "training seed"),
                        ([], "--model or --train"),
                        (["--model", "m=d", "--test-seed", "0"], "seed")):
        with pytest.raises(SystemExit):
            main([*argv, "--data", str(tmp_path)])
        assert words in capsys.readouterr().err
    assert main(["--model", "m=d", "--data", str(tmp_path / "nowhere")]) == 2
    assert "real data not available" in capsys.readouterr().err
    # held-out copies made before the cnr column existed: refused before any model runs
    for c in ("myosegmentum", "chu2015"):
        (tmp_path / "data" / c).mkdir(parents=True)
        old = tmp_path / "work" / "test_seed1" / c
        old.mkdir(parents=True)
        (old / "vertebra_labels.csv").write_text("id,level,class\n")
        (old / "README_lesion_table.csv").write_text("id,level,class,contrast_ratio\n")
    assert main(["--model", "m=missing", "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "README_lesion_table.csv: no cnr column" in err and err.count("\n") == 1


def test_visibility_bench_checks_set_and_include_before_any_work(tmp_path, capsys):
    """``--set`` overrides name a --train model and a valid Stage2Config field; ``--include`` takes earlier
    predictions of the same lesion seed, by model name."""
    from bench.visibility import _included, main

    earlier = tmp_path / "earlier.json"
    row = {"model": "base", "cohort": "water", "truth": 0, "cnr": None, "p": [1, 0, 0], "p_clean": [1, 0, 0]}
    earlier.write_text(json.dumps({"meta": {"test_seed": 1}, "predictions": [row, {**row, "model": "other"}]}))
    assert _included(earlier, ["base"], 1, None) == [row]
    for argv, words in ((["--set", "b:patch.size_mm=[64,64,64]"], "no --train model named 'b'"),
                        (["--set", "a:patch.nope=1"], "unknown field 'nope'"),
                        (["--set", "a:patch.spacing_mm=-1"], "must be positive"),
                        (["--set", "a"], "NAME:KEY=VALUE"),
                        (["--include", f"{earlier}:zz"], "no predictions of model 'zz'"),
                        (["--include", f"{earlier}:base", "--test-seed", "2"], "expected --test-seed 2"),
                        (["--include", f"{tmp_path / 'none.json'}:base"], "not a visibility results file"),
                        (["--include", f"{earlier}:base", "--model", "base=d"], "base also given to --model")):
        with pytest.raises(SystemExit):
            main(["--train", "a=none", *argv, "--data", str(tmp_path / "nowhere")])
        err = capsys.readouterr().err
        assert words in err and "error: --set a: error" not in err, err
    # included predictions must carry the truth and cnr of the held-out copies scored now
    import pandas as pd

    from bench.visibility import _stale_included

    table = pd.DataFrame({"id": ["s1", "s1"], "level": ["L1", "L2"], "class": [0, 2], "cnr": [float("nan"), -1.23456]})
    fat = {**row, "subject": "s1", "level": "L2", "truth": 2, "cnr": -1.235}
    normal = {**row, "subject": "s1", "level": "L1"}
    assert _stale_included([normal, fat], {"water": table}) is None
    assert _stale_included([normal, {**fat, "cnr": -1.0}], {"water": table}) == "base s1 L2"
    assert _stale_included([{**normal, "truth": 1}], {"water": table}) == "base s1 L1"
    assert _stale_included([{**fat, "level": "L3"}], {"water": table}) == "base s1 L3"
    # the override reaches the recipe: a finished run without it is another recipe
    done = tmp_path / "models" / "w"
    done.mkdir(parents=True)
    (done / "recipe.json").write_text(json.dumps({"families": ["corner"], "epochs": 80,
                                                  "overrides": ["patch.size_mm=[64,64,64]"]}))
    from bench.realdata import train_on_first_halves
    from data_prep.errors import SpinepipeInputError

    assert train_on_first_halves("w", tmp_path / "nodata", tmp_path, 80,
                                 overrides=["patch.size_mm=[64,64,64]"]) == done
    with pytest.raises(SpinepipeInputError, match="nodata"):
        train_on_first_halves("w", tmp_path / "nodata", tmp_path, 80)


def test_train_on_first_halves_reuses_only_a_finished_run_of_the_same_recipe(tmp_path):
    from bench.realdata import train_on_first_halves
    from data_prep.errors import SpinepipeInputError
    from data_prep.lesions import LesionConfig

    done = tmp_path / "models" / "m"
    done.mkdir(parents=True)
    (done / "recipe.json").write_text(json.dumps({"families": ["corner"], "epochs": 80, "min_cnr": 2.0, "seed": 1}))
    assert train_on_first_halves("m", tmp_path / "nodata", tmp_path, 80, LesionConfig(min_cnr=2.0), seed=1) == done
    # another seed, floor or length is another recipe: it would train (and here fails for want of data)
    for kw in ({"seed": 0, "config": LesionConfig(min_cnr=2.0)}, {"seed": 1, "config": None},
               {"seed": 1, "config": LesionConfig(min_cnr=2.0), "epochs": 30}):
        kw = {"epochs": 80, **kw}
        with pytest.raises(SpinepipeInputError, match="nodata"):
            train_on_first_halves("m", tmp_path / "nodata", tmp_path, **kw)


def test_visibility_evidence_rows_exact():
    from bench.visibility import evidence_rows

    preds = [{"model": "m", "cohort": "a", "evidence_inside": 0.2, "evidence_inside_expert": 0.5},
             {"model": "m", "cohort": "a", "evidence_inside": 0.6, "evidence_inside_expert": 0.7},
             {"model": "m", "cohort": "b", "evidence_inside": 0.9, "evidence_inside_expert": 0.8},
             {"model": "old", "cohort": "a"}]  # included from a file scored without --evidence: left out
    rows = {(r["model"], r["cohort"]): r for r in evidence_rows(preds, {"m": 0.5})}
    inc = [dict(r, model="inc") for r in preds[:1]]  # included from a file scored with --evidence: default 0.4
    assert evidence_rows(inc, {})[0]["flagged"] == 1.0
    assert set(rows) == {("m", "a"), ("m", "b"), ("m", "pooled")}
    a, pooled = rows[("m", "a")], rows[("m", "pooled")]
    assert a["n"] == 2 and a["inside_mean"] == 0.4 and a["inside_expert_mean"] == 0.6 and a["flagged"] == 0.5
    assert pooled["n"] == 3 and pooled["inside_expert_mean"] == 0.667 and pooled["flagged"] == 0.333
    assert pooled["inside_p10"] == round(float(np.percentile([0.2, 0.6, 0.9], 10)), 3)


def test_evidence_at_expert_centroids_scores_the_expert_body_on_each_patch(tmp_path, monkeypatch):
    """The expert mask lands on the patch grid where the patch's voxels lie in the world: checked against a
    lookup through the patch's and the scan's voxel <-> world maps. The untrained seg head's body is replaced
    by a block around the patch centre, so that the region (and the attribution) covers the expert body."""
    import torch

    import stage2_classify.infer as infer_mod

    def block(net, img):
        body = np.zeros(img.shape[-3:], bool)
        i, j, k = (s // 2 for s in body.shape)
        body[i - 3:i + 3, j - 4:j + 4, k - 3:k + 3] = True
        return body, None, "predicted"

    monkeypatch.setattr(infer_mod, "predicted_body", block)

    from bench.realdata import evidence_at_expert_centroids
    from data_prep.synth import write_cohort
    from stage2_classify.config import tiny_config
    from stage2_classify.evidence import fraction_inside
    from stage2_classify.infer import Classifier
    from stage2_classify.model import Stage2Net

    write_cohort(tmp_path, 1, seed=3)
    image, labels_path = tmp_path / "synth-000_image.nii.gz", tmp_path / "synth-000_vertebrae.nii.gz"
    torch.manual_seed(0)
    clf = Classifier.from_network(Stage2Net(tiny_config()))
    ev = evidence_at_expert_centroids(clf, image, labels_path, "t2")
    assert len(ev) >= 3
    img = read_image(image)
    labels = read_labelmap(labels_path, img)
    from data_prep.scan import vertebrae_from_labelmap

    verts = vertebrae_from_labelmap(labels)
    recs = clf.classify(img, verts, with_evidence=True, keep_evidence_maps=True, contrast="t2")
    for v, r in zip(verts, recs):
        e = ev[v.level]
        assert abs(sum(e["p"]) - 1.0) < 1e-3 and 0.0 <= e["inside"] <= 1.0
        geo = r["geometry"]
        ijk = np.argwhere(np.ones(geo.shape, bool))
        src = np.rint(labels.world_to_voxel(geo.voxel_to_world(ijk)).coords).astype(int)
        ok = np.all((src >= 0) & (src < np.array(labels.shape)), axis=1)
        lab = np.zeros(len(ijk), labels.array.dtype)
        lab[ok] = labels.array[tuple(src[ok].T)]
        expert = (lab == v.label).reshape(geo.shape)
        assert expert.any() and e["inside_expert"] > 0.05
        assert abs(e["inside_expert"] - fraction_inside(r["evidence"].array, expert)) < 0.01, v.level


def test_visibility_config_changes_lists_the_non_default_fields():
    from bench.visibility import config_changes
    from stage2_classify.config import Stage2Config

    cfg = Stage2Config()
    assert config_changes(cfg) == []
    cfg.train.margin_grad_penalty = 1.0
    cfg.patch.size_mm = (64.0, 64.0, 64.0)
    assert config_changes(cfg) == ["patch.size_mm=[64.0, 64.0, 64.0]", "train.margin_grad_penalty=1.0"]


def test_head_activity_counts_alive_units_exactly():
    """``bench/head_units.py``: a unit is alive when its pre-activation is positive on > 2 % of the vertebrae."""
    import torch

    from bench.head_units import head_activity
    from stage2_classify.config import tiny_config
    from stage2_classify.model import Stage2Net

    torch.manual_seed(0)
    net = Stage2Net(tiny_config())
    batch = {"image": torch.randn(3, 1, 12, 16, 16), "region": torch.zeros(3, 1, 12, 16, 16),
             "contrast": torch.full((3,), -1)}
    batch["region"][:, :, 3:9, 4:12, 4:12] = 1.0
    first = net.heads["cls"].mlp[0]
    with torch.no_grad():
        first.weight.zero_()
        first.bias.fill_(-1.0)
        first.bias[:3] = 1.0  # exactly three units positive on every vertebra
    out = head_activity(net, batch, chunk=2)  # two chunks: 2 + 1 vertebrae
    assert (out["alive_units"], out["hidden_units"]) == (3, first.out_features)
    assert out["logit_sd"] == [0.0] * len(out["logit_sd"])  # constant hidden layer: identical logits
    net.train()
    head_activity(net, batch)
    assert net.training  # the mode is restored
