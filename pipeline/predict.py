"""Scan -> stage 1 -> stage 2 -> report files. Orchestration only: the networks are passed in.

Anything that offers the two small protocols below can drive the pipeline, so orchestration is tested
with stand-in networks (``tests/pipeline/test_predict.py``) and the real stages plug in through
:func:`load_models`.

Outputs per scan ``<name>`` (``<name>`` = file name without suffix and without a trailing ``_image``):
``<name>_vertebrae.csv`` (report), ``<name>_labels.nii.gz`` (vertebral-body VerSe label map on the
input grid), ``<name>_centroids.json`` (VerSe), ``<name>_centroids.mrk.json`` (3D Slicer),
``<name>_overview.png`` and, with ``evidence=True``, ``<name>_evidence.nii.gz``. All are written into a
hidden temporary folder first and moved into place only when every file of that scan succeeded.

Per run, :func:`write_run_record` adds ``predict_run.json``: which models (folder, weights SHA-256, how
they were trained) and settings made these reports, and what became of each scan, so a verdict can be
traced to the model that gave it.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from data_prep.errors import SpinepipeInputError
from data_prep.io import strip_image_suffix, write_image
from data_prep.scan import Scan, Vertebra
from pipeline.report import (VertebraVerdict, build_report, placed_vertebrae, write_report, write_slicer_markups,
                             write_verse_json)
from pipeline.validate import load_scan_for_prediction

log = logging.getLogger(__name__)


class Localizer(Protocol):
    """Stage 1 as the pipeline sees it."""

    def localize(self, scan: Scan) -> list[Vertebra]:
        """Vertebrae in view (world LPS centroids, VerSe labels, confidences, flags)."""


@dataclass
class Classification:
    """Stage 2 output for one scan."""

    verdicts: list[VertebraVerdict]
    body_labels: Scan | None = None  # VerSe label map on the input grid
    evidence: Scan | None = None  # attribution map on the input grid


class Classifier(Protocol):
    """Stage 2 as the pipeline sees it."""

    classes: Sequence[str]

    def classify_scan(self, scan: Scan, vertebrae: list[Vertebra], with_evidence: bool = False) -> Classification:
        """Per-vertebra verdicts; optional label map and evidence map on ``scan``'s grid."""


@dataclass
class ScanResult:
    """What :func:`predict_scan` produced for one input."""

    source: Path
    name: str
    files: dict[str, Path] = field(default_factory=dict)
    n_vertebrae: int = 0
    seconds: float = 0.0
    summary: str = ""


def scan_name(path: str | os.PathLike) -> str:
    """Report name of a scan: file name without image suffix and without a trailing ``_image``."""
    stem = strip_image_suffix(Path(path).name.rstrip("/"))
    return stem[: -len("_image")] if stem.endswith("_image") and len(stem) > len("_image") else stem


def predict_scan(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    localizer: Localizer,
    classifier: Classifier,
    *,
    evidence: bool = False,
    overview: bool = True,
) -> ScanResult:
    """Run both stages on one scan and write its outputs into ``out_dir`` (all or nothing)."""
    t0 = time.perf_counter()
    path = Path(path)
    out_dir = Path(out_dir)
    scan = load_scan_for_prediction(path)
    name = scan_name(path)
    vertebrae = localizer.localize(scan)
    if not vertebrae:
        raise SpinepipeInputError(path, "no vertebra found: no spine in view, or not a spine MRI")
    # Attributions are always computed: the report's evidence_inside column and its low-evidence flag
    # need them. ``evidence`` only decides whether the map itself is saved.
    result = classifier.classify_scan(scan, vertebrae, with_evidence=True)
    classes = list(classifier.classes)
    report = build_report(vertebrae, result.verdicts, classes)
    vertebrae = placed_vertebrae(vertebrae, result.verdicts)  # the body centroids stage 2 measured, where it did

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out_dir))
    try:
        files = {"report": tmp / f"{name}_vertebrae.csv"}
        write_report(report, files["report"])
        files["verse_json"] = write_verse_json(vertebrae, scan, tmp / f"{name}_centroids.json")
        files["slicer"] = write_slicer_markups(vertebrae, tmp / f"{name}_centroids.mrk.json", name=name)
        if result.body_labels is not None:
            files["labels"] = write_image(result.body_labels, tmp / f"{name}_labels.nii.gz")
        if evidence and result.evidence is not None:
            files["evidence"] = write_image(result.evidence, tmp / f"{name}_evidence.nii.gz")
        if overview:
            files["overview"] = _write_overview(scan, result, report, tmp / f"{name}_overview.png", name)
        final = {}
        for key, f in files.items():
            dest = out_dir / f.name
            os.replace(f, dest)
            final[key] = dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = report["class"].value_counts().to_dict() if len(report) else {}
    levels = f"{report['level'].iloc[0]}-{report['level'].iloc[-1]}"
    flagged = int((report["flags"].astype(str) != "").sum())
    summary = (
        f"{name}: {len(report)} vertebrae {levels}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (f"; {flagged} flagged" if flagged else "")
    )
    return ScanResult(path, name, final, len(report), time.perf_counter() - t0, summary)


