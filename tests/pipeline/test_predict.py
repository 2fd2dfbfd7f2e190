"""Pipeline orchestration with stand-in networks: report columns/order, coordinates, atomic outputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep.errors import SpinepipeInputError
from data_prep.io import read_image, write_image
from data_prep.scan import Scan, Vertebra
from pipeline.predict import Classification, predict_scan, scan_name
from pipeline.report import VertebraVerdict, report_columns

CLASSES = ("normal", "inflammation", "fat")


def _oblique_scan() -> Scan:
    """Sagittal anisotropic scan (thick left-right slices), LPI orientation like the real data."""
    rng = np.random.default_rng(0)
    arr = rng.normal(100, 10, size=(12, 40, 60)).astype(np.float32)
    direction = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
    return Scan(arr, spacing=(3.5, 0.9, 0.9), origin=(-20.0, 15.0, 40.0), direction=direction)


class StandInLocalizer:
    def __init__(self, voxels: dict[int, tuple[float, float, float]]):
        self.voxels = voxels
        self.seen = None

    def localize(self, scan: Scan) -> list[Vertebra]:
        self.seen = scan
        # deliberately returned foot-to-head: the report must reorder
        out = []
        for label, ijk in sorted(self.voxels.items(), reverse=True):
            out.append(Vertebra(label, scan.voxel_to_world(np.array(ijk)).coords[0], confidence=0.9))
        if out:
            out[0].flags.append("cut_by_fov")
        return out


class StandInClassifier:
    classes = CLASSES

    def classify_scan(self, scan, vertebrae, with_evidence=False):
        verdicts = []
        labels = np.zeros(scan.shape, dtype=np.int16)
        for n, v in enumerate(vertebrae):
            p = np.full(3, 0.1)
            p[n % 3] = 0.8
            verdicts.append(VertebraVerdict(v.label, p, evidence_inside=0.97 - 0.1 * n, flags=["low_evidence"] if n == 2 else []))
            i, j, k = np.round(scan.world_to_voxel(v.centroid_world).coords[0]).astype(int)
            labels[max(i - 1, 0): i + 2, j - 2: j + 3, k - 2: k + 3] = v.label
        ev = scan.with_array(np.zeros(scan.shape, np.float32)) if with_evidence else None
        return Classification(verdicts, scan.with_array(labels), ev)


@pytest.fixture()
def scan_file(tmp_path):
    p = tmp_path / "in" / "case-7_image.nii.gz"
    write_image(_oblique_scan(), p)
    return p


def test_scan_name():
    assert scan_name("a/b/case-7_image.nii.gz") == "case-7"
    assert scan_name("x.mha") == "x"
    assert scan_name("dicomdir") == "dicomdir"


def test_report_columns_order_and_coordinates(scan_file, tmp_path):
    loc = StandInLocalizer({20: (6, 10, 10), 21: (6, 20, 30), 22: (6, 25, 50)})
    res = predict_scan(scan_file, tmp_path / "out", loc, StandInClassifier(), evidence=True, overview=False)
    df = pd.read_csv(res.files["report"], keep_default_na=False)
    assert list(df.columns) == report_columns(CLASSES)
    assert list(df.columns) == ["level", "label", "x_mm", "y_mm", "z_mm", "centroid_from", "confidence", "class",
                                "p_normal", "p_inflammation", "p_fat", "evidence_inside", "contrast_novelty", "flags"]
    assert df["level"].tolist() == ["L1", "L2", "L3"]  # head to foot
    assert df["centroid_from"].tolist() == ["stage1"] * 3  # the stand-in measured no body
    # world coordinates map back to the input grid voxels given by the stand-in
    scan = read_image(scan_file)
    ijk = scan.world_to_voxel(df[["x_mm", "y_mm", "z_mm"]].to_numpy(float)).coords
    np.testing.assert_allclose(ijk, [[6, 10, 10], [6, 20, 30], [6, 25, 50]], atol=0.02)
    # classes = argmax of the probabilities; flags merged from both stages
    assert df["class"].tolist() == [CLASSES[int(np.argmax(r))] for r in df[["p_normal", "p_inflammation", "p_fat"]].to_numpy()]
    assert "cut_by_fov" in df.loc[df.level == "L3", "flags"].item()
    labels = read_image(res.files["labels"])
    assert labels.same_geometry(scan)
    assert set(np.unique(labels.array)) == {0, 20, 21, 22}
    verse = json.loads(res.files["verse_json"].read_text())
    assert verse[0]["direction"] == list(scan.orientation_code())
    np.testing.assert_allclose([verse[1][c] for c in "XYZ"], [6, 10, 10], atol=0.01)
    slicer = json.loads(res.files["slicer"].read_text())
    pts = slicer["markups"][0]["controlPoints"]
    assert slicer["markups"][0]["coordinateSystem"] == "LPS"
    np.testing.assert_allclose(pts[0]["position"], df.loc[0, ["x_mm", "y_mm", "z_mm"]].to_numpy(float), atol=1e-3)
    assert "evidence" in res.files
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_body_centroids_from_stage2_replace_stage1_positions_in_every_output(scan_file, tmp_path):
    """Where a verdict carries the centroid of the body stage 2 classified, the CSV, the VerSe JSON and the
    Slicer markups all give that position (``centroid_from`` = body); the others keep stage 1's."""
    moved = {21: np.array([1.5, -2.0, 3.25])}  # world mm offsets of the body centroid from stage 1's

    class Recentring(StandInClassifier):
        def classify_scan(self, scan, vertebrae, with_evidence=False):
            res = super().classify_scan(scan, vertebrae, with_evidence)
            for verdict, v in zip(res.verdicts, vertebrae):
                if v.label in moved:
                    verdict.centroid_world = v.centroid_world + moved[v.label]
            return res

    loc = StandInLocalizer({20: (6, 10, 10), 21: (6, 20, 30), 22: (6, 25, 50)})
    res = predict_scan(scan_file, tmp_path / "out", loc, Recentring(), overview=False)
    df = pd.read_csv(res.files["report"], keep_default_na=False)
    scan = read_image(scan_file)
    stage1 = scan.voxel_to_world(np.array([[6, 10, 10], [6, 20, 30], [6, 25, 50]], float)).coords
    want = stage1 + np.array([[0, 0, 0], moved[21], [0, 0, 0]])
    np.testing.assert_allclose(df[["x_mm", "y_mm", "z_mm"]].to_numpy(float), want, atol=0.006)
    assert df["centroid_from"].tolist() == ["stage1", "body", "stage1"]
    verse = json.loads(res.files["verse_json"].read_text())
    np.testing.assert_allclose([[e[c] for c in "XYZ"] for e in verse[1:]], scan.world_to_voxel(want).coords, atol=0.01)
    pts = json.loads(res.files["slicer"].read_text())["markups"][0]["controlPoints"]
    np.testing.assert_allclose([pt["position"] for pt in pts], want, atol=1e-3)
    with pytest.raises(ValueError, match="finite"):
        VertebraVerdict(20, np.ones(3) / 3, centroid_world=[0.0, np.nan, 1.0])


