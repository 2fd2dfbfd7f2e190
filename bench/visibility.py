"""Stage 2 against lesion visibility (semi-synthetic): which inserted lesions can a model see at all?

Every lesion row of the simulator's table carries its measured ``cnr``: (mean intensity over the lesion's
voxels on the copy - the vertebra's marrow median) / the marrow's robust standard deviation (1.4826 x MAD),
both from the unmodified body. On a smooth marrow (chu2015, T2) most drawn ratios give CNR 2-12; on a
heterogeneous one (myosegmentum, Dixon water) many give CNR < 1: faint against the marrow's own variation,
yet labelled as lesions. This benchmark
classifies the held-out half of each real cohort (second half by name, seed ``--test-seed``, default
simulator) **and the same real scans without lesions**, and reports per model and cohort

* per-class AUC (one-vs-rest) on the copies, as the other benchmarks;
* detection AUC (p(lesion) = 1 - p(normal), lesion vertebrae of one ``|cnr|`` bin vs all normal vertebrae
  of the cohort) and the paired change: p(lesion) on the copy minus p(lesion) on the same vertebra of the
  unmodified scan (median over the bin's lesion vertebrae); a lesion the model does not see leaves it ~0;
* on the unmodified scans, the mean p(lesion) of every vertebra (real vertebrae with no inserted lesion:
  the false-alarm level on real anatomy).

    python bench/visibility.py [--model NAME=DIR ...] [--train NAME=MIN_CNR[:EPOCHS[:SEED]] ...] [--work DIR]
        -> bench/results/visibility.json + .md

``--model`` scores a model trained on the first halves only (e.g. ``bench/lesion_families.py``'s ``corner80``);
``--train NAME=MIN_CNR[:EPOCHS[:SEED]]`` trains one (default configuration, ``EPOCHS`` else 80, training seed
``SEED`` else 0) on seed-0 first-half copies drawn with ``LesionConfig(min_cnr=MIN_CNR)`` (``none``: the default
simulator), cached under ``--work``; ``--set NAME:KEY=VALUE`` changes that model's ``Stage2Config``
(e.g. ``--set wide:patch.size_mm=[64,64,64]``). ``--include FILE:MODEL[,MODEL...]`` adds the predictions of
models scored before, from an earlier results JSON of the same ``--test-seed`` (the committed ``visibility.json``
holds the two default models), so a new variant is tabled beside them without re-training them.
Each vertebra is classified around its expert centroid with the region the seg head predicts, without
attributions; with ``--evidence`` also with the Integrated Gradients ``spinepipe predict`` runs, on the copies
(share of |IG| inside the body the seg head found and inside the expert body). Every number here is
**semi-synthetic**.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.lesion_families import _model_arg, score_rows  # noqa: E402
from bench.mdtable import md_table  # noqa: E402
from bench.realdata import (COHORTS, classify_at_expert_centroids, cohort_halves,  # noqa: E402
                            evidence_at_expert_centroids, quiet_logging, real_data_missing, semisynthetic_copies,
                            train_on_first_halves, write_predictions_json)
from data_prep.io import write_text  # noqa: E402

#: ``|cnr|`` bins (lower edges inclusive) of the visibility table.
CNR_BINS = (0.0, 1.0, 2.0, 4.0, np.inf)


def _bin_label(lo: float, hi: float) -> str:
    return f"[{lo:g}, {'inf' if np.isinf(hi) else f'{hi:g}'})"


def visibility_rows(preds: list[dict], bins=CNR_BINS) -> list[dict]:
    """Per (model, cohort and pooled, ``|cnr|`` bin): detection AUC and paired change, see the module doc.

    ``preds``: dicts with ``model, cohort, truth`` (class index, 0 = normal), ``cnr`` (``None`` for a normal
    vertebra), ``p`` (probabilities on the copy, class 0 first) and ``p_clean`` (on the unmodified scan).
    One ``normal`` row per (model, cohort) gives the normals' mean p(lesion) on the copies and on the
    unmodified scans. AUC is ``None`` where a bin has no lesion vertebra or the cohort no normal one.
    """
    from bench.bench_stage2 import _detection_auc

    rows = []
    for model in dict.fromkeys(r["model"] for r in preds):
        for cohort in (*dict.fromkeys(r["cohort"] for r in preds), "pooled"):
            sel = [r for r in preds if r["model"] == model and cohort in ("pooled", r["cohort"])]
            normal = [r for r in sel if r["truth"] == 0]
            pl_n = np.array([1.0 - r["p"][0] for r in normal])
            rows.append({"model": model, "cohort": cohort, "cnr": "normal", "n": len(normal),
                         "mean_p_lesion": round(float(pl_n.mean()), 3) if normal else None,
                         "mean_p_lesion_clean": round(float(np.mean([1.0 - r["p_clean"][0] for r in sel])), 3)
                         if sel else None, "detection_auc": None, "median_paired_change": None})
            for lo, hi in zip(bins[:-1], bins[1:]):
                les = [r for r in sel if r["truth"] > 0 and r["cnr"] is not None and lo <= abs(r["cnr"]) < hi]
                pl = np.array([1.0 - r["p"][0] for r in les])
                change = np.array([r["p_clean"][0] - r["p"][0] for r in les])  # p_lesion(copy) - p_lesion(clean)
                rows.append({"model": model, "cohort": cohort, "cnr": _bin_label(lo, hi), "n": len(les),
                             "mean_p_lesion": round(float(pl.mean()), 3) if les else None,
                             "mean_p_lesion_clean": None, "detection_auc": _detection_auc(list(pl), list(pl_n)),
                             "median_paired_change": round(float(np.median(change)), 3) if les else None})
    return rows


def evidence_rows(preds: list[dict], thresholds: dict[str, float]) -> list[dict]:
    """Per (model, cohort and pooled), over the predictions that carry evidence (``--evidence``): mean and 10th
    percentile of the share of |IG| inside the seg head's body and inside the expert body, and the share of
    vertebrae under the model's evidence threshold (``thresholds[model]``; the default for a model included from
    an earlier file) on the former (flagged ``evidence_outside_body``)."""
    from stage2_classify.config import Stage2Config

    default = Stage2Config().evidence_threshold
    rows = []
    have = [r for r in preds if r.get("evidence_inside") is not None]
    for model in dict.fromkeys(r["model"] for r in have):
        for cohort in (*dict.fromkeys(r["cohort"] for r in have), "pooled"):
            sel = [r for r in have if r["model"] == model and cohort in ("pooled", r["cohort"])]
            own = np.array([r["evidence_inside"] for r in sel])
            exp = np.array([r["evidence_inside_expert"] for r in sel])
            rows.append({"model": model, "cohort": cohort, "n": len(sel),
                         "inside_mean": round(float(own.mean()), 3),
                         "inside_p10": round(float(np.percentile(own, 10)), 3),
                         "inside_expert_mean": round(float(exp.mean()), 3),
                         "inside_expert_p10": round(float(np.percentile(exp, 10)), 3),
                         "flagged": round(float(np.mean(own < thresholds.get(model, default))), 3)})
    return rows


def config_changes(cfg, default=None) -> list[str]:
    """``KEY=VALUE`` (dotted keys, ``--set`` syntax) for every field of the configuration dataclass ``cfg`` that
    differs from ``default`` (a fresh ``Stage2Config``): how a model given with ``--model`` was trained."""
    import json

    from data_prep.checkpoint import config_to_dict
    from stage2_classify.config import Stage2Config

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    have, base = flat(config_to_dict(cfg)), flat(config_to_dict(default or Stage2Config()))
    return [f"{k}={json.dumps(v)}" for k, v in have.items() if base.get(k) != v]


def _train_arg(text: str) -> tuple[str, float | None, int, int]:
    name, spec = _model_arg(text)
    value, _, rest = spec.partition(":")
    epochs, _, seed = rest.partition(":")
    try:
        cnr = None if value.lower() == "none" else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--train {name}: MIN_CNR must be a number or 'none', got {value!r}") from None
    if cnr is not None and not (np.isfinite(cnr) and cnr > 0):
        raise argparse.ArgumentTypeError(f"--train {name}: MIN_CNR must be positive, got {value!r}")
    if epochs and not (epochs.isdigit() and int(epochs) > 0):
        raise argparse.ArgumentTypeError(f"--train {name}: epochs must be a positive integer, got {epochs!r}")
    if seed and not seed.isdigit():
        raise argparse.ArgumentTypeError(f"--train {name}: the training seed must be a non-negative integer, "
                                         f"got {seed!r}")
    return name, cnr, int(epochs) if epochs else 80, int(seed) if seed else 0


def _set_arg(text: str) -> tuple[str, str]:
    name, sep, item = text.partition(":")
    if not sep or not name or "=" not in item:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE, got {text!r}")
    return name, item


def _overrides(sets: list[tuple[str, str]], trained: list[str], error) -> dict[str, list[str]]:
    """``{model name: [KEY=VALUE, ...]}`` of the ``--set`` options, each checked against ``Stage2Config``
    before anything is trained (``error``: the parser's, which exits)."""
    from bench.overrides import override_config
    from stage2_classify.config import Stage2Config

    out: dict[str, list[str]] = {}
    for name, item in sets:
        if name not in trained:
            error(f"--set {name}:{item}: no --train model named {name!r}")
        out.setdefault(name, []).append(item)
    for name, items in out.items():
        try:
            override_config(Stage2Config(), items).validate()
        except (SystemExit, ValueError) as e:
            error(f"--set {name}: {str(e).removeprefix('error: ')}")
    return out


def _include_arg(text: str) -> tuple[Path, list[str]]:
    path, sep, names = text.rpartition(":")
    models = [n for n in names.split(",") if n]
    if not sep or not path or not models:
        raise argparse.ArgumentTypeError(f"expected FILE:MODEL[,MODEL...], got {text!r}")
    return Path(path), models


def _included(path: Path, names: list[str], test_seed: int, error) -> list[dict]:
    """The predictions of models ``names`` in the results JSON ``path``, which must have been scored on the
    held-out copies of lesion seed ``test_seed`` (``error``: the parser's, which exits)."""
    import json

    try:
        res = json.loads(Path(path).read_text())
        seed, preds = res["meta"]["test_seed"], res["predictions"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        error(f"--include {path}: not a visibility results file ({e})")
    if seed != test_seed:
        error(f"--include {path}: scored on lesion seed {seed}, expected --test-seed {test_seed}")
    out = []
    for name in names:
        rows = [r for r in preds if r.get("model") == name]
        if not rows:
            error(f"--include {path}: no predictions of model {name!r} "
                  f"(it has {sorted({r.get('model') for r in preds})})")
        out += rows
    return out


def _truth_and_cnr(cls, cnr) -> tuple[int, float | None]:
    """A lesion-table row's class and ``cnr`` as prediction rows carry them (``cnr`` rounded, ``None`` for a
    normal vertebra): one rule for the rows written and for the check of included ones."""
    cls = int(cls)
    return cls, round(float(cnr), 3) if cls > 0 else None


def _stale_included(included: list[dict], tables: dict) -> str | None:
    """The first included prediction (``"model subject level"``) whose class or ``cnr`` is not the one in the
    held-out copies' lesion tables ``{cohort: DataFrame}``, else ``None``: included predictions are only
    comparable when they were made on the very same copies."""
    truth = {}
    for c, t in tables.items():
        for sid, level, cls, cnr in zip(t["id"], t["level"], t["class"], t["cnr"]):
            truth[(c, sid, level)] = _truth_and_cnr(cls, cnr)
    for r in included:
        if truth.get((r["cohort"], r["subject"], r["level"])) != (r["truth"], r["cnr"]):
            return f"{r['model']} {r['subject']} {r['level']}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=_model_arg, action="append", default=[], help="NAME=DIR, trained on first halves")
    ap.add_argument("--train", type=_train_arg, action="append", default=[],
                    help="NAME=MIN_CNR[:EPOCHS[:SEED]]: train on first-half copies with LesionConfig(min_cnr=MIN_CNR)")
    ap.add_argument("--set", dest="sets", type=_set_arg, action="append", default=[],
                    help="NAME:KEY=VALUE: a Stage2Config override of the --train model NAME")
    ap.add_argument("--include", type=_include_arg, action="append", default=[],
                    help="FILE:MODEL[,MODEL...]: predictions of these models from an earlier results JSON")
    ap.add_argument("--test-seed", type=int, default=1, help="lesion seed of the held-out copies (training copies: 0)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_visibility"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="visibility")
    ap.add_argument("--evidence", action="store_true",
                    help="also Integrated Gradients on every copy's vertebrae (as predict runs them): the share of "
                         "|IG| inside the body the seg head found and inside the expert body")
    args = ap.parse_args(argv)
    if not args.model and not args.train:
        ap.error("give at least one --model or --train")
    if args.test_seed == 0:
        ap.error("--test-seed 0 is the training copies' seed")
    overrides = _overrides(args.sets, [n for n, *_ in args.train], ap.error)
    included = [r for path, names in args.include for r in _included(path, names, args.test_seed, ap.error)]
    clash = sorted({r["model"] for r in included} & {n for n, *_ in [*args.model, *args.train]})
    if clash:
        ap.error(f"--include: model name(s) {', '.join(clash)} also given to --model / --train")
    if real_data_missing(args.data):
        return 2
    quiet_logging()
    import pandas as pd

    from data_prep.lesions import COHORT_CONTRAST, LesionConfig
    from stage2_classify.infer import Classifier

    t0 = time.time()
    halves = cohort_halves(args.data)
    root = semisynthetic_copies(args.data, args.work / f"test_seed{args.test_seed}",
                                {c: halves[c][1] for c in COHORTS}, args.test_seed)
    tables = {c: pd.read_csv(root / c / "README_lesion_table.csv") for c in COHORTS}
    for c, table in tables.items():
        if "cnr" not in table.columns:
            print(f"error: {root / c / 'README_lesion_table.csv'}: no cnr column (copies made before it existed; "
                  "delete the folder to regenerate them); nothing measured", file=sys.stderr)
            return 2
    stale = _stale_included(included, tables)
    if stale:
        print(f"error: --include: {stale}: its truth or cnr differs from the held-out copies under {root} "
              "(made by another simulator version?); nothing measured", file=sys.stderr)
        return 2
    models = [(n, Path(d), "given") for n, d in args.model]
    train_s: dict[str, float] = {}
    for name, cnr, epochs, seed in args.train:
        t = time.time()
        model = train_on_first_halves(name, args.data, args.work, epochs, LesionConfig(min_cnr=cnr), seed,
                                      overrides.get(name))
        models.append((name, model, f"min_cnr={cnr} ({epochs} epochs, training seed {seed})"
                       + "".join(f", {o}" for o in overrides.get(name, []))))
        train_s[name] = round(time.time() - t, 1)
    preds: list[dict] = list(included)
    classes: list[str] = []
    thresholds: dict[str, float] = {}
    for name, model, trained_on in models:
        clf = Classifier(model)
        classes = list(clf.config.classes)
        thresholds[name] = clf.config.evidence_threshold
        if trained_on == "given":  # say how: the settings that differ from today's defaults
            trained_on = "given" + "".join(f", {c}" for c in config_changes(clf.config))
        for c in COHORTS:
            table = tables[c]
            rows = {(i, lv): r for i, lv, r in zip(table["id"], table["level"], table.to_dict("records"))}
            for p in sorted((root / c).glob("*_image.nii.gz")):
                sid = p.name[: -len("_image.nii.gz")]
                labels = root / c / f"{sid}_vertebrae.nii.gz"
                if args.evidence:
                    ev = evidence_at_expert_centroids(clf, p, labels, COHORT_CONTRAST[c])
                    copy = {level: e["p"] for level, e in ev.items()}
                else:
                    ev, copy = {}, classify_at_expert_centroids(clf, p, labels, COHORT_CONTRAST[c])
                clean = classify_at_expert_centroids(clf, args.data / c / p.name, labels, COHORT_CONTRAST[c])
                for level, probs in copy.items():
                    row = rows.get((sid, level))
                    if row is None or level not in clean:
                        continue
                    cls, cnr = _truth_and_cnr(row["class"], row["cnr"])
                    preds.append({"model": name, "trained_on": trained_on, "family": "corner", "cohort": c,
                                  "subject": sid, "level": level, "truth": cls, "cnr": cnr,
                                  "p": probs, "p_clean": clean[level],
                                  **({"evidence_inside": ev[level]["inside"],
                                      "evidence_inside_expert": ev[level]["inside_expert"]} if level in ev else {})})
    res = {"meta": {"data": str(args.data), "models": {n: str(m) for n, m, _ in models}, "test_seed": args.test_seed,
                    "included": {str(path): names for path, names in args.include},
                    "classes": classes, "train_seconds": train_s, "seconds": round(time.time() - t0, 1),
                    "semi_synthetic": True},
           "classes_summary": score_rows(preds, classes), "visibility": visibility_rows(preds),
           "evidence": evidence_rows(preds, thresholds),
           "predictions": preds}
    cmd = " ".join(["python bench/visibility.py", *(f"--model {n}=DIR" for n, _ in args.model),
                    *(f"--train {n}={c if c is not None else 'none'}:{e}" + (f":{sd}" if sd else "")
                      for n, c, e, sd in args.train),
                    *(f"--set {n}:{o}" for n, o in args.sets),
                    *(f"--include {Path(p).name}:{','.join(m)}" for p, m in args.include),
                    *([f"--test-seed {args.test_seed}"] if args.test_seed != 1 else []),
                    *(["--evidence"] if args.evidence else [])])
    _write(args.out, args.name, res, cmd)
    return 0


def _write(out: Path, name: str, res: dict, cmd: str) -> None:
    """``name.json`` (one line per prediction) and ``name.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_json(res, out / f"{name}.json")
    meta = res["meta"]
    text = [
        "# Stage 2 against lesion visibility (semi-synthetic)", "",
        f"Generated by `{cmd}` in {meta['seconds']:.0f} s (training seconds, ~0 for a model reused from --work: "
        f"{meta['train_seconds'] or 'none'}). "
        "**Semi-synthetic**: real scans of the held-out half of each cohort (second half by name) with lesions "
        f"inserted by `data_prep.lesions` (default simulator, seed {meta['test_seed']}), and the same scans "
        "unmodified; models trained on the first halves. Each vertebra classified around its expert centroid "
        "with the seg head's region, no attributions (but for the evidence section). cnr = (lesion mean - "
        "marrow median) / marrow robust SD, "
        "measured on the copy; detection AUC = lesion vertebrae of the bin vs every normal vertebra of the cohort "
        "on p(lesion) = 1 - p(normal); paired change = p(lesion) on the copy - on the unmodified scan, same "
        "vertebra; `normal` rows: mean p(lesion) of the normal vertebrae on the copies and of every vertebra on "
        "the unmodified scans.", "",
        "## Per class (copies)", "",
        *md_table([{k: v for k, v in r.items() if k != "test_family"} for r in res["classes_summary"]]), "",
        "## By lesion visibility", "", *md_table(res["visibility"]), "",
    ]
    if res.get("evidence"):
        text += ["## Evidence (copies, `--evidence`)", "",
                 "Integrated Gradients as `spinepipe predict` runs them (blurred baseline, the model's IG steps, "
                 "target = the predicted class, the seg head's region): share of |IG| inside the body the seg head "
                 "found (`inside`, what the report shows) and inside the expert body mask (`inside_expert`); "
                 "`flagged` = share of vertebrae under the model's evidence threshold on `inside`.", "",
                 *md_table(res["evidence"]), ""]
    write_text("\n".join(text), out / f"{name}.md")


if __name__ == "__main__":
    raise SystemExit(main())
