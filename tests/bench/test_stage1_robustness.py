"""The perturbations of ``bench/stage1_robustness.py`` keep the ground truth on the anatomy they move."""
from __future__ import annotations

import numpy as np
import pytest

from bench.stage1_robustness import DEFAULT_VARIANTS, KINDS, axis_spread, main, perturb, summarise
from data_prep.scan import Scan


def _blob_scan() -> tuple[Scan, dict[int, np.ndarray]]:
    """A smooth bright blob in an odd-shaped, anisotropic, non-axis-aligned scan; gt = its world centre."""
    shape = (17, 23, 29)
    spacing = np.array([1.5, 1.0, 1.25])
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # a permutation with a flip
    scan = Scan(np.zeros(shape, np.float32), spacing, np.array([10.0, -5.0, 40.0]), direction)
    centre_ijk = np.array([8.0, 11.0, 14.0])
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((ii, jj, kk), centre_ijk, spacing))
    scan = scan.with_array((100.0 * np.exp(-d2 / (2 * 4.0 ** 2)) + 5.0).astype(np.float32))
    return scan, {20: scan.voxel_to_world(centre_ijk).coords[0]}


def _world_centre_of_mass(scan: Scan, floor: float) -> np.ndarray:
    a = np.clip(np.asarray(scan.array, np.float64) - floor, 0.0, None)
    ijk = np.argwhere(a > 0).astype(np.float64)
    w = a[a > 0]
    return scan.voxel_to_world((ijk * w[:, None]).sum(0) / w.sum()).coords[0]


@pytest.mark.parametrize("variant", ["original", "reorient:RAS", "reorient:SAR", "oblique:30", "tilt:30",
                                     "gamma:2", "scale"])
def test_ground_truth_follows_the_blob(variant):
    scan, gt = _blob_scan()
    out, g = perturb(variant, scan, gt)
    floor = 5.0 * 7.3 + 1000.0 + 20.0 if variant == "scale" else 20.0
    centre = _world_centre_of_mass(out, floor)
    # tilt resamples (B-spline); the others move no voxel relative to the anatomy
    assert np.linalg.norm(centre - g[20]) < (0.6 if variant == "tilt:30" else 0.35), (variant, centre, g[20])


def test_oblique_moves_world_positions_and_ground_truth_together():
    scan, gt = _blob_scan()
    out, g = perturb("oblique:30", scan, gt)
    assert np.linalg.norm(g[20] - gt[20]) > 1.0  # the world position really moved ...
    np.testing.assert_allclose(out.world_to_voxel(g[20]).coords, scan.world_to_voxel(gt[20]).coords, atol=1e-9)
    np.testing.assert_array_equal(out.array, scan.array)  # ... and no voxel did


def test_intensity_codings():
    scan, gt = _blob_scan()
    i16, g = perturb("int16", scan, gt)
    assert i16.array.dtype == np.int16 and g is gt
    assert int(i16.array.min()) == -1950 and int(i16.array.max()) == -950
    n1, _ = perturb("noise:0.1", scan, gt, seed=3)
    n2, _ = perturb("noise:0.1", scan, gt, seed=3)
    np.testing.assert_array_equal(n1.array, n2.array)  # reproducible
    assert n1.array.min() >= 0.0 and not np.allclose(n1.array, scan.array)
    g2, _ = perturb("gamma:2", scan, gt)
    order = np.argsort(scan.array.ravel())
    assert np.all(np.diff(g2.array.ravel()[order]) >= -1e-4)  # monotone: the anatomy's ranking is kept


