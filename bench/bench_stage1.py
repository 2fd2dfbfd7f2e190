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
  head-to-foot field of view; ground truth = vertebrae whose centroid stays inside). Named in
  ``--variants`` only: ``inverted`` (foreground contrast inverted, :func:`invert_contrast`: a contrast the
  training never saw as such; T1-like from Dixon water).
* Metrics (``pipeline.metrics``, VerSe definitions): identification rate, localisation error (mm),
  per-scan precision / recall, share of scans all-correct; reported per cohort and pooled, per variant.
  Precision and all-correct are given twice: strict (every prediction without a ground-truth match is
  false) and "annotated run", where a prediction beyond the ground truth's run of levels and more than
  20 mm from every annotated centroid is not scored (``identification(score_beyond_annotation=False)``):
  myosegmentum annotates L1-L5 while T12 (often T11) is in view, and the FOV crops leave partly
  visible vertebrae without a centroid, so a correct T12 there is not an error. A per-level table
  (identified / ground-truth vertebrae of each level, original scans) shows which levels a run misses.
* With ``--set ema_decay=...`` (weight averaging) the trained model is the average, and the same run's last
  raw weights are scored too (method ``spinepipe_stage1_raw``): a paired comparison on one training run.
* ``--members N``: each fold trains an ensemble of N seeds (``train.train_stage1_ensemble``: side by side
  on a CPU, one process and ``cpu_count // N`` threads each) and scores the ensemble (maps averaged);
  the fold's training time is the ensemble's wall time. ``--pretrained A,B`` scores an ensemble of
  models trained elsewhere.
* ``--nnunet``: nnU-Net v2 out of the box (3d_fullres vertebra-level semantic segmentation trained from the
  *expert masks*, i.e. more supervision than our points), via ``bench/nnunet_reference.py``: for each budget
  in ``--nnunet-budgets`` ("same" = the wall-clock our model took in that fold; or seconds) a speed probe
  picks the longest shipped training-length variant that fits, the run is stopped at the deadline and
  its newest complete checkpoint used; predicted with nnU-Net's defaults on the same test variants;
  centroid of the largest component of each predicted label = its vertebra. Heavy: meant for a GPU.

Results are written as they come to ``bench/results/stage1.json`` and ``stage1.md`` (never by hand).

Smoke run: ``python bench/bench_stage1.py --folds 1 --epochs 2 --quick``.

Folds can run as separate processes (``--fold-ids 0,1`` and ``--fold-ids 2,3,4`` with their own
``--name``) and be joined afterwards: ``--merge a.json b.json --name stage1`` rewrites the joined
tables from the per-scan records (no model is run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overrides import override_config  # noqa: E402
from data_prep import checkpoint  # noqa: E402
from data_prep.dataset import discover  # noqa: E402
from data_prep.io import read_image, read_labelmap, write_csv, write_image, write_text  # noqa: E402
from data_prep.scan import (Scan, anatomical_rank, centroids_from_labelmap, level_id, level_name, reorient,  # noqa: E402
                            resample_to_spacing)
from pipeline.metrics import ScanIdentification, identification, summarize_identification  # noqa: E402
from stage1_localize.config import Stage1Config  # noqa: E402
from stage1_localize.infer import Localizer, model_folders  # noqa: E402
from stage1_localize.labelling import AMBIGUOUS_FLAG, COMPLETION_FLAGS, TRANSITIONAL_FLAG  # noqa: E402
from stage1_localize.train import train_stage1, train_stage1_ensemble  # noqa: E402

log = logging.getLogger("bench_stage1")
T_START = time.time()
COHORTS = ("myosegmentum", "chu2015")
VARIANTS = ("original", "aniso", "fov_top", "fov_bottom")
#: stress tests run only when named in ``--variants`` (see the module docstring)
EXTRA_VARIANTS = ("inverted",)
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS
#: columns of the per-level identification table (levels outside it are still counted in the JSON)
LEVEL_COLUMNS = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")


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
        (folder / Path(c["image"]).name).symlink_to(Path(c["image"]).resolve())  # keeps the format suffix
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
        elif v == "inverted":
            yield v, invert_contrast(image), gt
        else:
            raise ValueError(f"unknown test variant {v!r}; expected one of {ALL_VARIANTS}")


def invert_contrast(image: Scan) -> Scan:
    """The scan with its foreground contrast inverted, geometry unchanged: intensities are mapped to [0, 1]
    between the 0.5th and 99.5th percentiles, voxels above 0.02 (the foreground, as in the training
    augmentation ``augment.p_invert``) become ``1 - x``, and the result is mapped back to the original range.
    On a Dixon-water image this gives bright marrow and fat with dark discs and CSF (T1-like); on a T2-TSE
    image a contrast no scanner makes. A stress test for an unseen contrast, not a T1 simulation."""
    x = np.asarray(image.array, np.float32)
    lo, hi = (float(q) for q in np.percentile(x, [0.5, 99.5]))
    if not hi > lo:
        raise ValueError(f"{image.name}: constant image, nothing to invert")
    y = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    y = np.where(y > 0.02, 1.0 - y, y)
    return image.with_array((lo + y * (hi - lo)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# Results
NAMING_FLAGS = (AMBIGUOUS_FLAG, TRANSITIONAL_FLAG)


# ---------------------------------------------------------------------------------------------------
def naming_flag_summary(items: list[dict], scans: list[ScanIdentification]) -> dict:
    """How well the naming flags warn: how many wrong scans carry a flag, and how many all-correct scans
    do (false alarms); right / wrong is ``ScanIdentification.all_correct`` of ``scans`` (one per record of
    ``items``, scored by the annotated-run rule)."""
    right = [bool(sc.all_correct) for sc in scans]
    flagged = [bool(r["naming_flagged"]) for r in items]
    return {"n_wrong_scans": right.count(False), "wrong_flagged": sum(f and not ok for f, ok in zip(flagged, right)),
            "n_right_scans": right.count(True), "right_flagged": sum(f and ok for f, ok in zip(flagged, right))}


def identification_by_level(items: list[dict]) -> dict[str, dict]:
    """Per ground-truth level name: ``{"n_gt", "identified", "id_rate"}`` over the records ``items``
    (head to foot). Shows *which* levels a run misses, e.g. chu2015's T11 / T12 above the levels every
    cohort annotates."""
    n: dict[int, int] = {}
    hit: dict[int, int] = {}
    for r in items:
        gt_ids = [level_id(name) for name in r["gt_levels"]]
        found = {int(v) for v in r["identified"]}
        for v in gt_ids:
            n[v] = n.get(v, 0) + 1
            hit[v] = hit.get(v, 0) + int(v in found)
    return {level_name(v): {"n_gt": n[v], "identified": hit[v], "id_rate": hit[v] / n[v]}
            for v in sorted(n, key=anatomical_rank)}


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
            for v in ALL_VARIANTS:
                rs = [r for r in self.records if r["method"] == m and r["variant"] == v]
                if not rs:
                    continue
                groups = {"pooled": rs, **{c: [r for r in rs if r["cohort"] == c] for c in COHORTS}}
                for g, items in groups.items():
                    if items:
                        errs = [{int(k): e for k, e in r["errors_mm"].items()} for r in items]
                        scans = [ScanIdentification(r["n_gt"], r["n_pred"], r["identified"], e)
                                 for r, e in zip(items, errs)]
                        summ = summarize_identification(scans)
                        if all("n_unscored" in r for r in items):  # the annotated-run variant of the scoring
                            lenient_scans = [ScanIdentification(r["n_gt"], r["n_pred"] - r["n_unscored"],
                                                                r["identified"], e, r["n_unscored"])
                                             for r, e in zip(items, errs)]
                            lenient = summarize_identification(lenient_scans)
                            summ.update({"precision_annotated_run": lenient["precision"],
                                         "all_correct_annotated_run": lenient["all_correct"],
                                         "n_unscored": lenient["n_unscored"]})
                            if all(r.get("naming_flagged") is not None for r in items):
                                summ.update(naming_flag_summary(items, lenient_scans))
                        summ["by_level"] = identification_by_level(items)
                        added = [(v, r) for r in items for v in r.get("completed", [])]
                        summ["completed"] = {"n": len(added),
                                             "identified": sum(v in r["identified"] for v, r in added)}
                        out.setdefault(m, {}).setdefault(v, {})[g] = summ
        return out

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        summ = self.summary()
        doc = {"meta": self.meta, "folds": self.folds, "summary": summ, "scans": self.records}
        write_text(json.dumps(doc, indent=1, default=float) + "\n", self.out_dir / f"{self.meta.get('name', 'stage1')}.json")
        lines = ["# Stage 1 benchmark: vertebra localisation and naming (points-only training)", "",
                 f"Generated by `bench/bench_stage1.py` on {self.meta['date']} (device: {self.meta.get('device_name', self.meta.get('device'))}, "
                 f"data: `{self.meta.get('data')}`); {self.meta['note']}", "",
                 *([f"Models evaluated without training: `{self.meta['pretrained']}`."] if self.meta.get("pretrained") else []),
                 *(["Joined from separate runs (`--merge`):", "",
                    *[f"- `{r['file']}` (fold{'s' if len(r['folds']) > 1 else ''} {', '.join(map(str, r['folds']))}; {r['date']}): "
                      + (f"models `{r['pretrained']}` evaluated without training" if r.get("pretrained") else
                         "trained in that run" + (f", {r['members']} members each" if (r.get("members") or 1) > 1 else ""))
                      for r in self.meta["merged_runs"]], ""] if self.meta.get("merged_runs") else []),
                 *([f"Decoding overrides of the saved configs: `{' '.join(self.meta['decode'])}`.", ""]
                   if self.meta.get("decode") else ([""] if self.meta.get("pretrained") else [])),
                 f"Folds run: {len({f['fold'] for f in self.folds})} of {self.meta['k']} (grouped by subject, stratified by cohort). "
                 "Metrics follow VerSe: id rate = identified / ground-truth vertebrae (20 mm, closest-GT rule); "
                 "error = mean centroid distance over labels present in both. Precision and all-correct: strict "
                 "(any prediction without a ground-truth match is false) / annotated run (predictions beyond the "
                 "annotated run of levels and > 20 mm from every annotated centroid, e.g. a visible T12 above "
                 "myosegmentum's L1-L5 masks, are not scored; their count is 'unscored').", "",
                 "| method | variant | cohort | scans | GT vertebrae | id rate | mean err (mm) | median err (mm) "
                 "| precision strict / annotated run | recall | all-correct strict / annotated run | unscored |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, per_v in summ.items():
            for v, per_c in per_v.items():
                for c, s in per_c.items():
                    lines.append(f"| {m} | {v} | {c} | {s['n_scans']} | {s['n_gt']} | {s['id_rate']:.3f} | "
                                 f"{s['mean_error_mm']:.1f} | {s['median_error_mm']:.1f} | {s['precision']:.3f} / "
                                 f"{s.get('precision_annotated_run', float('nan')):.3f} | {s['recall']:.3f} | "
                                 f"{s['all_correct']:.3f} / {s.get('all_correct_annotated_run', float('nan')):.3f} | "
                                 f"{s.get('n_unscored', '-')} |")
        level_rows = [(m, c, s["by_level"]) for m, per_v in summ.items() for v, per_c in per_v.items()
                      for c, s in per_c.items() if v == "original" and c != "pooled" and s.get("by_level")]
        if level_rows:
            lines += ["", "Identification rate by ground-truth level (original scans): identified / ground-truth "
                      "vertebrae of that level.", "",
                      "| method | cohort | " + " | ".join(LEVEL_COLUMNS) + " |",
                      "|---|---|" + "---|" * len(LEVEL_COLUMNS)]
            for m, c, by in level_rows:
                cells = [f"{by[lv]['identified']} / {by[lv]['n_gt']}" if lv in by else "-" for lv in LEVEL_COLUMNS]
                lines.append(f"| {m} | {c} | " + " | ".join(cells) + " |")
        flag_rows = [(m, v, c, s) for m, per_v in summ.items() for v, per_c in per_v.items()
                     for c, s in per_c.items() if "wrong_flagged" in s]
        if flag_rows:
            lines += ["", "Naming flags (`level_ambiguous` / `transitional?` on any vertebra of the scan): how many "
                      "wrongly named scans (annotated-run rule) carry one, and how many all-correct scans do "
                      "(false alarms).", "",
                      "| method | variant | cohort | wrong scans flagged | all-correct scans flagged |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {v} | {c} | {s['wrong_flagged']} / {s['n_wrong_scans']} | "
                      f"{s['right_flagged']} / {s['n_right_scans']} |" for m, v, c, s in flag_rows]
        done_rows = [(m, v, c, s["completed"]) for m, per_v in summ.items() for v, per_c in per_v.items()
                     for c, s in per_c.items() if s.get("completed", {}).get("n")]
        if done_rows:
            lines += ["", "Run completion (`labelling.fill_gaps` / `extend_ends`): predictions flagged `interpolated` "
                      "or `extrapolated`, and how many of them are identified (the rest are wrong or lie beyond the "
                      "annotated run, e.g. a T12 above myosegmentum's L1).", "",
                      "| method | variant | cohort | added | identified |", "|---|---|---|---|---|"]
            lines += [f"| {m} | {v} | {c} | {d['n']} | {d['identified']} |" for m, v, c, d in done_rows]
        lines += ["", "| fold | method | train scans | train wall-clock (s) | mean inference (s/scan) | notes |",
                  "|---|---|---|---|---|---|"]
        for f in self.folds:
            notes = ""
            if "trainer" in f:  # nnU-Net runs
                notes = (f"budget {f['budget_s']:.0f} s, {f.get('trainer')}, {f.get('epochs_done')} epoch(s) done, "
                         f"checkpoint {f.get('checkpoint')}")
                if f.get("estimated_sec_per_epoch"):
                    notes += f", ~{f['estimated_sec_per_epoch']:.0f} s/epoch"
                if not f.get("trained"):
                    notes += f"; NO MODEL: {str(f.get('reason', '')).splitlines()[0] if f.get('reason') else ''}"
            lines.append(f"| {f['fold']} | {f['method']} | {f['n_train']} | {f['train_seconds']:.0f} | "
                         f"{f.get('infer_seconds', float('nan')):.2f} | {notes} |")
        write_text("\n".join(lines) + "\n", self.out_dir / f"{self.meta.get('name', 'stage1')}.md")


def _with_defaults(config, defaults: dict):
    """``config`` (a saved config dict) with the keys it lacks taken from ``defaults``, recursively.

    A field added after a run was saved is read at today's default, as checkpoints load; if that default
    is not what the older code did (a default changed since), two runs of one protocol can be refused:
    a safe, visible error, never a silent mix."""
    if not isinstance(config, dict):
        return config
    out = {k: _with_defaults(v, defaults.get(k, {}) if isinstance(defaults, dict) else {}) for k, v in config.items()}
    if isinstance(defaults, dict):
        for k, v in defaults.items():
            out.setdefault(k, json.loads(json.dumps(v)))  # tuples -> lists, as in the saved JSON
    return out


def merge_results(files: list[Path], out_dir: Path, name: str) -> int:
    """Join result files of separate fold runs (same protocol) into ``<out_dir>/<name>.json/.md``."""
    docs = []
    for f in files:
        try:
            docs.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: {f}: not a readable stage-1 result file ({exc})", file=sys.stderr)
            return 2
    meta = dict(docs[0]["meta"], name=name, merged_from=[str(f) for f in files])
    # each part's own date and models (the first part's alone would head the joined table)
    meta.pop("pretrained", None)
    meta["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta["merged_runs"] = [{"file": Path(f).name, "date": d["meta"].get("date"), "pretrained": d["meta"].get("pretrained"),
                            "members": d["meta"].get("members"), "folds": sorted({fo["fold"] for fo in d["folds"]})}
                           for f, d in zip(files, docs)]
    defaults = dataclasses.asdict(Stage1Config())
    for f, d in zip(files, docs):
        for key in ("k", "seed", "config", "decode"):
            mine, first = d["meta"].get(key), meta.get(key)
            if key == "decode":  # runs from before the field existed decoded with the saved configs
                mine, first = mine or [], first or []
            if key == "config":  # a field added since one of the runs counts as its default (as checkpoints load)
                mine, first = _with_defaults(mine, defaults), _with_defaults(first, defaults)
            if mine != first:
                print(f"error: {f}: its {key!r} differs from {files[0]}'s; only runs of one protocol can be merged",
                      file=sys.stderr)
                return 2
    meta["fold_ids"] = sorted({fo["fold"] for d in docs for fo in d["folds"]})
    results = Results(out_dir, meta)
    for d in docs:
        results.records += d["scans"]
        results.folds += d["folds"]
    results.folds.sort(key=lambda fo: (fo["fold"], fo["method"]))
    results.write()
    return 0


def export_raw_weights(model_dir: Path, out_dir: Path) -> Path | None:
    """When ``model_dir`` holds a weight average (``ema_decay`` > 0) and its ``train_state.pt``: write the
    run's last raw weights as a model folder ``out_dir`` (same config) and return it; else None."""
    _, cfg, extra = checkpoint.load_model(model_dir, Stage1Config, kind="stage1")
    state = checkpoint.load_train_state(model_dir)
    if extra.get("weights") != "ema" or state is None:
        return None
    checkpoint.save_model(out_dir, state["model"], cfg, kind="stage1", extra={**extra, "weights": "raw"})
    return out_dir


def record(method, fold, case, variant, pred, gt, seconds, naming_flagged: bool | None = None,
           completed: list[int] | None = None) -> dict:
    """One scan's result; ``naming_flagged``: did any named vertebra carry a naming flag (level_ambiguous /
    transitional?), None for methods without flags (nnU-Net); ``completed``: VerSe ids of the predictions
    added by run completion (flags interpolated / extrapolated)."""
    r = identification(pred, gt)
    lenient = identification(pred, gt, score_beyond_annotation=False)
    return {"method": method, "fold": fold, "id": case["id"], "cohort": case["cohort"], "variant": variant,
            "naming_flagged": naming_flagged, "completed": [int(v) for v in (completed or [])],
            "n_gt": r.n_gt, "n_pred": r.n_pred, "n_unscored": lenient.n_unscored, "identified": r.identified,
            "pred_world_mm": {str(k): [round(float(c), 2) for c in np.asarray(p).reshape(3)] for k, p in pred.items()},
            "errors_mm": {str(k): v for k, v in r.errors_mm.items()},
            "pred_levels": [level_name(k) for k in sorted(pred)], "gt_levels": [level_name(k) for k in sorted(gt)],
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------------
# nnU-Net out of the box (same points-only data, same wall-clock)
# ---------------------------------------------------------------------------------------------------
def run_nnunet(fold: int, train: list[dict], test_items: list[tuple[dict, str, Scan, dict]], work: Path,
               budgets: list[tuple[str, float]], device: str, results: Results,
               deadline: float | None = None, predict_reserve_s: float = 100.0) -> None:
    """nnU-Net v2 out of the box on this fold, through ``bench/nnunet_reference.py`` (its own CLIs, unmodified):
    vertebra-level semantic segmentation trained from the *expert masks* of the training subjects, one
    training run per ``(tag, budget_s)`` (shipped training-length variant chosen by a speed probe so that
    nnU-Net's learning-rate schedule ends within the budget; killed at the deadline otherwise), predictions
    with its defaults (mirroring TTA, step 0.5) on the same test variants; centroid of the largest component of
    each predicted label = that vertebra. ``deadline`` (``time.time()`` seconds): a budget is cut so that
    training plus ``predict_reserve_s`` of prediction end before it (the cut is recorded), or skipped when
    under 30 s would be left."""
    from bench import nnunet_reference as nnref

    work = work / "nnunet"
    work.mkdir(parents=True, exist_ok=True)
    src = work / "masks_all"  # the training subjects of both cohorts, images + expert masks
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for c in train:
        for key in ("image", "vertebrae"):
            p = Path(c[key]).resolve()
            (src / p.name).symlink_to(p)
    dataset_id = 500 + fold
    ids = [c["id"] for c in train]
    t0 = time.perf_counter()
    nnref.prepare(src, ids, work, dataset_id, f"Stage1Masks{fold}", num_processes=min(8, os.cpu_count() or 1),
                  nice=0, overwrite=True)
    prep_s = time.perf_counter() - t0
    # nnU-Net needs a validation split (checkpoint_best selection): a few *training* subjects, never test ones
    split = {"train": ids, "val": ids[:: max(1, len(ids) // 4)][:4]}
    test_dir = work / "test_variants"
    shutil.rmtree(test_dir, ignore_errors=True)
    test_dir.mkdir()
    scan_paths = {}
    for n, (case, variant, scan, gt) in enumerate(test_items):
        key = f"case{n:04d}"
        scan_paths[key] = write_image(scan, test_dir / f"{key}.nii.gz")
    for tag, asked_s in budgets:
        method = f"nnunet_3d_fullres[{tag}]"
        budget_s = asked_s
        if deadline is not None:
            budget_s = min(asked_s, deadline - time.time() - predict_reserve_s)
            if budget_s < 30:
                log.warning("nnU-Net [%s]: skipped, only %.0f s left before the deadline", tag, budget_s)
                results.folds.append({"fold": fold, "method": method, "n_train": len(ids),
                                      "train_seconds": 0.0, "budget_s": asked_s, "trained": False, "trainer": None,
                                      "reason": "skipped: no time left before the run's deadline"})
                results.write()
                continue
        n_proc = None if device != "cpu" else 1  # nnU-Net's own default number of augmentation workers on a GPU box
        rec = nnref.train_with_budget(work, dataset_id, split, budget_s, n_proc_da=n_proc, nice=0, device=device,
                                      run_if_not_expected_to_fit=(tag != "same"))
        fold_rec = {"fold": fold, "method": method, "n_train": len(ids), "train_seconds": rec.get("seconds", budget_s),
                    "budget_s": budget_s, "budget_asked_s": asked_s, "plan_and_preprocess_s": round(prep_s, 1),
                    **{k: rec.get(k) for k in ("trained", "reason", "trainer", "epochs_planned", "epochs_done",
                                               "checkpoint", "checkpoint_epoch", "mean_epoch_s", "how_it_ended")}}
        if "probe" in rec:
            fold_rec["probe_sec_per_iter"] = rec["probe"].get("sec_per_iter")
            fold_rec["probe_startup_s"] = rec["probe"].get("startup_s")
            fold_rec["estimated_sec_per_epoch"] = rec.get("estimated_sec_per_epoch")
        results.folds.append(fold_rec)
        results.write()
        if not rec.get("trained"):
            log.warning("nnU-Net [%s] produced no model within %.0f s: %s", tag, budget_s, rec.get("reason"))
            continue
        pred = nnref.predict(work, dataset_id, rec["fold"], scan_paths, work / f"pred_{tag}", trainer=rec["trainer"],
                             checkpoint=rec["checkpoint"], separate_calls=False, nice=0, device=device)
        fold_rec["infer_seconds"] = pred["mean_seconds_per_scan"]
        for key, (case, variant, scan, gt) in zip(scan_paths, test_items):
            cents = {int(k): np.asarray(v, float) for k, v in pred["centroids"].get(key, {}).items()}
            results.add(record(method, fold, case, variant, cents, gt, pred["seconds_per_scan"][key]))
        results.write()


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--cohorts", default=",".join(COHORTS))
    ap.add_argument("--k", type=int, default=5, help="number of CV splits")
    ap.add_argument("--folds", type=int, default=None, help="run only the first N folds")
    ap.add_argument("--epochs", type=int, default=None, help="default: Stage1Config.epochs")
    ap.add_argument("--steps", type=int, default=None, help="steps per epoch (default: Stage1Config.steps_per_epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--members", type=int, default=1,
                    help="train an ensemble of this many seeds per fold (train_stage1_ensemble: side by side on a "
                         "CPU, one process each); the fold's training time is the ensemble's wall time")
    ap.add_argument("--quick", action="store_true", help="smoke run: few scans, few steps, two variants")
    ap.add_argument("--nnunet", action="store_true", help="also run nnU-Net v2 out of the box (heavy)")
    ap.add_argument("--nnunet-budgets", default="same",
                    help="comma list of nnU-Net training budgets: 'same' (= our fold's training wall-clock) "
                         "and/or seconds, e.g. 'same,240'")
    ap.add_argument("--device", default=None)
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="nnU-Net budgets are cut so that the whole run ends within this many seconds of its start")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a Stage1Config field (dotted for nested, JSON values), e.g. plan.base_features=16")
    ap.add_argument("--pretrained", type=Path, default=None,
                    help="skip training: evaluate this stage-1 model folder ('{fold}' is replaced by the fold index); "
                         "a comma list of folders evaluates their ensemble (maps averaged, see Localizer)")
    ap.add_argument("--decode", action="append", default=[], metavar="KEY=VALUE",
                    help="override a decoding field of the loaded model's config (e.g. peak_threshold=0.1)")
    ap.add_argument("--variants", default=None,
                    help=f"comma list of test variants (default: {','.join(VARIANTS)}; also: {','.join(EXTRA_VARIANTS)})")
    ap.add_argument("--fold-ids", default=None, help="comma list of fold indices to run (default: all / --folds)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="join the per-scan records of these result files into --name (runs no model)")
    ap.add_argument("--name", default="stage1", help="result file stem under --out (stage1 -> stage1.json, stage1.md)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "work_dirs" / "bench_stage1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.merge:
        return merge_results(args.merge, args.out, args.name)
    which = VARIANTS
    if args.variants:
        which = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        if not which or any(v not in ALL_VARIANTS for v in which):
            print(f"error: --variants {args.variants}: expected a comma list of {', '.join(ALL_VARIANTS)}",
                  file=sys.stderr)
            return 2
    if args.members < 1:
        print(f"error: --members {args.members}: expected >= 1", file=sys.stderr)
        return 2
    if not (args.data / "myosegmentum").is_dir():
        print(f"error: {args.data}: real data not available (expected myosegmentum/ and chu2015/)", file=sys.stderr)
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{os.cpu_count()}"
    cases = list_cases(args.data, [c for c in args.cohorts.split(",") if c])
    fold_of = make_folds(cases, args.k, args.seed)
    cfg = Stage1Config(seed=args.seed)
    if args.epochs:
        cfg = dataclasses.replace(cfg, epochs=args.epochs)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps_per_epoch=args.steps)
    if args.set:
        cfg = override_config(cfg, args.set)
    if args.quick:
        cfg = dataclasses.replace(cfg, epochs=min(cfg.epochs, 2), steps_per_epoch=5)
        which = which if args.variants else ("original", "fov_top")
    note = ("SMOKE RUN (--quick): numbers are not results." if args.quick else
            "real data, points-only training (mask centroids), no lesions inserted.")
    results = Results(args.out, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "k": args.k,
                                 "seed": args.seed, "device": device, "quick": args.quick, "note": note,
                                 "config": dataclasses.asdict(cfg), "n_cases": len(cases),
                                 "name": args.name, "data": str(args.data), "members": args.members,
                                 "device_name": device_name, "decode": list(args.decode),
                                 "pretrained": None if args.pretrained is None else str(args.pretrained)})
    n_folds = min(args.k, args.folds or args.k)
    fold_ids = [int(f) for f in args.fold_ids.split(",")] if args.fold_ids else list(range(n_folds))
    if any(not 0 <= f < args.k for f in fold_ids):
        print(f"error: --fold-ids {args.fold_ids}: expected indices in 0..{args.k - 1}", file=sys.stderr)
        return 2
    results.meta["fold_ids"] = fold_ids
    for fold in fold_ids:
        train = [c for c, f in zip(cases, fold_of) if f != fold]
        test = [c for c, f in zip(cases, fold_of) if f == fold]
        if args.quick:  # a few of each cohort
            train = [c for co in COHORTS for c in [x for x in train if x["cohort"] == co][:4]]
            test = [c for co in COHORTS for c in [x for x in test if x["cohort"] == co][:2]]
        fold_dir = args.work / f"fold{fold}"
        t0 = time.perf_counter()
        if args.pretrained is not None:  # evaluate a model trained elsewhere on this fold (no training here)
            model_dirs, train_s = [Path(p.format(fold=fold)) for p in str(args.pretrained).split(",")], float("nan")
        else:
            # one points-only folder per cohort: stage 1 samples the folders equally often (balance_groups)
            cohort_dirs = [write_points_only([c for c in train if c["cohort"] == co], fold_dir / f"train_points_{co}")
                           for co in COHORTS if any(c["cohort"] == co for c in train)]
            t0 = time.perf_counter()
            if args.members > 1:
                model_dirs = model_folders(train_stage1_ensemble(cohort_dirs, fold_dir / "ensemble", cfg,
                                                                 members=args.members))
            else:
                model_dirs = [train_stage1(cohort_dirs, fold_dir / "model", cfg)]
            train_s = time.perf_counter() - t0
        # a weight-averaged model (ema_decay > 0) is also scored with the last raw weights of the same run
        # (method spinepipe_stage1_raw): a paired comparison, free of run-to-run variation
        models = [("spinepipe_stage1", model_dirs)]  # several folders: their ensemble
        raw_dir = export_raw_weights(model_dirs[0], fold_dir / "model_raw") if len(model_dirs) == 1 else None
        if raw_dir is not None:
            models.append(("spinepipe_stage1_raw", raw_dir))
        test_items = []
        for method, mdir in models:
            loc = Localizer(mdir, device=device)
            if args.decode:  # decoding-only overrides of the saved config (peak threshold, labelling costs ...)
                loc.config = override_config(loc.config, args.decode)
            infer_s = []
            for case in test:
                image = read_image(case["image"])
                gt = gt_centroids(case, image)
                for variant, scan, g in variants(image, gt, which):
                    t1 = time.perf_counter()
                    verts = loc.localize(scan)
                    dt = time.perf_counter() - t1
                    infer_s.append(dt)
                    flagged = any(f in NAMING_FLAGS for v in verts for f in v.flags)
                    completed = [v.label for v in verts if COMPLETION_FLAGS & set(v.flags)]
                    results.add(record(method, fold, case, variant,
                                       {v.label: v.centroid_world for v in verts}, g, dt, naming_flagged=flagged,
                                       completed=completed))
                    if method == "spinepipe_stage1":
                        test_items.append((case, variant, scan, g))
            results.folds.append({"fold": fold, "method": method, "n_train": len(train), "train_seconds": train_s,
                                  "infer_seconds": float(np.mean(infer_s)) if infer_s else float("nan")})
            results.write()
        if args.nnunet:
            budgets = [("same", train_s) if b.strip() == "same" else (f"{float(b):.0f}s", float(b))
                       for b in args.nnunet_budgets.split(",") if b.strip()]
            run_nnunet(fold, train, test_items, fold_dir, budgets, device, results,
                       deadline=(T_START + args.deadline_s) if args.deadline_s else None)
        log.info("fold %d done: %s", fold, json.dumps(results.summary().get("spinepipe_stage1", {}).get("original", {}).get("pooled", {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
