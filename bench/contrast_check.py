"""Does stage 2 flag scans whose contrast it was not trained on? (``contrast_unseen``, real + synthetic scans)

A stage-2 model names a lesion's kind from its brightness relative to the marrow, which flips between
sequences (fat: dark on Dixon water / STIR, bright on T1 / T2-TSE). Each model saves the contrast
signatures of its training scans (:mod:`stage2_classify.domain`); at inference a scan far from all of them
gets ``contrast_unseen`` on every vertebra. This script trains short stage-2 models on semi-synthetic
copies of one or both real cohorts (lesions inserted by ``data_prep.lesions``, seed 0; the signature does
not depend on the lesions) and scores, per held-out set, the share of scans flagged and their novelty:

* ``myosegmentum`` (Dixon water): first half of the subjects by name trains, the other half is held out;
* ``chu2015`` (T2-TSE): likewise;
* ``both``: both training halves;
* each model is scored on both held-out halves (same contrast = should not be flagged; the other = should)
  and on synthetic scans of every contrast (``data_prep.synth``, 4 per contrast: T1 and STIR are seen by no
  model here);
* with the expert masks as regions (``given``) and with the seg head's own bodies (``predicted``, as
  ``spinepipe predict`` runs), centroids from the expert masks, and with the seg head's bodies around
  centroids moved by Gaussian noise (2 mm per axis, about stage 1's error); the threshold is
  evaluation-only, so the table also gives the flagged share at other thresholds (unmeasured scans count
  as not flagged, as the user sees them).

    python bench/contrast_check.py [--epochs 30] [--work /tmp/spinepipe_contrast_check]
        -> bench/results/contrast_check.json + .md

Real data only (exits with a message when ``../shared/data`` is absent). Numbers on the real cohorts are
semi-synthetic only in that the training copies carry inserted lesions.
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

from bench.mdtable import md_table  # noqa: E402
from bench.realdata import (COHORTS, cohort_halves, merge_folders, quiet_logging, real_data_missing,  # noqa: E402
                            semisynthetic_copies)
from data_prep.io import read_image, read_labelmap, write_text  # noqa: E402

THRESHOLDS = (1.0, 1.5, 2.0, 3.0)
SYNTH_CONTRASTS = ("t1", "t2", "stir", "water")
#: Per-axis standard deviation (mm) of the noise put on the expert centroids to mimic stage 1's error
#: (3.5 mm root-mean-square in 3-D; stage 1's mean error is 3-5 mm, median ~3 mm).
JITTER_MM = 2.0


def _synthetic(work: Path, n_per: int) -> list[tuple[str, str, Path]]:
    """``(id, contrast, folder)`` of synthetic scans, ``n_per`` per contrast."""
    from data_prep.synth import SynthConfig, write_cohort

    out = []
    for i, c in enumerate(SYNTH_CONTRASTS):
        dst = work / "synth" / f"{c}_{n_per}"
        if not (dst / "synth_meta.json").is_file():
            write_cohort(dst, n_per, 1000 + i, SynthConfig(contrasts=(c,), contrast_weights=None))
        out += [(p.name[: -len("_image.nii.gz")], c, dst) for p in sorted(dst.glob("*_image.nii.gz"))]
    return out


def _train(name: str, train_root: Path, cohorts: tuple[str, ...], work: Path, epochs: int) -> Path:
    """One model trained on the given cohorts' training copies (merged into one folder by symlinks)."""
    from stage2_classify.config import Stage2Config
    from stage2_classify.train import train_stage2

    out = work / "models" / name
    if (out / "model.safetensors").is_file():
        ref = json.loads((out / "config.json").read_text()).get("extra", {}).get("contrast_reference")
        if ref and len(ref.get("names", ())) == 4:
            return out
    folder = merge_folders([train_root / c for c in cohorts], work / "merged" / name)
    cfg = Stage2Config()
    cfg.train.epochs = epochs
    train_stage2(folder, out, cfg)
    return out


def _score(model: Path, scans: list[tuple[str, str, str, Path]]) -> list[dict]:
    """``scans``: (set name, id, contrast, folder). One row per scan and region source."""
    from data_prep.scan import Vertebra, vertebrae_from_labelmap
    from stage2_classify.infer import Classifier

    clf = Classifier(model)
    seen = {}
    check = clf._check_contrast

    def spy(scan, results, sig, named):  # keep the signature to split the novelty into its parts
        seen["sig"] = sig
        return check(scan, results, sig, named)

    clf._check_contrast = spy
    scales = clf.config.contrast_check.scales
    rows = []
    for set_name, sid, contrast, folder in scans:
        img = read_image(folder / f"{sid}_image.nii.gz")
        lab = read_labelmap(folder / f"{sid}_vertebrae.nii.gz", img)
        verts = vertebrae_from_labelmap(lab)
        rng = np.random.default_rng(sum(map(ord, sid)))
        jittered = [Vertebra(v.label, v.centroid_world + rng.normal(0.0, JITTER_MM, 3)) for v in verts]
        for source, masks, vs in (("given", lab, verts), ("predicted", None, verts),
                                  (f"predicted, centroids +-{JITTER_MM:g} mm", None, jittered)):
            recs = clf.classify(img, vs, masks=masks, with_evidence=False)
            nov = recs[0]["contrast_novelty"] if recs else float("nan")
            sig = seen.pop("sig", None)
            parts = {}
            for part, keep in (("centre", slice(0, 2)), ("region", slice(2, 4))):
                one = np.full(4, np.nan)
                if sig is not None:
                    one[keep] = sig[keep]
                p = clf.reference.novelty(one, scales) if clf.reference is not None else float("nan")
                parts[f"novelty_{part}"] = None if not np.isfinite(p) else round(float(p), 3)
            rows.append({"set": set_name, "id": sid, "contrast": contrast, "regions": source,
                         "signature": None if sig is None else [None if not np.isfinite(v) else round(float(v), 4)
                                                                for v in sig], **parts,
                         "novelty": None if not np.isfinite(nov) else round(float(nov), 3),
                         "flagged": bool(recs and "contrast_unseen" in recs[0]["flags"])})
    return rows


