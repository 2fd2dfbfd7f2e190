"""The canonical dataset layout: discover, check_dataset (one test per kind of problem), load_subject, CLI."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from data_prep import io
from data_prep.dataset import Problem, check_dataset, count_subjects, discover, load_subject, read_header
from data_prep.errors import SpinepipeInputError
from data_prep.scan import Scan
from pipeline.cli import main
from tests.data_prep.test_io import OBLIQUE, write_dicom_series

CLASSES = ["normal", "inflammation", "fat"]
SHAPE = (8, 10, 12)
SPACING = (1.0, 1.0, 2.0)
ORIGIN = (-4.0, 5.0, 20.0)
DIRECTION = np.array([[0.0, 0, 1], [0, 1, 0], [-1, 0, 0]])  # sagittal-like permutation


def _image(sid_seed: int = 0) -> Scan:
    rng = np.random.default_rng(sid_seed)
    return Scan(rng.integers(0, 255, SHAPE).astype(np.uint8), SPACING, ORIGIN, DIRECTION)


def _labels(img: Scan) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:6, 2:8, 1:5] = 20  # L1
    lab[2:6, 2:8, 6:10] = 21  # L2
    return lab


def _write_subject(d: Path, sid: str, seed: int) -> None:
    img = _image(seed)
    io.write_image(img, d / f"{sid}_image.nii.gz")
    lab = _labels(img)
    io.write_image(img.with_array(lab), d / f"{sid}_vertebrae.nii.gz")
    outl = np.where(lab == 20, 20, 0).astype(np.uint8)
    io.write_image(img.with_array(outl), d / f"{sid}_outlines.nii.gz")
    io.write_image(img.with_array(lab), d / f"{sid}_coarse.nii.gz")
    lesions = np.zeros(SHAPE, np.uint8)
    lesions[3, 4, 2] = 1
    io.write_image(img.with_array(lesions), d / f"{sid}_lesions.nii.gz")
    c1 = img.voxel_to_world([3.5, 4.5, 2.5]).coords[0]
    c2 = img.voxel_to_world([3.5, 4.5, 7.5]).coords[0]
    (d / f"{sid}_points.csv").write_text(
        "level,x_mm,y_mm,z_mm\n" + "".join(f"{lv},{c[0]},{c[1]},{c[2]}\n" for lv, c in (("L1", c1), ("L2", c2)))
    )
    lo, hi = np.minimum(c1, c2) - 1, np.maximum(c1, c2) + 1
    (d / f"{sid}_boxes.csv").write_text(
        ",".join(io.BOX_COLUMNS) + "\n" + f"L1,{','.join(map(str, lo))},{','.join(map(str, hi))}\n"
    )


@pytest.fixture(scope="module")
def clean_template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clean")
    _write_subject(d, "s01", 1)
    _write_subject(d, "s02", 2)
    (d / "vertebra_labels.csv").write_text(
        "id,level,class,confidence\ns01,L1,normal,1\ns01,L2,fat,0.7\ns02,L1,0,1\ns02,21,inflammation,0.9\n"
    )
    return d


@pytest.fixture
def dataset(clean_template, tmp_path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(clean_template, d)
    return d


# ---------------------------------------------------------------------------------------------
# discover / load_subject
# ---------------------------------------------------------------------------------------------
def test_discover_clean(dataset):
    subjects = discover(dataset)
    assert [s.id for s in subjects] == ["s01", "s02"]
    s = subjects[0]
    assert s.image == dataset / "s01_image.nii.gz"
    assert s.vertebrae == dataset / "s01_vertebrae.nii.gz"
    assert s.points == dataset / "s01_points.csv"
    assert set(s.annotations()) == {"vertebrae", "outlines", "coarse", "lesions", "points", "boxes"}
    assert s.structures is None
    assert count_subjects(dataset) == 2


def test_discover_other_formats_and_dicom(tmp_path):
    img = Scan(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (0.7, 0.7, 4.0), ORIGIN, OBLIQUE)
    io.write_image(img, tmp_path / "b_image.mha")
    io.write_image(img.with_array(np.full(img.shape, 20, np.uint8)), tmp_path / "b_vertebrae.nrrd")
    io.write_image(img, tmp_path / "c_image.nii")
    write_dicom_series(img, tmp_path / "a_image")
    subjects = discover(tmp_path)
    assert [(s.id, s.image.name) for s in subjects] == [("a", "a_image"), ("b", "b_image.mha"), ("c", "c_image.nii")]
    assert subjects[1].vertebrae.name == "b_vertebrae.nrrd"
    assert check_dataset(tmp_path) == []
    data = load_subject(subjects[0])
    assert data.image.shape == (3, 4, 5) and data.vertebrae is None
    np.testing.assert_array_equal(data.image.array, img.array)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "nope", "dataset folder not found"),
        (lambda d: d, "dataset folder is empty"),
        (lambda d: (d / "x_vertebrae.nii.gz").write_bytes(b"1") and d, "no subject image found"),
        (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "expected a dataset folder, found a file"),
    ],
    ids=["missing", "empty", "no-image", "file"],
)
def test_discover_errors(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(SpinepipeInputError) as info:
        discover(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert message in str(info.value)


def test_discover_refuses_duplicate_ids(dataset):
    io.write_image(_image(), dataset / "s01_image.mha")
    with pytest.raises(SpinepipeInputError, match=r"s01_image.mha: duplicate subject id 's01'"):
        discover(dataset)


def test_load_subject(dataset):
    s = discover(dataset)[0]
    data = load_subject(s)
    image, vertebrae, *_ = data
    assert image.shape == SHAPE and image.same_geometry(vertebrae)
    assert set(np.unique(vertebrae.array)) == {0, 20, 21}
    ids, pts = data.points
    assert ids == [20, 21] and pts.space == "world"
    np.testing.assert_allclose(image.world_to_voxel(pts).coords[0], [3.5, 4.5, 2.5], atol=1e-9)
    assert data.boxes[0] == [20]
    moved = Scan(vertebrae.array, SPACING, np.array(ORIGIN) + 5.0, DIRECTION)
    io.write_image(moved, s.vertebrae)
    with pytest.raises(SpinepipeInputError, match="s01_vertebrae.nii.gz: geometry does not match"):
        load_subject(s)


def test_read_header_matches_full_read(dataset):
    hdr = read_header(dataset / "s01_image.nii.gz")
    full = io.read_image(dataset / "s01_image.nii.gz")
    assert hdr.same_geometry(full, tol=1e-9)
    assert hdr.array.strides == (0, 0, 0)  # no voxel data was read


# ---------------------------------------------------------------------------------------------
# check_dataset: a clean dataset, then one test per kind of problem
# ---------------------------------------------------------------------------------------------
def test_clean_dataset_has_no_problems(dataset):
    assert check_dataset(dataset, classes=CLASSES) == []
    assert check_dataset(dataset, classes=CLASSES, voxels=False) == []
    assert check_dataset(dataset) == []  # class names are allowed when no class list is given


def _relabel(d: Path, name: str, fn) -> None:
    scan = io.read_image(d / name)
    io.write_image(scan.with_array(fn(scan.array.copy())), d / name)


def _write_geom(d: Path, name: str, *, shape=SHAPE, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> None:
    io.write_image(Scan(np.zeros(shape, np.uint8), spacing, origin, direction), d / name)


def _set(a, idx, v):
    a[idx] = v
    return a


def _write_float_image(d: Path, name: str, value: float) -> None:
    arr = _image().array.astype(np.float32)
    arr[1, 2, 3] = value
    (d / "s01_image.nii.gz").unlink()
    io.write_image(_image().with_array(arr), d / name)


def _rewrite_csv(d: Path, name: str, old: str, new: str) -> None:
    p = d / name
    p.write_text(p.read_text().replace(old, new))


def _points_far(d: Path) -> None:
    p = d / "s02_points.csv"
    p.write_text("level,x_mm,y_mm,z_mm\nL1,500,0,0\n")


def _boxes_far(d: Path) -> None:
    p = d / "s02_boxes.csv"
    p.write_text(",".join(io.BOX_COLUMNS) + "\nL2,400,0,0,410,10,10\n")


CASES = {
    # name: (mutate(d), file named in the problem, fragment of the message)
    "orphan": (lambda d: shutil.copy(d / "s01_vertebrae.nii.gz", d / "ghost_vertebrae.nii.gz"),
               "ghost_vertebrae.nii.gz", "annotation without an image"),
    "orphan-csv": (lambda d: shutil.copy(d / "s01_points.csv", d / "ghost_points.csv"),
                   "ghost_points.csv", "annotation without an image"),
    "truncated": (lambda d: (d / "s02_image.nii.gz").write_bytes((d / "s02_image.nii.gz").read_bytes()[:60]),
                  "s02_image.nii.gz", "truncated"),
    "corrupt": (lambda d: (d / "s01_outlines.nii.gz").unlink() or (d / "s01_outlines.mha").write_bytes(b"\x00" * 999),
                "s01_outlines.mha", "cannot read"),
    "empty-file": (lambda d: (d / "s01_coarse.nii.gz").write_bytes(b""), "s01_coarse.nii.gz", "empty"),
    "not-3d": (lambda d: sitk.WriteImage(sitk.Image(8, 10, sitk.sitkUInt8), str(d / "s02_image.nii.gz")),
               "s02_image.nii.gz", "expected a 3D image, got 2D"),
    "4d": (lambda d: sitk.WriteImage(sitk.Image([8, 10, 12, 3], sitk.sitkUInt8), str(d / "s02_lesions.nii.gz")),
           "s02_lesions.nii.gz", "expected a 3D label map, got 4D"),
    "shape": (lambda d: _write_geom(d, "s01_vertebrae.nii.gz", shape=(8, 10, 11)),
              "s01_vertebrae.nii.gz", "geometry does not match the image: shape (8, 10, 11) vs image (8, 10, 12)"),
    "spacing": (lambda d: _write_geom(d, "s01_outlines.nii.gz", spacing=(1.0, 1.0, 2.5)),
                "s01_outlines.nii.gz", "geometry does not match the image: spacing"),
    "origin": (lambda d: _write_geom(d, "s01_coarse.nii.gz", origin=(-4.0, 5.0, 21.0)),
               "s01_coarse.nii.gz", "geometry does not match the image: origin"),
    "direction": (lambda d: _write_geom(d, "s02_lesions.nii.gz", direction=np.eye(3)),
                  "s02_lesions.nii.gz", "geometry does not match the image: direction differs"),
    "nan-nifti": (lambda d: _write_float_image(d, "s01_image.nii.gz", np.nan), "s01_image.nii.gz", "NaN/Inf"),
    "inf-mha": (lambda d: _write_float_image(d, "s01_image.mha", np.inf), "s01_image.mha", "1 non-finite voxel(s)"),
    "constant": (lambda d: io.write_image(_image().with_array(np.full(SHAPE, 7, np.uint8)), d / "s02_image.nii.gz"),
                 "s02_image.nii.gz", "image is constant (every voxel is 7)"),
    "unknown-label": (lambda d: _relabel(d, "s01_vertebrae.nii.gz", lambda a: _set(a, (0, 0, 0), 27)),
                      "s01_vertebrae.nii.gz", "unknown label value(s) 27"),
    "unknown-label-outlines": (lambda d: _relabel(d, "s02_outlines.nii.gz", lambda a: _set(a, (0, 0, 0), 99)),
                               "s02_outlines.nii.gz", "unknown label value(s) 99"),
    "fractional-label": (lambda d: io.write_image(_image().with_array(np.full(SHAPE, 0.5, np.float32)),
                                                  d / "s02_coarse.nii.gz"),
                         "s02_coarse.nii.gz", "whole numbers"),
    "unknown-level-points": (lambda d: _rewrite_csv(d, "s01_points.csv", "L2,", "L9,"),
                             "s01_points.csv", "line 3: unknown vertebra level 'L9'"),
    "unknown-level-boxes": (lambda d: _rewrite_csv(d, "s02_boxes.csv", "L1,", "Th1,"),
                            "s02_boxes.csv", "line 2: unknown vertebra level 'Th1'"),
    "points-outside": (_points_far, "s02_points.csv", "line 2: L1 point (500.0, 0.0, 0.0) mm lies outside the image"),
    "boxes-outside": (_boxes_far, "s02_boxes.csv", "line 2: L2 box centre (405.0, 5.0, 5.0) mm lies outside"),
    "labels-unknown-subject": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "s02,L1,0,1", "zz,L1,0,1"),
                               "vertebra_labels.csv", "line 4: subject 'zz' does not exist in the dataset"),
    "labels-level-absent": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "s01,L2,fat", "s01,L4,fat"),
                            "vertebra_labels.csv",
                            "line 3: level L4 of subject 's01' is absent from its vertebra mask (levels present: L1, L2)"),
    "labels-duplicate": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "s02,21,", "s02,20,"),
                         "vertebra_labels.csv", "line 5: duplicate row for subject 's02' level L1 (first given on line 4)"),
    "labels-confidence": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "fat,0.7", "fat,1.5"),
                          "vertebra_labels.csv", "line 3: confidence 1.5 out of range"),
    "labels-confidence-text": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "fat,0.7", "fat,high"),
                               "vertebra_labels.csv", "line 3: confidence 'high' is not a number"),
    "labels-unknown-class": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "fat,0.7", "bone,0.7"),
                             "vertebra_labels.csv", "line 3: unknown class 'bone'"),
    "labels-class-index": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "s02,L1,0,", "s02,L1,3,"),
                           "vertebra_labels.csv", "line 4: class index 3 out of range"),
    "labels-unknown-level": (lambda d: _rewrite_csv(d, "vertebra_labels.csv", "s02,21,", "s02,L8,"),
                             "vertebra_labels.csv", "line 5: unknown vertebra level 'L8'"),
    "labels-missing-column": (lambda d: (d / "vertebra_labels.csv").write_text("id,level\ns01,L1\n"),
                              "vertebra_labels.csv", "missing column(s) class"),
    "structures-geometry": (lambda d: _write_geom(d, "s02_structures.nii.gz", spacing=(1.0, 1.2, 2.0)),
                            "s02_structures.nii.gz", "geometry does not match the image: spacing"),
    "negative-lesion-value": (lambda d: io.write_image(_image().with_array(np.full(SHAPE, -2, np.int16)),
                                                       d / "s01_lesions.nii.gz"),
                              "s01_lesions.nii.gz", "negative label value(s) -2"),
    "duplicate-id": (lambda d: io.write_image(_image(), d / "s01_image.mha"),
                     "s01_image.mha", "duplicate subject id 's01': s01_image.nii.gz and s01_image.mha both exist"),
    "duplicate-annotation": (lambda d: io.write_image(io.read_image(d / "s02_vertebrae.nii.gz"),
                                                      d / "s02_vertebrae.mha"),
                             "s02_vertebrae.mha", "duplicate vertebrae file for subject 's02'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_reported_once_naming_the_file(dataset, case):
    mutate, fname, fragment = CASES[case]
    mutate(dataset)
    problems = check_dataset(dataset, classes=CLASSES)
    assert len(problems) == 1, [str(p) for p in problems]
    p = problems[0]
    assert p.severity == "error"
    assert p.path.name == fname
    assert fragment in p.message
    line = str(p)
    assert line.startswith(f"{dataset / fname}: ") and "\n" not in line


def test_file_outside_layout_is_a_warning(dataset):
    (dataset / "notes.txt").write_text("todo")
    (dataset / "s01_mask.nii.gz").write_bytes(b"x")
    (dataset / "extra").mkdir()
    (dataset / "subjects.csv").write_text("id\ns01\n")  # allowed metadata table
    (dataset / "README_provenance.md").write_text("semi-synthetic")  # allowed
    (dataset / "s01_overview.png").write_bytes(b"png")  # synth preview: allowed
    (dataset / ".s01_image.nii.gz.abc.part.nii.gz").write_bytes(b"")  # hidden: ignored
    problems = check_dataset(dataset, classes=CLASSES)
    assert sorted(p.path.name for p in problems) == ["extra", "notes.txt", "s01_mask.nii.gz"]
    assert {p.severity for p in problems} == {"warning"}
    assert all("not part of the dataset layout" in p.message for p in problems)
    assert str(problems[0]).startswith(f"{problems[0].path}: warning: ")


def test_every_problem_is_collected_without_crashing(dataset):
    (dataset / "s01_image.nii.gz").write_bytes(b"garbage")
    (dataset / "s02_vertebrae.nii.gz").write_bytes(b"\x1f\x8b garbage")
    (dataset / "s02_points.csv").write_bytes(b"\xff\xfe\x00bad")
    (dataset / "vertebra_labels.csv").write_text('id,level,class\n"unterminated,L1,0\n')
    problems = check_dataset(dataset, classes=CLASSES)
    names = sorted(p.path.name for p in problems)
    assert names == ["s01_image.nii.gz", "s02_points.csv", "s02_vertebrae.nii.gz", "vertebra_labels.csv"], names


def test_label_maps_still_checked_when_image_is_unreadable(dataset):
    (dataset / "s01_image.nii.gz").write_bytes(b"garbage")
    _relabel(dataset, "s01_vertebrae.nii.gz", lambda a: _set(a, (0, 0, 0), 40))
    problems = check_dataset(dataset)
    assert sorted((p.path.name, p.message.split(" ")[0]) for p in problems) == [
        ("s01_image.nii.gz", "cannot"), ("s01_vertebrae.nii.gz", "unknown")]


def test_empty_folder_is_one_problem(tmp_path):
    problems = check_dataset(tmp_path)
    assert [str(p) for p in problems] == [
        f"{tmp_path}: dataset folder is empty; expected <id>_image.nii.gz (or .nii, .mha, .mhd, .nrrd, .nhdr, "
        "or a DICOM folder <id>_image/)"]


def test_missing_folder_raises(tmp_path):
    with pytest.raises(SpinepipeInputError, match="dataset folder not found"):
        check_dataset(tmp_path / "nope")


def test_headers_only_finds_geometry_but_skips_voxels(dataset):
    _write_geom(dataset, "s01_vertebrae.nii.gz", origin=(0.0, 0.0, 0.0))
    io.write_image(_image().with_array(np.full(SHAPE, 7, np.uint8)), dataset / "s02_image.nii.gz")
    quick = check_dataset(dataset, voxels=False)
    assert [(p.path.name, "origin" in p.message) for p in quick] == [("s01_vertebrae.nii.gz", True)]
    full = check_dataset(dataset)
    assert sorted(p.path.name for p in full) == ["s01_vertebrae.nii.gz", "s02_image.nii.gz"]


def test_problem_is_one_line():
    p = Problem(Path("a/b.csv"), "first\nsecond   third")
    assert str(p) == "a/b.csv: first second third"
    with pytest.raises(ValueError):
        Problem(Path("x"), "m", severity="fatal")


def test_synthetic_cohort_is_clean(tmp_path):
    from data_prep.synth import write_cohort

    ids = write_cohort(tmp_path, 1, seed=0)
    assert [s.id for s in discover(tmp_path)] == list(ids)
    assert discover(tmp_path)[0].structures is not None
    assert [str(p) for p in check_dataset(tmp_path)] == []


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _run(*args):
    return CliRunner().invoke(main, ["check-data", *map(str, args)])


def test_cli_clean(dataset):
    res = _run(dataset, "--classes", "normal,inflammation,fat")
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines() == ["2 subjects, 0 problems"]


def test_cli_problems(dataset):
    CASES["origin"][0](dataset)
    CASES["labels-duplicate"][0](dataset)
    (dataset / "notes.txt").write_text("x")
    res = _run(dataset, "--classes", "normal,inflammation,fat")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == f"{dataset / 'notes.txt'}: warning: " + CASES_WARNING
    assert lines[1].startswith(str(dataset / "s01_coarse.nii.gz") + ": geometry does not match")
    assert lines[2].startswith(str(dataset / "vertebra_labels.csv") + ": line 5: duplicate row")
    assert lines[3] == "2 subjects, 2 problems, 1 warnings"
    assert "Traceback" not in res.output


CASES_WARNING = ("not part of the dataset layout (expected <id>_image, _vertebrae, _outlines, _coarse, _lesions, "
                 "_structures images, <id>_points.csv, <id>_boxes.csv or vertebra_labels.csv); ignored")


def test_cli_warnings_only_exit_zero(dataset):
    (dataset / "notes.txt").write_text("x")
    res = _run(dataset)
    assert res.exit_code == 0
    assert res.output.strip().splitlines()[-1] == "2 subjects, 0 problems, 1 warnings"


def test_cli_missing_folder(tmp_path):
    res = _run(tmp_path / "nope")
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {tmp_path / 'nope'}: dataset folder not found"
    assert res.exception is None or isinstance(res.exception, SystemExit)


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("cohort, n", [("myosegmentum", 50), ("chu2015", 17)])
def test_real_cohorts_are_clean(shared_data, cohort, n):
    d = shared_data / cohort
    assert count_subjects(d) == n
    problems = check_dataset(d)
    assert [str(p) for p in problems] == []
    subjects = discover(d)
    assert all(s.vertebrae is not None and s.outlines is not None for s in subjects)


def test_read_subject_contrasts_from_table_sequence_names_and_synth_meta(tmp_path):
    import json

    from data_prep.dataset import parse_contrast, read_subject_contrasts

    assert read_subject_contrasts(tmp_path) == {}
    (tmp_path / "subjects.csv").write_text("id,sequence\na,Dixon water\nb,T2_TSE\nc,PD\nd,\n")
    assert read_subject_contrasts(tmp_path) == {"a": "water", "b": "t2"}  # PD / empty: unknown
    (tmp_path / "synth_meta.json").write_text(json.dumps({"subjects": {"a": {"contrast": "t1"}, "e": {"contrast": "stir"}}}))
    assert read_subject_contrasts(tmp_path) == {"a": "water", "b": "t2", "e": "stir"}  # subjects.csv wins
    (tmp_path / "subjects.csv").write_text("id,contrast,sequence\na,STIR,dixon-water\nb,,t2\n")
    assert read_subject_contrasts(tmp_path) == {"a": "stir", "e": "stir"}  # an explicit column beats sequence names
    (tmp_path / "subjects.csv").write_text("id,contrast\na,flair\n")
    with pytest.raises(SpinepipeInputError, match=r"subjects\.csv.*unknown image contrast 'flair'.*t1"):
        read_subject_contrasts(tmp_path)
    assert parse_contrast(" Water ") == "water" and parse_contrast(float("nan")) == "" and parse_contrast(None) == ""
