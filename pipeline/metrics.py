"""Shared evaluation metrics (pure functions on arrays / records).

Vertebra labelling follows the VerSe challenge (Sekuboyina et al., Med. Image Anal. 2021;
verse2019.grand-challenge.org/Tasks): a ground-truth vertebra with label ``L`` is **identified** when a
prediction with label ``L`` exists, lies within ``radius_mm`` (20 mm) of the ground-truth ``L`` centroid,
and the ground-truth centroid closest to that prediction is ``L``'s. Then

* identification rate = identified / ground-truth vertebrae (pooled over scans at dataset level);
* localisation distance = mean distance between predicted and ground-truth centroids of the labels
  present in both (regardless of the 20 mm rule);
* per-scan recall = identified / ground truth, precision = identified / predicted;
* share of scans all-correct = every ground-truth vertebra identified and no other prediction.

Partial annotation: a cohort may annotate only part of the visible spine (e.g. L1-L5 while T12 is in
view), and a field-of-view crop leaves partly visible vertebrae without a ground-truth centroid. With
``score_beyond_annotation=False`` a prediction that can not be judged is left out of the scoring
(``n_unscored``) instead of counted as false: its level lies outside the ground truth's run of levels
(cranial to the most cranial or caudal to the most caudal annotated level) *and* it lies farther than
``radius_mm`` from every ground-truth centroid. A prediction on an annotated vertebra, a duplicate, or
a wrong name inside the run is always scored. Benchmarks report both.

Classification metrics (for stage 2 and the pipeline): per-class one-vs-rest ROC AUC, balanced accuracy
and Cohen's kappa (linear or quadratic weights), computed with scikit-learn, with ``nan`` where a metric
is undefined (e.g. a class absent from the ground truth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


@dataclass
class ScanIdentification:
    """Per-scan identification result."""

    n_gt: int
    n_pred: int
    identified: list[int] = field(default_factory=list)
    errors_mm: dict[int, float] = field(default_factory=dict)  # labels present in both -> distance
    #: predictions beyond the annotated run of levels, away from every annotated vertebra (not in n_pred)
    n_unscored: int = 0

    @property
    def id_rate(self) -> float:
        return len(self.identified) / self.n_gt if self.n_gt else float("nan")

    recall = id_rate

    @property
    def precision(self) -> float:
        return len(self.identified) / self.n_pred if self.n_pred else float("nan")

    @property
    def mean_error_mm(self) -> float:
        return float(np.mean(list(self.errors_mm.values()))) if self.errors_mm else float("nan")

    @property
    def all_correct(self) -> bool:
        return len(self.identified) == self.n_gt == self.n_pred


def identification(
    pred: Mapping[int, Sequence[float]], gt: Mapping[int, Sequence[float]], radius_mm: float = 20.0,
    *, score_beyond_annotation: bool = True,
) -> ScanIdentification:
    """VerSe identification of one scan. ``pred`` / ``gt``: ``{verse_id: (x, y, z) mm}``.

    ``score_beyond_annotation=False``: predictions that can not be judged against a partial annotation
    are not scored (see the module docstring)."""
    from data_prep.scan import anatomical_rank

    gt_ids = list(gt)
    gt_xyz = np.array([np.asarray(gt[i], dtype=np.float64) for i in gt_ids]).reshape(-1, 3)
    ranks = [anatomical_rank(i) for i in gt_ids]
    hits: list[int] = []
    errors: dict[int, float] = {}
    unscored = 0
    for label, p in pred.items():
        if label not in gt:
            if not score_beyond_annotation and gt_ids:
                r = anatomical_rank(label)
                far = np.linalg.norm(gt_xyz - np.asarray(p, dtype=np.float64).reshape(3), axis=1).min() > radius_mm
                if far and (r < min(ranks) or r > max(ranks)):
                    unscored += 1
            continue
        p = np.asarray(p, dtype=np.float64).reshape(3)
        d = np.linalg.norm(gt_xyz - p, axis=1)
        errors[int(label)] = float(d[gt_ids.index(label)])
        if d[gt_ids.index(label)] < radius_mm and gt_ids[int(np.argmin(d))] == label:
            hits.append(int(label))
    return ScanIdentification(len(gt_ids), len(pred) - unscored, sorted(hits), errors, unscored)


def summarize_identification(scans: Sequence[ScanIdentification]) -> dict[str, float]:
    """Dataset-level numbers: pooled id rate, mean localisation error, mean per-scan precision/recall,
    share of scans all-correct, counts."""
    n_gt = sum(s.n_gt for s in scans)
    n_hit = sum(len(s.identified) for s in scans)
    errs = [e for s in scans for e in s.errors_mm.values()]
    prec = [s.precision for s in scans if s.n_pred]
    rec = [s.recall for s in scans if s.n_gt]
    return {
        "n_scans": len(scans),
        "n_gt": n_gt,
        "n_pred": sum(s.n_pred for s in scans),
        "n_unscored": sum(s.n_unscored for s in scans),
        "id_rate": n_hit / n_gt if n_gt else float("nan"),
        "mean_error_mm": float(np.mean(errs)) if errs else float("nan"),
        "median_error_mm": float(np.median(errs)) if errs else float("nan"),
        "precision": float(np.mean(prec)) if prec else float("nan"),
        "recall": float(np.mean(rec)) if rec else float("nan"),
        "all_correct": float(np.mean([s.all_correct for s in scans])) if scans else float("nan"),
    }


# ---------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------
def one_vs_rest_auc(y_true: Sequence[int], scores: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Per-class ROC AUC, class c vs rest, from ``scores (N, C)`` (probabilities or any monotone score).

    ``nan`` for a class with no positive or no negative sample.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(len(y), -1)
    C = n_classes or s.shape[1]
    out = np.full(C, np.nan)
    for c in range(C):
        pos = y == c
        if pos.any() and (~pos).any():
            out[c] = roc_auc_score(pos.astype(int), s[:, c])
    return out


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (a predicted class absent from
    ``y_true`` costs recall elsewhere but has no recall of its own; scikit-learn's
    ``balanced_accuracy_score`` gives the same number but warns about it on every small demo set)."""
    yt = np.asarray(y_true).reshape(-1)
    yp = np.asarray(y_pred).reshape(-1)
    if len(yt) == 0:
        return float("nan")
    if yp.shape != yt.shape:
        raise ValueError(f"y_pred has {yp.size} labels, y_true {yt.size}")
    return float(np.mean([np.mean(yp[yt == c] == c) for c in np.unique(yt)]))


def cohen_kappa(y_true: Sequence[int], y_pred: Sequence[int], weights: str | None = None) -> float:
    """Cohen's kappa (``weights`` None, ``"linear"`` or ``"quadratic"``); ``nan`` when undefined."""
    from sklearn.metrics import cohen_kappa_score

    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if len(yt) == 0:
        return float("nan")
    if len(np.unique(np.concatenate([yt, yp]))) == 1:
        return float("nan")  # chance agreement is 1: kappa undefined
    return float(cohen_kappa_score(yt, yp, weights=weights))
