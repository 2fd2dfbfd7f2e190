"""``evaluate`` on hand-made predictions against a hand-made dataset."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep.errors import SpinepipeInputError
from data_prep.scan import Points, Vertebra
from data_prep.weak_labels import write_points_csv
from pipeline.evaluate import evaluate
from pipeline.report import VertebraVerdict, build_report, write_report
from tests.pipeline.bad_inputs import _write, good_scan

CLASSES = ["normal", "inflammation", "fat"]
GT = {20: (0.0, 0.0, -30.0), 21: (0.0, 2.0, -62.0), 22: (0.0, 4.0, -94.0)}


@pytest.fixture()
def gt_dir(tmp_path):
    d = tmp_path / "gt"
    d.mkdir()
    for sid in ("a", "b"):
        _write(good_scan(), d / f"{sid}_image.nii.gz")
        write_points_csv(list(GT), Points(np.array(list(GT.values())), "world"), d / f"{sid}_points.csv")
    (d / "vertebra_labels.csv").write_text(
        "id,level,class\n" + "".join(f"{s},{lv},{c}\n" for s in ("a", "b") for lv, c in (("L1", 0), ("L2", 1), ("L3", 2)))
    )
    return d


def _pred(d, sid, cents, probs):
    verts = [Vertebra(k, v) for k, v in cents.items()]
    verdicts = [VertebraVerdict(k, np.asarray(p), 0.95) for k, p in zip(cents, probs)]
    write_report(build_report(verts, verdicts, CLASSES), d / f"{sid}_vertebrae.csv")


def test_perfect_and_shifted(gt_dir, tmp_path):
    pred = tmp_path / "pred"
    good = np.eye(3) * 0.8 + 0.1
    # a: exact but with an unannotated S1 far below (ignored by default) and 3 mm error on L1
    _pred(pred, "a", {20: (3.0, 0.0, -30.0), 21: GT[21], 22: GT[22], 26: (0.0, 0.0, -170.0)}, list(good) + [good[0]])
    # b: every label shifted by one level (L1 placed at L2's position ...): identification fails there
    _pred(pred, "b", {20: GT[21], 21: GT[22]}, good[:2][::-1])
    ev = evaluate(pred, gt_dir, classes=CLASSES)
    ident = ev.identification
    assert ident["n_gt"] == 6
    assert ident["id_rate"] == pytest.approx(3 / 6)
    assert ident["all_correct"] == pytest.approx(0.5)
    # errors: a -> 3, 0, 0; b -> |L1->L2 pos| = sqrt(4 + 32^2), same for L2
    e_b = np.hypot(2.0, 32.0)
    assert ident["mean_error_mm"] == pytest.approx((3 + 0 + 0 + 2 * e_b) / 5)
    assert ev.classification["classified vertebrae"] == 3
    assert ev.classification["balanced accuracy"] == pytest.approx(1.0)
    strict = evaluate(pred, gt_dir, classes=CLASSES, strict=True)
    assert strict.identification["all_correct"] == 0.0
    assert "identification rate" in ev.table()


def test_no_matching_reports(gt_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpinepipeInputError, match="no <id>_vertebrae.csv"):
        evaluate(tmp_path / "empty", gt_dir)


def test_bad_report(gt_dir, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a_vertebrae.csv").write_text("level,x_mm,y_mm,z_mm\nQ7,1,2,3\n")
    with pytest.raises(SpinepipeInputError, match="a_vertebrae.csv.*Q7"):
        evaluate(pred, gt_dir)


def test_evidence_summary_counts_the_reports_own_flag(gt_dir, tmp_path):
    """The flagged share follows the ``evidence_outside_body`` flag the report was written with (whatever
    threshold that was), not a fixed cut on ``evidence_inside``; vertebrae without evidence are left out."""
    from stage2_classify.evidence import EVIDENCE_FLAG

    pred = tmp_path / "pred"
    good = np.eye(3) * 0.8 + 0.1
    verts = [Vertebra(k, GT[k]) for k in GT]
    verdicts = [VertebraVerdict(20, good[0], 0.95),
                VertebraVerdict(21, good[1], 0.30, flags=[EVIDENCE_FLAG]),
                VertebraVerdict(22, good[2], 0.40, flags=["cut_by_fov"])]  # written at threshold 0.4
    write_report(build_report(verts, verdicts, CLASSES), pred / "a_vertebrae.csv")
    # b written at --evidence-threshold 0.45: the same 0.40 is flagged there, so no fixed cut gives 2 of 5
    verdicts_b = [VertebraVerdict(20, good[0], 0.40, flags=["interpolated", EVIDENCE_FLAG]),
                  VertebraVerdict(21, good[1], float("nan")), VertebraVerdict(22, good[2], 0.99)]
    write_report(build_report(verts, verdicts_b, CLASSES), pred / "b_vertebrae.csv")
    ev = evaluate(pred, gt_dir, classes=CLASSES)
    assert ev.evidence["mean evidence inside"] == pytest.approx((0.95 + 0.30 + 0.40 + 0.40 + 0.99) / 5)
    assert ev.evidence["min evidence inside"] == pytest.approx(0.30)
    assert ev.evidence[f"share flagged {EVIDENCE_FLAG}"] == pytest.approx(2 / 5)
