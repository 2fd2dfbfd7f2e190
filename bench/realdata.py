"""What the real-data benchmarks share: the cohorts, the check that they are there, their halves."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

COHORTS = ("myosegmentum", "chu2015")


def real_data_missing(data: Path) -> bool:
    """True, after one line on stderr naming ``data``, when the real cohorts are not there (the caller then
    exits with 2 and measures nothing)."""
    if (Path(data) / COHORTS[0]).is_dir():
        return False
    print(f"error: {data}: real data not available (expected {' and '.join(c + '/' for c in COHORTS)}); "
          "nothing measured", file=sys.stderr)
    return True


def quiet_logging(level: int = logging.WARNING) -> None:
    """Benchmark logging: ``level`` overall, errors only from stage-2 inference (one warning per flagged
    scan otherwise)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stage2_classify.infer").setLevel(logging.ERROR)


def cohort_halves(data: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per cohort, the subject ids sorted by name split into ``(first half, second half)`` (the second
    one longer for an odd count): the train / held-out split of ``contrast_check.py``'s models."""
    out = {}
    for c in COHORTS:
        ids = sorted(p.name[: -len("_image.nii.gz")] for p in (Path(data) / c).glob("*_image.nii.gz"))
        k = len(ids) // 2
        out[c] = (ids[:k], ids[k:])
    return out


def merge_folders(folders, dst: Path) -> Path:
    """One canonical folder ``dst`` (made afresh) holding every scan file of ``folders`` by symlink, with
    their ``vertebra_labels.csv`` and ``subjects.csv`` concatenated: what ``train_stage2`` reads."""
    import shutil

    import pandas as pd

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    labels, subjects = [], []
    for src in map(Path, folders):
        for p in src.glob("*_*.nii.gz"):
            (dst / p.name).symlink_to(p.resolve())
        labels.append(pd.read_csv(src / "vertebra_labels.csv"))
        subjects.append(pd.read_csv(src / "subjects.csv"))
    pd.concat(labels).to_csv(dst / "vertebra_labels.csv", index=False)
    pd.concat(subjects).to_csv(dst / "subjects.csv", index=False)
    return dst


def semisynthetic_copies(data: Path, dst_root: Path, ids: dict[str, list[str]], seed: int, config=None) -> Path:
    """**Semi-synthetic** copies (``data_prep.lesions.make_semisynthetic``, lesions of ``config``) of the
    subjects ``ids[cohort]`` of each cohort, one folder per cohort under ``dst_root`` (kept when already
    written: a folder with its ``vertebra_labels.csv``) -> ``dst_root``."""
    from data_prep.lesions import make_semisynthetic

    for c in COHORTS:
        dst = Path(dst_root) / c
        if not (dst / "vertebra_labels.csv").is_file():
            make_semisynthetic(Path(data) / c, dst, seed, config, ids=ids[c])
    return Path(dst_root)


def train_on_first_halves(name: str, data: Path, work: Path, epochs: int, config=None, seed: int = 0,
                          overrides: list[str] | None = None) -> Path:
    """A stage-2 model (default configuration but for ``overrides``, ``["patch.size_mm=[64,64,64]"]`` as
    ``--set`` takes them, ``epochs`` epochs, training seed ``seed``) trained on seed-0
    **semi-synthetic** copies (lesions of ``config``, a ``data_prep.lesions.LesionConfig``; default simulator
    when ``None``) of the first half of each cohort (:func:`cohort_halves`) -> ``work/models/name``. A finished
    run of the same recipe there is reused: the folder is rewritten after every epoch, so only a ``recipe.json``
    written at the end marks it done. Copies go to ``work/train/<families>[_cnr<min_cnr>]``."""
    import json

    from data_prep.io import write_text
    from data_prep.lesions import LesionConfig
    from stage2_classify.config import Stage2Config
    from stage2_classify.train import train_stage2

    config = config or LesionConfig()
    out = Path(work) / "models" / name
    recipe = {"families": list(config.families), "epochs": int(epochs)}
    tag = "_".join(config.families)
    if config.min_cnr is not None:
        recipe["min_cnr"] = float(config.min_cnr)
        tag += f"_cnr{config.min_cnr:g}"
    if seed:
        recipe["seed"] = int(seed)
    if overrides:
        recipe["overrides"] = list(overrides)
    if (out / "recipe.json").is_file() and json.loads((out / "recipe.json").read_text()) == recipe:
        return out
    halves = cohort_halves(data)
    root = semisynthetic_copies(data, Path(work) / "train" / tag, {c: halves[c][0] for c in COHORTS}, 0, config)
    folder = merge_folders([root / c for c in COHORTS], Path(work) / "merged" / name)
    from bench.overrides import override_config

    cfg = override_config(Stage2Config(), list(overrides or []))
    cfg.train.epochs = int(epochs)
    cfg.train.seed = int(seed)
    train_stage2(folder, out, cfg)
    write_text(json.dumps(recipe) + "\n", out / "recipe.json")
    return out


def _expert_vertebrae(image: Path, vertebrae: Path):
    """``(scan, label map on it, vertebrae with their expert centroids)`` of ``image`` and its label map."""
    from data_prep.io import read_image, read_labelmap
    from data_prep.scan import vertebrae_from_labelmap

    img = read_image(image)
    labels = read_labelmap(vertebrae, img)
    return img, labels, vertebrae_from_labelmap(labels)


def _probabilities(rec: dict, classes: list[str]) -> list[float]:
    """A ``Classifier.classify`` record's class probabilities in ``classes`` order, 5 decimals."""
    return [round(float(rec["probabilities"][k]), 5) for k in classes]


def classify_at_expert_centroids(clf, image: Path, vertebrae: Path, contrast: str) -> dict[str, list[float]]:
    """``{level: class probabilities}`` (in ``clf.config.classes`` order, 5 decimals) of every vertebra of the
    label map ``vertebrae`` on ``image``, classified by the stage-2 ``Classifier`` ``clf`` around its expert
    centroid with the region the seg head predicts (no mask given, as in ``spinepipe predict``), without
    attributions."""
    img, _, verts = _expert_vertebrae(image, vertebrae)
    classes = list(clf.config.classes)
    return {v.level: _probabilities(r, classes)
            for v, r in zip(verts, clf.classify(img, verts, with_evidence=False, contrast=contrast))}


def evidence_at_expert_centroids(clf, image: Path, vertebrae: Path, contrast: str) -> dict[str, dict]:
    """As :func:`classify_at_expert_centroids`, with the Integrated-Gradients evidence ``spinepipe predict``
    computes: ``{level: {"p": class probabilities, "inside": share of |IG| inside the body the seg head
    found (what the report shows and flags), "inside_expert": share inside the expert body mask}}``. The
    expert mask is resampled onto each vertebra's patch grid (nearest neighbour)."""
    from data_prep.scan import resample_like
    from stage2_classify.evidence import fraction_inside

    img, labels, verts = _expert_vertebrae(image, vertebrae)
    classes = list(clf.config.classes)
    out = {}
    for v, r in zip(verts, clf.classify(img, verts, with_evidence=True, keep_evidence_maps=True, contrast=contrast)):
        expert = resample_like(labels, r["geometry"], is_label=True).array == v.label
        out[v.level] = {"p": _probabilities(r, classes), "inside": round(float(r["evidence_inside"]), 4),
                        "inside_expert": round(fraction_inside(r["evidence"].array, expert), 4)}
    return out


def write_predictions_json(res: dict, path: Path) -> None:
    """``res`` as indented JSON, except its ``predictions`` list: one line per prediction, so a results file of
    thousands of predictions stays readable in a diff."""
    import json

    from data_prep.io import write_text

    body = json.dumps({k: v for k, v in res.items() if k != "predictions"}, indent=1)
    lines = ",\n".join(json.dumps(r) for r in res["predictions"])
    write_text(body[:-2] + ',\n "predictions": [\n' + lines + "\n ]\n}\n", path)
