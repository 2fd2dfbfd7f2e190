"""Overview PNGs of sagittal spine scans: mid-sagittal slice, vertebral-body contours with level names.

Display convention (every figure): the scan is reoriented to LPS without interpolation, the shown
slice is the sagittal slice through the centre of the labelled vertebral bodies (or the middle slice
without labels), drawn with its physical aspect ratio, **head up, anterior left, posterior right**.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.io import atomic_path  # noqa: E402
from data_prep.scan import VERSE_LEVELS, Scan, reorient  # noqa: E402

log = logging.getLogger(__name__)

_LESION_COLOUR = "#ff3030"
_BODY_COLOUR = "#30d0ff"


def _mid_slice(labels: Scan | None, image: Scan) -> int:
    if labels is not None:
        idx = np.flatnonzero(np.asarray(labels.array).reshape(labels.shape[0], -1).any(axis=1))
        if len(idx):
            counts = np.asarray(labels.array > 0).reshape(labels.shape[0], -1).sum(axis=1)
            return int(round(float(np.sum(np.arange(labels.shape[0]) * counts) / max(counts.sum(), 1))))
    return image.shape[0] // 2


def draw_sagittal(
    ax,
    image: Scan,
    labels: Scan | None = None,
    lesions: Scan | None = None,
    title: str = "",
    annotations: Sequence[dict[str, Any]] | None = None,
    slice_index: int | None = None,
    contours: bool = True,
) -> int:
    """Draw the mid-sagittal slice of ``image`` (with contours) on a matplotlib axis; return the LPS slice.

    ``labels`` choose the slice (through the bodies' centre) and, with ``contours``, are outlined and named.
    ``annotations``: dicts with ``level`` (name or VerSe id), optional ``centroid`` (world LPS mm, used to
    place the text; defaults to the body's centre in the slice) and ``text``.
    """
    img = reorient(image, "LPS")
    lab = reorient(labels, "LPS") if labels is not None else None
    les = reorient(lesions, "LPS") if lesions is not None else None
    i = _mid_slice(lab, img) if slice_index is None else int(slice_index)
    i = int(np.clip(i, 0, img.shape[0] - 1))
    sl = np.asarray(img.array[i], dtype=np.float32)  # (J: posterior, K: superior)
    lo, hi = np.percentile(sl, [0.5, 99.5])
    sy, sz = img.spacing[1], img.spacing[2]
    y0 = img.origin[1]
    z0 = img.origin[2]
    ny, nz = sl.shape
    extent = (y0 - sy / 2, y0 + (ny - 0.5) * sy, z0 - sz / 2, z0 + (nz - 0.5) * sz)
    ax.imshow(sl.T, cmap="gray", origin="lower", extent=extent, vmin=lo, vmax=max(hi, lo + 1e-6),
              interpolation="bilinear", aspect="equal")
    yy = y0 + np.arange(ny) * sy
    zz = z0 + np.arange(nz) * sz
    centres: dict[int, tuple[float, float]] = {}
    fronts: dict[int, float] = {}  # anterior edge (LPS y, mm) of each body in the slice
    if lab is not None and contours:
        ls = np.asarray(lab.array[i])
        for vid in np.unique(ls[ls > 0]):
            mask = (ls == vid).astype(np.float32)
            ax.contour(yy, zz, mask.T, levels=[0.5], colors=_BODY_COLOUR, linewidths=0.8)
            jj, kk = np.nonzero(mask)
            cy, cz = float(yy[jj].mean()), float(zz[kk].mean())
            centres[int(vid)] = (cy, cz)
            fronts[int(vid)] = float(yy[jj].min())
            y_text = fronts[int(vid)] - 3.0
            ax.text(y_text, cz, VERSE_LEVELS.get(int(vid), str(vid)), color=_BODY_COLOUR, fontsize=7,
                    ha="right", va="center", fontweight="bold")
    if les is not None:
        ms = np.asarray(les.array[i]) > 0
        if ms.any():
            ax.contour(yy, zz, ms.T.astype(np.float32), levels=[0.5], colors=_LESION_COLOUR, linewidths=1.0)
    for ann in annotations or []:
        lvl = ann.get("level")
        vid = None
        if lvl is not None:
            from data_prep.scan import level_id

            vid = int(lvl) if isinstance(lvl, (int, np.integer)) else level_id(str(lvl))
        anchor = annotation_anchor(vid, ann.get("centroid"), centres, fronts)
        if anchor is None:
            continue
        ax.text(anchor[0], anchor[1], str(ann.get("text", "")), color="yellow", fontsize=6, ha=anchor[2], va="center",
                bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.5, lw=0))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return i


def annotation_anchor(vid: int | None, centroid_world, centres: dict[int, tuple[float, float]],
                      fronts: dict[int, float]) -> tuple[float, float, str] | None:
    """Where a vertebra's annotation goes on the sagittal slice: ``(y_mm, z_mm, horizontal alignment)`` (LPS).

    Height: the annotation's world centroid ``(x, y, z)`` when given, else the body's centre in the slice.
    A body outlined in the slice has its level name drawn just in front of it (right-aligned at the anterior
    edge), so the annotation starts just behind that edge (left-aligned) instead of centred on the body,
    where a text wider than the body would cover the name. Without an outline: centred on the centroid.
    ``None`` when there is nothing to place it by.
    """
    z = None if centroid_world is None else float(np.asarray(centroid_world, dtype=float).reshape(3)[2])
    if vid is not None and vid in fronts:
        return fronts[vid] + 1.0, (centres[vid][1] if z is None else z), "left"
    if centroid_world is not None:
        c = np.asarray(centroid_world, dtype=float).reshape(3)
        return float(c[1]), float(c[2]), "center"
    if vid is not None and vid in centres:
        return centres[vid][0], centres[vid][1], "center"
    return None


def save_overview(
    image: Scan,
    labels: Scan | None,
    path: str | os.PathLike,
    lesions: Scan | None = None,
    title: str = "",
    annotations: list[dict] | None = None,
) -> Path:
    """Write a PNG of the mid-sagittal slice with body contours, level names and lesion outlines.

    Head up, anterior left, physical aspect ratio. ``annotations`` (optional) are per-vertebra dicts
    ``{"level": "L1", "centroid": (x, y, z) world mm or None, "text": "..."}`` overlaid on the slice.
    Written atomically.
    """
    img = reorient(image, "LPS")
    ext_y = img.shape[1] * img.spacing[1]
    ext_z = img.shape[2] * img.spacing[2]
    h = 6.0
    w = max(2.5, h * ext_y / max(ext_z, 1e-6)) + 0.4
    fig, ax = plt.subplots(figsize=(w, h + 0.3), dpi=110)
    try:
        i = draw_sagittal(ax, image, labels, lesions, title, annotations)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)
    log.debug("overview %s (sagittal slice %d)", path, i)
    return Path(path)


def save_panels(panels: Sequence[dict[str, Any]], path: str | os.PathLike, height_in: float = 6.0) -> Path:
    """Side-by-side overviews: each panel is a dict of :func:`draw_sagittal` keyword arguments
    (``image`` required; ``labels``, ``lesions``, ``title``, ``annotations`` optional)."""
    widths = []
    for p in panels:
        img = reorient(p["image"], "LPS")
        widths.append(max(0.4, img.shape[1] * img.spacing[1] / max(img.shape[2] * img.spacing[2], 1e-6)))
    fig, axes = plt.subplots(1, len(panels), figsize=(height_in * sum(widths) + 0.5, height_in + 0.3), dpi=110,
                             gridspec_kw=dict(width_ratios=widths), squeeze=False)
    try:
        for ax, p in zip(axes[0], panels):
            draw_sagittal(ax, **p)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)
    return Path(path)


__all__ = ["annotation_anchor", "draw_sagittal", "save_overview", "save_panels"]