def _summary(model_name: str, trained_on: str, rows: list[dict], threshold: float) -> list[dict]:
    out = []
    keys = list(dict.fromkeys((r["set"], r["regions"]) for r in rows))
    for set_name, source in keys:
        sel = [r for r in rows if r["set"] == set_name and r["regions"] == source]
        nov = np.array([r["novelty"] for r in sel if r["novelty"] is not None], dtype=float)
        row = {"model": model_name, "trained_on": trained_on, "scans": set_name, "regions": source, "n": len(sel),
               "n_measured": int(len(nov)),
               f"flagged_at_{threshold:g}": round(float(np.mean([r["flagged"] for r in sel])), 3)}
        for t in THRESHOLDS:
            if t != threshold:
                row[f"flagged_at_{t:g}"] = round(float(np.sum(nov > t)) / len(sel), 3)  # unmeasured: not flagged
        for name, key in (("novelty", "novelty"), ("centre part", "novelty_centre"), ("region part", "novelty_region")):
            v = np.array([r[key] for r in sel if r[key] is not None], dtype=float)
            row[f"{name} min/median/max"] = (" / ".join(f"{x:.2f}" for x in (v.min(), np.median(v), v.max()))
                                             if len(v) else "not measured")
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_contrast_check"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--synthetic-per-contrast", type=int, default=4)
    ap.add_argument("--name", default="contrast_check")
    args = ap.parse_args(argv)
    if real_data_missing(args.data):
        return 2
    quiet_logging(logging.INFO)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    halves = cohort_halves(args.data)
    train_root = semisynthetic_copies(args.data, args.work / "train", {c: halves[c][0] for c in COHORTS}, 0)
    from data_prep.lesions import COHORT_CONTRAST

    scans = [(f"{c} held-out ({COHORT_CONTRAST[c]})", sid, COHORT_CONTRAST[c], args.data / c)
             for c in COHORTS for sid in halves[c][1]]
    scans += [(f"synthetic {c}", sid, c, folder) for sid, c, folder in _synthetic(args.work, args.synthetic_per_contrast)]
    from stage2_classify.config import ContrastCheckConfig

    threshold = ContrastCheckConfig().threshold
    per_scan, summary, times = [], [], {}
    for name, cohorts in (("myosegmentum", ("myosegmentum",)), ("chu2015", ("chu2015",)), ("both", COHORTS)):
        t = time.time()
        model = _train(name, train_root, cohorts, args.work, args.epochs)
        times[f"train_{name}_s"] = round(time.time() - t, 1)
        rows = _score(model, scans)
        trained_on = " + ".join(f"{c} {len(halves[c][0])} ({COHORT_CONTRAST[c]})" for c in cohorts)
        per_scan += [{"model": name, **r} for r in rows]
        summary += _summary(name, trained_on, rows, threshold)
        log_rows = {"meta": {"data": str(args.data), "epochs": args.epochs, "threshold": threshold,
                             "scales": list(ContrastCheckConfig().scales), "seconds": round(time.time() - t0, 1), **times},
                    "summary": summary, "per_scan": per_scan}
        args.out.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(log_rows, indent=1) + "\n", args.out / f"{args.name}.json")  # written as it goes
    write_text(
        "# Stage 2: are scans of an unseen contrast flagged? (`contrast_unseen`)\n\n"
        f"Generated by `python bench/contrast_check.py --epochs {args.epochs}`. Short stage-2 models ({args.epochs} epochs) "
        "trained on semi-synthetic copies (inserted lesions) of the first half of each real cohort's subjects; "
        "scored on the other half of both cohorts (real scans, no lesions) and on synthetic scans of each contrast. "
        f"Default threshold {threshold:g} (distance to the nearest training scan's signature in units of "
        f"{tuple(ContrastCheckConfig().scales)}: body level, disc/body log ratio; the larger of the centre part, "
        "from the centroids alone, and the region part, from the body masks). `given`: expert masks as regions; "
        "`predicted`: the seg head's bodies (as `spinepipe predict` runs); `centroids +-N mm`: the same around "
        f"centroids moved by Gaussian noise of {JITTER_MM:g} mm per axis (about stage 1's error). A scan of the training contrast should "
        "not be flagged, one of another contrast should. Unmeasured scans count as not flagged.\n\n"
        + "\n".join(md_table(summary)) + f"\n\nTotal {time.time() - t0:.0f} s ({', '.join(f'{k} {v}' for k, v in times.items())}).\n",
        args.out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
