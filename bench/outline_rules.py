"""How right are the voxels that a loose-outline rule supervises? Real outlines against the expert masks.

Stage 2 trains its segmentation head from the real ``<id>_outlines.nii.gz`` contours (a few sagittal
slices per body, drawn *around* it) by reading each filled outline as the body boundary moved outward by
``loss.outline_offset_mm`` +- ``loss.outline_band_mm`` (:func:`stage2_classify.patches.build_targets`):
the outline eroded by offset + band is "this body", everything outside the outline eroded by
offset - band is "not this body", the band between is left unsupervised. This script measures, on every
outlined slice of the real data, against the expert vertebral-body masks:

* the signed distance of the drawn contour pixels to the expert body boundary (mm, + = outside);
* for each rule: the share of its positive voxels that are body, the share of its negative voxels (within
  10 mm of the outline) that are not this body, and the share of the body it supervises as positive.

No training, real data only (skips with a message when ``../shared/data`` is absent)::

    python bench/outline_rules.py            # -> bench/results/outline_rules.json + .md

Distances are in mm on each slice's own in-plane grid (anisotropic pixels handled by elliptical
structuring elements and the exact Euclidean distance transform with sampling = pixel size).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from data_prep.io import read_labelmap, write_text  # noqa: E402
from data_prep.weak_labels import _inplane, _sl, fill_outlines, shrink2d  # noqa: E402

log = logging.getLogger("outline_rules")

#: (name, offset mm, band mm): the default rule, its neighbours, and the symmetric 4-mm band used before.
RULES: tuple[tuple[str, float, float], ...] = (
    ("offset 4 +- 2 (default)", 4.0, 2.0),
    ("offset 4 +- 1.5", 4.0, 1.5),
    ("offset 4 +- 3", 4.0, 3.0),
    ("offset 0 +- 4 (before)", 0.0, 4.0),
)
NEAR_MM = 10.0


def rule_counts(filled: np.ndarray, body: np.ndarray, sp2: np.ndarray, offset_mm: float, band_mm: float) -> np.ndarray:
    """Counts for one outlined slice: ``[positives, positives in body, negatives near, negatives near not in
    body, body pixels, body pixels supervised positive]`` (negatives counted within NEAR_MM of the outline)."""
    pos = shrink2d(filled, offset_mm + band_mm, sp2)
    near = shrink2d(filled, -NEAR_MM, sp2)
    neg = ~shrink2d(filled, offset_mm - band_mm, sp2) & near
    return np.array([pos.sum(), (pos & body).sum(), neg.sum(), (neg & ~body).sum(), body.sum(), (pos & body).sum()],
                    dtype=np.int64)


def contour_offsets(filled: np.ndarray, body: np.ndarray, sp2: np.ndarray) -> np.ndarray:
    """Signed distance (mm) of the outline's boundary pixels to the body boundary: + outside, - inside."""
    edge = filled & ~ndimage.binary_erosion(filled)
    if not edge.any() or not body.any():
        return np.zeros(0)
    out = ndimage.distance_transform_edt(~body, sampling=sp2)
    ins = ndimage.distance_transform_edt(body, sampling=sp2)
    return np.where(body, -ins, out)[edge]


def measure(data: Path, limit: int | None = None) -> dict:
    per = {}
    for cohort in ("myosegmentum", "chu2015"):
        files = sorted((data / cohort).glob("*_outlines.nii.gz"))[:limit]
        counts = {name: np.zeros(6, np.int64) for name, _, _ in RULES}
        offs, n_slices = [], 0
        for f in files:
            sid = f.name[: -len("_outlines.nii.gz")]
            filled = fill_outlines(read_labelmap(f))
            verts = read_labelmap(data / cohort / f"{sid}_vertebrae.nii.gz", reference=filled)
            F = np.rint(np.asarray(filled.array)).astype(np.int64)
            V = np.rint(np.asarray(verts.array)).astype(np.int64)
            ax, _ = filled.axis_of(0)
            sp2 = _inplane(ax, filled.spacing)
            for s in range(F.shape[ax]):
                f2, v2 = F[_sl(ax, s)], V[_sl(ax, s)]
                for vid in np.unique(f2[f2 > 0]):
                    this, body = f2 == vid, v2 == vid
                    n_slices += 1
                    offs.append(contour_offsets(this, body, sp2))
                    for name, off, band in RULES:
                        counts[name] += rule_counts(this, body, sp2, off, band)
        o = np.concatenate(offs) if offs else np.zeros(0)
        per[cohort] = {"scans": len(files), "outlined_slices": n_slices, "counts": counts,
                       "offset_mm": {"mean": float(o.mean()) if o.size else None,
                                     "median": float(np.median(o)) if o.size else None,
                                     "p10": float(np.percentile(o, 10)) if o.size else None,
                                     "p90": float(np.percentile(o, 90)) if o.size else None,
                                     "share_inside_body": float((o < 0).mean()) if o.size else None}}
    return per


def _table(per: dict) -> tuple[list[dict], list[dict]]:
    offsets, rules = [], []
    cohorts = list(per) + ["pooled"]
    for c in cohorts:
        items = list(per.values()) if c == "pooled" else [per[c]]
        if c != "pooled":
            offsets.append({"cohort": c, "scans": per[c]["scans"], "outlined_slices": per[c]["outlined_slices"],
                            **{k: None if v is None else round(v, 3) for k, v in per[c]["offset_mm"].items()}})
        for name, off, band in RULES:
            a = sum(i["counts"][name] for i in items)
            rules.append({"cohort": c, "rule": name, "positive_mm": f"erode {off + band:g}",
                          "negative_mm": f"outside {'erode' if off - band >= 0 else 'dilate'} {abs(off - band):g}",
                          "positives_right": round(a[1] / max(a[0], 1), 4),
                          "negatives_right": round(a[3] / max(a[2], 1), 4),
                          "body_supervised": round(a[5] / max(a[4], 1), 4)})
    return offsets, rules


def _md(rows: list[dict]) -> str:
    return "\n".join(md_table(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--limit", type=int, default=None, help="first N scans per cohort only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data / "myosegmentum").is_dir():
        log.error("real data not available: %s is absent; nothing measured", args.data)
        return 2
    t0 = time.time()
    offsets, rules = _table(measure(args.data, args.limit))
    meta = {"data": str(args.data), "limit": args.limit, "near_mm": NEAR_MM, "seconds": round(time.time() - t0, 1),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"meta": meta, "contour_offsets": offsets, "rules": rules}, indent=1) + "\n",
               args.out / "outline_rules.json")
    write_text("# Loose outlines vs expert masks (real data, no training)\n\n"
               "Generated by `python bench/outline_rules.py`. Offsets: signed distance of the drawn contour's "
               "pixels to the expert body boundary on every outlined slice (mm, + = outside the body).\n\n"
               + _md(offsets) + "\n\nRules (stage 2 reads an outline as the boundary moved outward by offset +- band): "
               f"share of positive pixels that are body, of negative pixels within {NEAR_MM:g} mm of the outline that "
               "are not this body, and of the body supervised as positive.\n\n" + _md(rules) + "\n",
               args.out / "outline_rules.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
