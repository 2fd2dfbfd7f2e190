"""Metrics on hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import (balanced_accuracy, cohen_kappa, identification, one_vs_rest_auc,
                              summarize_identification)

GT = {20: (0, 0, 100), 21: (0, 0, 65), 22: (0, 0, 30), 23: (0, 0, -5)}


def test_perfect_scan():
    r = identification(dict(GT), GT)
    assert r.identified == [20, 21, 22, 23] and r.id_rate == 1.0 and r.precision == 1.0
    assert r.mean_error_mm == 0.0 and r.all_correct


def test_rules_distance_closest_gt_and_extra_predictions():
    pred = {
        20: (0, 0, 100 + 19.0),  # 19 mm off (above), closest GT still L1 (54 mm to L2): identified
        21: (0, 0, 65 - 25.0),   # 25 mm off: not identified (error counted)
        22: (0, 0, 30 - 18.0),   # 18 mm off but closer to L4 (17 mm): not identified
        24: (0, 0, -40),         # L5 not in GT: a false positive
    }
    r = identification(pred, GT)
    assert r.identified == [20]
    assert r.id_rate == pytest.approx(1 / 4)
    assert r.precision == pytest.approx(1 / 4)
    assert r.errors_mm == pytest.approx({20: 19.0, 21: 25.0, 22: 18.0})
    assert r.mean_error_mm == pytest.approx((19 + 25 + 18) / 3)
    assert not r.all_correct


def test_predictions_beyond_a_partial_annotation_can_be_left_unscored():
    # GT annotates L1-L4 only; T12 above L1 and L5 below L4 are visible and predicted where they are
    pred = dict(GT)
    pred[19] = (0, 0, 135)    # T12: above the run, 35 mm from L1 -> can not be judged
    pred[24] = (0, 0, -40)    # L5: below the run, 35 mm from L4 -> can not be judged
    strict = identification(pred, GT)
    assert strict.n_pred == 6 and not strict.all_correct and strict.n_unscored == 0
    lenient = identification(pred, GT, score_beyond_annotation=False)
    assert lenient.n_pred == 4 and lenient.n_unscored == 2 and lenient.all_correct and lenient.precision == 1.0
    # a name beyond the run but on an annotated vertebra (within 20 mm of L1) is a wrong answer: scored
    wrong = identification({**GT, 19: (0, 0, 110)}, GT, score_beyond_annotation=False)
    assert wrong.n_pred == 5 and wrong.n_unscored == 0 and not wrong.all_correct
    # the GT skips L2: a predicted L2 lies inside the run and is scored even when far from everything
    gap = {20: GT[20], 22: GT[22], 23: GT[23]}
    inside = identification({**gap, 21: (0, 0, 65)}, gap, score_beyond_annotation=False)
    assert inside.n_pred == 4 and inside.n_unscored == 0
    s = summarize_identification([strict, lenient])
    assert s["n_unscored"] == 2 and s["n_pred"] == 10


def test_shifted_labels_are_never_identified():
    pred = {k + 1: v for k, v in GT.items()}  # every label off by one level
    r = identification(pred, GT)
    assert r.identified == [] and r.id_rate == 0.0


def test_summary_pools_vertebrae_and_averages_scans():
    a = identification(dict(GT), GT)                               # 4/4, all correct
    b = identification({20: GT[20], 21: (0, 0, 0)}, {20: GT[20], 21: GT[21]})  # 1/2, 65 mm error
    s = summarize_identification([a, b])
    assert s["id_rate"] == pytest.approx(5 / 6)
    assert s["mean_error_mm"] == pytest.approx(65 / 6)
    assert s["precision"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["recall"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["all_correct"] == pytest.approx(0.5)
    assert s["n_gt"] == 6 and s["n_pred"] == 6


def test_empty_prediction():
    r = identification({}, GT)
    assert r.id_rate == 0.0 and math.isnan(r.precision) and math.isnan(r.mean_error_mm)


def test_one_vs_rest_auc_hand_computed():
    y = [0, 0, 1, 1, 2]
    s = np.array([[0.9, 0.1, 0.0], [0.4, 0.5, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    auc = one_vs_rest_auc(y, s)
    # class 0: positives {0.9, 0.4} vs negatives {0.5, 0.2, 0.1}: pairs won 3 + 2 = 5 of 6
    assert auc[0] == pytest.approx(5 / 6)
    # class 1: positives {0.4, 0.7} vs negatives {0.1, 0.5, 0.1}: 2 + 3 = 5 of 6
    assert auc[1] == pytest.approx(5 / 6)
    assert auc[2] == pytest.approx(1.0)
    assert math.isnan(one_vs_rest_auc([0, 0], np.array([[0.5, 0.5], [0.4, 0.6]]))[1])


def test_balanced_accuracy_and_kappa_hand_computed():
    y = [0, 0, 0, 0, 1, 1]
    p = [0, 0, 0, 1, 1, 0]
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 1 / 2) / 2)
    # po = 4/6; pe = (4/6)(4/6) + (2/6)(2/6) = 20/36; kappa = (24/36 - 20/36) / (16/36) = 0.25
    assert cohen_kappa(y, p) == pytest.approx(0.25)
    assert cohen_kappa([0, 1, 2], [0, 1, 2], weights="quadratic") == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))


def test_balanced_accuracy_with_a_predicted_class_absent_from_truth_is_silent():
    import warnings

    y, p = [0, 0, 1, 1], [0, 2, 1, 2]  # class 2 predicted, never true: recalls 1/2 and 1/2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert balanced_accuracy(y, p) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="y_pred has 3 labels"):
        balanced_accuracy(y, p[:3])
