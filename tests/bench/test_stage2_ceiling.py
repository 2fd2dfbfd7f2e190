"""The stage-2 ceiling analysis (bench/stage2_ceiling.py) on hand-made cases."""
from __future__ import annotations

import numpy as np

from bench.stage2_ceiling import ceiling_table, main, perfect_detection_scores, ratio_typing_bound
from data_prep.lesions import LesionConfig
from pipeline.metrics import one_vs_rest_auc


def test_ratio_bound_disjoint_overlapping_and_identical_ranges():
    # Dixon water: oedema bright, fat dark -> the ratio separates them completely
    water = ratio_typing_bound("water", n=3000)
    assert water["auc"] == 1.0 and water["brighter"] == "inflammation"
    # T2-TSE without subtle draws: oedema U(1.10, 1.6), fat U(1.25, 2.0). The likelihood ratio is constant on
    # the overlap, so AUC = P(oedema < 1.25) + P(oedema in overlap) * (P(fat > 1.6) + P(fat in overlap) / 2)
    #                     = 0.3 + 0.7 * (0.4 / 0.75 + 0.35 / 0.75 / 2) = 0.8367
    t2 = ratio_typing_bound("t2", LesionConfig(subtle_prob=0.0), n=20000)
    assert abs(t2["auc"] - 0.8367) < 0.01 and t2["brighter"] == "fat"
    same = ratio_typing_bound("t2", LesionConfig(inflammation_t2=(1.25, 2.0), subtle_prob=0.0), n=20000)
    assert abs(same["auc"] - 0.5) < 0.03


def test_perfect_detection_scores():
    cls = np.array([0, 1, 2, 1, 2, 0])
    c = np.array([np.nan, 2.0, -2.0, 1.5, -1.0, np.nan])
    s = perfect_detection_scores(cls, c)
    assert np.array_equal(s[cls == 0], [[1, 0, 0], [1, 0, 0]])
    assert np.allclose(s[cls > 0, 1] + s[cls > 0, 2], 1.0) and np.all(s[cls > 0, 0] == 0)
    assert s[1, 1] > s[2, 1] and s[3, 1] > s[4, 1]
    assert np.allclose(one_vs_rest_auc(cls, s, 3), 1.0)
    # the fit learns the polarity: dark inflammation, bright fat (T1) types just as well
    flipped = perfect_detection_scores(cls, -c)
    assert np.allclose(one_vs_rest_auc(cls, flipped, 3), 1.0)
    # a contrast that does not tell the kinds apart leaves every lesion at the inflammation share
    flat = perfect_detection_scores(cls, np.where(cls > 0, 1.0, np.nan))
    assert np.allclose(flat[cls > 0, 1], 0.5, atol=1e-6)


def test_ceiling_table_rows_and_pooled_network_order():
    rng = np.random.default_rng(0)
    rows = []
    for cohort, contrast, sign in (("b", "water", 1.0), ("a", "t2", -1.0)):
        for k in (0, 1, 2, 0, 1, 2, 0):
            lc = None if k == 0 else sign * (2.0 if k == 1 else -2.0) + 0.1 * rng.standard_normal()
            p = rng.dirichlet([1, 1, 1]).tolist()
            rows.append({"cohort": cohort, "contrast": contrast, "cls": k, "lesion_contrast": lc, "p": p})
    bounds = {"water": {"auc": 1.0, "brighter": "inflammation"}, "t2": {"auc": 0.86, "brighter": "fat"}}
    table = {r["cohort"]: r for r in ceiling_table(rows, bounds)}
    assert set(table) == {"a", "b", "pooled"}
    assert table["pooled"]["n_normal_infl_fat"] == [6, 4, 4] and table["a"]["n_normal_infl_fat"] == [3, 2, 2]
    assert table["b"]["typing_oracle"] == 1.0 and table["a"]["typing_oracle"] == 1.0
    assert table["pooled"]["per_class_auc_perfect_detection"] == [1.0, 1.0, 1.0]
    y = np.array([r["cls"] for r in rows])
    p = np.array([r["p"] for r in rows])
    expect = [round(float(x), 3) for x in one_vs_rest_auc(y, p, 3)]
    assert table["pooled"]["per_class_auc_network"] == expect  # scores stay aligned with their rows
    detected = sum(1 for r in rows if r["cls"] > 0 and r["p"][0] < 0.5)
    assert table["pooled"]["n_lesion_detected"] == detected


def test_main_without_data_or_cache_fails_cleanly(tmp_path, caplog):
    assert main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    assert main(["--samples-cache", str(tmp_path / "none.pkl.xz"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert "absent" in caplog.text and "none.pkl.xz" in caplog.text
