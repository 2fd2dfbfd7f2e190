"""End-to-end benchmark of ``spinepipe predict``: seconds per scan and peak memory on real scans.

    python bench/bench_pipeline.py --models models [--data ../shared/data] [--n 8]
        [--nnunet-work DIR] [--nnunet-dataset-id ID] [--nnunet-n K] [--no-nnunet]

Scans: the first ``--n`` subjects of each cohort in ``../shared/data`` at their native 1 mm grid, and
copies resampled to clinical anisotropy (0.8 x 0.8 mm in plane, 4 mm between sagittal slices).
Each set runs as one ``spinepipe predict`` process (as a user would run a batch); we record its wall time,
the per-scan times it prints, and its peak resident memory (``ru_maxrss`` of the child).

Reference, in the same run (unless ``--no-nnunet``): nnU-Net v2's own predictor (``nnUNetv2_predict``,
default settings: mirroring TTA, step 0.5, one call per scan) through ``bench/nnunet_reference.py``, on the
first ``--nnunet-n`` scans of each set (default 1: myosegmentum-001 and its clinical copy). Its default
predictor runs 8 mirrored passes per sliding-window tile, minutes per scan on a 2-core CPU, and a chu2015
scan (381 x 381 in-plane) has more than twice the tiles of a myosegmentum one (224 x 224); raise
``--nnunet-n`` to include more. The model is the trained one recorded in ``--nnunet-work`` for
``--nnunet-dataset-id`` if there is one; otherwise nnU-Net plans and preprocesses the subjects our models
were trained on (``extra.train_subjects`` of the stage-1 model, else every subject not benchmarked) and
its own trainer writes an *untrained* checkpoint (:func:`bench.nnunet_reference.untrained_model`): the
predictor's cost does not depend on the weights, so this is a speed reference only, and the table says so.
The ratio divides nnU-Net's seconds per scan by ours on the same scans (ours in-process, from the
per-scan lines ``spinepipe predict`` prints; nnU-Net's per call, its start-up of a few seconds included).

Results: ``bench/results/pipeline.json`` and ``pipeline.md`` (rewritten after each step).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.io import read_image, write_image  # noqa: E402
from data_prep.scan import resample_to_spacing  # noqa: E402

COHORTS = ("myosegmentum", "chu2015")
CLINICAL_SPACING_LPS = (4.0, 0.8, 0.8)  # mm along world x (left-right), y (A-P), z (S-I)
#: the per-scan line of ``spinepipe predict``: "<name>: 6 vertebrae L1-S1; normal 6 (3.2 s) -> <csv>"
_SUMMARY = re.compile(r"^(\S+): .*\((\d+(?:\.\d+)?) s\) -> ", re.MULTILINE)


def clinical_copy(src: Path, dst: Path) -> Path:
    """Resample a scan so its left-right axis has 4 mm slices and the sagittal plane 0.8 mm pixels."""
    scan = read_image(src)
    spacing = np.empty(3)
    for world_axis, mm in enumerate(CLINICAL_SPACING_LPS):
        spacing[scan.axis_of(world_axis)[0]] = mm
    write_image(resample_to_spacing(scan, spacing), dst)
    return dst


def run_predict(scans: list[Path], out_dir: Path, models: Path, workers: int, ig_steps: int | None = None) -> dict:
    """One ``spinepipe predict`` batch in a child process: wall time, per-scan times, peak RSS."""
    cmd = [str(Path(sys.executable).parent / "spinepipe"), "predict", *map(str, scans), "-o", str(out_dir),
           "--models", str(models), "-j", str(workers)]
    if ig_steps is not None:
        cmd += ["--ig-steps", str(ig_steps)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    by_name = {m.group(1): float(m.group(2)) for m in _SUMMARY.finditer(proc.stdout)}
    per_scan = list(by_name.values())
    return {
        "n_scans": len(scans),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "wall_s_per_scan": round(wall / max(len(scans), 1), 2),
        "per_scan_s_mean": round(float(np.mean(per_scan)), 2) if per_scan else None,
        "per_scan_s_max": round(float(np.max(per_scan)), 2) if per_scan else None,
        "per_scan_s": {k: round(v, 2) for k, v in by_name.items()},
        # ru_maxrss of children is the max over all children so far: report it only when it grew
        "peak_rss_gb": round(peak_kb / 1024**2, 3) if peak_kb > before else round(before / 1024**2, 3),
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
        "summaries": proc.stdout.strip().splitlines()[:3],
    }


def models_info(models: Path, ig_steps: int | None = None) -> str:
    """One line on what the benchmarked models are (from the ``extra`` record of their config.json) and the
    Integrated-Gradients steps stage 2 runs with (``ig_steps`` if given, else the model's own)."""
    parts = []
    for stage in ("stage1", "stage2"):
        try:
            saved = json.loads((models / stage / "config.json").read_text())
        except (OSError, ValueError):
            saved = {}
        extra = saved.get("extra", {})
        if stage == "stage2":
            steps = ig_steps or saved.get("config", {}).get("ig_steps")
            extra = {**extra, "ig_steps": steps} if steps else extra
        epochs = extra.get("epochs_done", extra.get("epoch"))
        n = extra.get("n_train_subjects")
        parts.append(f"{stage} {epochs} epochs" + (f", {n} training subjects" if n else "")
                     + (f", {extra['n_samples']} training vertebrae" if "n_samples" in extra else "")
                     + (f", {extra['ig_steps']} IG steps" if "ig_steps" in extra else ""))
    return "; ".join(parts)


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(res, indent=1, default=float))
    lines = ["# spinepipe predict: end-to-end speed and memory", "",
             f"Machine: {res['meta']['cpus']} CPU cores, torch threads 2. Models: `{res['meta']['models']}`"
             + (f" ({res['meta']['models_info']})." if res["meta"].get("models_info") else "."),
             "Targets: <= 10 s per scan, <= 3 GB peak memory.", "",
             "| scans | n | wall s/scan (incl. start-up) | mean s/scan (in-process) | max s/scan | peak RSS GB | rc |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["spinepipe"].items():
        lines.append(f"| {name} | {r['n_scans']} | {r['wall_s_per_scan']} | {r['per_scan_s_mean']} | {r['per_scan_s_max']} "
                     f"| {r['peak_rss_gb']} | {r['returncode']} |")
    if res.get("nnunet"):
        model = res.get("nnunet_model", {})
        lines += ["", "## nnU-Net v2 predictor (`nnUNetv2_predict`, default settings) on the same scans", "",
                  f"Model: {model.get('weights', 'trained')}; patch {model.get('patch_size')}, "
                  f"spacing {model.get('spacing')} mm, mirroring axes {model.get('mirroring_axes')}. "
                  "One nnU-Net call per scan (start-up included); ours in-process on the same scans.", "",
                  "| scans | cases | nnU-Net s/scan | spinepipe s/scan (same scans) | ratio nnU-Net / spinepipe |",
                  "|---|---|---|---|---|"]
        for name, r in res["nnunet"].items():
            ratio = r.get("ratio")
            lines.append(f"| {name} | {', '.join(r['cases'])} | {r.get('s_per_scan')} | {r.get('spinepipe_s_per_scan')} "
                         f"| {round(ratio, 1) if ratio else 'n/a'} |")
    elif res.get("nnunet_note"):
        lines += ["", f"nnU-Net reference: {res['nnunet_note']}"]
    lines += ["", "Reproduce: `make bench-pipeline BENCH_ARGS=\"--models models\"` (see bench/bench_pipeline.py)."]
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")


def nnunet_model(args, benchmarked: list[Path]) -> dict:
    """The nnU-Net model for the reference: trained (record in ``--nnunet-work``) or an untrained one made
    from the subjects our models were trained on, else from every subject not in ``benchmarked`` (see the
    module docstring)."""
    from bench import nnunet_reference as nr

    work = args.nnunet_work.resolve()
    did, fold = args.nnunet_dataset_id, args.nnunet_fold
    trained = work / f"nnunet_reference_train_{did:03d}_fold{fold}.json"
    if trained.exists() and json.loads(trained.read_text()).get("trained"):
        rec = json.loads(trained.read_text())
        return {"weights": f"trained ({rec['trainer']})", "trainer": rec["trainer"], "checkpoint": rec["checkpoint"]}
    made = work / f"nnunet_reference_untrained_{did:03d}_fold{fold}.json"
    if made.exists():  # reused as is (its plans come from the subjects it was made from; delete it to redo)
        return json.loads(made.read_text())
    cfg = json.loads((args.models / "stage1" / "config.json").read_text())
    ids = cfg.get("extra", {}).get("train_subjects")
    if not ids:
        from data_prep.dataset import discover

        bench_ids = {p.name.split("_image")[0] for p in benchmarked}
        ids = [s.id for c in COHORTS for s in discover(args.data / c) if s.id not in bench_ids]
    # one canonical folder with both cohorts (symlinks), then nnU-Net's own plan + preprocess
    both = work / "subjects"
    both.mkdir(parents=True, exist_ok=True)
    for c in COHORTS:
        for f in (args.data / c).glob("*.nii.gz"):
            if f.name.split("_")[0] in ids and not (both / f.name).exists():
                os.symlink(f.resolve(), both / f.name)
    nr.prepare(both, ids, work, did, "SpinepipeSpeed")
    return nr.untrained_model(work, did, fold)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=8, help="scans per cohort")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--ig-steps", type=int, default=None,
                    help="`spinepipe predict --ig-steps` (default: the stage-2 model's setting)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_bench_pipeline"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--nnunet-work", type=Path, default=None,
                    help="nnU-Net work folder of the reference (default: <work>/nnunet_ref)")
    ap.add_argument("--no-nnunet", action="store_true", help="skip the nnU-Net reference")
    ap.add_argument("--nnunet-dataset-id", type=int, default=903)
    ap.add_argument("--nnunet-fold", type=int, default=0)
    ap.add_argument("--nnunet-n", type=int, default=1, help="scans of each set (first ones) for the nnU-Net reference")
    args = ap.parse_args(argv)
    if not (args.data / "myosegmentum").is_dir():
        sys.stderr.write(f"skipping: real data not found at {args.data}\n")
        return 0
    if not (args.models / "stage1" / "config.json").is_file() or not (args.models / "stage2" / "config.json").is_file():
        sys.stderr.write(f"error: {args.models}: no trained models; run `make train-stage1 stage2` first\n")
        return 2
    native = [sorted((args.data / c).glob("*_image.nii.gz"))[: args.n] for c in COHORTS]
    native = [p for group in native for p in group]
    clin_dir = args.work / "clinical"
    clin_dir.mkdir(parents=True, exist_ok=True)
    clinical = [clinical_copy(p, clin_dir / p.name) if not (clin_dir / p.name).exists() else clin_dir / p.name for p in native]
    res = {"meta": {"cpus": os.cpu_count(), "models": str(args.models), "models_info": models_info(args.models, args.ig_steps),
                    "n_per_cohort": args.n,
                    "clinical_spacing_lps_mm": CLINICAL_SPACING_LPS}, "spinepipe": {}, "nnunet": {}}
    for name, scans in (("native 1 mm", native), ("clinical 0.8x0.8x4 mm", clinical)):
        res["spinepipe"][name] = run_predict(scans, args.work / "pred" / name.split()[0], args.models, args.workers,
                                           args.ig_steps)
        write_results(res, args.out)
    failed = [n for n, r in res["spinepipe"].items() if r["returncode"] != 0]
    if failed:
        sys.stderr.write(f"error: spinepipe predict failed on {', '.join(failed)}: "
                         f"{res['spinepipe'][failed[0]]['stderr_tail'][-1:]}\n")
        return 1
    if not args.no_nnunet:
        args.nnunet_work = args.nnunet_work or args.work / "nnunet_ref"
        res["nnunet_model"] = nnunet_model(args, native)
        write_results(res, args.out)
        from bench.nnunet_reference import predict as nnunet_predict

        for name, scans in (("native 1 mm", native), ("clinical 0.8x0.8x4 mm", clinical)):
            subset = scans[: args.nnunet_n]
            r = nnunet_predict(args.nnunet_work, args.nnunet_dataset_id, args.nnunet_fold, subset,
                               args.work / "nnunet" / name.split()[0], trainer=res["nnunet_model"]["trainer"],
                               checkpoint=res["nnunet_model"]["checkpoint"])
            ours_by_case = res["spinepipe"][name]["per_scan_s"]
            cases = list(r["seconds_per_scan"])
            ours = [ours_by_case[c] for c in cases if c in ours_by_case]
            theirs = float(np.mean(list(r["seconds_per_scan"].values())))
            ours_mean = float(np.mean(ours)) if len(ours) == len(cases) else None
            res["nnunet"][name] = {"cases": cases, "s_per_scan": round(theirs, 1),
                                   "seconds_per_scan": r["seconds_per_scan"],
                                   "spinepipe_s_per_scan": round(ours_mean, 2) if ours_mean else None,
                                   "ratio": theirs / ours_mean if ours_mean else None}
            write_results(res, args.out)
    else:
        res["nnunet_note"] = "not run (--no-nnunet)"
        write_results(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
