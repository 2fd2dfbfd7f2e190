"""No patient identifiers in outputs; same inputs and seed give the same predictions; worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from data_prep.io import read_image
from pipeline.predict import predict_many, predict_scan
from tests.pipeline.test_predict import StandInClassifier, StandInLocalizer

SECRET_NAME = "DOE^JOHNATHAN"
SECRET_ID = "PID-8675309"


def _dicom_series(folder: Path) -> Path:
    """A small sagittal int16 DICOM series carrying a patient name and id in every slice."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = (rng.normal(500, 80, size=(12, 60, 40))).astype(np.int16)  # numpy (slice, row, col)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for n in range(vol.shape[0]):
        sl = sitk.GetImageFromArray(vol[n])
        sl.SetSpacing((0.9, 0.9))
        for tag, value in [("0010|0010", SECRET_NAME), ("0010|0020", SECRET_ID), ("0008|0060", "MR"),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"),
                           ("0020|0013", str(n + 1)), ("0020|0032", f"{3.5 * n}\\0\\0"),
                           ("0020|0037", "0\\1\\0\\0\\0\\-1"), ("0018|0050", "3.5")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{n:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_outputs_carry_no_patient_identifiers(tmp_path):
    series = _dicom_series(tmp_path / "patient_series")
    assert SECRET_NAME.encode() in (series / "IM000.dcm").read_bytes()  # the input does carry them
    scan = read_image(series)
    assert 12 in scan.shape
    out = tmp_path / "out"
    loc = StandInLocalizer({20: tuple(np.array(scan.shape) // 2)})
    res = predict_scan(series, out, loc, StandInClassifier(), evidence=True, overview=True)
    assert res.files
    for f in out.iterdir():
        data = f.read_bytes()
        if f.suffix == ".gz":
            import gzip

            data = gzip.decompress(data)
        assert SECRET_NAME.encode() not in data and SECRET_ID.encode() not in data, f.name
        assert b"JOHNATHAN" not in data and b"8675309" not in data, f.name


def test_same_seed_same_predictions(tmp_path):
    """Stage-2 classifier with seeded random weights: two runs give byte-identical reports."""
    from stage2_classify.config import tiny_config
    from stage2_classify.infer import Classifier
    from stage2_classify.model import Stage2Net
    from tests.pipeline.bad_inputs import _write, good_scan

    scan_path = _write(good_scan(shape=(16, 48, 64)), tmp_path / "s_image.nii.gz")
    outs = []
    for run in range(2):
        torch.manual_seed(123)
        clf = Classifier.from_network(Stage2Net(tiny_config()))
        loc = StandInLocalizer({20: (8, 20, 20), 21: (8, 24, 44)})
        res = predict_scan(scan_path, tmp_path / f"run{run}", loc, clf, overview=False)
        outs.append(res.files["report"].read_bytes())
    assert outs[0] == outs[1]
    assert b"p_inflammation" in outs[0]


def _stand_in_models():
    return StandInLocalizer({20: (6, 10, 10), 21: (6, 20, 30)}), StandInClassifier()


def test_batch_with_two_worker_processes(tmp_path):
    from tests.pipeline.bad_inputs import _write, good_scan

    scans = [_write(good_scan(), tmp_path / f"c{n}_image.nii.gz") for n in range(3)]
    (tmp_path / "broken_image.nii.gz").write_bytes(b"junk")
    scans.append(tmp_path / "broken_image.nii.gz")
    results = dict(predict_many(scans, tmp_path / "out", _stand_in_models, workers=2))
    assert len(results) == 4
    assert isinstance(results[scans[-1]], Exception)
    for p in scans[:3]:
        assert (tmp_path / "out" / f"{p.name.split('_')[0]}_vertebrae.csv").is_file()
