"""Stage 1 on scanner-like perturbations of held-out real scans (orientation, obliquity, intensity coding,
bias field, noise, contrast curve, slice thickness).

The project is judged on scans from other hospitals and scanners than the two cohorts in ``../shared/data``.
This script takes one trained stage-1 model and the real scans it never saw, makes perturbed copies of each,
and scores every copy with the VerSe rule (``pipeline.metrics.identification``, annotated-run scoring as in
``bench_stage1.py``), next to the unperturbed scan (paired: same model, same scans, same run).

    python bench/stage1_robustness.py --model WORK/fold4/model --fold 4 [--k 5 --seed 0]
        [--variants original,reorient:RAS,...] [--name stage1_robustness]
        -> bench/results/<name>.json + .md
    python bench/stage1_robustness.py --merge LABEL=F0.json,F1.json,... [--merge LABEL2=...] --name N
        -> one table per label over the pooled per-scan records of its files (e.g. the five fold models of
           one 5-fold run), and identification side by side; runs no model

``--fold F`` scores the subjects that ``bench_stage1.py`` (same ``--k`` / ``--seed``) held out of fold F, so a
fold model from that benchmark sees only scans it was not trained on; ``--fold -1`` scores every subject
(only meaningful for a model trained elsewhere). Real data only (exits with a message when the folder is
absent). Perturbations (:func:`perturb`, each a pure function of the scan; ``gt`` = world LPS mm centroids):

* ``reorient:CODE``: the voxel axes permuted / flipped (``sitk.DICOMOrient``); world positions unchanged.
* ``oblique:DEG``: the header direction rotated by DEG about the left-right axis (voxels unchanged): the
  spine now lies tilted in world space; the ground truth is rotated with it.
* ``tilt:DEG``: the image resampled onto a grid rotated by DEG about the left-right axis (B-spline, zero
  fill): the spine now lies tilted in the *voxel grid* (a patient lying at an angle, or a strong lordosis);
  world positions, and so the ground truth, unchanged.
* ``scale``: float intensities x 7.3 + 1000 (another scanner's units); ``int16``: x 10 - 2000 stored as int16.
* ``thick:MM``: a 4-mm sagittal slab (Gaussian slice profile, FWHM 4 mm) resampled to MM x MM in-plane.
* ``bias:A``: a smooth multiplicative field ``exp(A (0.7 y + 0.3 z))`` over the normalised posterior /
  superior extent (a posterior surface coil: the back up to ``exp(A)`` brighter, the front darker).
* ``noise:F``: Rician noise with SD ``F`` x the 99th intensity percentile.
* ``gamma:G``: intensities mapped through ``x**G`` below the 99.5th percentile (another contrast curve).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from bench.realdata import COHORTS, quiet_logging, real_data_missing  # noqa: E402
from data_prep.scan import Scan, anatomical_rank, reorient, resample_to_spacing  # noqa: E402

DEFAULT_VARIANTS = ("original", "reorient:RAS", "reorient:SAR", "oblique:30",
                    "tilt:-30", "tilt:-15", "tilt:15", "tilt:30",
                    "scale", "int16", "thick:0.5", "bias:0.7", "bias:1.2", "noise:0.08", "noise:0.16",
                    "gamma:0.5", "gamma:2")

#: the perturbation kinds :func:`perturb` knows (``kind`` or ``kind:value``)
KINDS = ("original", "reorient", "oblique", "tilt", "scale", "int16", "thick", "bias", "noise", "gamma")

Centroids = dict[int, np.ndarray]


def perturb(variant: str, scan: Scan, gt: Centroids, seed: int = 0) -> tuple[Scan, Centroids]:
    """The perturbed copy of ``scan`` and the ground-truth centroids (world LPS mm) that go with it.

    ``variant`` is ``kind`` or ``kind:value`` (module docstring); a ``ValueError`` names the known kinds."""
    kind, _, value = variant.partition(":")
    a = np.asarray(scan.array, np.float32)
    if kind == "original":
        return scan, gt
    if kind == "reorient":
        return reorient(scan, value), gt
    if kind == "oblique":
        r = Rotation.from_euler("x", float(value), degrees=True).as_matrix()
        o = np.asarray(scan.origin, np.float64)
        moved = Scan(scan.array, scan.spacing.copy(), o.copy(), r @ scan.direction, name=scan.name)
        return moved, {k: o + r @ (np.asarray(p, np.float64) - o) for k, p in gt.items()}
    if kind == "tilt":
        r = Rotation.from_euler("x", float(value), degrees=True).as_matrix()
        return resample_to_spacing(scan, scan.spacing, direction=r @ scan.direction), gt
    if kind == "scale":
        return scan.with_array(a * 7.3 + 1000.0), gt
    if kind == "int16":
        return scan.with_array(np.round(a * 10.0 - 2000.0).astype(np.int16)), gt
    if kind == "thick":
        from scipy import ndimage

        can = reorient(scan, "LPS")  # i = left-right, the slice direction of a sagittal acquisition
        sigma = [max(0.0, (4.0 / 2.355) / can.spacing[0]), 0.0, 0.0]
        slab = can.with_array(ndimage.gaussian_filter(np.asarray(can.array, np.float32), sigma))
        return resample_to_spacing(slab, (4.0, float(value), float(value))), gt
    if kind == "bias":
        can = reorient(scan, "LPS")  # j runs anterior -> posterior, k inferior -> superior
        n = can.shape
        j = np.linspace(-1.0, 1.0, n[1])[None, :, None]
        k = np.linspace(-1.0, 1.0, n[2])[None, None, :]
        field = np.exp(float(value) * (0.7 * j + 0.3 * k)).astype(np.float32)
        return can.with_array(np.asarray(can.array, np.float32) * field), gt
    if kind == "noise":
        rng = np.random.default_rng(seed)
        sd = float(value) * float(np.percentile(a, 99))
        noisy = np.sqrt((a + rng.normal(0.0, sd, a.shape)) ** 2 + rng.normal(0.0, sd, a.shape) ** 2)
        return scan.with_array(noisy.astype(np.float32)), gt
    if kind == "gamma":
        top = float(np.percentile(a, 99.5)) or 1.0
        return scan.with_array((top * np.clip(a / top, 0.0, None) ** float(value)).astype(np.float32)), gt
    raise ValueError(f"unknown perturbation {variant!r}; expected original, reorient:CODE, oblique:DEG, "
                     "tilt:DEG, scale, int16, thick:MM, bias:A, noise:F or gamma:G")


def summarise(per_variant: dict[str, list[dict]]) -> list[dict]:
    """One row per variant from per-scan records ``{"id", "n_gt", "identified", "errors", "seconds",
    "all_correct"}``: identification rate, mean / median error, all-correct share, seconds per scan and
    its ratio to ``original`` (when scored), and the scans not all-correct."""
    base_t = None
    if per_variant.get("original"):
        base_t = float(np.mean([r["seconds"] for r in per_variant["original"]]))
    rows = []
    for v, recs in per_variant.items():
        n_gt = sum(r["n_gt"] for r in recs)
        errs = [e for r in recs for e in r["errors"]]
        t = float(np.mean([r["seconds"] for r in recs]))
        rows.append({
            "variant": v, "scans": len(recs), "gt_vertebrae": n_gt,
            "id_rate": round(sum(r["identified"] for r in recs) / n_gt, 3) if n_gt else None,
            "mean_err_mm": round(float(np.mean(errs)), 2) if errs else None,
            "median_err_mm": round(float(np.median(errs)), 2) if errs else None,
            "all_correct": round(float(np.mean([r["all_correct"] for r in recs])), 3),
            "s_per_scan": round(t, 2),
            "time_vs_original": round(t / base_t, 2) if base_t else None,
            "not_all_correct": ", ".join(r["id"] for r in recs if not r["all_correct"]) or "-",
        })
    return rows


def axis_spread(tilts_by_run: dict[int, list[float]], whole: list[float]) -> list[dict]:
    """How far the axis of a run of n consecutive vertebrae lies from the median whole-run axis: one row per
    n, from ``tilts_by_run[n]`` (degrees, every run of n in every scan) and ``whole`` (one tilt per scan)."""
    ref = float(np.median(whole))
    rows = [{"run": "whole scan", "runs": len(whole), "median_deg": round(ref, 2),
             "max_abs_dev_deg": round(float(np.max(np.abs(np.asarray(whole) - ref))), 1)}]
    for n in sorted(tilts_by_run):
        d = np.abs(np.asarray(tilts_by_run[n]) - ref)
        rows.append({"run": f"{n} consecutive", "runs": len(d), "median_deg": None,
                     "max_abs_dev_deg": round(float(d.max()), 1), "p95_abs_dev_deg": round(float(np.percentile(d, 95)), 1),
                     "beyond_10_deg": int((d > 10).sum()), "beyond_12_deg": int((d > 12).sum())})
    return rows


def merge(specs: list[str], out: Path, name: str) -> int:
    """Pool the per-scan records of result files per label (``LABEL=A.json,B.json``) and write ``<name>``."""
    from data_prep.io import write_text

    pooled: dict[str, dict[str, list[dict]]] = {}
    sources: dict[str, list[dict]] = {}
    for spec in specs:
        label, _, files = spec.partition("=")
        paths = [Path(f) for f in files.split(",") if f]
        if not label or not paths or label in pooled:
            print(f"error: --merge {spec}: expected LABEL=FILE.json[,FILE.json ...] with a label not used before",
                  file=sys.stderr)
            return 2
        pooled[label], sources[label] = {}, []
        for path in paths:
            try:
                d = json.loads(path.read_text())
                per_scan, meta = d["per_scan"], d["meta"]
                source = {"file": path.name, **{k: meta[k] for k in ("model", "decode", "fold", "date")}}
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"error: {path}: not a stage1_robustness.py result file ({e!r})", file=sys.stderr)
                return 2
            sources[label].append(source)
            for v, recs in per_scan.items():
                pooled[label].setdefault(v, []).extend(recs)
    rows = {label: summarise(pv) for label, pv in pooled.items()}
    variants = list(dict.fromkeys(v for pv in pooled.values() for v in pv))
    side = [{"variant": v, **{label: next((r["id_rate"] for r in rows[label] if r["variant"] == v), None)
                              for label in rows}} for v in variants]
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"meta": {"merged": sources, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                           "side_by_side": side, "rows": rows, "per_scan": pooled}, indent=1), out / f"{name}.json")
    md = ["# Stage 1 on scanner-like perturbations: merged runs", "",
          f"`python bench/stage1_robustness.py {' '.join('--merge ' + shlex.quote(s.partition('=')[0] + '=...') for s in specs)}` "
          "pools the per-scan records of each label's files (one file per fold model; real scans each model never "
          "saw; real data, no lesions; VerSe rule, annotated-run scoring).", "",
          "Identification rate, side by side:", ""]
    md += md_table(side)
    for label in rows:
        md += ["", f"## {label}", "", "From: " + ", ".join(
            f"`{s['file']}` ({', '.join(s['model'])}{' ' + ' '.join(s['decode']) if s['decode'] else ''})"
            for s in sources[label]), ""]
        md += md_table(rows[label])
    write_text("\n".join(md) + "\n", out / f"{name}.md")
    print("\n".join(md_table(side)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append",
                    help="stage-1 model folder (repeat: an ensemble, as `localize --models`)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--fold", type=int, help="score bench_stage1.py's held-out subjects of this "
                    "fold (-1: every subject)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE",
                    help="decoding-only override of the saved config (e.g. detilt_min_deg=0)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="stage1_robustness")
    ap.add_argument("--merge", action="append", default=[], metavar="LABEL=A.json,B.json",
                    help="pool the per-scan records of these result files under LABEL (repeat for several "
                         "labels); runs no model")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), args.name)
    if not args.model or args.fold is None:
        ap.error("--model and --fold are required (or --merge)")
    data = Path(args.data)
    if real_data_missing(data):
        return 2
    from bench.bench_stage1 import gt_centroids, list_cases, make_folds
    from data_prep.io import read_image, write_text
    from pipeline.metrics import identification
    from stage1_localize.infer import Localizer

    from data_prep.errors import SpinepipeInputError

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v.partition(":")[0] not in KINDS]
    if unknown or not variants:
        print(f"error: --variants {args.variants}: unknown {', '.join(unknown) or 'empty list'}; expected "
              f"{', '.join(KINDS)} (with ':VALUE' where the docstring says)", file=sys.stderr)
        return 2
    try:
        loc = Localizer(args.model if len(args.model) > 1 else args.model[0])
        cases = list_cases(data, COHORTS)
    except SpinepipeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_logging()  # only once the arguments are known to be good (it sets process-wide logger levels)
    fold_of = make_folds(cases, args.k, args.seed)
    test = [c for c, f in zip(cases, fold_of) if args.fold < 0 or f == args.fold]
    if args.decode:
        from bench.overrides import override_config

        loc.config = override_config(loc.config, args.decode)
    from stage1_localize.infer import spine_tilt_deg
    from stage1_localize.preprocess import prepare

    whole, by_run = [], {3: [], 4: [], 5: []}
    held_out: dict[str, tuple] = {}  # image and ground truth of the scans scored below, read once
    for case in cases:  # the anatomy of every scan (expert centroids), in the grid stage 1 sees
        image = read_image(case["image"])
        gt = gt_centroids(case, image)
        if case in test:
            held_out[case["id"]] = (image, gt)
        grid = prepare(image, loc.config)
        pts = np.array([gt[k] for k in sorted(gt, key=anatomical_rank)])
        whole.append(spine_tilt_deg(pts, grid))
        for m in by_run:
            by_run[m] += [spine_tilt_deg(pts[i:i + m], grid) for i in range(len(pts) - m + 1)]
    spread = axis_spread(by_run, whole)
    per_variant: dict[str, list[dict]] = {v: [] for v in variants}
    for n, case in enumerate(test):
        image, gt = held_out[case["id"]]
        for v in variants:
            scan, g = perturb(v, image, gt, seed=n)
            t0 = time.perf_counter()
            found = loc.localize(scan)
            dt = time.perf_counter() - t0
            r = identification({x.label: x.centroid_world for x in found}, g, score_beyond_annotation=False)
            per_variant[v].append({"id": case["id"], "cohort": case["cohort"], "n_gt": r.n_gt,
                                   "identified": len(r.identified), "errors": list(r.errors_mm.values()),
                                   "seconds": dt, "all_correct": r.all_correct})
        print(f"{n + 1}/{len(test)} {case['id']}", file=sys.stderr, flush=True)
    rows = summarise(per_variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "decode": args.decode, "fold": args.fold, "k": args.k, "seed": args.seed,
            "data": str(data),
            "scans": [c["id"] for c in test], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_text(json.dumps({"meta": meta, "rows": rows, "axis_spread": spread, "per_scan": per_variant}, indent=1),
               out / f"{args.name}.json")
    md = ["# Stage 1 on scanner-like perturbations of held-out real scans",
          "",
          f"Generated by `python bench/stage1_robustness.py --fold {args.fold}"
          f"{'' if args.variants == ','.join(DEFAULT_VARIANTS) else ' --variants ' + args.variants}"
          f"{''.join(' --decode ' + d for d in args.decode)}` on {meta['date']} with the stage-1 "
          f"model(s) {', '.join(f'`{m}`' for m in args.model)}; {len(test)} real scans that model never saw "
          f"(fold {args.fold} of bench_stage1.py's {args.k}-fold split, seed {args.seed}); real data, no lesions. "
          "VerSe rule (20 mm, closest ground truth), annotated-run scoring; all variants of a scan in the same "
          "run, so the time ratios are paired. Perturbations: see the script's docstring.",
          ""]
    md += md_table(rows)
    md += ["", f"## The spine's axis in the image grid ({len(cases)} real scans, expert centroids)", "",
           "Tilt of the spine in the sagittal plane of the prepared grid (`stage1_localize.infer.spine_tilt_deg`: "
           "median angle of the steps between neighbouring centroids; +: the upper end posterior), whole "
           "annotated run per scan, "
           "and how far the axis of every run of n consecutive vertebrae lies from the median whole-run axis "
           "(the lumbar curve): what `detilt_min_deg` / `detilt_min_named` must tolerate.", ""]
    md += md_table(spread)
    write_text("\n".join(md) + "\n", out / f"{args.name}.md")
    print("\n".join(md_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
