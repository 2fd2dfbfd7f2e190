"""The main job on built-in synthetic data (``make demo``): synthesize, check, train both stages briefly,
predict on held-out scans, evaluate, and print where everything went.

Sized for a 2-core CPU (about 15-20 minutes, most of it stage-1 training; 14 min on 2026-12-04). The numbers
it prints come from minutes of training on 16 synthetic scans: they show the pipeline works end to end, not
what a fully trained model reaches. Stage 1 gets its library default of 80 epochs: at 24 (until session 20)
its heatmap had separated one or two vertebrae per held-out scan (identification 0.10); 48 epochs (until
session 30) identified 0.70 on one machine (2026-12-03) but 0.27 on another (AMD EPYC, 2026-12-04: same code
and seeds, other floating-point results), where 80 epochs on the same training scans identified 0.83 (3 of 4
scans all correct): 48 sat on the edge of learning the heatmap. Since session 39 the library default rotates
training patches by up to 30 deg instead of 12 (better on tilted spines after full training on real scans,
``stage1_localize.config.AugmentConfig``); in this brief training it learns slower: 80 epochs identify 0.63
of the held-out synthetic vertebrae at 9.7 mm (1 of 4 scans all correct) against 0.83 at 5.8 mm with 12 deg
(2026-12-05, same machine and seeds). The demo keeps the library default all the same: it shows what the
defaults do, not a tuned number.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("spinepipe.demo")


@dataclasses.dataclass
class DemoConfig:
    n_train: int = 16
    n_test: int = 4
    seed: int = 0
    stage1_epochs: int = 80
    stage2_epochs: int = 24


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def run_demo(out: Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Path]:
    """Run the whole demo into ``out``; returns the important paths."""
    from data_prep.dataset import check_dataset
    from data_prep.lesions import cohort_hook
    from data_prep.synth import SynthConfig, write_cohort
    from pipeline.commands.predict import load_models
    from pipeline.evaluate import evaluate
    from pipeline.predict import predict_many, write_run_record
    from stage1_localize.config import Stage1Config
    from stage1_localize.train import train_stage1
    from stage2_classify.config import Stage2Config
    from stage2_classify.train import train_stage2

    t0 = time.perf_counter()
    out = Path(out)
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    models = out / "models"
    _say(f"[1/6] synthesizing {cfg.n_train} training + {cfg.n_test} held-out scans with simulated lesions")
    write_cohort(train_dir, cfg.n_train, cfg.seed, SynthConfig(), cohort_hook(), overview=2)
    write_cohort(test_dir, cfg.n_test, cfg.seed + 1000, SynthConfig(), cohort_hook(), overview=0)
    _say("[2/6] checking the datasets")
    for d in (train_dir, test_dir):
        problems = [p for p in check_dataset(d) if p.severity == "error"]
        if problems:
            raise RuntimeError(f"synthetic dataset {d} has problems: {problems[0]}")
    _say(f"[3/6] training stage 1 ({cfg.stage1_epochs} epochs) -> {models / 'stage1'}")
    train_stage1(train_dir, models / "stage1", dataclasses.replace(Stage1Config(), epochs=cfg.stage1_epochs))
    _say(f"[4/6] training stage 2 ({cfg.stage2_epochs} epochs) -> {models / 'stage2'}")
    s2 = Stage2Config()
    s2.train = dataclasses.replace(s2.train, epochs=cfg.stage2_epochs)
    train_stage2(train_dir, models / "stage2", s2)
    _say(f"[5/6] predicting {cfg.n_test} held-out scans")
    pred_dir = out / "predictions"
    scans = sorted(test_dir.glob("*_image.nii.gz"))
    pair = load_models(models)
    outcomes = []
    for path, res in predict_many(scans, pred_dir, lambda: pair):
        outcomes.append((path, res))
        _say(f"  error: {res}" if isinstance(res, Exception) else f"  {res.summary}")
    done = [res for _, res in outcomes if not isinstance(res, Exception)]
    if not done:
        raise RuntimeError("no held-out scan could be analysed; train longer (--stage1-epochs)")
    write_run_record(pred_dir, *pair, outcomes)
    _say("[6/6] evaluating against the synthetic ground truth")
    ev = evaluate(pred_dir, test_dir, classes=list(s2.classes))
    table = ev.table()
    (out / "evaluation.md").write_text("Synthetic demo (brief training; not a benchmark)\n\n" + table + "\n")
    _say(table)
    first = done[0].name
    paths = {"report": pred_dir / f"{first}_vertebrae.csv", "overview": pred_dir / f"{first}_overview.png",
             "predictions": pred_dir, "models": models, "evaluation": out / "evaluation.md"}
    _say(f"done in {time.perf_counter() - t0:.0f} s")
    for k, v in paths.items():
        _say(f"  {k:12s} {v.resolve()}")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out", type=Path)
    ap.add_argument("--n-train", type=int, default=DemoConfig.n_train)
    ap.add_argument("--n-test", type=int, default=DemoConfig.n_test)
    ap.add_argument("--stage1-epochs", type=int, default=DemoConfig.stage1_epochs)
    ap.add_argument("--stage2-epochs", type=int, default=DemoConfig.stage2_epochs)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from data_prep.errors import SpinepipeInputError

    try:
        run_demo(args.out, DemoConfig(args.n_train, args.n_test, args.seed, args.stage1_epochs, args.stage2_epochs))
    except (SpinepipeInputError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
