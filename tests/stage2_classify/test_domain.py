"""Contrast signature and the ``contrast_unseen`` check (stage2_classify.domain) on hand-made arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from stage2_classify.config import tiny_config
from data_prep.scan import Scan
from stage2_classify.domain import (CONTRAST_FLAG, ContrastReference, centre_signature, patch_signature,
                                    region_signature, scan_signature)


def _column_volume():
    """``(3, 3, 14)`` patch, k = head-foot: body at k 5..8 (0.2), other bodies at k 0 and 13 in columns
    i = 0, 1 only (0.5); disc space next to the body (k 3, 4, 9, 10) 0.6 in those columns; everything else
    0.99 (beyond the 4-mm band, or in column i = 2 where no other body closes the column)."""
    img = np.full((3, 3, 14), 0.99)
    body = np.zeros(img.shape, bool)
    others = np.zeros(img.shape, bool)
    body[:, :, 5:9] = True
    others[:2, :, 0] = others[:2, :, 13] = True
    img[body] = 0.2
    img[others] = 0.5
    for k in (3, 4, 9, 10):
        img[:2, :, k] = 0.6
    return img, body, others


def test_patch_signature_reads_only_the_disc_space_between_bodies():
    img, body, others = _column_volume()
    assert patch_signature(img, body, others, spacing_mm=2.0, band_mm=4.0) == (0.2, 0.6)
    # a wider band reaches k 1, 2 / 11, 12 (0.99): the median moves
    assert patch_signature(img, body, others, spacing_mm=2.0, band_mm=8.0)[1] == pytest.approx(0.795)
    # the band follows axis 2 (head-foot): the same volume with axes 0 and 2 swapped has no disc space
    swap = lambda a: np.swapaxes(a, 0, 2)  # noqa: E731
    assert patch_signature(swap(img), swap(body), swap(others), 2.0, 4.0) is None


def test_patch_signature_none_without_neighbours_or_body():
    img, body, others = _column_volume()
    assert patch_signature(img, body, None, 2.0) is None
    assert patch_signature(img, body, np.zeros_like(others), 2.0) is None
    tiny = np.zeros_like(body)
    tiny[0, 0, 6] = True
    assert patch_signature(img, tiny, others, 2.0) is None
    with pytest.raises(ValueError, match=r"\(3, 3, 14\).*\(3, 3\)"):
        patch_signature(img, body, others[..., 0], 2.0)


def test_region_signature_medians_and_log_ratio():
    sig = region_signature([(0.2, 0.6), (0.4, 0.6), None, (0.3, 0.9)])
    np.testing.assert_allclose(sig, [0.3, math.log(0.62 / 0.32)])
    assert region_signature([None, None]) is None


def _spine(direction=np.eye(3), spacing=(1.0, 1.0, 1.0)):
    """``(20, 20, 100)`` scan at 1 mm, head-foot along world z: bodies (0.4) at z 20, 50, 80 +- 10 mm, discs
    (0.8) between them, everything else 0.1; centroids of L1-L3 at the bodies' centres (world mm)."""
    z = np.arange(100)
    prof = np.full(100, 0.1)
    for c in (20, 50, 80):
        prof[(z >= c - 10) & (z <= c + 10)] = 0.4
    for c in (35, 65):
        prof[(z >= c - 4) & (z <= c + 4)] = 0.8
    arr = np.broadcast_to(prof, (20, 20, 100)).copy()
    scan = Scan(arr, spacing=spacing, origin=np.zeros(3), direction=direction)
    cents = {20 + n: scan.voxel_to_world(np.array([10.0, 10.0, c])).coords[0] for n, c in enumerate((20, 50, 80))}
    return scan, cents