def test_bias_field_brightens_the_back_and_the_top():
    from data_prep.scan import reorient

    scan, gt = _blob_scan()
    out, g = perturb("bias:0.5", scan, gt)
    ref = reorient(scan, "LPS")
    np.testing.assert_allclose(out.direction, ref.direction)
    ratio = np.asarray(out.array, np.float64) / np.asarray(ref.array, np.float64)
    # j = posterior, k = superior after reorientation: exp(0.5 (0.7 y + 0.3 z)) from (-1, -1) to (+1, +1)
    np.testing.assert_allclose(ratio[0, -1, -1] / ratio[0, 0, 0], np.exp(2 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(ratio[0, -1, 0] / ratio[0, 0, 0], np.exp(2 * 0.5 * 0.7), rtol=1e-5)
    assert g is gt


def test_thick_slices_have_the_requested_spacing():
    scan, gt = _blob_scan()
    out, _ = perturb("thick:0.5", scan, gt)
    np.testing.assert_allclose(out.spacing, [4.0, 0.5, 0.5])
    np.testing.assert_allclose(out.direction, np.eye(3), atol=1e-9)  # reoriented: i = left-right (slices)


def test_unknown_perturbation_names_the_known_ones():
    scan, gt = _blob_scan()
    with pytest.raises(ValueError, match="unknown perturbation 'blur:2'.*tilt:DEG"):
        perturb("blur:2", scan, gt)
    assert all(v.partition(":")[0] in KINDS for v in DEFAULT_VARIANTS)


def test_summarise_counts_and_pairs_times():
    recs = {
        "original": [{"id": "a", "n_gt": 5, "identified": 5, "errors": [1.0, 3.0], "seconds": 2.0, "all_correct": True},
                     {"id": "b", "n_gt": 3, "identified": 2, "errors": [2.0], "seconds": 4.0, "all_correct": False}],
        "bias:1": [{"id": "a", "n_gt": 5, "identified": 4, "errors": [4.0], "seconds": 1.5, "all_correct": False},
                   {"id": "b", "n_gt": 3, "identified": 3, "errors": [], "seconds": 1.5, "all_correct": True}],
    }
    rows = {r["variant"]: r for r in summarise(recs)}
    assert rows["original"]["id_rate"] == 0.875 and rows["original"]["mean_err_mm"] == 2.0
    assert rows["original"]["all_correct"] == 0.5 and rows["original"]["not_all_correct"] == "b"
    assert rows["bias:1"]["time_vs_original"] == 0.5 and rows["bias:1"]["not_all_correct"] == "a"


def test_axis_spread_from_hand_made_tilts():
    rows = axis_spread({3: [10.0, -6.0, 24.0], 4: [9.0, 7.0]}, whole=[6.0, 8.0, 10.0])
    assert rows[0] == {"run": "whole scan", "runs": 3, "median_deg": 8.0, "max_abs_dev_deg": 2.0}
    assert rows[1]["max_abs_dev_deg"] == 16.0 and rows[1]["beyond_10_deg"] == 2 and rows[1]["beyond_12_deg"] == 2
    assert rows[2]["max_abs_dev_deg"] == 1.0 and rows[2]["beyond_10_deg"] == 0


def test_main_rejects_unknown_variants_and_bad_models_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "myosegmentum").mkdir(parents=True)  # passes the real-data check; nothing is read before the errors
    assert main(["--model", str(tmp_path), "--fold", "0", "--data", str(data), "--variants", "original,blur:2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "blur:2" in err and "tilt" in err and len(err.splitlines()) == 1
    assert main(["--model", str(tmp_path / "none"), "--fold", "0", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def _result_file(path, fold, records):
    import json

    path.write_text(json.dumps({"meta": {"model": [f"m/fold{fold}"], "decode": [], "fold": fold, "date": "d"},
                                "per_scan": records}))
    return str(path)


def test_merge_pools_the_per_scan_records_of_each_label(tmp_path, capsys):
    import json

    def rec(sid, n, ok):
        return {"id": sid, "cohort": "c", "n_gt": n, "identified": ok, "errors": [1.0] * ok, "seconds": 1.0,
                "all_correct": ok == n}

    a0 = _result_file(tmp_path / "a0.json", 0, {"original": [rec("s1", 5, 5)], "tilt:30": [rec("s1", 5, 0)]})
    a1 = _result_file(tmp_path / "a1.json", 1, {"original": [rec("s2", 4, 4)], "tilt:30": [rec("s2", 4, 4)]})
    b0 = _result_file(tmp_path / "b0.json", 0, {"original": [rec("s1", 5, 3)], "tilt:30": [rec("s1", 5, 5)]})
    assert main(["--merge", f"A={a0},{a1}", "--merge", f"B={b0}", "--out", str(tmp_path), "--name", "m"]) == 0
    d = json.loads((tmp_path / "m.json").read_text())
    side = {r["variant"]: r for r in d["side_by_side"]}
    assert side["original"] == {"variant": "original", "A": 1.0, "B": 0.6}
    assert side["tilt:30"] == {"variant": "tilt:30", "A": round(4 / 9, 3), "B": 1.0}
    rows_a = {r["variant"]: r for r in d["rows"]["A"]}
    assert rows_a["tilt:30"]["scans"] == 2 and rows_a["tilt:30"]["not_all_correct"] == "s1"
    assert "## B" in (tmp_path / "m.md").read_text()
    capsys.readouterr()
    assert main(["--merge", f"A={tmp_path / 'missing.json'}", "--out", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "no_meta.json").write_text('{"per_scan": {}, "meta": {"fold": 0}}')
    assert main(["--merge", f"A={tmp_path / 'no_meta.json'}", "--out", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "no_meta.json" in err and "'model'" in err and len(err.strip().splitlines()) == 1
    assert main(["--merge", f"A={a0}", "--merge", f"A={a1}", "--out", str(tmp_path), "--name", "x"]) == 2
    assert "label not used before" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
