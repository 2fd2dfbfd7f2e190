"""``spinepipe predict`` (both stages + report) and ``spinepipe evaluate``."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from pipeline.cli import CONTRAST_HELP, contrast_option, evidence_threshold_option, ig_steps_option, main

DEFAULT_MODELS = Path("models")


def load_models(models_dir: str | Path = DEFAULT_MODELS, device: str = "cpu", contrast: str | None = None,
                evidence_threshold: float | None = None, stage1_dirs: tuple[Path, ...] = (),
                ig_steps: int | None = None):
    """``(Localizer, Classifier)`` from ``models_dir/stage1`` and ``models_dir/stage2``; ``contrast`` is the
    image contrast of the scans (stage 2, see :meth:`stage2_classify.infer.Classifier.classify`);
    ``evidence_threshold`` and ``ig_steps`` override the stage-2 model's (``None``: keep it); ``stage1_dirs`` (one or more
    stage-1 model folders, several = an ensemble) replace ``models_dir/stage1``.

    A missing model raises a one-line error naming the make target that trains it.
    """
    from stage1_localize.infer import Localizer
    from stage2_classify.infer import Classifier

    models_dir = Path(models_dir)
    stage1 = [Path(d) for d in stage1_dirs] or [models_dir / "stage1"]
    return (Localizer(stage1, device=device),
            Classifier(models_dir / "stage2", device=device, contrast=contrast, evidence_threshold=evidence_threshold,
                       ig_steps=ig_steps))


@main.command("predict")
@click.argument("scans", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for the per-scan reports.")
@click.option("--models", "models_dir", default=DEFAULT_MODELS, show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder holding stage1/ and stage2/ models.")
@click.option("--evidence/--no-evidence", default=False, show_default=True,
              help="Also write <name>_evidence.nii.gz (Integrated Gradients map on the input grid).")
@click.option("-j", "--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes for a batch of scans (each loads the models once).")
@click.option("--stage1", "stage1_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Stage-1 model folder to use instead of MODELS/stage1; repeat it for an ensemble of models "
                   "trained on the same data (maps averaged, as `localize --models A --models B`).")
@contrast_option(CONTRAST_HELP)
@evidence_threshold_option()
@ig_steps_option()
def predict_cmd(scans: tuple[Path, ...], out_dir: Path, models_dir: Path, evidence: bool, workers: int,
                stage1_dirs: tuple[Path, ...], contrast: str | None, evidence_threshold: float | None,
                ig_steps: int | None) -> None:
    """Find, name and classify every vertebra of each SCAN (file, DICOM folder, or folder of scans)."""
    from pipeline.predict import predict_many, write_run_record
    from pipeline.validate import collect_scans

    paths = collect_scans(list(scans))
    make = functools.partial(load_models, models_dir, contrast=contrast, evidence_threshold=evidence_threshold,
                             stage1_dirs=stage1_dirs, ig_steps=ig_steps)
    # loaded here once: fails fast with a clear message before any worker starts, names the models in the
    # run record, and with one worker is the pair that predicts
    models = make()
    failures, outcomes = 0, []
    with click.progressbar(length=len(paths), label="predicting", file=sys.stderr,
                           show_pos=True) if len(paths) > 1 else _NullBar() as bar:
        for path, res in predict_many(paths, out_dir, (lambda: models) if workers <= 1 else make, evidence=evidence,
                                      workers=workers):
            bar.update(1)
            outcomes.append((path, res))
            if isinstance(res, Exception):
                failures += 1
                click.echo(f"error: {res}", err=True)
            else:
                click.echo(f"{res.summary} ({res.seconds:.1f} s) -> {res.files['report']}")
    if len(outcomes) > failures:
        write_run_record(out_dir, *models, outcomes)
    if failures:
        click.echo(f"error: {failures} of {len(paths)} scans failed", err=True)
        sys.exit(2)


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


@main.command("evaluate")
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.argument("gt_dir", type=click.Path(path_type=Path))
@click.option("--classes", default="normal,inflammation,fat", show_default=True,
              help="Comma-separated class names, in the order of the report's p_<class> columns.")
@click.option("--strict", is_flag=True, help="Count predicted levels outside the annotated range as errors.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the numbers as JSON.")
def evaluate_cmd(pred_dir: Path, gt_dir: Path, classes: str, strict: bool, json_out: Path | None) -> None:
    """Score PRED_DIR (reports from `spinepipe predict`) against the dataset GT_DIR."""
    import json

    from data_prep.io import write_text
    from pipeline.evaluate import evaluate

    ev = evaluate(pred_dir, gt_dir, classes=[c.strip() for c in classes.split(",") if c.strip()], strict=strict)
    click.echo(ev.table())
    if json_out:
        payload = {"identification": ev.identification, "classification": ev.classification, "evidence": ev.evidence,
                   "per_scan": ev.per_scan.to_dict(orient="records")}
        write_text(json.dumps(payload, indent=1, default=float), json_out)
