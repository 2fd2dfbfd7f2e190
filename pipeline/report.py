"""Radiologist-facing outputs: the per-vertebra CSV report, VerSe centroid JSON and 3D Slicer markups.

All writers are atomic (temporary name, then rename). Coordinates in the CSV and in the Slicer file
are world LPS mm of the *input* image; the VerSe JSON uses continuous voxel indices of the input
image, with its axis codes in the leading ``direction`` entry (VerSe convention).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from data_prep.io import write_csv, write_text
from data_prep.scan import Scan, Vertebra, VertebraVerdict, anatomical_rank

BASE_COLUMNS = ["level", "label", "x_mm", "y_mm", "z_mm", "centroid_from", "confidence"]


def report_columns(classes: Sequence[str]) -> list[str]:
    """Exact column order of ``<name>_vertebrae.csv``."""
    return BASE_COLUMNS + ["class"] + [f"p_{c}" for c in classes] + ["evidence_inside", "contrast_novelty", "flags"]


def build_report(
    vertebrae: Sequence[Vertebra],
    verdicts: Sequence[VertebraVerdict] | None,
    classes: Sequence[str],
) -> pd.DataFrame:
    """One row per vertebra, head to foot, columns :func:`report_columns`.

    ``verdicts`` are matched to vertebrae by VerSe label; a vertebra without a verdict gets empty
    class columns and the flag ``not_classified``. The position (``x_mm, y_mm, z_mm``, world LPS) is the
    centroid of the body stage 2 classified when its verdict carries one (``centroid_from`` = ``body``),
    else stage 1's (``stage1``).
    """
    by_label = {v.label: v for v in (verdicts or [])}
    rows = []
    for vert in sorted(vertebrae, key=lambda v: anatomical_rank(v.label)):
        verdict = by_label.get(vert.label)
        flags = list(vert.flags)
        body = verdict is not None and verdict.centroid_world is not None
        c = verdict.centroid_world if body else vert.centroid_world
        row: dict = {
            "level": vert.level,
            "label": vert.label,
            "x_mm": round(float(c[0]), 2),
            "y_mm": round(float(c[1]), 2),
            "z_mm": round(float(c[2]), 2),
            "centroid_from": "body" if body else "stage1",
            "confidence": round(float(vert.confidence), 4),
        }
        if verdict is None:
            row["class"] = ""
            row.update({f"p_{c}": np.nan for c in classes})
            row["evidence_inside"] = np.nan
            row["contrast_novelty"] = np.nan
            flags.append("not_classified")
        else:
            p = np.asarray(verdict.probabilities, dtype=float)
            if p.shape != (len(classes),):
                raise ValueError(f"vertebra {vert.level}: expected {len(classes)} probabilities, got shape {p.shape}")
            row["class"] = classes[int(np.argmax(p))]
            row.update({f"p_{c}": round(float(pc), 4) for c, pc in zip(classes, p)})
            row["evidence_inside"] = round(float(verdict.evidence_inside), 4)
            nov = float(verdict.contrast_novelty)
            row["contrast_novelty"] = round(nov, 3) if np.isfinite(nov) else np.nan
            flags.extend(f for f in verdict.flags if f not in flags)
        row["flags"] = ";".join(dict.fromkeys(flags))
        rows.append(row)
    return pd.DataFrame(rows, columns=report_columns(classes))


def placed_vertebrae(vertebrae: Sequence[Vertebra], verdicts: Sequence[VertebraVerdict] | None) -> list[Vertebra]:
    """``vertebrae`` with each centroid replaced by the body centroid its verdict carries (matched by VerSe
    label; the others unchanged): the positions every output of ``spinepipe predict`` uses."""
    by_label = {v.label: v for v in (verdicts or []) if v.centroid_world is not None}
    return [dataclasses.replace(v, centroid_world=by_label[v.label].centroid_world.copy()) if v.label in by_label else v
            for v in vertebrae]


def write_report(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the report CSV atomically."""
    return write_csv(df, path)


def verse_centroids(vertebrae: Sequence[Vertebra], scan: Scan) -> list[dict]:
    """VerSe-style centroid list: ``[{"direction": axcodes}, {"label", "X", "Y", "Z"}, ...]``.

    ``X, Y, Z`` are continuous voxel indices ``(i, j, k)`` of ``scan``; ``direction`` gives the
    patient direction each voxel axis points to (``"LPS"`` letters as in nibabel axcodes).
    """
    out: list[dict] = [{"direction": list(scan.orientation_code())}]
    for v in sorted(vertebrae, key=lambda v: anatomical_rank(v.label)):
        ijk = scan.world_to_voxel(v.centroid_world).coords[0]
        out.append({"label": int(v.label), "X": round(float(ijk[0]), 3), "Y": round(float(ijk[1]), 3), "Z": round(float(ijk[2]), 3)})
    return out


def write_verse_json(vertebrae: Sequence[Vertebra], scan: Scan, path: str | os.PathLike) -> Path:
    return write_text(json.dumps(verse_centroids(vertebrae, scan), indent=1), path)


def slicer_markups(vertebrae: Sequence[Vertebra], name: str = "vertebrae") -> dict:
    """3D Slicer markups (``.mrk.json``) point list in LPS mm, one control point per vertebra."""
    points = []
    for n, v in enumerate(sorted(vertebrae, key=lambda v: anatomical_rank(v.label)), start=1):
        points.append(
            {
                "id": str(n),
                "label": v.level,
                "description": ";".join(v.flags),
                "position": [round(float(c), 3) for c in v.centroid_world],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        )
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "name": name,
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "labelFormat": "%N-%d",
                "controlPoints": points,
            }
        ],
    }


def write_slicer_markups(vertebrae: Sequence[Vertebra], path: str | os.PathLike, name: str = "vertebrae") -> Path:
    return write_text(json.dumps(slicer_markups(vertebrae, name), indent=1), path)
