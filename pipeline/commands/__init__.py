"""CLI command modules; each registers its commands on :data:`pipeline.cli.main` when imported."""
from pipeline.commands import data  # noqa: F401
from pipeline.commands import synth  # noqa: F401
from pipeline.commands import predict  # noqa: F401
from pipeline.commands import stage2  # noqa: F401
from pipeline.commands import stage1  # noqa: F401
