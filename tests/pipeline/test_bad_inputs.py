"""Every kind of bad input gives one clear line naming the file, and never a traceback."""
from __future__ import annotations

import pytest

from data_prep.errors import SpinepipeInputError
from data_prep.io import read_image, read_labelmap, read_points_csv, read_vertebra_labels_csv
from pipeline.validate import collect_scans, load_scan_for_prediction
from tests.pipeline import bad_inputs as bi

CLASSES = ["normal", "inflammation", "fat"]


def _scan_gate(path):
    """What ``spinepipe predict`` does with each argument before any network runs."""
    for p in collect_scans([path]):
        load_scan_for_prediction(p)


@pytest.mark.parametrize("make", bi.SCAN_CASES, ids=lambda f: f.__name__)
def test_bad_scan_gives_one_line_error(make, tmp_path):
    path, expected = make(tmp_path)
    with pytest.raises(SpinepipeInputError) as info:
        _scan_gate(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert expected.lower() in msg.lower(), msg
    assert path.name in msg, f"error does not name the file: {msg}"


def test_good_scan_passes(tmp_path):
    p = tmp_path / "ok_image.nii.gz"
    bi._write(bi.good_scan(), p)
    _scan_gate(p)


def test_corpus_is_large_enough():
    assert len(bi.SCAN_CASES) + 6 >= 20


@pytest.mark.parametrize(
    "make, reader",
    [
        (bi.points_nan, read_points_csv),
        (bi.points_missing_column, read_points_csv),
        (bi.labels_unknown_class, lambda p: read_vertebra_labels_csv(p, CLASSES)),
        (bi.labels_bad_confidence, lambda p: read_vertebra_labels_csv(p, CLASSES)),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_bad_csv(make, reader, tmp_path):
    path, expected = make(tmp_path)
    with pytest.raises(SpinepipeInputError) as info:
        reader(path)
    assert expected in str(info.value) and path.name in str(info.value)
    assert "\n" not in str(info.value)


def test_labelmap_geometry_mismatch(tmp_path):
    (img, lab), expected = bi.labelmap_other_geometry(tmp_path)
    with pytest.raises(SpinepipeInputError) as info:
        read_labelmap(lab, reference=read_image(img))
    assert expected in str(info.value) and lab.name in str(info.value)
