"""``spinepipe evaluate PRED_DIR GT_DIR``: score reports written by ``spinepipe predict`` against a dataset.

Ground truth comes from the canonical layout (:mod:`data_prep.dataset`): centroids from
``<id>_points.csv`` or, failing that, from ``<id>_vertebrae.nii.gz``; classes from ``vertebra_labels.csv``.
Predictions are ``<id>_vertebrae.csv`` reports (world LPS mm).

Unannotated vertebrae: real datasets often annotate only part of the visible spine (e.g. L1-L5 with
T12 and S1 in view). A predicted level that is absent from the ground truth and lies beyond the
annotated head-foot range is therefore *ignored* by default rather than counted as a false positive
(``--strict`` counts it). Predicted levels inside the annotated range always count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.dataset import discover
from data_prep.errors import SpinepipeInputError
from data_prep.io import read_labelmap, read_points_csv, read_vertebra_labels_csv
from data_prep.scan import centroids_from_labelmap, level_id
from pipeline import metrics


@dataclass
class Evaluation:
    identification: dict[str, float]
    per_scan: pd.DataFrame
    classification: dict[str, float] | None
    evidence: dict[str, float] | None

    def table(self) -> str:
        """Human-readable summary table (markdown)."""
        rows = [("scans", f"{self.identification['n_scans']}"),
                ("identification rate (VerSe, 20 mm)", f"{self.identification['id_rate']:.3f}"),
                ("mean localisation error (mm)", f"{self.identification['mean_error_mm']:.2f}"),
                ("mean per-scan precision", f"{self.identification['precision']:.3f}"),
                ("mean per-scan recall", f"{self.identification['recall']:.3f}"),
                ("scans all correct", f"{self.identification['all_correct']:.3f}")]
        for name, block in (("", self.classification), ("", self.evidence)):
            for k, v in (block or {}).items():
                rows.append((k, f"{v:.3f}" if isinstance(v, float) else str(v)))
        w = max(len(r[0]) for r in rows)
        return "\n".join([f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"] + [f"| {k.ljust(w)} | {v} |" for k, v in rows])


def _gt_centroids(subject) -> dict[int, np.ndarray]:
    if subject.points is not None:
        ids, pts = read_points_csv(subject.points)
        return {i: p for i, p in zip(ids, pts.coords)}
    if subject.vertebrae is not None:
        return centroids_from_labelmap(read_labelmap(subject.vertebrae))
    return {}


def _read_prediction(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpinepipeInputError(path, f"cannot parse report CSV: {str(exc).splitlines()[0]}") from None
    need = ["level", "x_mm", "y_mm", "z_mm"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise SpinepipeInputError(path, f"missing column(s) {', '.join(missing)}; expected a spinepipe report")
    try:
        df["label"] = [level_id(v) for v in df["level"]]
    except ValueError as exc:
        raise SpinepipeInputError(path, str(exc)) from None
    return df


def _drop_unannotated(pred: dict[int, np.ndarray], gt: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    if not gt:
        return pred
    z = np.array([c[2] for c in gt.values()])
    top, bottom = z.max(), z.min()  # LPS: z grows superior
    return {k: v for k, v in pred.items() if k in gt or bottom - 10.0 <= v[2] <= top + 10.0}


def evaluate(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *, classes: list[str] | None = None,
             strict: bool = False, radius_mm: float = 20.0) -> Evaluation:
    """Score every ground-truth subject that has a report in ``pred_dir``."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise SpinepipeInputError(pred_dir, "prediction folder not found")
    subjects = discover(gt_dir)
    labels_csv = gt_dir / "vertebra_labels.csv"
    gt_classes = read_vertebra_labels_csv(labels_csv, classes) if labels_csv.is_file() else None
    from stage2_classify.evidence import EVIDENCE_FLAG  # the report's flag (torch only when evaluating)

    results, rows, cls_true, cls_prob, evid, evid_flagged = [], [], [], [], [], []
    for s in subjects:
        report = pred_dir / f"{s.id}_vertebrae.csv"
        if not report.is_file():
            continue
        gt = _gt_centroids(s)
        df = _read_prediction(report)
        pred = {int(r.label): np.array([r.x_mm, r.y_mm, r.z_mm], float) for r in df.itertuples()}
        if not strict:
            pred = _drop_unannotated(pred, gt)
        ident = metrics.identification(pred, gt, radius_mm=radius_mm)
        results.append(ident)
        rows.append({"id": s.id, "n_gt": ident.n_gt, "n_pred": ident.n_pred, "identified": len(ident.identified),
                     "mean_error_mm": ident.mean_error_mm, "all_correct": ident.all_correct})
        if "evidence_inside" in df.columns:
            has = df["evidence_inside"].notna()
            evid.extend(float(v) for v in df.loc[has, "evidence_inside"])
            flags = df.loc[has, "flags"] if "flags" in df.columns else pd.Series([""] * int(has.sum()))
            evid_flagged.extend(EVIDENCE_FLAG in str(f).split(";") for f in flags.fillna(""))
        prob_cols = [c for c in df.columns if c.startswith("p_")]
        if gt_classes is not None and prob_cols:
            names = [c[2:] for c in prob_cols]
            if classes is not None and names != list(classes):
                raise SpinepipeInputError(report, f"report classes {names} differ from the expected {classes}")
            sub = gt_classes[gt_classes["id"] == s.id]
            by_label = {int(r.label): r for r in df.itertuples()}
            for g_label, g_class in zip(sub["label"], sub["class"]):
                if int(g_label) in ident.identified:
                    cls_true.append(int(g_class))
                    cls_prob.append([float(getattr(by_label[int(g_label)], c)) for c in prob_cols])
    if not results:
        raise SpinepipeInputError(pred_dir, f"no <id>_vertebrae.csv report matches a subject of {gt_dir}")
    classification = None
    if cls_true:
        probs = np.array(cls_prob)
        y = np.array(cls_true)
        aucs = metrics.one_vs_rest_auc(y, probs, probs.shape[1])
        names = classes or [f"class{c}" for c in range(probs.shape[1])]
        classification = {f"AUC {n}": float(a) for n, a in zip(names, aucs)}
        classification["balanced accuracy"] = metrics.balanced_accuracy(y, probs.argmax(1))
        classification["Cohen's kappa"] = metrics.cohen_kappa(y, probs.argmax(1))
        classification["classified vertebrae"] = len(y)
    evidence = None
    if evid:
        e = np.array(evid)
        # the flag follows the threshold the reports were written with (the model's or --evidence-threshold)
        evidence = {"mean evidence inside": float(e.mean()), "min evidence inside": float(e.min()),
                    f"share flagged {EVIDENCE_FLAG}": float(np.mean(evid_flagged))}
    return Evaluation(metrics.summarize_identification(results), pd.DataFrame(rows), classification, evidence)
