"""A non-learned-features baseline for the semi-synthetic stage-2 benchmark: what does the body's intensity
distribution alone tell?

For each vertebra (the ``bench_stage2.py`` samples: real scans with lesions inserted by
:mod:`data_prep.lesions`, **semi-synthetic**) the intensities inside the expert body mask are robustly
standardised (median, interquartile range), optionally smoothed inside the mask (normalised Gaussian
convolution, sigma 2 and 4 mm on the 2-mm patch, i.e. a matched filter for small lesions), and summarised by
their upper and lower tails (99.5th / 0.5th percentiles, maximum, minimum): 12 features that a focal bright
or dark lesion should move. A class-balanced logistic regression on them is cross-validated on the **same
subject-grouped folds** as ``bench_stage2.py`` (``folds_by_subject``, same seed), pooled and per cohort (one
model for both cohorts, fitted per fold on the training subjects only). No deep learning, seconds on a CPU::

    python bench/stage2_baseline.py [--samples-cache FILE] [--folds 3]

Writes ``bench/results/stage2_baseline.{json,md}``. A floor for the network, not a competitor: if the
network did not beat it, its convolutions would add nothing over intensity tails.
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

from bench.bench_stage2 import LABEL, _metrics, cohort_of, folds_by_subject, script_samples  # noqa: E402
from bench.mdtable import md_table  # noqa: E402
from data_prep.io import write_text  # noqa: E402
from stage2_classify.config import Stage2Config  # noqa: E402

log = logging.getLogger("stage2_baseline")

#: Gaussian sigmas (voxels of the 2-mm patch) of the in-mask smoothing; 0 = raw voxels.
SIGMAS_VOX = (0.0, 1.0, 2.0)
FEATURES = tuple(f"{k}_sigma{s:g}" for s in SIGMAS_VOX for k in ("p99.5", "p0.5", "max", "min"))


def tail_features(image: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``(len(FEATURES),)`` tail statistics of the robustly standardised intensities inside ``body``
    (``(I, J, K)`` image and boolean mask), raw and smoothed inside the mask; zeros for an empty mask."""
    from scipy import ndimage as ndi

    m = np.asarray(body, bool)
    if m.sum() < 4:
        return np.zeros(len(FEATURES))
    img = np.asarray(image, np.float64)
    v = img[m]
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    z = (img - med) / max(q3 - q1, 1e-3)
    out = []
    for sigma in SIGMAS_VOX:
        if sigma == 0:
            zs = z
        else:  # normalised convolution: a function of the voxels inside the mask only
            zs = ndi.gaussian_filter(z * m, sigma) / np.maximum(ndi.gaussian_filter(m.astype(np.float64), sigma), 1e-6)
        w = zs[m]
        out += [np.percentile(w, 99.5), np.percentile(w, 0.5), w.max(), w.min()]
    return np.asarray(out)


def cross_validated(x: np.ndarray, y: np.ndarray, folds: list[tuple[list[int], list[int]]], n_classes: int) -> np.ndarray:
    """Held-out class probabilities ``(N, n_classes)`` of a standardised, class-balanced logistic regression
    fitted on each fold's training rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = np.zeros((len(y), n_classes))
    for train, test in folds:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced"))
        clf.fit(x[train], y[train])
        p[np.ix_(test, clf.classes_)] = clf.predict_proba(x[test])
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_bench_stage2"))
    ap.add_argument("--samples-cache", type=Path, default=None, help="samples written by bench_stage2.py --samples-cache")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="lesion seed and fold seed (as bench_stage2.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="stage2_baseline")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.time()
    cfg = Stage2Config()
    loaded = script_samples(cfg, args.data, args.work, args.seed, args.samples_cache, log)
    if loaded is None:
        return 2
    samples, _ = loaded
    x = np.stack([tail_features(s.image, s.targets.body > 0.5) for s in samples])
    y = np.array([s.cls for s in samples])
    n_classes = len(cfg.classes)
    p = cross_validated(x, y, folds_by_subject(samples, args.folds, args.seed), n_classes)
    cohorts = np.array([cohort_of(s.subject) for s in samples])
    rows = [{"cohort": c, **_metrics(y[cohorts == c], p[cohorts == c], n_classes)} for c in sorted(set(cohorts))]
    rows.append({"cohort": "pooled", **_metrics(y, p, n_classes)})
    meta = {"n_vertebrae": len(samples), "folds": args.folds, "seed": args.seed, "features": list(FEATURES),
            "seconds": round(time.time() - t0, 1), "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"label": LABEL, "meta": meta, "cv_by_cohort": rows}, indent=1) + "\n",
               args.out / f"{args.name}.json")
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else  # noqa: E731
                                          " / ".join(fmt(a) for a in v) if isinstance(v, list) else str(v))
    write_text(f"# Stage 2 intensity-tail baseline ({LABEL})\n\n"
               f"Generated by `python bench/stage2_baseline.py {' '.join(meta['argv'])}`: {len(samples)} vertebrae, "
               f"{args.folds}-fold CV grouped by subject (the folds of `bench_stage2.py`, seed {args.seed}); a "
               f"class-balanced logistic regression on {len(FEATURES)} tail statistics of the robustly standardised "
               "intensities inside the expert body mask (raw, and smoothed inside the mask at 2 and 4 mm). "
               f"AUC per class normal / inflammation / fat. All numbers are **{LABEL}**.\n\n"
               + "\n".join(md_table(rows, fmt)) + "\n", args.out / f"{args.name}.md")
    log.info("wrote %s.{json,md} in %.0f s", args.out / args.name, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
