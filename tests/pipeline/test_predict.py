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
