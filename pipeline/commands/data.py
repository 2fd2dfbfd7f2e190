"""Data commands: ``synth``, ``check-data``."""
from __future__ import annotations

import click

from pipeline.cli import main


@main.command("check-data")
@click.argument("dataset_dir", type=click.Path(file_okay=True, dir_okay=True, path_type=str))
@click.option("--classes", default=None, metavar="A,B,...",
              help="Comma-separated class names that vertebra_labels.csv may use (e.g. normal,inflammation,fat).")
@click.option("--headers-only", is_flag=True,
              help="Read image headers only: geometry checks, skips NaN/constant/label-value checks (fast).")
def check_data(dataset_dir: str, classes: str | None, headers_only: bool) -> None:
    """Check DATASET_DIR against the canonical layout: one line per problem, then a summary.

    Exit code 0 when nothing is wrong (warnings allowed), 1 when problems were found, 2 when the
    folder is missing.
    """
    from tqdm.auto import tqdm

    from data_prep.dataset import check_dataset, count_subjects

    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    n_subjects = count_subjects(dataset_dir)
    with tqdm(total=n_subjects, unit="subject", disable=None, leave=False, file=click.get_text_stream("stderr")) as bar:
        problems = check_dataset(dataset_dir, class_list, voxels=not headers_only,
                                 progress=lambda s: (bar.set_postfix_str(s.id, refresh=False), bar.update(1)))
    for p in problems:
        click.echo(str(p))
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    summary = f"{n_subjects} subjects, {errors} problems"
    if warnings:
        summary += f", {warnings} warnings"
    click.echo(summary)
    if errors:
        raise SystemExit(1)