RUN_RECORD = "predict_run.json"


def run_record(localizer: Localizer, classifier: Classifier,
               outcomes: Sequence[tuple[Path, "ScanResult | Exception"]]) -> dict:
    """The provenance of a prediction run (see :func:`write_run_record`). Stand-in networks without model
    folders (tests) are recorded as ``[]`` / ``None``."""
    import datetime
    import importlib.metadata

    import torch

    from data_prep.checkpoint import model_provenance

    try:
        version = importlib.metadata.version("spinepipe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    stage2_dir = getattr(classifier, "model_dir", None)
    cfg = getattr(classifier, "config", None)
    scans = []
    for path, res in outcomes:
        if isinstance(res, Exception):
            scans.append({"source": str(path), "error": str(res)})
        else:
            scans.append({"source": str(path), "name": res.name, "n_vertebrae": res.n_vertebrae,
                          "seconds": round(res.seconds, 2), "files": {k: v.name for k, v in res.files.items()}})
    return {
        "spinepipe": version,
        "torch": torch.__version__,
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "stage1_models": [model_provenance(d) for d in getattr(localizer, "model_dirs", [])],
        "stage2_model": (dict(model_provenance(stage2_dir), train_contrasts=_train_contrasts(classifier))
                         if stage2_dir is not None else None),
        "settings": {"contrast": getattr(classifier, "contrast", None),
                     "evidence_threshold": getattr(cfg, "evidence_threshold", None),
                     "ig_steps": getattr(cfg, "ig_steps", None)},
        "scans": scans,
    }


def _train_contrasts(classifier: Classifier) -> list[str] | None:
    """The image contrasts of the stage-2 model's training scans, from its contrast reference (None without
    one, e.g. a model saved before the check or trained on scans of unknown contrast)."""
    ref = getattr(classifier, "reference", None)
    return None if ref is None else sorted(str(c) for c in ref.contrasts)


def write_run_record(out_dir: str | os.PathLike, localizer: Localizer, classifier: Classifier,
                     outcomes: Sequence[tuple[Path, "ScanResult | Exception"]]) -> Path:
    """Write ``out_dir/predict_run.json`` (atomically; a later run in the same folder replaces it): versions,
    the stage-1 model folder(s) (each ensemble member) and the stage-2 one with their weights' SHA-256 and
    training facts (epochs, number of training subjects or patches, ``synthetic_only``, stage 2's training
    contrasts), the stage-2 settings in force, and per scan its files or its error. Called once the scans are
    done, by ``spinepipe predict`` (when at least one scan succeeded) and ``make demo``."""
    import json

    from data_prep.io import write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_text(json.dumps(run_record(localizer, classifier, outcomes), indent=1) + "\n", out / RUN_RECORD)


def _write_overview(scan: Scan, result: Classification, report, path: Path, name: str) -> Path:
    from data_prep.overview import save_overview

    annotations = []
    for _, row in report.iterrows():
        text = f"{row['level']} {row['class']}"
        if row["evidence_inside"] == row["evidence_inside"]:  # not NaN
            text += f" ev {row['evidence_inside']:.2f}"
        if row["flags"]:
            text += " !"
        annotations.append({"level": row["level"], "centroid": (row["x_mm"], row["y_mm"], row["z_mm"]), "text": text})
    save_overview(scan, result.body_labels, path, title=name, annotations=annotations)
    return path


def predict_many(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    make_models: Callable[[], tuple[Localizer, Classifier]],
    *,
    evidence: bool = False,
    workers: int = 1,
) -> Iterator[tuple[Path, ScanResult | SpinepipeInputError]]:
    """Stream scans through the pipeline; yields ``(path, result or error)`` as each finishes.

    Memory stays bounded: one scan per worker is in memory at a time. With ``workers > 1`` each
    worker process loads the models once (``make_models`` must be picklable, e.g. a
    ``functools.partial`` of :func:`load_models`).
    """
    paths = [Path(p) for p in paths]
    if workers <= 1:
        localizer, classifier = make_models()
        for p in paths:
            try:
                yield p, predict_scan(p, out_dir, localizer, classifier, evidence=evidence)
            except SpinepipeInputError as exc:
                yield p, exc
        return
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(make_models,)) as pool:
        futures = {pool.submit(_worker_predict, p, out_dir, evidence): p for p in paths}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            yield futures[fut], fut.result()


_WORKER_MODELS: tuple | None = None


def _init_worker(make_models) -> None:
    global _WORKER_MODELS
    import torch

    torch.set_num_threads(1)
    _WORKER_MODELS = make_models()


def _worker_predict(path, out_dir, evidence):
    localizer, classifier = _WORKER_MODELS  # type: ignore[misc]
    try:
        return predict_scan(path, out_dir, localizer, classifier, evidence=evidence)
    except SpinepipeInputError as exc:
        return exc