def test_no_spine_is_an_error_and_writes_nothing(scan_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SpinepipeInputError, match="no vertebra found"):
        predict_scan(scan_file, out, StandInLocalizer({}), StandInClassifier(), overview=False)
    assert not out.exists() or not list(out.iterdir())


def test_failure_midway_leaves_no_partial_output(scan_file, tmp_path):
    class Broken(StandInClassifier):
        def classify_scan(self, scan, vertebrae, with_evidence=False):
            c = super().classify_scan(scan, vertebrae, with_evidence)
            c.verdicts[0].probabilities = np.ones(2)  # wrong length -> report building fails
            return c

    out = tmp_path / "out"
    with pytest.raises(ValueError):
        predict_scan(scan_file, out, StandInLocalizer({20: (6, 10, 10)}), Broken(), overview=False)
    assert not out.exists() or not list(out.iterdir())


def test_cli_contrast_choices_match_the_library():
    from data_prep.dataset import IMAGE_CONTRASTS
    from data_prep.lesions import CONTRASTS
    from pipeline.cli import CONTRAST_CHOICES
    from stage2_classify.config import IMAGE_CONTRASTS as STAGE2_CONTRASTS

    assert CONTRAST_CHOICES == IMAGE_CONTRASTS == CONTRASTS == STAGE2_CONTRASTS


