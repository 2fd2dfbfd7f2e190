"""Stage 2 re-centring: are the body centroids stage 2 measures closer to the truth than stage 1's?

``spinepipe predict`` reports, per vertebra, the centroid of the body stage 2 classified when it found one
within ``Stage2Config.recentre_max_mm`` of stage 1's centroid (``centroid_from`` = body), and classifies
from a patch cropped again around it. This script scores both positions against the expert masks'
centroids on real scans that neither model trained on, and runs stage 2 with re-centring off and on to
show what it does to the verdicts and the time:

    python bench/recentre.py --stage1 FOLD0_MODEL [FOLD1_MODEL ...] --stage2 MODEL [--second-half-only]
        [--lesions WORK_DIR] -> bench/results/recentre.json + .md

Each ``--stage1`` folder must record its training subjects (``extra.train_subjects``, as
``bench/bench_stage1.py`` folds do); its held-out scans are scored. ``--second-half-only`` keeps only
the second half of each cohort's subjects by name: the held-out half of ``bench/contrast_check.py``'s
models, whose stage-2 folders do not list their subjects. Identification follows the VerSe rule
(:mod:`pipeline.metrics`); errors are over the labels present in both. Without ``--lesions`` the scans
are real and lesion-free: the probability shifts describe what re-centring changes, not accuracy. With
``--lesions WORK_DIR`` the scored scans are **semi-synthetic** copies (``data_prep.lesions``, seed 1, written
once under ``WORK_DIR``), and each verdict is scored against the class of the annotated vertebra nearest
to stage 1's centroid (within 20 mm; others are not scored), with re-centring off and on, paired.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from bench.realdata import (COHORTS, cohort_halves, quiet_logging, real_data_missing,  # noqa: E402
                            semisynthetic_copies)
from data_prep.io import read_image, read_labelmap, write_text  # noqa: E402


def second_halves(data: Path) -> set[str]:
    """The second half by name of each cohort's subjects (``bench/contrast_check.py``'s held-out half)."""
    return {sid for _, held_out in cohort_halves(data).values() for sid in held_out}


def summary_rows(per_scan: list[dict]) -> list[dict]:
    """Per cohort and pooled: identification and localisation error of stage 1's centroids and of the
    reported ones (body centroids where stage 2 found the body)."""
    from pipeline.metrics import identification, summarize_identification

    rows = []
    for cohort in (*COHORTS, "pooled"):
        scans = [s for s in per_scan if cohort in ("pooled", s["cohort"])]
        if not scans:
            continue
        for name, key in (("stage 1", "stage1"), ("reported (re-centred)", "reported")):
            ids = [identification({int(k): v for k, v in s[key].items()}, {int(k): v for k, v in s["gt"].items()},
                                  score_beyond_annotation=False) for s in scans]
            summ = summarize_identification(ids)
            hit_err = [e for r in ids for lab, e in r.errors_mm.items() if lab in r.identified]
            rows.append({"cohort": cohort, "positions": name, "scans": len(scans), "gt_vertebrae": summ["n_gt"],
                         "id_rate": round(summ["id_rate"], 3), "mean_err_mm": round(summ["mean_error_mm"], 2),
                         "median_err_mm": round(summ["median_error_mm"], 2),
                         "mean_err_identified_mm": round(float(np.mean(hit_err)), 2) if hit_err else float("nan"),
                         "all_correct": round(summ["all_correct"], 3)})
    return rows


def class_rows(truth: list[int], probs: dict[str, list[np.ndarray]], classes: list[str]) -> list[dict]:
    """Per-class one-vs-rest AUC and balanced accuracy of the verdicts with re-centring off and on."""
    from pipeline.metrics import balanced_accuracy, one_vs_rest_auc

    rows = []
    for mode, ps in probs.items():
        p = np.array(ps).reshape(len(truth), len(classes))
        auc = one_vs_rest_auc(truth, p, len(classes))
        rows.append({"recentring": mode, "vertebrae": len(truth),
                     **{f"n_{c}": int(np.sum(np.asarray(truth) == k)) for k, c in enumerate(classes)},
                     **{f"auc_{c}": round(float(a), 3) for c, a in zip(classes, auc)},
                     "balanced_accuracy": round(balanced_accuracy(truth, p.argmax(1)), 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", type=Path, nargs="+", required=True, help="stage-1 fold model folders")
    ap.add_argument("--stage2", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--second-half-only", action="store_true")
    ap.add_argument("--lesions", type=Path, default=None, help="score semi-synthetic copies written here")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="recentre")
    args = ap.parse_args(argv)
    if real_data_missing(args.data):
        return 2
    quiet_logging()
    from data_prep.scan import centroids_from_labelmap
    from stage1_localize.infer import Localizer
    from stage2_classify.infer import Classifier

    clf = Classifier(args.stage2)
    limit = clf.config.recentre_max_mm or 10.0
    halves = cohort_halves(args.data)
    keep = second_halves(args.data) if args.second_half_only else None
    source = {c: args.data / c for c in COHORTS}
    labels: dict[tuple[str, int], int] = {}
    if args.lesions is not None:
        import pandas as pd

        from data_prep.scan import level_id

        ids = {c: [i for half in halves[c] for i in half if keep is None or i in keep] for c in COHORTS}
        semisynthetic_copies(args.data, args.lesions, ids, 1)
        for c in COHORTS:
            dst = args.lesions / c
            source[c] = dst
            table = pd.read_csv(dst / "vertebra_labels.csv")
            for sid, level, k in zip(table["id"], table["level"], table["class"]):
                labels[(sid, level_id(level))] = int(k)
    truth: list[int] = []
    probs: dict[str, list[np.ndarray]] = {"off": [], "on": []}
    per_scan: list[dict] = []
    shifts, dp, changed, seconds = [], [], 0, {"off": [], "on": []}
    counts: dict[str, dict[str, int]] = {"off": {}, "on": {}}
    t0 = time.time()
    for model in args.stage1:
        train = set(json.loads((model / "config.json").read_text())["extra"]["train_subjects"])
        loc = Localizer(model)
        for c in COHORTS:
            for p in sorted(source[c].glob("*_image.nii.gz")):
                sid = p.name[: -len("_image.nii.gz")]
                if sid in train or (keep is not None and sid not in keep):
                    continue
                img = read_image(p)
                gt = centroids_from_labelmap(read_labelmap(p.parent / f"{sid}_vertebrae.nii.gz", img))
                verts = loc.localize(img)
                recs = {}
                for mode, mm in (("off", 0.0), ("on", limit)):
                    clf.config.recentre_max_mm = mm
                    t = time.perf_counter()
                    recs[mode] = clf.classify(img, verts, with_evidence=False)
                    seconds[mode].append(time.perf_counter() - t)
                for v, a, b in zip(verts, recs["off"], recs["on"]):
                    if labels:
                        near = min(gt, key=lambda k: np.linalg.norm(gt[k] - v.centroid_world))
                        if np.linalg.norm(gt[near] - v.centroid_world) < 20 and (sid, near) in labels:
                            truth.append(labels[(sid, near)])
                            for mode, r in (("off", a), ("on", b)):
                                probs[mode].append(np.array([r["probabilities"][k] for k in clf.config.classes]))
                    pa = np.array(list(a["probabilities"].values()))
                    pb = np.array(list(b["probabilities"].values()))
                    dp.append(float(np.abs(pa - pb).max()))
                    changed += int(a["class"] != b["class"])
                    for mode, r in (("off", a), ("on", b)):
                        counts[mode][r["class"]] = counts[mode].get(r["class"], 0) + 1
                    if b["centroid_from"] == "body":
                        shifts.append(float(np.linalg.norm(b["centroid_world"] - a["centroid_world"])))
                per_scan.append({
                    "subject": sid, "cohort": c, "stage1_model": str(model),
                    "gt": {str(k): np.round(v, 2).tolist() for k, v in gt.items()},
                    "stage1": {str(v.label): np.round(v.centroid_world, 2).tolist() for v in verts},
                    "reported": {str(r["label"]): np.round(r["centroid_world"], 2).tolist() for r in recs["on"]},
                    "n_body": sum(r["centroid_from"] == "body" for r in recs["on"]),
                })
    rows = summary_rows(per_scan)
    crows = class_rows(truth, probs, list(clf.config.classes)) if truth else []
    n_vert = sum(len(s["stage1"]) for s in per_scan)
    other = {
        "vertebrae": n_vert, "recentred": len(shifts), "recentre_max_mm": limit,
        "shift_mm_median": round(float(np.median(shifts)), 2) if shifts else None,
        "shift_mm_max": round(float(np.max(shifts)), 2) if shifts else None,
        "max_abs_delta_p_median": round(float(np.median(dp)), 4) if dp else None,
        "max_abs_delta_p_max": round(float(np.max(dp)), 4) if dp else None,
        "class_changed": changed,
        "class_counts_off": counts["off"], "class_counts_on": counts["on"],
        "s_per_scan_off": round(float(np.mean(seconds["off"])), 2) if seconds["off"] else None,
        "s_per_scan_on": round(float(np.mean(seconds["on"])), 2) if seconds["on"] else None,
    }
    res = {"meta": {"stage1": [str(m) for m in args.stage1], "stage2": str(args.stage2),
                    "second_half_only": args.second_half_only, "seconds": round(time.time() - t0, 1)},
           "summary": rows, "classification": crows, "recentring": other, "per_scan": per_scan}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(res, indent=1) + "\n", args.out / f"{args.name}.json")
    kind = ("semi-synthetic copies (lesions inserted by `data_prep.lesions`, seed 1; the stage-2 model was trained on "
            "other subjects' copies)" if crows else
            "real scans (no lesions inserted; the stage-2 model was trained on semi-synthetic copies)")
    flags = (" --second-half-only" if args.second_half_only else "") + (" --lesions DIR" if crows else "")
    text = [
        "# Stage 2 re-centring: body centroids vs stage 1's centroids", "",
        f"Generated by `python bench/recentre.py --stage1 ... --stage2 ...{flags}` on {len(per_scan)} {kind}, held "
        "out from both models. Ground truth: the expert masks' centroids. VerSe identification (20 mm); 'annotated "
        "run' scoring (a visible level beyond the annotated ones is not scored). Errors over the labels present in "
        "both; 'identified' = over identified vertebrae only.", "",
        f"Models: stage 1 {', '.join(f'`{m}`' for m in args.stage1)}; stage 2 `{args.stage2}` "
        f"({clf.extra.get('epoch', clf.extra.get('epochs_done', '?'))} epochs, {clf.extra.get('n_samples', '?')} "
        "training vertebrae).", "",
        *md_table(rows), "",
        f"Re-centred (body found within {limit:g} mm): {other['recentred']} of {n_vert} vertebrae; shift median "
        f"{other['shift_mm_median']} mm, max {other['shift_mm_max']} mm. Verdicts with re-centring on vs off: max "
        f"|delta p| per vertebra median {other['max_abs_delta_p_median']}, max {other['max_abs_delta_p_max']}; class "
        f"changed in {changed} (verdicts off {counts['off']}, on {counts['on']}). Stage 2 without attributions: "
        f"{other['s_per_scan_off']} s per scan off, {other['s_per_scan_on']} s on.", ""]
    if crows:
        text += ["## Verdicts against the inserted lesions (semi-synthetic), re-centring off vs on", "",
                 "Each verdict scored against the class of the annotated vertebra nearest to stage 1's centroid "
                 "(within 20 mm).", "", *md_table(crows), ""]
    text.append(f"Total {time.time() - t0:.0f} s.")
    write_text("\n".join(text) + "\n", args.out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
