"""Stage 2 on lesion families it was not trained on (semi-synthetic): corner-trained models vs others.

The default lesion simulator draws ASAS corner lesions only. Real spines also show endplate bands
(Andersson lesions, Modic changes), focal lesions inside the body and diffuse marrow change, and the
project is judged on lesions it did not generate. This benchmark inserts each family of
``data_prep.lesions.LESION_FAMILIES`` on its own into the held-out half of each real cohort (the second
half by name, ``bench/realdata.cohort_halves``; seed 1, else ``--test-seed``) and scores stage-2 models trained on the first
half:

    python bench/lesion_families.py [--model NAME=DIR ...] [--train NAME=FAMILY,FAMILY[:EPOCHS] ...] [--epochs 30]
        [--families corner endplate focal diffuse] [--work DIR] -> bench/results/lesion_families.json + .md

``--pool A.json B.json [--pool-models NAME ...]`` re-scores the predictions of earlier runs (e.g. two test
seeds) as one set, without running any model. ``--model`` scores an existing model (it must have been trained on the first halves only, e.g.
``bench/contrast_check.py``'s ``both``; name it after its training lesions); ``--train NAME=F1,F2[:EPOCHS]`` trains one (``EPOCHS``, else
``--epochs``; default configuration otherwise) on first-half copies whose lesions come from families F1, F2
(seed 0), cached under ``--work``. Each vertebra is classified from a patch around its expert centroid with the region the
seg head predicts (no mask given, as in ``spinepipe predict``), without attributions. Scores per model,
test family and cohort: one-vs-rest AUC per class, balanced accuracy and the typing AUC (inflammation vs
fat among lesion vertebrae). Every number here is **semi-synthetic**, and the families are the project's
own drawings of other lesion kinds: a proxy for lesions it did not generate, not real ones.
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
from bench.realdata import (COHORTS, classify_at_expert_centroids, cohort_halves, quiet_logging,  # noqa: E402
                            real_data_missing, semisynthetic_copies, train_on_first_halves, write_predictions_json)
from data_prep.io import write_text  # noqa: E402


def score_rows(preds: list[dict], classes: list[str]) -> list[dict]:
    """Per (model, test family, cohort and pooled): AUC per class, balanced accuracy, typing AUC."""
    from bench.bench_stage2 import typing_auc
    from pipeline.metrics import balanced_accuracy, one_vs_rest_auc

    rows = []
    keys = sorted({(r["model"], r["family"]) for r in preds}, key=lambda k: (k[0], k[1]))
    for model, family in keys:
        for cohort in (*COHORTS, "pooled"):
            sel = [r for r in preds if r["model"] == model and r["family"] == family
                   and cohort in ("pooled", r["cohort"])]
            if not sel:
                continue
            truth = np.array([r["truth"] for r in sel])
            p = np.array([r["p"] for r in sel])
            auc = one_vs_rest_auc(truth, p, len(classes))
            rows.append({"model": model, "trained_on": sel[0]["trained_on"], "test_family": family,
                         "cohort": cohort, "vertebrae": len(sel),
                         **{f"n_{c}": int(np.sum(truth == k)) for k, c in enumerate(classes)},
                         **{f"auc_{c}": round(float(a), 3) for c, a in zip(classes, auc)},
                         "balanced_accuracy": round(balanced_accuracy(truth, p.argmax(1)), 3),
                         "typing_auc": typing_auc(truth, p, classes)})
    return rows


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    from data_prep.lesions import COHORT_CONTRAST, LESION_FAMILIES, LesionConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=_model_arg, action="append", default=[], help="NAME=DIR, trained on first halves")
    ap.add_argument("--train", type=_model_arg, action="append", default=[],
                    help="NAME=FAMILY[,FAMILY...][:EPOCHS]: train a model on first-half copies with these lesion families")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--test-seed", type=int, default=1, help="lesion seed of the held-out copies (training copies: 0)")
    ap.add_argument("--families", nargs="+", default=list(LESION_FAMILIES), choices=LESION_FAMILIES)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_lesion_families"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="lesion_families")
    ap.add_argument("--pool", type=Path, nargs="+", default=[], help="results JSON files to score as one set")
    ap.add_argument("--pool-models", nargs="+", default=[], help="with --pool: keep these models only")
    args = ap.parse_args(argv)
    if args.pool:
        return _pool(args)
    if not args.model and not args.train:
        ap.error("give at least one --model, --train or --pool")
    if args.test_seed == 0:
        ap.error("--test-seed 0 is the training copies' seed")
    plans = []
    for name, spec in args.train:
        fams, _, epochs = spec.partition(":")
        bad = [f for f in fams.split(",") if f not in LESION_FAMILIES]
        if bad:
            ap.error(f"--train: unknown lesion famil{'y' if len(bad) == 1 else 'ies'} {bad}; expected {LESION_FAMILIES}")
        if epochs and not (epochs.isdigit() and int(epochs) > 0):
            ap.error(f"--train {name}: epochs must be a positive integer, got {epochs!r}")
        plans.append((name, tuple(fams.split(",")), int(epochs) if epochs else args.epochs))
    if real_data_missing(args.data):
        return 2
    quiet_logging()
    import pandas as pd

    from stage2_classify.infer import Classifier

    t0 = time.time()
    halves = cohort_halves(args.data)
    models: list[tuple[str, Path, str]] = []
    for n, d in args.model:
        done = json.loads((Path(d) / "config.json").read_text()).get("extra", {}).get("epoch", "?")
        models.append((n, Path(d), f"given ({done} epochs; see its name)"))
    train_s: dict[str, float] = {}
    for name, families, epochs in plans:
        t = time.time()
        models.append((name, train_on_first_halves(name, args.data, args.work, epochs,
                                                   LesionConfig(families=families)),
                       f"{'+'.join(families)} ({epochs} epochs)"))
        train_s[name] = round(time.time() - t, 1)
    sub = "test" if args.test_seed == 1 else f"test_seed{args.test_seed}"
    tests = {f: semisynthetic_copies(args.data, args.work / sub / f, {c: halves[c][1] for c in COHORTS},
                                     args.test_seed, LesionConfig(families=(f,))) for f in args.families}
    preds: list[dict] = []
    classes: list[str] = []
    for name, model, trained_on in models:
        clf = Classifier(model)
        classes = list(clf.config.classes)
        for family, root in tests.items():
            for c in COHORTS:
                table = pd.read_csv(root / c / "vertebra_labels.csv")
                truth = {(i, lv): int(k) for i, lv, k in zip(table["id"], table["level"], table["class"])}
                for p in sorted((root / c).glob("*_image.nii.gz")):
                    sid = p.name[: -len("_image.nii.gz")]
                    got = classify_at_expert_centroids(clf, p, root / c / f"{sid}_vertebrae.nii.gz", COHORT_CONTRAST[c])
                    for level, probs in got.items():
                        if (sid, level) in truth:
                            preds.append({"model": name, "trained_on": trained_on, "family": family, "cohort": c,
                                          "subject": sid, "level": level, "truth": truth[(sid, level)], "p": probs})
    rows = score_rows(preds, classes)
    res = {"meta": {"data": str(args.data), "models": {n: str(m) for n, m, _ in models}, "test_seed": args.test_seed,
                    "classes": classes,
                    "trained": {n: {"families": list(f), "epochs": e} for n, f, e in plans},
                    "train_seconds": train_s, "families": args.families, "seconds": round(time.time() - t0, 1),
                    "semi_synthetic": True},
           "summary": rows, "predictions": preds}
    cmd = " ".join(["python bench/lesion_families.py", *(f"--model {n}=DIR" for n, _ in args.model),
                    *(f"--train {n}={f}" for n, f in args.train),
                    *([f"--test-seed {args.test_seed}"] if args.test_seed != 1 else [])])
    _write(args.out, args.name, res,
           f"Generated by `{cmd}` in {res['meta']['seconds']:.0f} s. **Semi-synthetic**: real scans of the held-out "
           "half of each cohort (second half by name) with lesions inserted by `data_prep.lesions` "
           f"(seed {args.test_seed}), one lesion family per test set (`LesionConfig.families`); models trained on the "
           f"first halves (seed-0 copies). Training seconds: {train_s or 'none (given models)'}.")
    return 0


def _pool(args) -> int:
    """``--pool``: the predictions of earlier runs scored as one set (each keeps its ``test_seed``)."""
    from data_prep.lesions import CLASSES

    preds, seeds, classes = [], [], None
    for f in args.pool:
        try:
            run = json.loads(Path(f).read_text())
            meta, got = run["meta"], run["predictions"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {f}: not a lesion_families results file ({e})", file=sys.stderr)
            return 2
        seeds.append(int(meta.get("test_seed", 1)))
        these = list(meta.get("classes", CLASSES))
        if classes is not None and these != classes:
            print(f"error: {f}: classes {these} differ from {classes}", file=sys.stderr)
            return 2
        classes = these
        preds += [{**r, "test_seed": seeds[-1]} for r in got if not args.pool_models or r["model"] in args.pool_models]
    if len(set(seeds)) < len(seeds):
        print(f"error: {' '.join(map(str, args.pool))}: the same test seed twice ({seeds}); nothing pooled",
              file=sys.stderr)
        return 2
    rows = score_rows(preds, classes)
    res = {"meta": {"pooled_from": [str(f) for f in args.pool], "test_seeds": seeds, "classes": classes,
                    "semi_synthetic": True}, "summary": rows, "predictions": preds}
    keep = f" --pool-models {' '.join(args.pool_models)}" if args.pool_models else ""
    _write(args.out, args.name, res,
           f"Generated by `python bench/lesion_families.py --pool {' '.join(str(f) for f in args.pool)}{keep}`: the "
           f"predictions of those runs (test seeds {', '.join(map(str, seeds))}) scored as one set. **Semi-synthetic**: "
           "real scans of the held-out half of each cohort with lesions inserted by `data_prep.lesions`, one lesion "
           "family per test set; models trained on the first halves (seed-0 copies).")
    return 0


def _write(out: Path, name: str, res: dict, provenance: str) -> None:
    """``name.json`` (one line per prediction, so the file stays readable in a diff) and ``name.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_json(res, out / f"{name}.json")
    rows = res["summary"]
    text = [
        "# Stage 2 on lesion families it was not trained on (semi-synthetic)", "",
        provenance + " Each vertebra classified around its expert centroid with the seg head's region, no "
        "attributions. The families are the project's own drawings of other lesion kinds (endplate bands, "
        "focal lesions inside the body, diffuse patches): a proxy for lesions it did not generate, not real ones. "
        "typing = AUC of inflammation vs fat among lesion vertebrae.", "",
        "Pooled:", "", *md_table([r for r in rows if r["cohort"] == "pooled"]), "",
        "Per cohort:", "", *md_table([r for r in rows if r["cohort"] != "pooled"]), "",
    ]
    write_text("\n".join(text), out / f"{name}.md")


if __name__ == "__main__":
    raise SystemExit(main())
