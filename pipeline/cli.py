"""The ``spinepipe`` command line (click).

Every command turns :class:`~data_prep.errors.SpinepipeInputError` (bad user input) into one line
``error: <file>: <problem>`` on stderr and exit code 2 — never a traceback. Commands are thin: they
parse options and call library functions, which hold the logic and are tested directly.
"""
from __future__ import annotations

import logging
import sys

import click

from data_prep.errors import SpinepipeInputError


#: ``--contrast`` choices of the stage-2 commands: :data:`data_prep.dataset.IMAGE_CONTRASTS`, spelled out here
#: so that the CLI starts without importing the imaging stack (tests/pipeline/test_predict.py checks they agree).
CONTRAST_CHOICES: tuple[str, ...] = ("t1", "t2", "stir", "water")


def contrast_option(help_text: str):
    """The ``--contrast`` option (one of :data:`CONTRAST_CHOICES`, default unknown)."""
    return click.option("--contrast", type=click.Choice(CONTRAST_CHOICES), default=None, help=help_text)


def evidence_threshold_option():
    """The ``--evidence-threshold`` option of the stage-2 commands (0..1, default: the model's own)."""
    return click.option("--evidence-threshold", type=click.FloatRange(0.0, 1.0), default=None,
                        help="With evidence: flag a verdict evidence_outside_body when less than this share of its "
                             "Integrated-Gradients mass lies inside the vertebral body (default: the model's setting).")


def ig_steps_option():
    """The ``--ig-steps`` option of the stage-2 commands (default: the model's own)."""
    return click.option("--ig-steps", type=click.IntRange(min=2, max=512), default=None,
                        help="Integrated-Gradients steps per verdict: the attribution's integration steps, the "
                             "main cost of the evidence check (about linear); more = closer to the exact integral "
                             "(default: the model's setting; bench/results/ig_steps.md).")


CONTRAST_HELP = ("Image contrast of the scan(s): t1, t2 (T2-TSE without fat suppression), stir, water (Dixon water). "
                 "Models trained with model.contrast_input type lesions by it (fat is dark on stir/water, bright on "
                 "t1/t2); every model flags the verdicts (contrast_unseen) when its training data never named this "
                 "contrast; default unknown.")


class _Group(click.Group):
    """Click group that reports bad input as a one-line error with a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpinepipeInputError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """spinepipe: find, name and classify every vertebra in sagittal spine MRI."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# Commands live next to the code they drive; importing registers them on ``main``.
# (Each module below defines its commands with ``@main.command(...)``.)
from pipeline import commands as _commands  # noqa: E402,F401
