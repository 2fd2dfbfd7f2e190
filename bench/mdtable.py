"""Markdown tables for the benchmark result files (one helper instead of one per script)."""
from __future__ import annotations

from typing import Callable, Sequence


def md_table(rows: Sequence[dict], fmt: Callable[[object], str] = lambda v: "" if v is None else str(v)) -> list[str]:
    """Lines of a markdown table of ``rows``: columns = the union of their keys in first-seen order, each cell
    ``fmt(value)`` (``fmt(None)`` for a key a row lacks). No rows: no lines."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if not keys:
        return []
    return (["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])