def test_centre_signature_reads_bodies_and_disc_cylinders():
    scan, cents = _spine()
    np.testing.assert_allclose(centre_signature(scan, cents), [0.4, math.log(0.82 / 0.42)])
    # a cylinder reaching past the disc (half-length 0.25 x 30 mm = 7.5 mm > 4 mm) still has a disc median
    # only when most of it is disc: at 0.5 x 30 = 15 mm it holds more body than disc
    assert centre_signature(scan, cents, disc_half_length=0.5)[1] == pytest.approx(0.0)
    # the stored orientation does not matter: the same spine stored with axes permuted and one flipped
    # (voxel (a, b, c) here is voxel (c, 19 - b, a) of ``scan``, world (c, 19 - b, a) mm)
    perm = np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]], dtype=float)
    other = Scan(np.transpose(scan.array, (2, 1, 0))[:, ::-1, :], origin=np.array([0.0, 19.0, 0.0]), direction=perm)
    np.testing.assert_allclose(other.voxel_to_world(np.array([3.0, 4.0, 5.0])).coords[0], [5.0, 15.0, 3.0])
    np.testing.assert_allclose(centre_signature(other, cents), centre_signature(scan, cents))


def test_centre_signature_pairs_only_adjacent_levels():
    scan, cents = _spine()
    assert centre_signature(scan, {20: cents[20]}) is None
    # L1 and L3 without L2: their midpoint lies inside L2's body, so no pair
    assert centre_signature(scan, {20: cents[20], 22: cents[22]}) is None
    # T12 -> L1 is adjacent (the T13 slot between them is empty), L5 -> S1 is not used (sacrum centroid)
    assert centre_signature(scan, {19: cents[20], 20: cents[21]}) is not None
    assert centre_signature(scan, {24: cents[21], 26: cents[22]}) is None


def test_scan_signature_joins_parts():
    np.testing.assert_allclose(scan_signature(np.array([0.1, 0.2]), None), [0.1, 0.2, np.nan, np.nan])
    np.testing.assert_allclose(scan_signature(None, np.array([0.3, 0.4])), [np.nan, np.nan, 0.3, 0.4])
    assert scan_signature(None, None) is None


def test_reference_novelty_is_the_larger_part_of_the_nearest_scaled_distances():
    ref = ContrastReference(np.array([[0.5, 0.0, 0.5, 0.0], [0.2, 1.0, np.nan, np.nan]]), ("water", "", "t2", "water"))
    assert ref.contrasts == ("t2", "water")
    # centre part: to row 0 (0.1/0.1, 0.4/0.2) -> sqrt(5); to row 1 (0.2/0.1, 0.6/0.2) -> sqrt(13)
    assert ref.novelty(np.array([0.4, 0.4, np.nan, np.nan]), (0.1, 0.2)) == pytest.approx(math.sqrt(5.0))
    # region part only row 0 has: (0.3/0.1, 0) -> 3 > sqrt(5)
    assert ref.novelty(np.array([0.4, 0.4, 0.8, 0.0]), (0.1, 0.2)) == pytest.approx(3.0)
    assert ref.novelty(np.array([0.2, 1.0, 0.5, 0.1]), (0.1, 0.2)) == pytest.approx(0.5)
    assert math.isnan(ref.novelty(np.full(4, np.nan), (0.1, 0.2)))
    again = ContrastReference.from_dict(ref.to_dict())
    np.testing.assert_allclose(again.signatures, ref.signatures)
    assert again.contrasts == ref.contrasts


@pytest.mark.parametrize("bad, match", [
    ({"signatures": []}, r"\(N, 4\).*got shape \(0,\)"),
    ({"signatures": [[0.1, 0.2, 0.3]]}, r"got shape \(1, 3\)"),
    ({"signatures": [[0.1, None, 0.2, 0.3]]}, "complete part"),
    ({"signatures": [[None, None, None, None]]}, "complete part"),
    ({"signatures": [["a", 1, 2, 3]]}, "rows of numbers"),
    ({"names": ["a", "b"], "signatures": [[0.1, 0.2, 0.3, 0.4]]}, "signature names"),
    ([1, 2], "mapping"),
])
def test_reference_rejects_bad_data(bad, match):
    with pytest.raises(ValueError, match=match):
        ContrastReference.from_dict(bad)


