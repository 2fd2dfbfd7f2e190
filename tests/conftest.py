"""Shared fixtures: the real-data folder (skipped with a clear message when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("SPINEPIPE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (override with ``SPINEPIPE_SHARED_DATA``); skips when the folder is absent."""
    if not (SHARED_DATA / "myosegmentum").is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (set SPINEPIPE_SHARED_DATA)")
    return SHARED_DATA
