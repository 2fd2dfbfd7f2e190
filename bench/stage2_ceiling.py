"""How well *could* any classifier do on the semi-synthetic stage-2 benchmark? Ceilings next to the network.

The stage-2 benchmark's class labels come from lesions that :mod:`data_prep.lesions` inserts into real
vertebrae (**semi-synthetic**). The simulator draws a lesion's shape, size, corner and texture the same way
for both kinds; only its intensity ratio (lesion / marrow median) depends on the kind and the image contrast
(:data:`data_prep.lesions.POLARITY` and the ``LesionConfig`` ratio ranges), as in real MRI: on Dixon water
or STIR oedema is bright and fat dark, but on T2-TSE without fat suppression both are bright (oedema
1.10-1.6 x marrow, fat 1.25-2.0 x). From one image the two kinds can then be told apart by brightness alone,
and where the ranges overlap no classifier can separate them. Per cohort (contrast) this script measures:

1. **simulator bound**: AUC of inflammation vs fat for the Bayes-optimal (likelihood-ratio) score of the
   ratio the simulator *draws* (Monte Carlo with its own ``_draw_ratio``), before texture, partial volume
   and resampling blur it: an upper bound for typing from one image of that contrast;
2. **measured oracle**: the same with the lesion's signed contrast as it shows on the 2-mm patch
   (:func:`bench.bench_stage2.lesion_contrast`, the lesion's location given);
3. **per-class AUC under perfect detection**: normals never called lesions, lesions typed by the measured
   oracle (a per-cohort logistic posterior, fitted in-sample): the best the issue's per-class AUC
   (target 0.97) could be if every lesion were found;

and, from a ``bench_stage2.py`` result file with ``cv_predictions`` (default ``stage2_e80.json``), the
network's typing AUC and per-class AUC on the same vertebrae. No training; minutes on a CPU::

    python bench/stage2_ceiling.py [--samples-cache FILE] [--predictions bench/results/stage2_e80.json]

The samples must be the ones the predictions were made on (lesion seed 0 by default); rows are matched by
(subject, VerSe label, class) and the number matched is reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_stage2 import _r, cohort_of, lesion_contrast, script_samples, typing_auc  # noqa: E402
from bench.mdtable import md_table  # noqa: E402
from data_prep.io import write_text  # noqa: E402
from data_prep.lesions import CLASSES, COHORT_CONTRAST, CONTRASTS, LesionConfig, _draw_ratio  # noqa: E402
from pipeline.metrics import one_vs_rest_auc  # noqa: E402
from stage2_classify.config import Stage2Config  # noqa: E402

log = logging.getLogger("stage2_ceiling")


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for ``positive`` (bool) vs the rest (ties count one half)."""
    y = np.asarray(positive, bool).astype(int)
    s = np.asarray(score, float)
    return float(one_vs_rest_auc(y, np.stack([-s, s], 1), 2)[1])


def ratio_typing_bound(contrast: str, config: LesionConfig | None = None, n: int = 20000, seed: int = 0,
                       bins: int = 400) -> dict:
    """Inflammation-vs-fat AUC of the likelihood ratio of the simulator's drawn intensity ratio.

    ``n`` draws per kind estimate the two densities (histogram of ``bins`` bins over the joint range),
    ``n`` fresh draws per kind are scored by the ratio of those densities (the Bayes-optimal ranking for a
    scalar observation). Returns ``{"auc", "inflammation_ratio": [p10, p50, p90], "fat_ratio": [...],
    "brighter": "inflammation" | "fat"}``.
    """
    cfg = config or LesionConfig()
    rng = np.random.default_rng(seed)

    def draws(kind):
        return np.array([_draw_ratio(kind, contrast, cfg, rng)[0] for _ in range(n)])

    a_fit, b_fit, a, b = draws("inflammation"), draws("fat"), draws("inflammation"), draws("fat")
    edges = np.linspace(min(a_fit.min(), b_fit.min(), a.min(), b.min()),
                        max(a_fit.max(), b_fit.max(), a.max(), b.max()) + 1e-9, bins + 1)
    ha = np.histogram(a_fit, edges)[0] + 0.5
    hb = np.histogram(b_fit, edges)[0] + 0.5
    lr = ha / hb

    def score(x):
        return lr[np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)]

    auc = _auc(np.r_[np.ones(n, bool), np.zeros(n, bool)], np.r_[score(a), score(b)])
    return {"auc": round(auc, 4),
            "inflammation_ratio": [round(float(v), 3) for v in np.percentile(a, [10, 50, 90])],
            "fat_ratio": [round(float(v), 3) for v in np.percentile(b, [10, 50, 90])],
            "brighter": "inflammation" if np.median(a) > np.median(b) else "fat"}