def test_config_rejects_bad_contrast_check():
    cfg = tiny_config()
    cfg.contrast_check.scales = (0.1, 0.0)
    with pytest.raises(ValueError, match="contrast_check"):
        cfg.validate()
    cfg = tiny_config()
    cfg.contrast_check.disc_radius_mm = 0.0
    with pytest.raises(ValueError, match="disc_radius_mm"):
        cfg.validate()


def _classifier(reference):
    from stage2_classify.infer import Classifier
    from stage2_classify.model import Stage2Net

    clf = Classifier.from_network(Stage2Net(tiny_config()))
    clf.reference = reference
    return clf


def test_check_flags_every_vertebra_of_a_far_scan(caplog):
    scan = Scan(np.zeros((2, 2, 2)), name="far_scan.nii.gz")
    sig = np.array([0.2, 1.0, np.nan, np.nan])  # centre part only (no body found)
    near = _classifier(ContrastReference(np.array([[0.25, 1.0, 0.3, 0.2]]), ("water",)))
    recs = [{"flags": []}, {"flags": ["cut_by_fov"]}]
    near._check_contrast(scan, recs, sig, None)
    assert [r["flags"] for r in recs] == [[], ["cut_by_fov"]]
    assert recs[0]["contrast_novelty"] == pytest.approx(0.5) and recs[1]["contrast_novelty"] == pytest.approx(0.5)
    # the region part, once measured, counts too: (0.3 -> 0.6) / 0.1 = 3 units
    recs = [{"flags": []}]
    near._check_contrast(scan, recs, np.array([0.2, 1.0, 0.6, 0.2]), None)
    assert recs[0]["flags"] == [CONTRAST_FLAG] and recs[0]["contrast_novelty"] == pytest.approx(3.0)
    far = _classifier(ContrastReference(np.array([[0.6, -0.5, np.nan, np.nan]]), ("t1",)))
    recs = [{"flags": []}, {"flags": ["cut_by_fov"]}]
    far._check_contrast(scan, recs, sig, None)
    assert [r["flags"] for r in recs] == [[CONTRAST_FLAG], ["cut_by_fov", CONTRAST_FLAG]]
    assert "far_scan.nii.gz" in caplog.text and "nearest training scan" in caplog.text
    # a threshold of None switches the signature test off
    far.config.contrast_check.threshold = None
    recs = [{"flags": []}]
    far._check_contrast(scan, recs, sig, None)
    assert recs[0]["flags"] == []


def test_check_flags_a_named_contrast_the_training_never_named():
    scan = Scan(np.zeros((2, 2, 2)))
    sig = np.array([0.2, 1.0, 0.2, 1.0])
    clf = _classifier(ContrastReference(np.array([[0.2, 1.0, 0.2, 1.0]]), ("water",)))
    recs = [{"flags": []}]
    clf._check_contrast(scan, recs, sig, "T1")
    assert recs[0]["flags"] == [CONTRAST_FLAG]
    recs = [{"flags": []}]
    clf._check_contrast(scan, recs, sig, "water")
    assert recs[0]["flags"] == [] and recs[0]["contrast_novelty"] == 0.0
    # no reference (a model saved before the check) or no signature: nothing flagged, novelty NaN
    for c, s in ((_classifier(None), sig), (clf, None)):
        recs = [{"flags": []}]
        c._check_contrast(scan, recs, s, None)
        assert recs[0]["flags"] == [] and math.isnan(recs[0]["contrast_novelty"])


def test_classify_measures_the_centre_part_from_the_given_centroids(monkeypatch):
    """Classifier.classify passes the centre part of the vertebrae it was given (a tiny untrained network
    finds no body, so the region part is missing) to the check."""
    from data_prep.scan import Vertebra

    scan, cents = _spine(spacing=(1.0, 1.0, 1.0))
    clf = _classifier(ContrastReference(np.array([[0.4, 0.0, np.nan, np.nan]]), ()))
    got = {}
    monkeypatch.setattr(type(clf), "_check_contrast", lambda self, sc, recs, sig, named: got.setdefault("sig", sig))
    clf.classify(scan, [Vertebra(v, c) for v, c in cents.items()], with_evidence=False)
    from stage2_classify.patches import normalise_intensity

    cc = clf.config.contrast_check
    expect = centre_signature(normalise_intensity(scan, clf.config.patch.intensity_percentiles), cents,
                              cc.body_radius_mm, cc.disc_radius_mm, cc.disc_half_length)
    np.testing.assert_allclose(got["sig"][:2], expect)


