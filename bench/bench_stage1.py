"""Stage-1 benchmark: vertebra localisation + naming on real sagittal lumbar MRI, trained from POINTS only.

Protocol
--------
* Data: ``../shared/data`` cohorts ``myosegmentum`` (Dixon water, L1-L5) and ``chu2015`` (T2 TSE, T11-L5).
* ``--k``-fold cross-validation (default 5) grouped by subject (one scan per subject here, so folds are
  disjoint subject sets), stratified by cohort (each fold holds both cohorts). ``--folds N`` runs only
  the first N folds (smoke runs).
* **Points only**: for each training fold one work folder per cohort holds symlinks to the images and
  ``<id>_points.csv`` written from the mask centroids; the masks themselves are not there, so training
  cannot use them. The folders are sampled equally often (``Stage1Config.balance_groups``).
* Test variants per held-out scan: ``original``; ``aniso`` (resampled to a 0.8 x 0.8 x 4 mm sagittal
  acquisition: 4 mm left-right); ``fov_top`` / ``fov_bottom`` (the upper / lower 60 % of the
  head-to-foot field of view; ground truth = vertebrae whose centroid stays inside).
* Metrics (``pipeline.metrics``, VerSe definitions): identification rate, localisation error (mm),
  per-scan precision / recall, share of scans all-correct; reported per cohort and pooled, per variant.
* ``--nnunet``: nnU-Net v2 out of the box (3d_fullres, default trainer) on the *same* points-only data
  (balls of ``--ball-mm`` around each point labelled by level, via ``data_prep.nnunet_io``), trained for
  the same wall-clock time our model took in that fold (the run is stopped there and its best
  checkpoint is used), predicted on the same test variants; centroid of each predicted label = its
  vertebra. Heavy: meant for a GPU machine.

Results are written as they come to ``bench/results/stage1.json`` and ``stage1.md`` (never by hand).

Smoke run: ``python bench/bench_stage1.py --folds 1 --epochs 2 --quick``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.dataset import discover  # noqa: E402
from data_prep.io import read_image, read_labelmap, write_csv, write_text  # noqa: E402
from data_prep.scan import Scan, centroids_from_labelmap, level_name, reorient, resample_to_spacing  # noqa: E402
from pipeline.metrics import ScanIdentification, identification, summarize_identification  # noqa: E402
from stage1_localize.config import Stage1Config  # noqa: E402
from stage1_localize.infer import Localizer  # noqa: E402
from stage1_localize.train import train_stage1  # noqa: E402

log = logging.getLogger("bench_stage1")
COHORTS = ("myosegmentum", "chu2015")
VARIANTS = ("original", "aniso", "fov_top", "fov_bottom")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def list_cases(data_root: Path, cohorts) -> list[dict]:
    cases = []
    for c in cohorts:
        for s in discover(data_root / c):
            if s.vertebrae is None:
                continue
            cases.append({"id": s.id, "cohort": c, "image": s.image, "vertebrae": s.vertebrae})
    return cases


def make_folds(cases: list[dict], k: int, seed: int) -> list[int]:
    """Fold index per case: subjects shuffled within each cohort, then dealt round-robin (stratified)."""
    rng = np.random.default_rng(seed)
    fold = [0] * len(cases)
    for c in sorted({x["cohort"] for x in cases}):
        idx = [i for i, x in enumerate(cases) if x["cohort"] == c]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        for r, i in enumerate(idx):
            fold[i] = r % k
    return fold


def gt_centroids(case: dict, image: Scan) -> dict[int, np.ndarray]:
    return centroids_from_labelmap(read_labelmap(case["vertebrae"], reference=image))


def write_points_only(cases: list[dict], folder: Path) -> Path:
    """Symlinked images + ``<id>_points.csv`` from the mask centroids (no masks in the folder)."""
    import pandas as pd

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for c in cases:
        img = read_image(c["image"])
        cents = gt_centroids(c, img)
        (folder / f"{c['id']}_image.nii.gz").symlink_to(Path(c["image"]).resolve())
        rows = [{"level": level_name(v), "x_mm": p[0], "y_mm": p[1], "z_mm": p[2]} for v, p in sorted(cents.items())]
        write_csv(pd.DataFrame(rows, columns=["level", "x_mm", "y_mm", "z_mm"]), folder / f"{c['id']}_points.csv")
    return folder


def variants(image: Scan, gt: dict[int, np.ndarray], which=VARIANTS):
    """Yield ``(variant, scan, gt)`` test copies (see module docstring)."""
    for v in which:
        if v == "original":
            yield v, image, gt
        elif v == "aniso":
            from scipy import ndimage

            can = reorient(image, "LPS")  # i = left-right: the 4 mm slice direction of a sagittal scan
            # slab profile of a 4 mm slice (FWHM 4 mm) before sampling every 4 mm: partial volume, not aliasing
            sigma = [max(0.0, (4.0 / 2.355) / can.spacing[0]), 0.0, 0.0]
            thick = can.with_array(ndimage.gaussian_filter(np.asarray(can.array, np.float32), sigma))
            yield v, resample_to_spacing(thick, (4.0, 0.8, 0.8)), gt
        elif v in ("fov_top", "fov_bottom"):
            can = reorient(image, "LPS")  # k runs inferior -> superior
            n = can.shape[2]
            keep = int(round(0.6 * n))
            lo = n - keep if v == "fov_top" else 0
            arr = np.ascontiguousarray(can.array[:, :, lo:lo + keep])
            origin = can.voxel_to_world(np.array([0.0, 0.0, lo])).coords[0]
            crop = Scan(arr, can.spacing, origin, can.direction, name=f"{image.name}_{v}")
            inside = {}
            for vid, p in gt.items():
                ijk = crop.world_to_voxel(p).coords[0]
                if -0.5 <= ijk[2] <= crop.shape[2] - 0.5:
                    inside[vid] = p
            yield v, crop, inside


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------
class Results:
    def __init__(self, out_dir: Path, meta: dict):
        self.out_dir = out_dir
        self.meta = meta
        self.records: list[dict] = []
        self.folds: list[dict] = []

    def add(self, rec: dict) -> None:
        self.records.append(rec)

    def summary(self) -> dict:
        out: dict = {}
        methods = sorted({r["method"] for r in self.records})
        for m in methods:
            for v in VARIANTS:
                rs = [r for r in self.records if r["method"] == m and r["variant"] == v]
                if not rs:
                    continue
                groups = {"pooled": rs, **{c: [r for r in rs if r["cohort"] == c] for c in COHORTS}}
                for g, items in groups.items():
                    if items:
                        scans = [ScanIdentification(r["n_gt"], r["n_pred"], r["identified"],
                                                    {int(k): e for k, e in r["errors_mm"].items()}) for r in items]
                        out.setdefault(m, {}).setdefault(v, {})[g] = summarize_identification(scans)
        return out

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summ = self.summary()
        doc = {"meta": self.meta, "folds": self.folds, "summary": summ, "scans": self.records}
        write_text(json.dumps(doc, indent=1, default=float) + "\n", self.out_dir / "stage1.json")
        lines = ["# Stage 1 benchmark: vertebra localisation and naming (points-only training)", "",
                 f"Generated by `bench/bench_stage1.py` on {self.meta['date']}; {self.meta['note']}", "",
                 f"Folds run: {len(self.folds)} of {self.meta['k']} (grouped by subject, stratified by cohort). "
                 "Metrics follow VerSe: id rate = identified / ground-truth vertebrae (20 mm, closest-GT rule); "
                 "error = mean centroid distance over labels present in both.", "",
                 "| method | variant | cohort | scans | GT vertebrae | id rate | mean err (mm) | median err (mm) "
                 "| precision | recall | all-correct |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, per_v in summ.items():
            for v, per_c in per_v.items():
                for c, s in per_c.items():
                    lines.append(f"| {m} | {v} | {c} | {s['n_scans']} | {s['n_gt']} | {s['id_rate']:.3f} | "
                                 f"{s['mean_error_mm']:.1f} | {s['median_error_mm']:.1f} | {s['precision']:.3f} | "
                                 f"{s['recall']:.3f} | {s['all_correct']:.3f} |")
        lines += ["", "| fold | method | train scans | train wall-clock (s) | mean inference (s/scan) |",
                  "|---|---|---|---|---|"]
        for f in self.folds:
            lines.append(f"| {f['fold']} | {f['method']} | {f['n_train']} | {f['train_seconds']:.0f} | "
                         f"{f.get('infer_seconds', float('nan')):.2f} |")
        write_text("\n".join(lines) + "\n", self.out_dir / "stage1.md")


def record(method, fold, case, variant, pred, gt, seconds) -> dict:
    r = identification(pred, gt)
    return {"method": method, "fold": fold, "id": case["id"], "cohort": case["cohort"], "variant": variant,
            "n_gt": r.n_gt, "n_pred": r.n_pred, "identified": r.identified,
            "errors_mm": {str(k): v for k, v in r.errors_mm.items()},
            "pred_levels": [level_name(k) for k in sorted(pred)], "gt_levels": [level_name(k) for k in sorted(gt)],
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------------
# nnU-Net out of the box (same points-only data, same wall-clock)
# ---------------------------------------------------------------------------------------------------
def run_nnunet(fold: int, train_dir: Path, test_items: list[tuple[dict, str, Scan, dict]], work: Path,
               budget_s: float, ball_mm: float, device: str, results: Results) -> None:
    from data_prep.io import write_image
    from data_prep.nnunet_io import export_nnunet_raw, nnunet_env

    env = {**os.environ, **nnunet_env(work / "nnunet", create=True)}
    dataset_id = 500 + fold
    ds = export_nnunet_raw(train_dir, env["nnUNet_raw"], dataset_id, f"Stage1Points{fold}",
                           labels_from_points=ball_mm, overwrite=True)
    label_map = json.loads((ds / "spinepipe_label_map.json").read_text())
    to_verse = {int(k): int(v) for k, v in label_map.get("nnunet_to_verse", {}).items()}
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "2"],
                   env=env, check=True)
    t0 = time.perf_counter()
    try:
        subprocess.run(["nnUNetv2_train", str(dataset_id), "3d_fullres", "all", "-device", device],
                       env=env, timeout=budget_s)
    except subprocess.TimeoutExpired:
        log.info("nnU-Net stopped at the wall-clock budget (%.0f s)", budget_s)
    train_s = time.perf_counter() - t0
    res_dir = next(Path(env["nnUNet_results"]).glob(f"Dataset{dataset_id:03d}_*/nnUNetTrainer__nnUNetPlans__3d_fullres"), None)
    chk = None
    if res_dir is not None:
        for name in ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth"):
            if (res_dir / "fold_all" / name).is_file():
                chk = name
                break
    results.folds.append({"fold": fold, "method": "nnunet_3d_fullres", "n_train": len(list(train_dir.glob("*_points.csv"))),
                          "train_seconds": train_s, "checkpoint": chk})
    if chk is None:
        log.warning("nnU-Net produced no checkpoint within %.0f s; no predictions for fold %d", budget_s, fold)
        return
    inp, outp = work / "nnunet_in", work / "nnunet_out"
    for d in (inp, outp):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    keys = []
    for n, (case, variant, scan, gt) in enumerate(test_items):
        key = f"case{n:04d}"
        write_image(scan, inp / f"{key}_0000.nii.gz")
        keys.append((key, case, variant, scan, gt))
    t0 = time.perf_counter()
    subprocess.run(["nnUNetv2_predict", "-i", str(inp), "-o", str(outp), "-d", str(dataset_id), "-c", "3d_fullres",
                    "-f", "all", "-chk", chk, "-device", device, "--disable_progress_bar"], env=env, check=True)
    per_scan = (time.perf_counter() - t0) / max(1, len(keys))
    for key, case, variant, scan, gt in keys:
        seg = read_labelmap(outp / f"{key}.nii.gz")
        cents = centroids_from_labelmap(seg, ids=sorted(to_verse)) if to_verse else {}
        pred = {to_verse[k]: p for k, p in cents.items() if k in to_verse}
        results.add(record("nnunet_3d_fullres", fold, case, variant, pred, gt, per_scan))


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cohorts", default=",".join(COHORTS))
    ap.add_argument("--k", type=int, default=5, help="number of CV splits")
    ap.add_argument("--folds", type=int, default=None, help="run only the first N folds")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--steps", type=int, default=25, help="steps per epoch (the committed results: 30 x 25)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: few scans, few steps, two variants")
    ap.add_argument("--nnunet", action="store_true", help="also run nnU-Net v2 out of the box (heavy)")
    ap.add_argument("--ball-mm", type=float, default=8.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "work_dirs" / "bench_stage1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (args.data / "myosegmentum").is_dir():
        print(f"error: {args.data}: real data not available (expected myosegmentum/ and chu2015/)", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = list_cases(args.data, [c for c in args.cohorts.split(",") if c])
    fold_of = make_folds(cases, args.k, args.seed)
    cfg = Stage1Config(seed=args.seed)
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps_per_epoch=args.steps)
    which = VARIANTS
    if args.quick:
        cfg = dataclasses.replace(cfg, epochs=min(cfg.epochs, 2), steps_per_epoch=5)
        which = ("original", "fov_top")
    note = ("SMOKE RUN (--quick): numbers are not results." if args.quick else
            "real data, points-only training (mask centroids), no lesions inserted.")
    results = Results(args.out, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "k": args.k,
                                 "seed": args.seed, "device": device, "quick": args.quick, "note": note,
                                 "config": dataclasses.asdict(cfg), "n_cases": len(cases)})
    n_folds = min(args.k, args.folds or args.k)
    for fold in range(n_folds):
        train = [c for c, f in zip(cases, fold_of) if f != fold]
        test = [c for c, f in zip(cases, fold_of) if f == fold]
        if args.quick:  # a few of each cohort
            train = [c for co in COHORTS for c in [x for x in train if x["cohort"] == co][:4]]
            test = [c for co in COHORTS for c in [x for x in test if x["cohort"] == co][:2]]
        fold_dir = args.work / f"fold{fold}"
        # one points-only folder per cohort: stage 1 samples the folders equally often (balance_groups)
        cohort_dirs = [write_points_only([c for c in train if c["cohort"] == co], fold_dir / f"train_points_{co}")
                       for co in COHORTS if any(c["cohort"] == co for c in train)]
        t0 = time.perf_counter()
        model_dir = train_stage1(cohort_dirs, fold_dir / "model", cfg)
        train_s = time.perf_counter() - t0
        loc = Localizer(model_dir, device=device)
        test_items, infer_s = [], []
        for case in test:
            image = read_image(case["image"])
            gt = gt_centroids(case, image)
            for variant, scan, g in variants(image, gt, which):
                t1 = time.perf_counter()
                verts = loc.localize(scan)
                dt = time.perf_counter() - t1
                infer_s.append(dt)
                results.add(record("spinepipe_stage1", fold, case, variant,
                                   {v.label: v.centroid_world for v in verts}, g, dt))
                test_items.append((case, variant, scan, g))
        results.folds.append({"fold": fold, "method": "spinepipe_stage1", "n_train": len(train),
                              "train_seconds": train_s, "infer_seconds": float(np.mean(infer_s)) if infer_s else float("nan")})
        results.write()
        if args.nnunet:
            train_dir = write_points_only(train, fold_dir / "train_points")
            run_nnunet(fold, train_dir, test_items, fold_dir, train_s, args.ball_mm, device, results)
            results.write()
        log.info("fold %d done: %s", fold, json.dumps(results.summary().get("spinepipe_stage1", {}).get("original", {}).get("pooled", {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
