"""Classifier + ``spinepipe classify`` on a small oblique scan (random-weight model: plumbing, not accuracy)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from data_prep.checkpoint import save_model
from data_prep.io import read_image, write_image
from data_prep.scan import Scan, Vertebra
from pipeline.cli import main
from stage2_classify.config import tiny_config
from stage2_classify.infer import Classifier, read_centroids_csv
from stage2_classify.model import Stage2Net


def _scan():
    """Two box 'bodies' (labels 20, 21) in an oblique, anisotropic scan."""
    shape = (40, 36, 24)
    d = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).T  # sagittal-like permutation
    scan = Scan(np.zeros(shape, np.float32), (1.2, 1.5, 3.0), (10.0, -20.0, 5.0), d)
    arr = np.random.default_rng(0).normal(50, 5, shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    lab[6:16, 10:26, 8:16] = 20
    lab[22:32, 10:26, 8:16] = 21
    arr[lab > 0] = 200
    return scan.with_array(arr), scan.with_array(lab)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    net = Stage2Net(cfg)
    return save_model(tmp_path / "stage2", net.state_dict(), cfg, kind="stage2")


def test_classifier_with_and_without_masks(model_dir):
    scan, lab = _scan()
    from data_prep.scan import vertebrae_from_labelmap

    verts = vertebrae_from_labelmap(lab)
    clf = Classifier(model_dir)
    recs = clf.classify(scan, verts, masks=lab, with_evidence=True, keep_evidence_maps=True)
    assert [r["label"] for r in recs] == [20, 21]
    for r in recs:
        assert r["region_source"] == "mask"
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= r["evidence_inside"] <= 1.0
        assert r["body_patch"].sum() > 0
    recs2 = clf.classify(scan, verts, with_evidence=False)
    assert all(r["region_source"] in ("predicted", "prior") for r in recs2)
    assert all(np.isnan(r["evidence_inside"]) for r in recs2)
    assert all(("region_prior" in r["flags"]) == (r["region_source"] == "prior") for r in recs2)
    # classify_scan (pipeline protocol): label map and evidence on the input grid
    res = clf.classify_scan(scan, [Vertebra(20, verts[0].centroid_world, mask=lab.array == 20)], with_evidence=True)
    assert res.evidence.same_geometry(scan) and res.body_labels.same_geometry(scan)
    assert set(np.unique(res.body_labels.array).tolist()) <= {0, 20}
    assert len(res.verdicts) == 1 and res.verdicts[0].probabilities.shape == (3,)


def test_cli_classify_writes_csv_and_evidence(model_dir, tmp_path):
    scan, lab = _scan()
    write_image(scan, tmp_path / "s1_image.nii.gz")
    from data_prep.scan import centroids_from_labelmap

    c = centroids_from_labelmap(lab)
    pd.DataFrame([{"level": n, "label": vid, "x_mm": c[vid][0], "y_mm": c[vid][1], "z_mm": c[vid][2],
                   "confidence": 0.9, "flags": f} for n, vid, f in (("L1", 20, "cut_by_fov"), ("L2", 21, ""))]
                 ).to_csv(tmp_path / "c.csv", index=False)
    assert [v.label for v in read_centroids_csv(tmp_path / "c.csv")] == [20, 21]
    r = CliRunner().invoke(main, ["classify", str(tmp_path / "s1_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                                  "-o", str(tmp_path / "out"), "--models", str(model_dir), "--evidence"])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(tmp_path / "out" / "s1_classes.csv", keep_default_na=False)
    assert list(df.columns) == ["level", "label", "x_mm", "y_mm", "z_mm", "centroid_from", "class", "p_normal",
                                "p_inflammation", "p_fat", "evidence_inside", "contrast_novelty", "flags"]
    assert set(df["centroid_from"]) <= {"body", "input"} and np.isfinite(df[["x_mm", "y_mm", "z_mm"]].to_numpy(float)).all()
    assert df["label"].tolist() == [20, 21] and "cut_by_fov" in df["flags"][0]
    ev = read_image(tmp_path / "out" / "s1_evidence.nii.gz")
    assert ev.same_geometry(scan)
    # the evidence flag's threshold, set at run time: 0 never flags, 1 flags every verdict with mass outside
    flagged = {}
    for t in ("0", "1"):
        r = CliRunner().invoke(main, ["classify", str(tmp_path / "s1_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                                      "-o", str(tmp_path / f"out{t}"), "--models", str(model_dir), "--evidence",
                                      "--evidence-threshold", t])
        assert r.exit_code == 0, r.output
        d = pd.read_csv(tmp_path / f"out{t}" / "s1_classes.csv", keep_default_na=False)
        flagged[t] = ["evidence_outside_body" in f for f in d["flags"]]
        assert (d["evidence_inside"] < 1.0).all()
    assert flagged == {"0": [False, False], "1": [True, True]}
    r = CliRunner().invoke(main, ["classify", str(tmp_path / "s1_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                                  "-o", str(tmp_path / "outx"), "--models", str(model_dir), "--evidence-threshold", "1.5"])
    assert r.exit_code != 0 and "1.5" in r.output and not (tmp_path / "outx").exists()


def test_cli_missing_model_and_bad_centroids(tmp_path):
    scan, _ = _scan()
    write_image(scan, tmp_path / "s_image.nii.gz")
    (tmp_path / "c.csv").write_text("level,label,x_mm,y_mm,z_mm\nL1,21,0,0,0\n")
    r = CliRunner().invoke(main, ["classify", str(tmp_path / "s_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                                  "-o", str(tmp_path / "o"), "--models", str(tmp_path / "none")])
    assert r.exit_code == 2 and "make train-stage2" in r.output
    from data_prep.errors import SpinepipeInputError

    with pytest.raises(SpinepipeInputError, match="line 2"):
        read_centroids_csv(tmp_path / "c.csv")


def test_contrast_reaches_a_contrast_aware_model(tmp_path):
    from stage2_classify.config import ModelConfig

    torch.manual_seed(0)
    cfg = tiny_config(model=ModelConfig(base_channels=8, levels=3, dropout=0.0, contrast_input=True))
    net = Stage2Net(cfg)
    with torch.no_grad():  # make the contrast code matter visibly
        net.heads["contrast"].weight.mul_(20.0)
    folder = save_model(tmp_path / "stage2", net.state_dict(), cfg, kind="stage2")
    scan, lab = _scan()
    from data_prep.scan import vertebrae_from_labelmap

    verts = vertebrae_from_labelmap(lab)

    def probs(clf, **kw):
        return np.array([list(r["probabilities"].values()) for r in clf.classify(scan, verts, masks=lab,
                                                                                  with_evidence=False, **kw)])

    clf = Classifier(folder)
    unknown, water, t2 = probs(clf), probs(clf, contrast="water"), probs(clf, contrast="t2")
    assert np.abs(water - t2).max() > 1e-3 and np.abs(unknown - water).max() > 1e-3
    assert np.array_equal(probs(Classifier(folder, contrast="water")), water)  # constructor default
    assert np.array_equal(probs(Classifier(folder, contrast="water"), contrast="t2"), t2)  # per call wins
    from data_prep.errors import SpinepipeInputError

    with pytest.raises(SpinepipeInputError, match="unknown image contrast 'flair'"):
        probs(clf, contrast="flair")
    # the CLI option: a bad value is refused by click (exit 2) before anything is written
    write_image(scan, tmp_path / "s_image.nii.gz")
    (tmp_path / "c.csv").write_text("level,label,x_mm,y_mm,z_mm,confidence,flags\n")
    r = CliRunner().invoke(main, ["classify", str(tmp_path / "s_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                                  "-o", str(tmp_path / "o"), "--models", str(folder), "--contrast", "flair"])
    assert r.exit_code == 2 and "flair" in r.output and not (tmp_path / "o").exists()


def test_evidence_threshold_override_reaches_the_classifier(model_dir, monkeypatch, tmp_path):
    import shutil

    import stage1_localize.infer as s1
    from pipeline.commands.predict import load_models

    from stage2_classify.config import Stage2Config

    assert Classifier(model_dir).config.evidence_threshold == Stage2Config().evidence_threshold  # the saved one
    assert Classifier(model_dir, evidence_threshold=0.3).config.evidence_threshold == 0.3
    with pytest.raises(ValueError, match="evidence_threshold"):
        Classifier(model_dir, evidence_threshold=1.2)
    shutil.copytree(model_dir, tmp_path / "models" / "stage2")
    monkeypatch.setattr(s1, "Localizer", lambda folder, device="cpu": "stand-in")
    loc, clf = load_models(tmp_path / "models", evidence_threshold=0.25)
    assert loc == "stand-in" and clf.config.evidence_threshold == 0.25
    # the IG steps likewise: the saved value unless overridden, integers >= 2 only
    assert Classifier(model_dir).config.ig_steps == tiny_config().ig_steps == 8
    assert load_models(tmp_path / "models", ig_steps=5)[1].config.ig_steps == 5
    for bad in (1, 2.5):
        with pytest.raises(ValueError, match="ig_steps"):
            Classifier(model_dir, ig_steps=bad)


def test_cli_ig_steps_reach_the_attribution(model_dir, tmp_path, monkeypatch):
    """``classify --ig-steps N`` integrates with N steps (the saved value without it); N < 2 is refused
    before any output is written."""
    import stage2_classify.infer as infer

    scan, lab = _scan()
    write_image(scan, tmp_path / "s1_image.nii.gz")
    from data_prep.scan import centroids_from_labelmap

    c = centroids_from_labelmap(lab)[20]
    pd.DataFrame([{"level": "L1", "label": 20, "x_mm": c[0], "y_mm": c[1], "z_mm": c[2], "confidence": 0.9,
                   "flags": ""}]).to_csv(tmp_path / "c.csv", index=False)
    seen = []
    real = infer.explain

    def spy(*args, **kwargs):
        seen.append(args[6])  # n_steps, passed positionally by Classifier.classify
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "explain", spy)
    base = ["classify", str(tmp_path / "s1_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
            "--models", str(model_dir), "--evidence"]
    for extra, out in (([], "a"), (["--ig-steps", "3"], "b")):
        r = CliRunner().invoke(main, base + ["-o", str(tmp_path / out)] + extra)
        assert r.exit_code == 0, r.output
    assert seen == [Classifier(model_dir).config.ig_steps, 3]
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "bad"), "--ig-steps", "1"])
    assert r.exit_code == 2 and "--ig-steps" in r.output and not (tmp_path / "bad").exists()


def test_cli_classify_flags_an_unseen_contrast(tmp_path):
    """A model whose training scans look like this scan and were named Dixon water: ``--contrast water`` gives
    novelty 0 and no flag; ``--contrast t1`` flags every vertebra; a model saved with a reference of another
    contrast family flags it from the signature alone. Bad reference data in config.json: one-line error."""
    from data_prep.scan import centroids_from_labelmap
    from stage2_classify.domain import CONTRAST_FLAG, ContrastReference, centre_signature, scan_signature
    from stage2_classify.patches import normalise_intensity

    scan, lab = _scan()
    write_image(scan, tmp_path / "s1_image.nii.gz")
    c = centroids_from_labelmap(lab)
    pd.DataFrame([{"level": n, "label": vid, "x_mm": c[vid][0], "y_mm": c[vid][1], "z_mm": c[vid][2],
                   "confidence": 0.9, "flags": ""} for n, vid in (("L1", 20), ("L2", 21))]).to_csv(tmp_path / "c.csv", index=False)
    cfg = tiny_config()
    cc = cfg.contrast_check
    own = centre_signature(normalise_intensity(scan, cfg.patch.intensity_percentiles), c, cc.body_radius_mm,
                           cc.disc_radius_mm, cc.disc_half_length)
    assert own is not None
    net = Stage2Net(cfg)

    def run(ref, contrast, name):
        model = save_model(tmp_path / f"m_{name}", net.state_dict(), cfg, kind="stage2",
                           extra={"contrast_reference": ref})
        args = ["classify", str(tmp_path / "s1_image.nii.gz"), "--centroids", str(tmp_path / "c.csv"),
                "-o", str(tmp_path / f"out_{name}"), "--models", str(model)] + (["--contrast", contrast] if contrast else [])
        return CliRunner().invoke(main, args), tmp_path / f"out_{name}" / "s1_classes.csv"

    same = ContrastReference(scan_signature(own, None)[None], ("water",)).to_dict()
    for contrast, flagged in (("water", False), ("t1", True), (None, False)):
        r, csv = run(same, contrast, f"same_{contrast}")
        assert r.exit_code == 0, r.output
        df = pd.read_csv(csv, keep_default_na=False)
        assert [CONTRAST_FLAG in f for f in df["flags"]] == [flagged, flagged]
        assert np.allclose(df["contrast_novelty"].astype(float), 0.0, atol=1e-3)
    far = ContrastReference(scan_signature(own + np.array([0.5, 0.0]), None)[None], ()).to_dict()
    r, csv = run(far, None, "far")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(csv, keep_default_na=False)
    assert all(CONTRAST_FLAG in f for f in df["flags"]) and np.allclose(df["contrast_novelty"].astype(float), 5.0, atol=1e-2)
    r, csv = run({"signatures": [[1.0, 2.0]]}, None, "bad")
    assert r.exit_code != 0 and "config.json" in r.output and "(N, 4)" in r.output and not csv.parent.exists()


def test_classifier_recentres_on_the_body(model_dir, monkeypatch):
    """A centroid given 8.8 mm off the body (as stage 1's can be): the verdict's patch is cropped again
    around the body, whose centroid the record reports (``centroid_from`` body) to within the patch grid's
    resolution (4 mm in the tiny model); with re-centring off, or a limit below the offset, the given centroid is kept."""
    from data_prep.scan import centroids_from_labelmap

    scan, lab = _scan()
    truth = centroids_from_labelmap(lab)[20]
    given = truth + np.array([6.0, -4.0, 5.0])
    clf = Classifier(model_dir)
    spacing = clf.config.patch.spacing_mm
    (rec,) = clf.classify(scan, [Vertebra(20, given)], masks=lab, with_evidence=False)
    assert rec["centroid_from"] == "body" and rec["region_source"] == "mask"
    # a box sampled on the patch grid (nearest voxel): its centroid is within half a voxel per axis
    assert np.abs(rec["centroid_world"] - truth).max() <= 0.5 * spacing + 1e-6
    assert np.linalg.norm(rec["centroid_world"] - truth) < 0.5 * np.linalg.norm(given - truth)
    # the second patch is centred on the body: its centroid sits within a voxel of the patch centre
    centre_ijk = (np.array(rec["body_patch"].shape) - 1) / 2
    assert np.abs(np.argwhere(rec["body_patch"]).mean(0) - centre_ijk).max() <= 1.0
    from stage2_classify.infer import classes_table

    row = classes_table([rec], clf.classes).iloc[0]
    assert row["centroid_from"] == "body"
    np.testing.assert_allclose(row[["x_mm", "y_mm", "z_mm"]].to_numpy(float), rec["centroid_world"], atol=0.006)
    verdict = clf.classify_scan(scan, [Vertebra(20, given)], with_evidence=False).verdicts[0]
    assert verdict.centroid_world is None or np.linalg.norm(verdict.centroid_world - given) <= clf.config.recentre_max_mm
    # the contrast check's centroid part is measured at the given centroids, whatever the seg head found
    import stage2_classify.infer as infer

    seen = []
    real = infer.centre_signature
    monkeypatch.setattr(infer, "centre_signature", lambda image, cents, *a: seen.append(cents) or real(image, cents, *a))
    (rec,) = clf.classify(scan, [Vertebra(20, given)], masks=lab, with_evidence=False)
    assert rec["centroid_from"] == "body" and np.array_equal(seen[-1][20], given)
    for limit in (0.0, 5.0):
        clf.config.recentre_max_mm = limit
        (rec,) = clf.classify(scan, [Vertebra(20, given)], masks=lab, with_evidence=False)
        assert rec["centroid_from"] == "input" and np.array_equal(rec["centroid_world"], given)