def perfect_detection_scores(cls: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """``(N, 3)`` class scores of an oracle that finds every lesion and types it by its measured contrast.

    ``cls`` ``(N,)`` true classes (0 normal, 1 inflammation, 2 fat); ``contrast`` ``(N,)`` signed lesion
    contrast (NaN where none was measurable). Normals score ``(1, 0, 0)``; a lesion vertebra ``(0, p, 1 - p)``
    with ``p`` = P(inflammation | contrast) of a logistic fit on the lesion vertebrae (in-sample: a ceiling,
    not a model: it learns the polarity too), or the inflammation share where the contrast is NaN or only one
    kind is present.
    """
    cls = np.asarray(cls, int)
    c = np.asarray(contrast, float)
    les = cls > 0
    out = np.zeros((len(cls), 3))
    out[~les, 0] = 1.0
    prior = float(np.mean(cls[les] == 1)) if les.any() else 0.5
    p = np.full(len(cls), prior)
    ok = les & np.isfinite(c)
    if ok.any() and len(np.unique(cls[ok])) == 2:
        from sklearn.linear_model import LogisticRegression

        x = c[ok, None]
        p[ok] = LogisticRegression(C=1e4).fit(x, cls[ok] == 1).predict_proba(x)[:, 1]
    out[les, 1] = p[les]
    out[les, 2] = 1.0 - p[les]
    return out


def ceiling_table(rows: list[dict], bounds: dict[str, dict]) -> list[dict]:
    """Per cohort and pooled: class counts, lesion contrast, typing AUCs and per-class AUCs.

    ``rows``: one dict per vertebra with ``cohort``, ``contrast`` (image contrast), ``cls``, ``lesion_contrast``
    (float or None) and optionally ``p`` (the network's class probabilities). The pooled row ranks the
    per-cohort perfect-detection posteriors together.
    """
    cls_all = np.array([r["cls"] for r in rows])
    c_all = np.array([np.nan if r["lesion_contrast"] is None else r["lesion_contrast"] for r in rows])
    scores_all = np.zeros((len(rows), 3))
    have_p = bool(rows) and all(r.get("p") is not None for r in rows)
    p_all = np.array([r["p"] for r in rows], float) if have_p else None
    cohorts = sorted({r["cohort"] for r in rows})
    out = []
    for name in cohorts + ["pooled"]:
        idx = np.arange(len(rows)) if name == "pooled" else np.array([i for i, r in enumerate(rows) if r["cohort"] == name])
        cls, c = cls_all[idx], c_all[idx]
        rec: dict = {"cohort": name, "contrast": "" if name == "pooled" else rows[idx[0]]["contrast"],
                     "n_normal_infl_fat": np.bincount(cls, minlength=3).tolist()}
        for k, kind in ((1, "inflammation"), (2, "fat")):
            v = c[(cls == k) & np.isfinite(c)]
            rec[f"{kind}_contrast_p10_p50_p90"] = [_r(x, 2) for x in np.percentile(v, [10, 50, 90])] if len(v) else None
        lm = (cls == 1) | (cls == 2)
        if name == "pooled":
            rec["typing_bound"] = None
            scores = scores_all
            rec["typing_oracle"] = _r(_auc(cls[lm] == 1, scores[lm, 1]), 3) if len(np.unique(cls[lm])) == 2 else None
        else:
            b = bounds[rec["contrast"]]
            rec["typing_bound"] = b["auc"]
            brighter = b["brighter"] == "inflammation"
            m = lm & np.isfinite(c)
            rec["typing_oracle"] = (_r(_auc(cls[m] == 1, c[m] if brighter else -c[m]), 3)
                                    if len(np.unique(cls[m])) == 2 else None)
            scores = perfect_detection_scores(cls, c)
            scores_all[idx] = scores
        rec["per_class_auc_perfect_detection"] = [_r(x, 3) for x in one_vs_rest_auc(cls, scores, 3)]
        if p_all is not None:
            rec["typing_network"] = typing_auc(cls, p_all[idx], CLASSES)
            found = p_all[idx, 0] < 0.5  # the lesion vertebrae the network calls abnormal
            rec["typing_network_detected"] = typing_auc(cls[found], p_all[idx][found], CLASSES)
            rec["n_lesion_detected"] = int(((cls > 0) & found).sum())
            rec["per_class_auc_network"] = [_r(x, 3) for x in one_vs_rest_auc(cls, p_all[idx], 3)]
        out.append(rec)
    return out


def _md(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, (list, tuple)):
            return " / ".join(fmt(x) for x in v)
        return f"{v:g}" if isinstance(v, float) else str(v)

    return "\n".join(md_table(rows, fmt))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_stage2_ceiling"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="stage2_ceiling")
    ap.add_argument("--seed", type=int, default=0, help="lesion seed of the semi-synthetic data (as bench_stage2)")
    ap.add_argument("--samples-cache", type=Path, default=None,
                    help="a bench_stage2.py --samples-cache file (default patch config) instead of the data")
    ap.add_argument("--predictions", type=Path, default=ROOT / "bench" / "results" / "stage2_e80.json",
                    help="bench_stage2.py result file with cv_predictions ('none' to skip)")
    ap.add_argument("--n-draws", type=int, default=20000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    cfg = Stage2Config()
    loaded = script_samples(cfg, args.data, args.work, args.seed, args.samples_cache, log)
    if loaded is None:
        return 2
    samples, source = loaded
    preds = {}
    pred_file = None if str(args.predictions) == "none" else args.predictions
    if pred_file is not None:
        try:
            d = json.loads(pred_file.read_text())
            preds = {(r["subject"], r["label"], r["cls"]): r["p"] for r in d["sections"]["cv_predictions"]}
        except (OSError, ValueError, KeyError) as e:
            log.error("%s: cannot read cv_predictions (%s)", pred_file, e)
            return 2
    rows = []
    for s in samples:
        cohort = cohort_of(s.subject)
        rows.append({"cohort": cohort, "contrast": COHORT_CONTRAST.get(cohort, "?"), "cls": s.cls,
                     "lesion_contrast": lesion_contrast(s), "p": preds.get((s.subject, s.label, s.cls))})
    n_matched = sum(r["p"] is not None for r in rows)
    if preds and n_matched < len(rows):
        log.warning("%d of %d vertebrae have no prediction in %s: the network columns are left out",
                    len(rows) - n_matched, len(rows), pred_file)
        for r in rows:
            r["p"] = None
    bounds = {c: ratio_typing_bound(c, n=args.n_draws, seed=args.seed) for c in CONTRASTS}
    table = ceiling_table(rows, bounds)
    shown = None
    if pred_file is not None:
        try:
            shown = str(pred_file.resolve().relative_to(ROOT))
        except ValueError:
            shown = str(pred_file)
    meta = {"source": source, "predictions": shown,
            "n_vertebrae": len(rows), "n_with_predictions": n_matched, "lesion_seed": args.seed,
            "n_draws": args.n_draws, "seconds": round(time.time() - t0, 1),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"meta": meta, "simulator_bounds": bounds, "ceilings": table}, indent=1) + "\n",
               args.out / f"{args.name}.json")
    bound_rows = [{"contrast": c, **b} for c, b in bounds.items()]
    write_text(
        "# Stage 2: what could any classifier do? (semi-synthetic)\n\n"
        f"Generated by `python bench/stage2_ceiling.py {' '.join(meta['argv'])}`. Real scans with lesions inserted by "
        f"`data_prep.lesions` (seed {args.seed}); {len(rows)} vertebrae; network predictions from "
        f"`{meta['predictions']}` ({n_matched} matched). All numbers are **semi-synthetic**.\n\n"
        "The simulator draws shape, size, corner and texture alike for both lesion kinds; only the intensity ratio "
        "(lesion / marrow median) depends on the kind and contrast. Typing AUC = inflammation vs fat among the "
        "lesion vertebrae. Bound: likelihood-ratio score of the *drawn* ratio (no texture, partial volume or blur; "
        f"{args.n_draws} draws per kind). Oracle: the lesion's signed contrast on the 2-mm patch with its location given "
        "(marrow-SD units, `lesion_contrast`). Perfect detection: normals never called lesions, lesions typed by the "
        "oracle (in-sample logistic posterior per cohort); per-class AUC normal / inflammation / fat.\n\n"
        "## Simulator bound per contrast\n\n" + _md(bound_rows) + "\n\n"
        "## Per cohort\n\n" + _md(table) + "\n",
        args.out / f"{args.name}.md")
    log.info("wrote %s.{json,md} in %.0f s", args.out / args.name, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
