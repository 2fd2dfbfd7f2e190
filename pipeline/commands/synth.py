"""``spinepipe synth``: write a synthetic sagittal spine cohort (the embedded default dataset)."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli import CONTRAST_CHOICES, main

#: ``data_prep.lesions.LESION_FAMILIES``, spelled out so that ``spinepipe --help`` does not import the simulator
#: (a test keeps the two equal).
LESION_FAMILY_CHOICES: tuple[str, ...] = ("corner", "endplate", "focal", "diffuse")


@main.command("synth")
@click.option("-n", "--n-subjects", "n", type=click.IntRange(min=1), default=8, show_default=True,
              help="Number of subjects to generate.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (created if missing; existing synth files are overwritten).")
@click.option("--seed", type=int, default=0, show_default=True, help="Cohort seed (same seed = same files).")
@click.option("--contrast", "contrasts", multiple=True, type=click.Choice(CONTRAST_CHOICES),
              help="Restrict to these contrasts (repeatable; default: a realistic mix).")
@click.option("--overview/--no-overview", default=False, show_default=True,
              help="Also write <id>_overview.png (mid-sagittal slice with level contours).")
@click.option("--lesions/--no-lesions", default=True, show_default=True,
              help="Insert simulated lesions (classes normal / inflammation / fat) with data_prep.lesions.")
@click.option("--lesion-family", "families", multiple=True, type=click.Choice(LESION_FAMILY_CHOICES),
              help="Lesion families to draw from (repeatable; default: corner, the ASAS corner lesion; endplate "
                   "bands, focal and diffuse lesions test or widen what a model has seen).")
@click.option("--overview-max", type=click.IntRange(min=0), default=20, show_default=True,
              help="With --overview: write PNGs for at most this many (the first) subjects.")
def synth_cmd(n: int, out_dir: Path, seed: int, contrasts: tuple[str, ...], overview: bool, lesions: bool,
              families: tuple[str, ...], overview_max: int) -> None:
    """Generate N synthetic sagittal lumbar MRI scans with ground truth in the canonical layout."""
    from data_prep.synth import SynthConfig, write_cohort

    cfg = SynthConfig(contrasts=tuple(contrasts), contrast_weights=None) if contrasts else SynthConfig()
    lesion_fn = None
    if lesions:
        from data_prep.lesions import LesionConfig, cohort_hook

        lesion_fn = cohort_hook(LesionConfig(families=tuple(dict.fromkeys(families))) if families else None)
    elif families:
        raise click.UsageError("--lesion-family needs lesions (drop --no-lesions)")
    ids = write_cohort(out_dir, n, seed, cfg, lesion_fn, overview=min(overview_max, n) if overview else 0)
    extra = f", overviews for {min(overview_max, n)}" if overview else ""
    click.echo(f"wrote {len(ids)} synthetic subjects ({ids[0]} .. {ids[-1]}{extra}) to {out_dir.resolve()}")