def test_training_saves_the_reference_per_subject(tmp_path, monkeypatch):
    """train_on_samples ends by measuring each training subject's signature with the network's own body
    predictions (here a stand-in that returns the samples' true masks) and saves it with the model."""
    import stage2_classify.infer as infer
    from data_prep.checkpoint import load_model
    from stage2_classify.config import Stage2Config
    from stage2_classify.train import train_on_samples

    from .conftest import toy_samples

    cfg = tiny_config()
    cfg.train.epochs = 1
    samples = toy_samples(cfg, 6)
    for i, s in enumerate(samples):
        s.subject = f"subj{i % 2}"
        s.contrast = "water" if i % 2 == 0 else "t2"
        s.centre_signature = np.array([0.3, 0.1 * (i % 2)])  # as build_samples sets it, one per subject
    seen = []

    def stand_in(net, img):
        s = next(s for s in samples if np.array_equal(s.image, img[0, 0].numpy()))
        seen.append(s.subject)
        return s.targets.body, s.targets.others, "predicted"

    monkeypatch.setattr(infer, "predicted_body", stand_in)
    out = train_on_samples(samples, cfg, tmp_path / "m")
    assert sorted(seen) == sorted(s.subject for s in samples)
    _, _, extra = load_model(out, Stage2Config, kind="stage2")
    ref = ContrastReference.from_dict(extra["contrast_reference"])
    assert ref.contrasts == ("t2", "water") and ref.signatures.shape == (2, 4)
    for row, subject in zip(ref.signatures, ("subj0", "subj1")):
        mine = [s for s in samples if s.subject == subject]
        expect = region_signature([patch_signature(s.image, s.targets.body, s.targets.others, cfg.patch.spacing_mm,
                                                   cfg.contrast_check.band_mm) for s in mine])
        np.testing.assert_allclose(row[2:], expect, atol=1e-5)
        np.testing.assert_allclose(row[:2], mine[0].centre_signature, atol=1e-5)


def test_novelty_reaches_both_csvs():
    """``contrast_novelty`` travels from the records to ``<name>_classes.csv`` and from the verdicts to the
    radiologist report (NaN stays empty)."""
    from data_prep.scan import Vertebra, VertebraVerdict
    from pipeline.report import build_report
    from stage2_classify.infer import classes_table

    classes = ("normal", "fat")
    recs = [{"level": "L1", "label": 20, "class": "normal", "probabilities": {"normal": 0.9, "fat": 0.1},
             "evidence_inside": 0.5, "flags": [CONTRAST_FLAG], "contrast_novelty": 2.34567},
            {"level": "L2", "label": 21, "class": "fat", "probabilities": {"normal": 0.2, "fat": 0.8},
             "evidence_inside": 0.5, "flags": [], "contrast_novelty": float("nan")}]
    df = classes_table(recs, classes)
    assert df["contrast_novelty"].iloc[0] == pytest.approx(2.346) and math.isnan(df["contrast_novelty"].iloc[1])
    verts = [Vertebra(20, np.zeros(3)), Vertebra(21, np.array([0.0, 0.0, -30.0]))]
    verdicts = [VertebraVerdict(20, np.array([0.9, 0.1]), 0.5, [CONTRAST_FLAG], 2.34567),
                VertebraVerdict(21, np.array([0.2, 0.8]), 0.5, [])]
    rep = build_report(verts, verdicts, classes)
    assert rep["contrast_novelty"].iloc[0] == pytest.approx(2.346) and math.isnan(rep["contrast_novelty"].iloc[1])
    assert rep["flags"].iloc[0] == CONTRAST_FLAG
