"""Placement of the per-vertebra annotations on the overview PNG (hand-made positions, LPS mm)."""
from __future__ import annotations

import pytest

from data_prep.overview import annotation_anchor

CENTRES = {20: (10.0, -30.0)}  # body centre in the slice: (y, z)
FRONTS = {20: -8.0}  # anterior edge of that body (y)


def test_outlined_body_text_starts_behind_its_front_edge_at_the_centroid_height():
    # the level name is right-aligned 3 mm in front of the edge; the text starts 1 mm behind it
    assert annotation_anchor(20, (5.0, 12.0, -28.5), CENTRES, FRONTS) == pytest.approx((-7.0, -28.5, "left"))
    assert annotation_anchor(20, None, CENTRES, FRONTS) == (-7.0, -30.0, "left")


def test_without_an_outline_the_text_is_centred_on_the_centroid_or_skipped():
    assert annotation_anchor(21, (5.0, 12.0, -60.0), CENTRES, FRONTS) == (12.0, -60.0, "center")
    assert annotation_anchor(None, (5.0, 12.0, -60.0), {}, {}) == (12.0, -60.0, "center")
    assert annotation_anchor(21, None, CENTRES, FRONTS) is None
    assert annotation_anchor(20, None, CENTRES, {}) == (10.0, -30.0, "center")
