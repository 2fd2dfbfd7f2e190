"""Stage-2 commands: ``classify`` (per-vertebra classes for one scan) and ``train-stage2``."""
from __future__ import annotations

import logging
from pathlib import Path

import click

from pipeline.cli import CONTRAST_HELP, contrast_option, evidence_threshold_option, ig_steps_option, main

log = logging.getLogger(__name__)


def _scan_name(path: Path) -> str:
    from data_prep.io import strip_image_suffix

    stem = strip_image_suffix(Path(path).name.rstrip("/"))
    return stem[: -len("_image")] if stem.endswith("_image") and len(stem) > len("_image") else stem


@main.command("classify")
@click.argument("scan", type=click.Path(path_type=Path))
@click.option("--centroids", required=True, type=click.Path(path_type=Path),
              help="Stage-1 centroids CSV (level,label,x_mm,y_mm,z_mm,confidence,flags; world LPS mm).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder.")
@click.option("--models", "models_dir", default="models/stage2", show_default=True, type=click.Path(path_type=Path),
              help="Stage-2 model folder (or a folder containing stage2/).")
@click.option("--masks", type=click.Path(path_type=Path), default=None,
              help="Optional vertebral-body label map (VerSe ids) on the scan's grid; else the model segments.")
@click.option("--evidence", is_flag=True, help="Also compute Integrated Gradients and write <name>_evidence.nii.gz.")
@contrast_option(CONTRAST_HELP)
@evidence_threshold_option()
@ig_steps_option()
def classify_cmd(scan: Path, centroids: Path, out_dir: Path, models_dir: Path, masks: Path | None, evidence: bool,
                 contrast: str | None, evidence_threshold: float | None, ig_steps: int | None) -> None:
    """Classify every vertebra listed in --centroids: writes <name>_classes.csv."""
    from data_prep.io import read_image, read_labelmap, write_csv, write_image
    from stage2_classify.infer import Classifier, classes_table, evidence_map, read_centroids_csv

    if (models_dir / "stage2" / "config.json").is_file():
        models_dir = models_dir / "stage2"
    clf = Classifier(models_dir, evidence_threshold=evidence_threshold, ig_steps=ig_steps)
    image = read_image(scan)
    mask_scan = read_labelmap(masks, reference=image) if masks is not None else None
    verts = read_centroids_csv(centroids)
    records = clf.classify(image, verts, masks=mask_scan, with_evidence=evidence, keep_evidence_maps=evidence,
                           contrast=contrast)
    for r, v in zip(records, verts):
        r["flags"] = list(dict.fromkeys(list(v.flags) + list(r["flags"])))
    name = _scan_name(scan)
    out_csv = write_csv(classes_table(records, clf.classes), out_dir / f"{name}_classes.csv")
    click.echo(f"wrote {out_csv}")
    if evidence:
        ev = evidence_map(records, image)
        if ev is not None:
            click.echo(f"wrote {write_image(ev, out_dir / f'{name}_evidence.nii.gz')}")


@main.command("train-stage2")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Canonical dataset folder (vertebra_labels.csv + images + masks/weak labels). "
                   "Without it: a small synthetic cohort with lesions is generated into --work.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default="models/stage2",
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the number of epochs.")
@click.option("--resume", is_flag=True, help="Continue from <out>/train_state.pt.")
@click.option("--seed", type=int, default=None, help="Training seed.")
@click.option("--config", "config_json", type=click.Path(path_type=Path), default=None,
              help="Stage2Config JSON (dataclass fields).")
@click.option("--annotation", type=click.Choice(["auto", "full", "coarse", "outline", "box", "point", "none"]),
              default="auto", show_default=True, help="Which body annotation to train the seg head on.")
@click.option("--n-synth", type=click.IntRange(min=2), default=12, show_default=True,
              help="Without --data: number of synthetic subjects.")
@click.option("--work", "work_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Without --data: where to write the synthetic cohort (default <out>_synth_data beside <out>).")
@contrast_option("Image contrast of every training scan (default: per subject from the folder's subjects.csv "
                 "'contrast' or 'sequence' column, or synth_meta.json; else unknown).")
def train_stage2_cmd(data_dir: Path | None, out_dir: Path, epochs: int | None, resume: bool, seed: int | None,
                     config_json: Path | None, annotation: str, n_synth: int, work_dir: Path | None,
                     contrast: str | None) -> None:
    """Train the stage-2 per-vertebra classifier (writes model.safetensors, config.json, train_log.csv)."""
    from stage2_classify.config import Stage2Config
    from stage2_classify.train import load_config_json, synthesize_training_data, train_stage2

    cfg = load_config_json(config_json) if config_json else Stage2Config()
    if epochs is not None:
        cfg.train.epochs = epochs
    if seed is not None:
        cfg.train.seed = seed
    if data_dir is None:
        work = work_dir or (out_dir.parent / f"{out_dir.name}_synth_data")
        if not (work / "vertebra_labels.csv").is_file():
            click.echo(f"no --data: writing {n_synth} synthetic subjects with lesions to {work}", err=True)
            synthesize_training_data(work, n_synth, cfg.train.seed)
        data_dir = work
    out = train_stage2(data_dir, out_dir, cfg, resume=resume, annotation=annotation, contrast=contrast)
    click.echo(f"stage-2 model written to {out}")