def test_cli_predict_writes_a_run_record_naming_the_models(scan_file, tmp_path, monkeypatch):
    """``spinepipe predict`` loads the models once (one worker) and writes ``predict_run.json``: each model
    folder with the SHA-256 of its weights and its training facts, the stage-2 settings, and per scan its
    files or its error. A run where every scan fails writes no record."""
    import types

    import torch
    from click.testing import CliRunner

    import pipeline.commands.predict as cmd
    from data_prep import checkpoint
    from pipeline.cli import main
    from stage2_classify.config import tiny_config

    cfg = tiny_config()
    s1 = checkpoint.save_model(tmp_path / "m1", {"w": torch.zeros(2)}, cfg, kind="stage1",
                               extra={"epochs_done": 3, "synthetic_only": True, "train_subjects": ["a", "b"]})
    s2 = checkpoint.save_model(tmp_path / "m2", {"w": torch.ones(2)}, cfg, kind="stage2",
                               extra={"epoch": 5, "n_samples": 40, "synthetic_only": False, "loss_weights": {"cls": 1.0}})
    loads = []

    def fake_load_models(*args, **kwargs):
        loc, clf = StandInLocalizer({20: (6, 10, 10), 21: (6, 10, 30)}), StandInClassifier()
        loc.model_dirs, clf.model_dir, clf.contrast = [s1], s2, kwargs.get("contrast")
        clf.reference = types.SimpleNamespace(contrasts=("water", "t2"))
        loads.append(kwargs)
        return loc, clf

    monkeypatch.setattr(cmd, "load_models", fake_load_models)
    bad = tmp_path / "in" / "broken_image.nii.gz"
    bad.write_bytes(b"not a nifti")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", str(scan_file), str(bad), "-o", str(out), "--contrast", "t2"])
    assert res.exit_code == 2 and "1 of 2 scans failed" in res.output, res.output
    assert len(loads) == 1 and loads[0]["contrast"] == "t2"
    rec = json.loads((out / "predict_run.json").read_text())
    sha = {p: json.loads((p / "config.json").read_text())["weights_sha256"] for p in (s1, s2)}
    m1 = rec["stage1_models"]
    assert len(m1) == 1 and m1[0]["folder"] == str(s1.resolve()) and m1[0]["weights_sha256"] == sha[s1]
    assert m1[0]["kind"] == "stage1" and m1[0]["epochs_done"] == 3 and m1[0]["synthetic_only"] is True
    assert "train_subjects" not in m1[0]  # lists are left out
    m2 = rec["stage2_model"]
    assert m2["weights_sha256"] == sha[s2] and m2["n_samples"] == 40 and "loss_weights" not in m2
    assert m2["train_contrasts"] == ["t2", "water"]
    assert rec["settings"]["contrast"] == "t2"
    by_source = {s["source"]: s for s in rec["scans"]}
    ok, failed = by_source[str(scan_file)], by_source[str(bad)]
    assert ok["name"] == "case-7" and ok["n_vertebrae"] == 2 and ok["files"]["report"] == "case-7_vertebrae.csv"
    assert "broken_image.nii.gz" in failed["error"] and "files" not in failed
    # every scan failing: an error, and no record
    res = CliRunner().invoke(main, ["predict", str(bad), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 2 and not (tmp_path / "out2" / "predict_run.json").exists()
