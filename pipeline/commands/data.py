"""Data commands: ``synth``, ``check-data``."""
from __future__ import annotations

import click

from pipeline.cli import main
