"""End-to-end benchmark of ``spinepipe predict``: seconds per scan and peak memory on real scans.

    python bench/bench_pipeline.py --models models [--data ../shared/data] [--n 8]
        [--nnunet-work DIR --nnunet-dataset-id ID --nnunet-fold F]

Scans: the first ``--n`` subjects of each cohort in ``../shared/data`` at their native 1 mm grid, and
copies resampled to clinical anisotropy (0.8 x 0.8 mm in plane, 4 mm between sagittal slices).
Each set runs as one ``spinepipe predict`` process (as a user would run a batch); we record its wall time,
the per-scan times it prints, and its peak resident memory (``ru_maxrss`` of the child).

Reference, in the same run: nnU-Net v2's own predictor (``nnUNetv2_predict``, default settings) on the
same scans, through ``bench/nnunet_reference.py``, when an nnU-Net model folder is given. The speed ratio
compares the two on identical inputs on this machine.

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


def clinical_copy(src: Path, dst: Path) -> Path:
    """Resample a scan so its left-right axis has 4 mm slices and the sagittal plane 0.8 mm pixels."""
    scan = read_image(src)
    spacing = np.empty(3)
    for world_axis, mm in enumerate(CLINICAL_SPACING_LPS):
        spacing[scan.axis_of(world_axis)[0]] = mm
    write_image(resample_to_spacing(scan, spacing), dst)
    return dst


def run_predict(scans: list[Path], out_dir: Path, models: Path, workers: int) -> dict:
    """One ``spinepipe predict`` batch in a child process: wall time, per-scan times, peak RSS."""
    cmd = [str(Path(sys.executable).parent / "spinepipe"), "predict", *map(str, scans), "-o", str(out_dir),
           "--models", str(models), "-j", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    per_scan = [float(m) for m in re.findall(r"\((\d+(?:\.\d+)?) s\) ->", proc.stdout)]
    return {
        "n_scans": len(scans),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "wall_s_per_scan": round(wall / max(len(scans), 1), 2),
        "per_scan_s_mean": round(float(np.mean(per_scan)), 2) if per_scan else None,
        "per_scan_s_max": round(float(np.max(per_scan)), 2) if per_scan else None,
        # ru_maxrss of children is the max over all children so far: report it only when it grew
        "peak_rss_gb": round(peak_kb / 1024**2, 3) if peak_kb > before else round(before / 1024**2, 3),
        "stderr_tail": proc.stderr.strip().splitlines()[-3:],
        "summaries": proc.stdout.strip().splitlines()[:3],
    }


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(res, indent=1, default=float))
    lines = ["# spinepipe predict: end-to-end speed and memory", "",
             f"Machine: {res['meta']['cpus']} CPU cores, torch threads 2. Models: `{res['meta']['models']}`.",
             "Targets: <= 10 s per scan, <= 3 GB peak memory.", "",
             "| scans | n | wall s/scan (incl. start-up) | mean s/scan (in-process) | max s/scan | peak RSS GB | rc |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["spinepipe"].items():
        lines.append(f"| {name} | {r['n_scans']} | {r['wall_s_per_scan']} | {r['per_scan_s_mean']} | {r['per_scan_s_max']} "
                     f"| {r['peak_rss_gb']} | {r['returncode']} |")
    if res.get("nnunet"):
        lines += ["", "## nnU-Net v2 predictor (default settings) on the same scans", "",
                  "| scans | nnU-Net s/scan | spinepipe s/scan | speed ratio (nnU-Net / spinepipe) |", "|---|---|---|---|"]
        for name, r in res["nnunet"].items():
            ours = res["spinepipe"].get(name, {}).get("wall_s_per_scan")
            ratio = (r["s_per_scan"] / ours) if (ours and r.get("s_per_scan")) else None
            lines.append(f"| {name} | {r.get('s_per_scan')} | {ours} | {round(ratio, 2) if ratio else 'n/a'} |")
    elif res.get("nnunet_note"):
        lines += ["", f"nnU-Net reference: {res['nnunet_note']}"]
    lines += ["", "Reproduce: `make bench-pipeline BENCH_ARGS=\"--models models\"` (see bench/bench_pipeline.py)."]
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=8, help="scans per cohort")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_bench_pipeline"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--nnunet-work", type=Path)
    ap.add_argument("--nnunet-dataset-id", type=int)
    ap.add_argument("--nnunet-fold", default="0")
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
    res = {"meta": {"cpus": os.cpu_count(), "models": str(args.models), "n_per_cohort": args.n,
                    "clinical_spacing_lps_mm": CLINICAL_SPACING_LPS}, "spinepipe": {}, "nnunet": {}}
    for name, scans in (("native 1 mm", native), ("clinical 0.8x0.8x4 mm", clinical)):
        res["spinepipe"][name] = run_predict(scans, args.work / "pred" / name.split()[0], args.models, args.workers)
        write_results(res, args.out)
    if args.nnunet_work and args.nnunet_dataset_id is not None:
        from bench.nnunet_reference import predict as nnunet_predict

        for name, scans in (("native 1 mm", native), ("clinical 0.8x0.8x4 mm", clinical)):
            t0 = time.perf_counter()
            r = nnunet_predict(args.nnunet_work, args.nnunet_dataset_id, args.nnunet_fold, scans,
                               args.work / "nnunet" / name.split()[0])
            wall = time.perf_counter() - t0
            res["nnunet"][name] = {"s_per_scan": round(wall / len(scans), 2),
                                   **{k: v for k, v in r.items() if k in ("seconds", "s_per_scan_reported", "device")}}
            write_results(res, args.out)
    else:
        res["nnunet_note"] = "not run (no --nnunet-work model folder given)"
        write_results(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
