"""Stage-1 commands: ``spinepipe localize`` and ``spinepipe train-stage1``."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli import main

DEFAULT_STAGE1 = Path("models") / "stage1"


def centroids_name(scan_path: Path) -> str:
    """``<name>_centroids.csv`` for a scan file or DICOM folder (a trailing ``_image`` is dropped)."""
    from data_prep.io import strip_image_suffix

    name = strip_image_suffix(scan_path) if scan_path.is_file() else scan_path.name
    if name.endswith("_image") and len(name) > len("_image"):
        name = name[: -len("_image")]
    return f"{name}_centroids.csv"


@main.command("localize")
@click.argument("scan", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for <name>_centroids.csv.")
@click.option("--models", "model_dirs", default=(DEFAULT_STAGE1,), show_default=True, multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Stage-1 model folder, or the folder holding stage1/ (as for `predict --models`). Repeat it "
                   "to run an ensemble of models trained on the same data (their maps are averaged; the "
                   "first model's config decodes them).")
@click.option("--device", default=None, help="torch device (default: cuda when available, else cpu).")
def localize_cmd(scan: Path, out_dir: Path, model_dirs: tuple[Path, ...], device: str | None) -> None:
    """Find and name every vertebra of SCAN; write OUT/<name>_centroids.csv
    (level,label,x_mm,y_mm,z_mm,confidence,flags; world LPS mm)."""
    from data_prep.io import read_image
    from stage1_localize.infer import Localizer, holds_model, write_centroids_csv

    dirs = [Path(d) / "stage1" if holds_model(Path(d) / "stage1") else Path(d) for d in model_dirs]
    # missing model -> one-line error naming the make target
    localizer = Localizer(dirs, device=device)
    image = read_image(scan)
    vertebrae = localizer.localize(image)
    path = write_centroids_csv(vertebrae, Path(out_dir) / centroids_name(Path(scan)))
    levels = ",".join(v.level for v in vertebrae) or "none"
    flagged = sum(bool(v.flags) for v in vertebrae)
    click.echo(f"{path}: {len(vertebrae)} vertebrae ({levels}){f', {flagged} flagged' if flagged else ''}")


@main.command("train-stage1")
@click.option("--data", "data_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Canonical dataset folder (<id>_image + <id>_points.csv or <id>_vertebrae); repeat for "
                   "several cohorts/sites (sampled equally often). Omitted: a small synthetic cohort is "
                   "generated into --work.")
@click.option("--out", "out_dir", default=DEFAULT_STAGE1, show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Model folder to write.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Training epochs (default: config).")
@click.option("--steps", "steps_per_epoch", default=None, type=click.IntRange(min=1), help="Steps per epoch.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt (last finished epoch).")
@click.option("--seed", default=None, type=int, help="Training seed (default: the config's, 0).")
@click.option("--config", "config_json", type=click.Path(path_type=Path), default=None,
              help='Stage1Config JSON with any subset of its fields, nested as in a saved config.json, e.g. '
                   '{"augment": {"max_rotation_deg": 12}}; --seed / --epochs / --steps override it.')
@click.option("--members", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train an ensemble of this many models (seeds SEED, SEED+1, ...) into OUT/member<m>/ plus "
                   "OUT/ensemble.json; `localize` / `predict` then average their maps. On a CPU the members "
                   "train side by side, one process each.")
@click.option("--work", "work_dir", default=Path("work_dirs") / "stage1_synth", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where the synthetic cohort goes without --data.")
@click.option("--synth-n", default=16, show_default=True, type=click.IntRange(min=2),
              help="Number of synthetic subjects without --data.")
def train_stage1_cmd(data_dirs: tuple[Path, ...], out_dir: Path, epochs: int | None, steps_per_epoch: int | None,
                     resume: bool, seed: int | None, config_json: Path | None, members: int, work_dir: Path,
                     synth_n: int) -> None:
    """Train the stage-1 localiser from points (masks optional); writes OUT/model.safetensors,
    config.json, train_state.pt and train_log.csv (with --members N: those of each member under
    OUT/member<m>/, then OUT/ensemble.json). Works under torchrun (DDP)."""
    import dataclasses

    from data_prep.checkpoint import load_config_json
    from stage1_localize.config import Stage1Config
    from stage1_localize.train import train_stage1, train_stage1_ensemble

    cfg = load_config_json(Stage1Config, config_json) if config_json else Stage1Config()
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    data_dir: list[Path] | Path | None = list(data_dirs) or None
    if data_dir is None:
        from data_prep.dataset import discover
        from data_prep.synth import write_cohort

        have = len(discover(work_dir)) if Path(work_dir).is_dir() else 0
        if have < synth_n:
            click.echo(f"synthesizing {synth_n} subjects into {work_dir}", err=True)
            write_cohort(work_dir, synth_n, seed=cfg.seed)
        data_dir = Path(work_dir)
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if steps_per_epoch is not None:
        cfg = dataclasses.replace(cfg, steps_per_epoch=steps_per_epoch)
    if members > 1:
        out = train_stage1_ensemble(data_dir, out_dir, cfg, members=members, resume=resume)
        click.echo(f"stage-1 ensemble of {members} models written to {out}")
    else:
        out = train_stage1(data_dir, out_dir, cfg, resume=resume)
        click.echo(f"stage-1 model written to {out}")
