"""Synthetic sagittal lumbar(-thoracic) spine MRI: the embedded default dataset (demo, fast tests).

Each subject is rendered from a small analytic anatomy model:

* a spine **centreline** in the mid-sagittal plane, parametrised by arc length ``s`` (mm, ``s = 0`` at
  the S1 upper endplate, ``s > 0`` cranial), with lumbar lordosis, thoracic kyphosis, sacral kyphosis,
  a global tilt and a mild lateral (scoliotic) sway;
* every voxel gets **curvilinear coordinates** ``(s, n, w)``: ``n`` is the signed distance from the
  centreline in the sagittal plane (posterior positive; the posterior vertebral wall lies at
  ``n = 16 mm``) and ``w`` the left-right offset from the (swaying) centreline;
* structures are signed-distance-like functions in those coordinates (vertebral bodies as rounded
  boxes with a D-shaped cross-section and concave endplates, discs with nucleus/annulus, thecal sac,
  cord/conus/cauda, pedicles/laminae/articular and spinous processes, sacrum) or in world coordinates
  (skin, subcutaneous fat, paraspinal and psoas muscle, abdomen, great vessels);
* they are painted with soft edges (linear partial-volume ramps of one in-plane voxel; thick slices
  are supersampled 3x left-right and averaged), per-contrast tissue intensities, marrow texture,
  a smooth bias field, Rician noise and a per-scan intensity scaling / dtype;
* the canonical grid (axes towards L, P, S) is finally stored in a random axis order and flips
  (``LPI`` like the real data, ``PIL``, ``ASL`` ...); world geometry is unchanged by construction.

Ground truth per subject: the image, the vertebral-body label map (VerSe ids), a multi-structure label
map (see :data:`STRUCTURES`), the vertebrae (head to foot, world centroids from the label map), the
contrast, the anatomical variants and the levels cut by the field of view.

Cohorts are written in the canonical layout (see :func:`write_cohort`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from data_prep.errors import SpinepipeInputError
from data_prep.io import as_paths, write_csv, write_image, write_text
from data_prep.scan import (
    TRANSITIONAL_IDS,
    Scan,
    Vertebra,
    level_name,
    reorient,
    vertebrae_from_labelmap,
)

log = logging.getLogger(__name__)

#: Multi-structure label map values (``SynthSubject.structures``).
STRUCTURES: dict[int, str] = {
    0: "background (air outside the body)",
    1: "vertebral body (every body in the vertebra label map, incl. the S1 body)",
    2: "intervertebral disc (nucleus and annulus)",
    3: "spinal canal: thecal sac / CSF (incl. the cauda equina roots)",
    4: "spinal cord and conus medullaris",
    5: "posterior elements and other bone (pedicles, laminae, articular and spinous processes, sacrum below S1)",
    6: "muscle (paraspinal, psoas)",
    7: "fat (subcutaneous, epidural, interspinous, foraminal, prevertebral)",
    8: "other soft tissue (abdominal and pelvic viscera, great vessels, ligaments)",
}

#: Contrasts the generator can render.
CONTRASTS = ("t1", "t2", "stir", "water")

#: Folder-level file :func:`write_cohort` writes; its presence marks a built-in synthetic cohort.
SYNTH_META_FILE = "synth_meta.json"

# Tissue intensities per contrast (arbitrary units, ~0..1 before bias, noise and scaling).
_TISSUE: dict[str, dict[str, float]] = {
    #          marrow cortex nucleus annulus  csf   cord   fat  muscle viscera ligament vessel fluid
    "t1": dict(marrow=0.62, cortex=0.06, nucleus=0.36, annulus=0.28, csf=0.12, cord=0.40, fat=0.92,
               muscle=0.30, viscera=0.34, ligament=0.10, vessel=0.06, fluid=0.12),
    "t2": dict(marrow=0.36, cortex=0.05, nucleus=0.80, annulus=0.22, csf=0.95, cord=0.38, fat=0.72,
               muscle=0.17, viscera=0.26, ligament=0.07, vessel=0.05, fluid=0.90),
    "stir": dict(marrow=0.14, cortex=0.04, nucleus=0.75, annulus=0.18, csf=1.00, cord=0.40, fat=0.07,
                 muscle=0.20, viscera=0.28, ligament=0.06, vessel=0.05, fluid=0.95),
    "water": dict(marrow=0.30, cortex=0.05, nucleus=0.78, annulus=0.30, csf=0.88, cord=0.45, fat=0.07,
                  muscle=0.36, viscera=0.34, ligament=0.10, vessel=0.08, fluid=0.80),
}

# Nominal vertebral-body size (height SI, depth AP, width LR, mm) and the disc below each level.
_BODY_MM: dict[int, tuple[float, float, float]] = {
    15: (20.5, 27.0, 33.0), 16: (21.0, 27.5, 34.0), 17: (22.0, 28.5, 36.0), 18: (23.0, 29.5, 38.0),
    19: (24.0, 30.5, 40.0), 28: (24.5, 31.0, 41.0), 20: (25.0, 32.0, 43.0), 21: (26.0, 33.5, 45.0),
    22: (26.5, 34.5, 47.0), 23: (26.5, 35.5, 48.5), 24: (25.5, 36.0, 50.0), 25: (25.0, 36.0, 50.0),
    26: (30.0, 40.0, 50.0),
}
_DISC_BELOW_MM: dict[int, float] = {
    15: 5.0, 16: 5.5, 17: 6.0, 18: 6.5, 19: 7.0, 28: 7.5, 20: 7.5, 21: 8.5, 22: 9.5, 23: 10.0,
    24: 9.5, 25: 9.0,
}
_POST_WALL = 16.0  # n (mm) of the posterior vertebral wall


# ---------------------------------------------------------------------------------------------
# Configuration and results
# ---------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """Knobs of the synthetic spine generator. Ranges ``(lo, hi)`` are sampled uniformly per subject.

    Defaults give small, CPU-friendly scans (at most ``max_voxels`` = 1.1 M voxels; about 0.4-1.2 s per
    subject on one core) covering up to T10 to the sacrum (partial views included), with a realistic mix
    of contrasts, spacings, orientations and dtypes.
    """

    #: contrasts to draw from (subset of :data:`CONTRASTS`) and their relative weights (None = equal)
    contrasts: tuple[str, ...] = ("t1", "t2", "stir", "water")
    contrast_weights: Optional[tuple[float, ...]] = (0.25, 0.4, 0.15, 0.2)
    #: in-plane (AP, SI) pixel size and left-right slice thickness of anisotropic scans (mm)
    inplane_spacing_mm: tuple[float, float] = (0.6, 1.2)
    slice_thickness_mm: tuple[float, float] = (3.0, 4.5)
    #: fraction of isotropic-ish scans and their voxel size (mm)
    isotropic_rate: float = 0.2
    isotropic_spacing_mm: tuple[float, float] = (0.9, 1.4)
    #: field of view (mm) superior-inferior, anterior-posterior, left-right
    fov_si_mm: tuple[float, float] = (210.0, 320.0)
    fov_ap_mm: tuple[float, float] = (140.0, 230.0)
    fov_lr_mm: tuple[float, float] = (70.0, 120.0)
    #: voxel budget: the in-plane spacing is coarsened until the grid fits (keeps generation fast);
    #: isotropic scans (never supersampled) get twice the budget and are coarsened on every axis
    max_voxels: int = 1_100_000
    #: probability that the field of view cuts through a body at the top / bottom
    partial_top_rate: float = 0.25
    partial_bottom_rate: float = 0.25
    #: anatomical variant rates: 6 lumbar vertebrae (L6, id 25), 13 thoracic (T13, id 28),
    #: 4 lumbar vertebrae (L5 missing). L6 and missing-lumbar exclude each other (L6 wins).
    l6_rate: float = 0.05
    t13_rate: float = 0.03
    missing_lumbar_rate: float = 0.03
    #: global body-size scale, per-level size jitter (relative sd)
    size_scale: tuple[float, float] = (0.9, 1.12)
    size_jitter: float = 0.04
    #: curvature: sacral slope (S1 endplate vs horizontal), inclination of the upper lumbar spine (deg,
    #: negative = leaning back; lordosis L1-S1 follows from both), thoracic kyphosis (deg per 100 mm),
    #: global sagittal tilt (deg), lateral sway amplitude (mm)
    sacral_slope_deg: tuple[float, float] = (28.0, 45.0)
    upper_lumbar_angle_deg: tuple[float, float] = (-14.0, -2.0)
    kyphosis_deg_per_100mm: tuple[float, float] = (0.0, 12.0)
    tilt_deg: tuple[float, float] = (-5.0, 5.0)
    scoliosis_mm: tuple[float, float] = (0.0, 6.0)
    #: probability that a disc is degenerated (dark nucleus, lower height); higher for the lowest discs
    disc_degeneration_rate: float = 0.25
    #: stored grid orientations (3-letter codes, direction each voxel axis points towards), drawn uniformly
    orientations: tuple[str, ...] = ("LPI", "LPI", "LPI", "LPS", "PIL", "RAI", "ASL", "PIR", "SAR", "ILP")
    #: bias-field strength (log-amplitude) and Rician noise sd (fraction of the brightest tissue)
    bias_strength: tuple[float, float] = (0.08, 0.35)
    noise_level: tuple[float, float] = (0.01, 0.035)
    #: stored dtypes and their weights; uint8 scans are rescaled to 0-255 like the real cohorts
    dtypes: tuple[str, ...] = ("uint8", "uint16", "float32")
    dtype_weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    #: supersample thick slices 3x left-right (true partial volume across the slice)
    supersample: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, problem: str) -> SpinepipeInputError:
            return SpinepipeInputError(None, f"SynthConfig.{name}: {problem}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = tuple(v)
                setattr(self, f.name, v)
            if f.name.endswith(("_mm", "_deg", "_scale", "_strength", "_level", "_100mm")) and isinstance(v, tuple):
                if len(v) != 2 or not all(math.isfinite(float(x)) for x in v) or v[0] > v[1]:
                    raise bad(f.name, f"expected a range (lo, hi) with lo <= hi, got {v!r}")
            if f.name.endswith("_rate") and not (0.0 <= float(v) <= 1.0):
                raise bad(f.name, f"rate must lie in [0, 1], got {v!r}")
        for name in ("inplane_spacing_mm", "slice_thickness_mm", "isotropic_spacing_mm", "fov_si_mm",
                     "fov_ap_mm", "fov_lr_mm", "size_scale"):
            if getattr(self, name)[0] <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)!r}")
        if not self.contrasts or any(c not in CONTRASTS for c in self.contrasts):
            raise bad("contrasts", f"expected a non-empty subset of {CONTRASTS}, got {self.contrasts!r}")
        if self.contrast_weights is not None and (
            len(self.contrast_weights) != len(self.contrasts) or min(self.contrast_weights) < 0
            or sum(self.contrast_weights) <= 0
        ):
            raise bad("contrast_weights", "need one non-negative weight per contrast (or None)")
        axis_of = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}
        for code in self.orientations:
            c = str(code).upper()
            if len(c) != 3 or any(ch not in axis_of for ch in c) or sorted(axis_of[ch] for ch in c) != [0, 1, 2]:
                raise bad("orientations", f"{code!r} is not a 3-letter orientation code like 'LPI'")
        if not self.orientations:
            raise bad("orientations", "need at least one orientation code")
        if not self.dtypes or any(d not in ("uint8", "uint16", "float32") for d in self.dtypes):
            raise bad("dtypes", f"expected a subset of ('uint8', 'uint16', 'float32'), got {self.dtypes!r}")
        if len(self.dtype_weights) != len(self.dtypes) or min(self.dtype_weights) < 0 or sum(self.dtype_weights) <= 0:
            raise bad("dtype_weights", "need one non-negative weight per dtype")
        if self.max_voxels < 50_000:
            raise bad("max_voxels", f"too small ({self.max_voxels}); use at least 50000")
        if self.size_jitter < 0 or self.size_jitter > 0.3:
            raise bad("size_jitter", f"must lie in [0, 0.3], got {self.size_jitter}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SynthSubject:
    """One synthetic scan and its ground truth.

    ``labels`` holds vertebral bodies only (VerSe ids, posterior elements excluded); ``structures`` is
    the multi-structure map of :data:`STRUCTURES`; both lie on ``image``'s grid. ``vertebrae`` are
    head to foot with world LPS centroids computed from ``labels``; ``cut_levels`` are the VerSe ids of
    bodies partially outside the field of view (also flagged ``"cut_by_fov"`` on the vertebra).
    """

    image: Scan
    labels: Scan
    structures: Scan
    vertebrae: list[Vertebra]
    contrast: str
    variants: list[str]
    cut_levels: list[int]
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def levels(self) -> list[int]:
        return [v.label for v in self.vertebrae]


# ---------------------------------------------------------------------------------------------
# Small geometry helpers
# ---------------------------------------------------------------------------------------------
def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy from a signed distance (negative inside): 1 inside, 0 outside."""
    return np.clip(0.5 - d / width, 0.0, 1.0).astype(np.float32)


def _round_inter(da: np.ndarray, db: np.ndarray, r: float) -> np.ndarray:
    """Intersection of two SDFs with the common edge rounded by radius ``r``."""
    qa = da + r
    qb = db + r
    return np.sqrt(np.maximum(qa, 0) ** 2 + np.maximum(qb, 0) ** 2) + np.minimum(np.maximum(qa, qb), 0) - r


def _box_sdf(coords: Sequence[np.ndarray], centre: Sequence[float], half: Sequence[float], r: float) -> np.ndarray:
    """Rounded box SDF for broadcastable coordinate arrays."""
    q = [np.abs(c - m) - h + r for c, m, h in zip(coords, centre, half)]
    outside = np.sqrt(sum(np.maximum(x, 0) ** 2 for x in q))
    inside = np.minimum(np.maximum(np.maximum(q[0], q[1]), q[2]), 0)
    return outside + inside - r


def _ellipse_sdf(u: np.ndarray, v: np.ndarray, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Approximate SDF of the ellipse ``(u/a)^2 + (v/b)^2 <= 1`` and its normalised radius."""
    uu = u / a
    vv = v / b
    e = np.sqrt(uu * uu + vv * vv)
    g = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / np.maximum(e, 1e-6)
    return (e - 1.0) / np.maximum(g, 1e-6), e


def _lin_up(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear upsampling of a small array to ``shape`` (cell-centred, edge-clamped)."""
    out = np.asarray(a, np.float32)
    for ax, n in enumerate(shape):
        m = out.shape[ax]
        if m == n:
            continue
        pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
        i0 = np.minimum(pos.astype(int), max(m - 2, 0))
        i1 = np.minimum(i0 + 1, m - 1)
        w = (pos - i0).astype(np.float32)
        sh = [1] * out.ndim
        sh[ax] = n
        w = w.reshape(sh)
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
    return out


@dataclass
class _Level:
    vid: int
    sc: float  # arc-length centre
    height: float
    depth: float
    width: float
    taper: float = 0.0
    labelled: bool = True
    conc: float = 1.2


class _Canvas:
    """Image / structure / label arrays on the (supersampled) canonical grid, painted in order."""

    def __init__(self, shape: tuple[int, int, int]):
        self.img = np.zeros(shape, np.float32)
        self.struct = np.zeros(shape, np.uint8)
        self.lab = np.zeros(shape, np.uint8)

    def paint(self, box, alpha: np.ndarray, value, struct: int | None = None, label: int | None = None) -> None:
        sub = self.img[box]
        alpha = np.broadcast_to(alpha, sub.shape)
        sub += alpha * (np.asarray(value, np.float32) - sub)
        inside = alpha > 0.5
        if struct is not None:
            self.struct[box][inside] = struct
        if label is not None:
            self.lab[box][inside] = label


# ---------------------------------------------------------------------------------------------
# Subject generation
# ---------------------------------------------------------------------------------------------
def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` in a cohort drawn with ``seed`` (stable, independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def _u(rng: np.random.Generator, rng_pair: Sequence[float]) -> float:
    return float(rng.uniform(rng_pair[0], rng_pair[1]))


def generate_subject(seed: int, config: SynthConfig | None = None) -> SynthSubject:
    """Render one synthetic subject. Same ``seed`` and ``config`` give byte-identical arrays."""
    config = config or SynthConfig()
    rng = np.random.default_rng(int(seed))
    g = _Generator(rng, config)
    return g.run(int(seed))


class _Generator:
    def __init__(self, rng: np.random.Generator, cfg: SynthConfig):
        self.rng = rng
        self.cfg = cfg

    # -- anatomy -------------------------------------------------------------------------------
    def _sample_levels(self) -> tuple[list[int], list[str]]:
        rng, cfg = self.rng, self.cfg
        variants: list[str] = []
        lumbar = [20, 21, 22, 23, 24]
        r = rng.random()
        if r < cfg.l6_rate:
            lumbar = lumbar + [25]
            variants.append("L6")
        elif r < cfg.l6_rate + cfg.missing_lumbar_rate * (1 - cfg.l6_rate) and cfg.missing_lumbar_rate > 0:
            lumbar = lumbar[:-1]
            variants.append("4_lumbar")
        thor = [15, 16, 17, 18, 19]
        if rng.random() < cfg.t13_rate:
            thor = thor + [28]
            variants.append("T13")
        return thor + lumbar + [26], variants  # head to foot

    def _build_spine(self, ids_head_to_foot: list[int]) -> None:
        rng, cfg = self.rng, self.cfg
        scale = _u(rng, cfg.size_scale)
        levels: list[_Level] = []
        # S1 (sacrum) body: wedge, upper endplate at s = 0
        h, d, w = _BODY_MM[26]
        h1 = h * scale * rng.uniform(0.92, 1.08)
        levels.append(_Level(26, -h1 / 2, h1, d * scale * rng.uniform(0.92, 1.06), w * scale, taper=0.3, conc=0.4))
        s_top = 0.0
        discs: list[tuple[int, int, float, float]] = []  # (upper id, lower id, hydration, height)
        for vid in reversed(ids_head_to_foot[:-1]):
            lower = levels[-1]
            nominal = _DISC_BELOW_MM[vid]
            degen = rng.random() < cfg.disc_degeneration_rate * (1.6 if vid in (23, 24, 25) else 0.7)
            hyd = float(rng.uniform(0.15, 0.5) if degen else rng.uniform(0.75, 1.0))
            dh = nominal * scale * (0.55 + 0.45 * hyd) * rng.uniform(0.9, 1.1)
            bh, bd, bw = (x * scale * (1 + cfg.size_jitter * rng.standard_normal()) for x in _BODY_MM[vid])
            sc = s_top + dh + bh / 2
            levels.append(_Level(vid, sc, bh, bd, bw, labelled=True))
            discs.append((vid, lower.vid, hyd, dh))
            s_top = sc + bh / 2
        # sacral segments below S1 (bone, not labelled)
        s_bot = -h1
        seg_h = [21.0, 17.0, 13.0]
        for i, sh in enumerate(seg_h):
            sh *= scale
            gap = 1.8
            sc = s_bot - gap - sh / 2
            levels.append(_Level(0, sc, sh, (33.0 - 5 * i) * scale, (44.0 - 7 * i) * scale, taper=0.15,
                                 labelled=False, conc=0.0))
            s_bot = sc - sh / 2
        self.levels = levels  # foot-first order for S1..top, then sacral segments
        self.discs = discs
        self.s_top = s_top
        self.s_bottom = s_bot
        self.by_id = {lv.vid: lv for lv in levels if lv.vid}
        lv_l1 = self.by_id[20]
        # centreline angle phi(s) (deg): positive = going up moves anterior
        phi0 = _u(rng, cfg.sacral_slope_deg)
        lam = float(rng.uniform(40.0, 65.0))
        s_l1 = lv_l1.sc + lv_l1.height / 2
        phi_top = _u(rng, cfg.upper_lumbar_angle_deg)
        lordosis = (phi0 - phi_top) * (1 - math.exp(-s_l1 / lam))
        kyph = _u(rng, cfg.kyphosis_deg_per_100mm) / 100.0
        tilt = _u(rng, cfg.tilt_deg)
        kappa_s = float(rng.uniform(0.25, 0.5))
        ds = 1.0
        s = np.arange(self.s_bottom - 120.0, self.s_top + 150.0 + ds, ds)
        phi = np.where(
            s >= 0,
            phi_top + (phi0 - phi_top) * np.exp(-np.maximum(s, 0) / lam) - kyph * np.maximum(s - s_l1, 0),
            phi0 - kappa_s * np.minimum(-s, 110.0),
        ) + tilt
        rad = np.deg2rad(phi)
        t = np.stack([-np.sin(rad), np.cos(rad)], axis=1)  # (dy, dz) per mm going up
        nrm = np.stack([np.cos(rad), np.sin(rad)], axis=1)  # posterior normal
        pos = np.zeros((len(s), 2))
        steps = 0.5 * (t[1:] + t[:-1]) * ds
        pos[1:] = np.cumsum(steps, axis=0)
        i0 = int(np.argmin(np.abs(s)))
        self.p0 = np.array([rng.uniform(-15, 15), rng.uniform(-30, 40), rng.uniform(-120, 60)])
        pos = pos - pos[i0] + self.p0[1:]
        self.curve_s, self.curve_p, self.curve_t, self.curve_n = s, pos, t, nrm
        self.curve_phi = phi
        self.tree = cKDTree(pos)
        # lateral sway (scoliosis) x_c(s)
        amp = _u(rng, cfg.scoliosis_mm)
        period = float(rng.uniform(250.0, 450.0))
        ph = float(rng.uniform(0, 2 * np.pi))
        self.sway = (amp, period, ph)
        self.canal_ap = float(rng.uniform(14.0, 18.0)) * min(1.1, scale)
        self.canal_hw = float(rng.uniform(10.0, 12.5))
        self.conus_s = lv_l1.sc + float(rng.uniform(-0.9, 0.9)) * (lv_l1.height / 2 + 5)
        self.dural_end_s = float(rng.uniform(-45.0, -25.0))
        self.epidural = float(rng.uniform(1.0, 3.5))
        self.meta_anat = dict(
            size_scale=scale, sacral_slope_deg=phi0 + tilt, lordosis_deg=lordosis, tilt_deg=tilt,
            scoliosis_mm=amp, kyphosis_deg_per_100mm=kyph * 100,
            disc_hydration={level_name(u) + "/" + level_name(lo): round(hy, 3) for u, lo, hy, _ in discs},
        )

    def xc(self, s: np.ndarray) -> np.ndarray:
        amp, period, ph = self.sway
        return self.p0[0] + amp * (np.sin(2 * np.pi * s / period + ph) - math.sin(ph))

    def world_sn(self, s: float, n: float) -> np.ndarray:
        """(y, z) world of curvilinear (s, n)."""
        i = int(np.clip(np.searchsorted(self.curve_s, s), 1, len(self.curve_s) - 1))
        f = (s - self.curve_s[i - 1]) / (self.curve_s[i] - self.curve_s[i - 1])
        p = (1 - f) * self.curve_p[i - 1] + f * self.curve_p[i]
        nv = (1 - f) * self.curve_n[i - 1] + f * self.curve_n[i]
        return p + n * nv

    def body_z_extent(self, lv: _Level) -> tuple[float, float]:
        pts = [self.world_sn(s, n) for s in (lv.sc - lv.height / 2, lv.sc, lv.sc + lv.height / 2)
               for n in (_POST_WALL - lv.depth, _POST_WALL)]
        zs = [p[1] for p in pts]
        return min(zs), max(zs)

    # -- field of view and grid ------------------------------------------------------------------
    def _sample_grid(self) -> None:
        rng, cfg = self.rng, self.cfg
        isotropic = rng.random() < cfg.isotropic_rate
        if isotropic:
            iso = _u(rng, cfg.isotropic_spacing_mm)
            sp = np.array([iso * rng.uniform(0.95, 1.05), iso, iso])
        else:
            ip = _u(rng, cfg.inplane_spacing_mm)
            sp = np.array([_u(rng, cfg.slice_thickness_mm), ip, ip])
        labelled = [lv for lv in self.levels if lv.labelled and lv.vid not in (15, 16)]
        ext = {lv.vid: self.body_z_extent(lv) for lv in self.levels if lv.vid}
        # top limit: T9 body stays outside; bottom: below S1 body into the sacrum
        top_limit = ext[16][0] - 0.5
        s1_lo = ext[26][0]
        fov_si = _u(rng, cfg.fov_si_mm)
        bottom = s1_lo - float(rng.uniform(5.0, 45.0))
        cut_bottom = rng.random() < cfg.partial_bottom_rate
        cut_top = rng.random() < cfg.partial_top_rate
        order = [lv.vid for lv in sorted(labelled, key=lambda q: -q.sc)]  # head to foot
        if cut_bottom:
            cand = order[-3:]  # e.g. L4, L5, S1
            vid = cand[int(rng.integers(len(cand)))]
            lo, hi = ext[vid]
            bottom = lo + float(rng.uniform(0.3, 0.7)) * (hi - lo)
        top = min(bottom + fov_si, top_limit)
        if cut_top:
            # cut through a body so that >= 3 bodies stay fully inside
            cand = [v for v in order if ext[v][0] > bottom + 1.0]
            full_below = [v for v in cand if ext[v][1] < top]
            if len(full_below) >= 4:
                choices = full_below[: max(1, len(full_below) - 3)]
                vid = choices[int(rng.integers(len(choices)))]
                lo, hi = ext[vid]
                top = lo + float(rng.uniform(0.3, 0.7)) * (hi - lo)
        if top - bottom < 60:
            top = bottom + 60
        # AP extent: from in front of the bodies (with a margin) backwards
        ys_ant = []
        for lv in labelled:
            lo, hi = ext[lv.vid]
            if hi < bottom or lo > top:
                continue
            ys_ant.append(self.world_sn(lv.sc, _POST_WALL - lv.depth)[0])
        y_ant = min(ys_ant) if ys_ant else float(self.p0[1] - 40)
        fov_ap = _u(rng, cfg.fov_ap_mm)
        y_lo = y_ant - float(rng.uniform(12.0, 0.45 * fov_ap))
        x_off = float(rng.uniform(-8, 8))
        x_mid = float(self.p0[0] + x_off)
        # left-right: always cover the widest body (bodies are cut only superiorly / inferiorly)
        max_w = max(lv.width for lv in labelled)
        fov_lr = max(_u(rng, cfg.fov_lr_mm), max_w + 2 * (abs(x_off) + 2 * self.sway[0]) + 8)
        # voxel budget
        n = np.array([fov_lr / sp[0], fov_ap / sp[1], (top - bottom) / sp[2]])
        total = float(np.prod(n))
        budget = cfg.max_voxels * (2 if isotropic else 1)  # isotropic scans are not supersampled
        if total > budget:
            if isotropic:  # keep it isotropic: coarsen every axis
                f = (total / budget) ** (1 / 3)
                sp *= f
                n /= f
            else:
                f = math.sqrt(total / budget)
                sp[1:] *= f
                n[1:] /= f
        shape = tuple(int(max(8, round(v))) for v in n)
        self.spacing = sp
        self.shape = shape
        # canonical grid (axes towards L, P, S): voxel centres
        self.x = x_mid - 0.5 * (shape[0] - 1) * sp[0] + np.arange(shape[0]) * sp[0]
        self.y = y_lo + 0.5 * sp[1] + np.arange(shape[1]) * sp[1]
        self.z = bottom + 0.5 * sp[2] + np.arange(shape[2]) * sp[2]
        self.fov_z = (bottom, bottom + shape[2] * sp[2])
        self.ext = ext
        self.cut_top, self.cut_bottom = cut_top, cut_bottom

    # -- rendering -------------------------------------------------------------------------------
    def _curvilinear(self) -> None:
        Y, Z = np.meshgrid(self.y, self.z, indexing="ij")
        pts = np.stack([Y.ravel(), Z.ravel()], axis=1)
        _, idx = self.tree.query(pts)
        c = self.curve_p[idx]
        dlt = pts - c
        S = self.curve_s[idx] + np.einsum("ij,ij->i", dlt, self.curve_t[idx])
        N = np.einsum("ij,ij->i", dlt, self.curve_n[idx])
        self.S = S.reshape(Y.shape).astype(np.float32)
        self.N = N.reshape(Y.shape).astype(np.float32)
        self.Y, self.Z = Y.astype(np.float32), Z.astype(np.float32)
        # world y of the centreline as a function of z (monotone in z for |phi| < 90 deg)
        order = np.argsort(self.curve_p[:, 1])
        self.yc_of_z = lambda z: np.interp(z, self.curve_p[order, 1], self.curve_p[order, 0])

    def _box2d(self, s_lo, s_hi, n_lo, n_hi):
        m = (self.S >= s_lo) & (self.S <= s_hi) & (self.N >= n_lo) & (self.N <= n_hi)
        if not m.any():
            return None
        jj = np.flatnonzero(m.any(axis=1))
        kk = np.flatnonzero(m.any(axis=0))
        return slice(jj[0], jj[-1] + 1), slice(kk[0], kk[-1] + 1)

    def _sub(self, s_lo, s_hi, n_lo, n_hi, w_max):
        """Sub-box (slices) and its coordinates S, N (1, J, K) and W (I, J, K)."""
        b = self._box2d(s_lo, s_hi, n_lo, n_hi)
        if b is None:
            return None
        S = self.S[b][None]
        N = self.N[b][None]
        xc = self.xc(S)
        lo, hi = float(xc.min()) - w_max, float(xc.max()) + w_max
        ii = np.flatnonzero((self.xs >= lo) & (self.xs <= hi))
        if len(ii) == 0:
            return None
        bi = slice(ii[0], ii[-1] + 1)
        W = self.xs[bi][:, None, None] - xc
        return (bi,) + b, S, N, W.astype(np.float32)

    def _offset_y(self, n_off: float, Z: np.ndarray) -> np.ndarray:
        """World y of the curve offset by ``n_off`` mm (posterior) at heights ``Z``."""
        pts = self.curve_p + n_off * self.curve_n
        order = np.argsort(pts[:, 1])
        return np.interp(Z, pts[order, 1], pts[order, 0]).astype(np.float32)

    def _sub_rigid(self, sc, s_lo, s_hi, n_lo, n_hi, w_max):
        """Like :meth:`_sub` but in the rigid frame of the centreline at ``sc`` (no curvature folding)."""
        i = int(np.clip(np.searchsorted(self.curve_s, sc), 0, len(self.curve_s) - 1))
        p, t, nv = self.curve_p[i], self.curve_t[i], self.curve_n[i]
        dy, dz = self.Y - p[0], self.Z - p[1]
        Sr = (sc + dy * t[0] + dz * t[1]).astype(np.float32)
        Nr = (dy * nv[0] + dz * nv[1]).astype(np.float32)
        m = (Sr >= s_lo) & (Sr <= s_hi) & (Nr >= n_lo) & (Nr <= n_hi)
        if not m.any():
            return None
        jj = np.flatnonzero(m.any(axis=1))
        kk = np.flatnonzero(m.any(axis=0))
        b = slice(jj[0], jj[-1] + 1), slice(kk[0], kk[-1] + 1)
        xc = float(self.xc(np.array(sc)))
        ii = np.flatnonzero((self.xs >= xc - w_max) & (self.xs <= xc + w_max))
        if len(ii) == 0:
            return None
        bi = slice(ii[0], ii[-1] + 1)
        W = (self.xs[bi] - xc)[:, None, None].astype(np.float32)
        return (bi,) + b, Sr[b][None], Nr[b][None], W

    def _render(self) -> _Canvas:
        rng = self.rng
        T = self.tissue
        sp = self.spacing
        m = 3 if (self.cfg.supersample and sp[0] > 1.6 * sp[1]) else 1
        self.m = m
        nx = self.shape[0] * m
        self.xs = (self.x[:, None] + (np.arange(m) - (m - 1) / 2)[None, :] * sp[0] / m).ravel().astype(np.float32)
        shape = (nx, self.shape[1], self.shape[2])
        cv = _Canvas(shape)
        pv = float(sp[1])  # partial-volume ramp width (in-plane voxel)
        Y, Z, S, N = self.Y[None], self.Z[None], self.S[None], self.N[None]
        full = (slice(None), slice(None), slice(None))
        W = (self.xs[:, None, None] - self.xc(S)).astype(np.float32)

        # low-frequency random fields (texture of abdomen, marrow)
        def field(coarse: tuple[int, int, int], smooth: float) -> np.ndarray:
            f = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), smooth, mode="wrap")
            f /= max(float(f.std()), 1e-6)
            up = [1.0] + [max(1.0, min(4.0, shape[a] / (2.0 * coarse[a]))) for a in (1, 2)]
            if max(up) > 1.0:  # smooth (cubic) in-plane refinement before the cheap linear upsampling
                f = ndimage.zoom(f, up, order=3, mode="grid-wrap", grid_mode=True)
            return _lin_up(f, shape)

        visc_f = field((max(2, nx // 6), max(4, shape[1] // 8), max(4, shape[2] // 8)), 0.8)
        visc_g = field((max(2, nx // 6), max(4, shape[1] // 8), max(4, shape[2] // 8)), 0.8)
        tex = field((max(2, nx // 2), max(4, shape[1] // 3), max(4, shape[2] // 3)), 0.6)
        self.tex = tex

        # --- body outline and soft tissue (world-based) ---
        yc = self.yc_of_z(self.Z)[None]
        zS1 = self.world_sn(0.0, 0.0)[1]
        back_thick = self.back_thick_lumbar - (self.back_thick_lumbar - self.back_thick_sacral) / (
            1 + np.exp((Z - zS1 + 10) / 15.0))
        y_back = yc + _POST_WALL + self.canal_ap + back_thick
        y_front = float(self.yc_of_z(np.array([zS1 + 80]))[0]) - self.belly + 0.08 * (Z - zS1)
        d_out = np.maximum(Y - y_back, y_front - Y)
        a_in = _ramp(d_out, pv)
        visc = T["viscera"] * (1 + 0.2 * visc_f)
        visc = visc + (T["fat"] - visc) * np.clip(visc_g - 0.6, 0, 1)
        visc = visc + (T["fluid"] - visc) * np.clip(visc_f - 0.9, 0, 1)
        visc = visc * (1 - 0.85 * np.clip(-visc_g - 1.2, 0, 1))  # bowel gas
        cv.paint(full, a_in, visc, struct=8)
        # posterior muscles (behind the posterior body wall) and psoas
        d_mus = np.maximum(self._offset_y(_POST_WALL + 2, Z) - Y, np.abs(W) - 80)
        mus = T["muscle"] * (1 + 0.05 * tex) + 0.5 * (T["fat"] - T["muscle"]) * np.clip(visc_g - 1.2, 0, 1)  # fat streaks
        cv.paint(full, _ramp(d_mus, 3.0) * a_in, mus, struct=6)
        lv1 = self.by_id[20]
        s_ps = lv1.sc + lv1.height / 2
        sub = self._sub(-40, s_ps + 10, _POST_WALL - 42, _POST_WALL + 10, 62)
        if sub is not None:
            b, Sb, Nb, Wb = sub
            grow = np.clip((s_ps + 10 - Sb) / 90.0, 0, 1)
            dps, _ = _ellipse_sdf(Nb - (_POST_WALL - 16), np.abs(Wb) - 36, 6 + 12 * grow + 1e-3, 5 + 13 * grow + 1e-3)
            cv.paint(b, _ramp(dps, pv) * (grow > 0.02), T["muscle"], struct=6)
        # prevertebral fat sheet and great vessels (flow voids)
        sub = self._sub(self.s_bottom, self.s_top + 60, _POST_WALL - 48, _POST_WALL - 18, 30)
        if sub is not None:
            b, Sb, Nb, Wb = sub
            n_front = _POST_WALL - self.by_id[22].depth
            d_pre, _ = _ellipse_sdf(Nb - (n_front - 1.5), Wb, 2.5, 26.0)
            cv.paint(b, _ramp(d_pre, 2 * pv) * 0.6, T["fat"], struct=7)
        lv4 = self.by_id[23]
        for wc, r, s_end in ((float(self.rng.uniform(5, 14)), 9.5, lv4.sc), (-16.0, 10.5, lv4.sc - 20)):
            sub = self._sub(s_end - 5, self.s_top + 60, -self.vessel_offset - 2 * r - 25, -self.vessel_offset + 5,
                            abs(wc) + r + 2)
            if sub is None:
                continue
            b, Sb, Nb, Wb = sub
            Yb = self.Y[b[1:]][None]
            yv = self.yc_of_z(self.Z[b[1:]])[None] - self.vessel_offset - r
            dv, _ = _ellipse_sdf(Yb - yv, Wb - wc, r, r * 1.05)
            dv = np.maximum(dv, s_end - Sb)
            cv.paint(b, _ramp(dv, pv), T["vessel"], struct=8)
        # subcutaneous fat (posterior and anterior) with a thin skin line
        d_fat = np.minimum(y_back - self.fat_back - Y, Y - (y_front + self.fat_front))
        cv.paint(full, _ramp(d_fat, pv) * a_in, T["fat"] * (1 + 0.04 * tex), struct=7)
        # interspinous / posterior midline fat and ligament strip
        n_lam = _POST_WALL + self.canal_ap
        d_is = np.maximum(np.maximum(np.abs(W) - 6.0, self._offset_y(n_lam + 3, Z) - Y), Y - (y_back - self.fat_back))
        cv.paint(full, _ramp(d_is, 4.0) * 0.25, T["fat"])
        del d_out, d_mus, d_fat, d_is, visc, mus

        # --- canal: foraminal / epidural fat, thecal sac, cord ---
        s_hi = self.s_top + 60
        sub = self._sub(self.s_bottom - 20, s_hi, _POST_WALL - 10, n_lam + 15, 40)
        if sub is not None:
            b, Sb, Nb, Wb = sub
            ap = np.where(Sb > 0, self.canal_ap, self.canal_ap * np.clip(1 + Sb / 110.0, 0.45, 1))
            nc = _POST_WALL + ap / 2
            d_bony, _ = _ellipse_sdf(Nb - nc, Wb, ap / 2 + 0.5, self.canal_hw + 3)
            d_bony = np.maximum(d_bony, self.s_bottom + 5 - Sb)
            # foramina (fat) lateral to the canal
            d_for = _box_sdf((Nb, Wb, Sb), (nc, 0.0, (self.s_bottom + s_hi) / 2),
                             (ap / 2, self.canal_hw + 14, (s_hi - self.s_bottom) / 2), 3.0)
            cv.paint(b, _ramp(np.minimum(d_for, d_bony), pv), T["fat"] * 0.9, struct=7)
            sac_ap = ap - self.epidural
            d_sac, _ = _ellipse_sdf(Nb - (_POST_WALL + 0.8 + sac_ap / 2), Wb, sac_ap / 2, self.canal_hw)
            taper = np.clip((Sb - self.dural_end_s) / 25.0, 0, 1)
            d_sac = np.maximum(d_sac, self.dural_end_s - Sb) + (1 - taper) * 4
            cv.paint(b, _ramp(d_sac, pv), T["csf"], struct=3)
            n_mid = _POST_WALL + 0.8 + sac_ap * 0.5
            cs = np.clip((Sb - self.conus_s) / 22.0, 0, 1) ** 0.6
            d_cord, _ = _ellipse_sdf(Nb - n_mid, Wb, 3.6 * cs + 1e-3, 4.6 * cs + 1e-3)
            d_cord = np.maximum(d_cord, self.conus_s - Sb)
            cv.paint(b, _ramp(d_cord, pv), T["cord"], struct=4)
            # cauda equina roots: thin, posteriorly lying bundle (seen as partial-volume grey)
            d_cau, _ = _ellipse_sdf(Nb - (n_mid + sac_ap * 0.15), Wb, 2.5, 5.0)
            d_cau = np.maximum(np.maximum(d_cau, Sb - self.conus_s), self.dural_end_s + 12 - Sb)
            cv.paint(b, _ramp(d_cau, 2 * pv) * 0.45, T["cord"])

        # --- discs ---
        order = sorted([lv for lv in self.levels], key=lambda q: -q.sc)
        for up, lo in zip(order[:-1], order[1:]):
            if not (up.vid and lo.vid):
                continue
            hyd = self.hydration.get((up.vid, lo.vid), 0.9)
            s_a = up.sc - up.height / 2
            s_b = lo.sc + lo.height / 2
            dd = 0.5 * (up.depth + lo.depth * (1 - lo.taper)) + 1.0
            ww = 0.5 * (up.width + lo.width) + 2.0
            sub = self._sub(s_b - 4, s_a + 4, _POST_WALL - dd - 6, _POST_WALL + 4, ww / 2 + 4)
            if sub is None:
                continue
            b, Sb, Nb, Wb = sub
            ne = _POST_WALL - 0.375 * dd
            d_x, e = _ellipse_sdf(Nb - ne, Wb, 0.625 * dd, ww / 2)
            d_x = np.maximum(d_x, Nb - (_POST_WALL + 0.8))
            ce = np.clip(1 - e * e, 0, 1)
            upb = s_a + up.conc * ce + 1.0
            lob = s_b - lo.conc * ce - 1.0
            d_u = np.maximum(lob - Sb, Sb - upb)
            d = _round_inter(d_u, d_x, 1.5)
            a = _ramp(d, pv)
            mid = 0.5 * (s_a + s_b)
            gap = max(s_a - s_b, 1.0)
            _, en = _ellipse_sdf(Nb - (_POST_WALL - 0.45 * dd), Wb, 0.36 * dd, 0.34 * ww)
            en = np.sqrt(en ** 2 + ((Sb - mid) / (0.45 * gap + 0.8)) ** 2)
            a_nuc = np.clip((1.0 - en) * 2.2, 0, 1)
            cleft = np.clip(1 - np.abs(Sb - mid) / 0.9, 0, 1) * 0.35 * (hyd < 0.9)
            nuc_val = T["annulus"] + hyd * (T["nucleus"] - T["annulus"])
            val = T["annulus"] + a_nuc * (nuc_val - T["annulus"]) * (1 - cleft)
            cv.paint(b, a, val, struct=2)

        # --- vertebral bodies and posterior elements ---
        for lv in order:
            self._paint_vertebra(cv, lv, pv, T)
        return cv

    def _paint_vertebra(self, cv: _Canvas, lv: _Level, pv: float, T: dict[str, float]) -> None:
        H, D, Wd = lv.height, lv.depth, lv.width
        sub = self._sub(lv.sc - H / 2 - 3, lv.sc + H / 2 + 3, _POST_WALL - D - 3, _POST_WALL + 3, Wd / 2 + 3)
        if sub is not None:
            b, Sb, Nb, Wb = sub
            t = np.clip((lv.sc + H / 2 - Sb) / H, 0, 1)
            Dl = D * (1 - lv.taper * t) - self.waist * (1 - (2 * t - 1) ** 2)  # anterior waist
            d_x, e = _ellipse_sdf(Nb - (_POST_WALL - 0.375 * Dl), Wb, 0.625 * Dl, Wd / 2)
            d_x = np.maximum(d_x, Nb - _POST_WALL)
            d_u = np.abs(Sb - lv.sc) - H / 2 + lv.conc * np.clip(1 - e * e, 0, 1)
            d = _round_inter(d_u, d_x, 3.0)
            a = _ramp(d, pv)
            a_m = _ramp(d + 1.1, pv)
            marrow = T["marrow"] * (1 + 0.09 * self.tex[b])
            # basivertebral vein: short fluid-like cleft from the posterior wall
            bv = np.clip(1 - np.abs(Sb - lv.sc) / 1.2, 0, 1) * (Nb > _POST_WALL - 0.3 * D) * (np.abs(Wb) < 4)
            marrow = marrow + 0.35 * bv * (T["fluid"] - marrow) * self.bv_strength
            val = T["cortex"] + (a_m / np.maximum(a, 1e-3)) * (marrow - T["cortex"])
            cv.paint(b, a, val, struct=1 if lv.labelled else 5, label=lv.vid if lv.labelled else None)
        # posterior elements (not part of the body label)
        ap = self.canal_ap if lv.sc > 0 else self.canal_ap * max(0.45, 1 + lv.sc / 110.0)
        n_lam = _POST_WALL + ap + 0.8
        cw = self.canal_hw
        if lv.vid == 0 or lv.vid == 26:
            # sacrum: posterior plate (fused laminae) with a median crest
            sub = self._sub_rigid(lv.sc, lv.sc - H / 2 - 2, lv.sc + H / 2 + 2, n_lam - 2, n_lam + 16, cw + 14)
            if sub is None:
                return
            b, Sb, Nb, Wb = sub
            d1 = _box_sdf((Sb, Nb, Wb), (lv.sc, n_lam + 3.0, 0.0), (H / 2 + 1.0, 3.0, cw + 10), 1.5)
            d2 = _box_sdf((Sb, Nb, Wb), (lv.sc, n_lam + 8.0, 0.0), (H / 3, 6.0, 3.0), 2.0)
            d = np.minimum(d1, d2)
        else:
            sp_len = self.spinous_len * (0.8 if lv.vid in (15, 16, 17) else 1.0)
            dn = self.disc_gap.get(lv.vid, 8.0)
            sub = self._sub_rigid(lv.sc, lv.sc - H / 2 - dn, lv.sc + H / 2 + dn, _POST_WALL - 4, n_lam + sp_len + 8,
                                  cw + 16)
            if sub is None:
                return
            b, Sb, Nb, Wb = sub
            aW = np.abs(Wb)
            ped = _box_sdf((Sb, Nb, aW), (lv.sc + 0.18 * H, _POST_WALL + ap * 0.4, cw + 4.0),
                           (0.27 * H, ap * 0.45, 4.0), 2.0)
            lam = _box_sdf((Sb, Nb, aW), (lv.sc - 0.12 * H, n_lam + 3.0, 0.0), (0.38 * H, 3.0, cw + 6), 1.5)
            # spinous process: slopes caudally and tapers towards its tip
            slope = 0.75 if lv.vid in (15, 16, 17, 18) else 0.3
            rel = np.clip((Nb - n_lam) / sp_len, 0, 1)
            spin = _box_sdf((Sb + slope * (Nb - n_lam), Nb, Wb), (lv.sc - 0.15 * H, n_lam + 4.0 + sp_len / 2, 0.0),
                            (0.3 * H * (1 - 0.3 * rel), sp_len / 2, 3.0), 3.0)
            art = _box_sdf((Sb, Nb, aW), (lv.sc, n_lam - 1.0, cw + 8.5),
                           (H / 2 + 0.5 * dn - 1.2, 5.0, 5.0), 2.0)
            d = np.minimum(np.minimum(ped, lam), np.minimum(spin, art))
        a = _ramp(d, pv)
        a_m = _ramp(d + 1.0, pv)
        marrow = T["marrow"] * 0.95 * (1 + 0.09 * self.tex[b])
        val = T["cortex"] + (a_m / np.maximum(a, 1e-3)) * (marrow - T["cortex"])
        cv.paint(b, a, val, struct=5, label=0)  # posterior elements are never part of a body label

    def _contrast(self) -> None:
        rng, cfg = self.rng, self.cfg
        w = np.asarray(cfg.contrast_weights if cfg.contrast_weights is not None else [1.0] * len(cfg.contrasts), float)
        self.contrast = cfg.contrasts[int(rng.choice(len(cfg.contrasts), p=w / w.sum()))]
        base = _TISSUE[self.contrast]
        self.tissue = {k: float(v * rng.uniform(0.88, 1.12)) for k, v in base.items()}

    def _soft_params(self) -> None:
        rng = self.rng
        self.back_thick_lumbar = float(rng.uniform(60.0, 95.0))
        self.back_thick_sacral = float(rng.uniform(25.0, 40.0))
        self.fat_back = float(rng.uniform(6.0, 28.0))
        self.fat_front = float(rng.uniform(8.0, 35.0))
        self.belly = float(rng.uniform(110.0, 180.0))
        self.vessel_offset = float(rng.uniform(19.0, 24.0))
        self.spinous_len = float(rng.uniform(24.0, 34.0))
        self.bv_strength = float(rng.uniform(0.0, 1.0))
        self.waist = float(rng.uniform(0.5, 2.5))
        self.hydration = {}
        self.disc_gap = {}
        for up, lo, hyd, dh in self.discs:
            self.hydration[(up, lo)] = hyd
            self.disc_gap[up] = dh

    def _finish(self, cv: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng, cfg = self.rng, self.cfg
        m = self.m
        img = cv.img
        if m > 1:
            img = img.reshape(self.shape[0], m, self.shape[1], self.shape[2]).mean(axis=1)
            struct = cv.struct[m // 2:: m]
            lab = cv.lab[m // 2:: m]
        else:
            struct, lab = cv.struct, cv.lab
        img = np.ascontiguousarray(img, dtype=np.float32)
        # bias field: smooth random log-field + receive-coil fall-off from the back
        strength = _u(rng, cfg.bias_strength)
        coarse = rng.standard_normal((3, 4, 4)).astype(np.float32)
        coarse = ndimage.zoom(coarse, (1, 4, 4), order=3, mode="nearest")
        logb = _lin_up(coarse, img.shape)
        logb = logb / max(float(np.abs(logb).max()), 1e-6) * strength
        ycoord = np.linspace(-0.5, 0.5, img.shape[1], dtype=np.float32)[None, :, None]
        logb = logb + float(rng.uniform(0.1, 0.6)) * ycoord
        img *= np.exp(logb)
        # Rician noise
        sigma = _u(rng, cfg.noise_level) * float(np.percentile(img[struct > 0], 99))
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
        self.noise_sigma = sigma
        dt = cfg.dtypes[int(rng.choice(len(cfg.dtypes), p=np.asarray(cfg.dtype_weights) / sum(cfg.dtype_weights)))]
        if dt == "uint8":
            hi = float(np.percentile(img, 99.8))
            img = np.clip(img / hi * rng.uniform(200, 255), 0, 255).round().astype(np.uint8)
        elif dt == "uint16":
            img = np.clip(img * rng.uniform(500, 4000), 0, 65535).round().astype(np.uint16)
        else:
            img = (img * rng.uniform(0.5, 2000.0)).astype(np.float32)
        self.dtype = dt
        return img, np.ascontiguousarray(struct), np.ascontiguousarray(lab)

    def run(self, seed: int) -> SynthSubject:
        ids, variants = self._sample_levels()
        self._build_spine(ids)
        self._contrast()
        self._soft_params()
        self._sample_grid()
        self._curvilinear()
        cv = self._render()
        img, struct, lab = self._finish(cv)
        origin = np.array([self.x[0], self.y[0], self.z[0]])
        canon = Scan(img, self.spacing.copy(), origin, np.eye(3), name="image")
        code = str(self.cfg.orientations[int(self.rng.integers(len(self.cfg.orientations)))]).upper()
        image = reorient(canon, code)
        labels = reorient(canon.with_array(lab, name="vertebrae"), code)
        structures = reorient(canon.with_array(struct, name="structures"), code)
        # levels cut by the field of view: their body label reaches a face of the grid
        faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
        cut = sorted(set(int(v) for f in faces for v in np.unique(f) if v))
        verts = vertebrae_from_labelmap(labels)
        for v in verts:
            if v.label in cut:
                v.flags.append("cut_by_fov")
            if v.label in TRANSITIONAL_IDS:
                v.flags.append("transitional")
        cut_sorted = [v.label for v in verts if v.label in cut]
        meta = dict(
            seed=seed, contrast=self.contrast, orientation=image.orientation_code(), dtype=self.dtype,
            spacing=[round(float(s), 4) for s in image.spacing], shape=list(image.shape),
            levels=[v.level for v in verts], variants=list(variants),
            cut_levels=[level_name(v) for v in cut_sorted], supersample=self.m,
            noise_sigma=round(float(self.noise_sigma), 5), **self.meta_anat,
        )
        log.debug("synthetic subject seed=%d: %s %s levels %s", seed, self.contrast, image.shape, meta["levels"])
        return SynthSubject(image, labels, structures, verts, self.contrast, list(variants), cut_sorted, seed, meta)


# ---------------------------------------------------------------------------------------------
# Cohort writer
# ---------------------------------------------------------------------------------------------
#: ``lesion_fn(image, labels, contrast, rng) -> (image, lesion_label_map_or_None, {verse_id: class_index})``
LesionFn = Callable[[Scan, Scan, str, np.random.Generator], tuple[Scan, Optional[Scan], dict[int, int]]]


def points_table(vertebrae: Sequence[Vertebra]) -> pd.DataFrame:
    """``level,x_mm,y_mm,z_mm`` rows (world LPS centroids) for ``<id>_points.csv``."""
    return pd.DataFrame(
        [dict(level=v.level, x_mm=float(v.centroid_world[0]), y_mm=float(v.centroid_world[1]),
              z_mm=float(v.centroid_world[2])) for v in vertebrae],
        columns=["level", "x_mm", "y_mm", "z_mm"],
    )


def write_cohort(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    lesion_fn: LesionFn | None = None,
    *,
    overview: int = 0,
) -> list[str]:
    """Write ``n`` synthetic subjects to ``out_dir`` in the canonical layout; return their ids.

    Per subject ``<id>`` (``synth-000``, ...): ``<id>_image.nii.gz``, ``<id>_vertebrae.nii.gz``
    (bodies, VerSe ids), ``<id>_structures.nii.gz`` (see :data:`STRUCTURES`), ``<id>_points.csv``
    (``level,x_mm,y_mm,z_mm`` world LPS centroids) and, when ``lesion_fn`` returns a map,
    ``<id>_lesions.nii.gz``. Folder level: ``vertebra_labels.csv`` (``id,level,class,confidence``; class
    0 = normal unless ``lesion_fn`` says otherwise) and ``synth_meta.json`` (seed, config, per-subject
    contrast / spacing / levels / variants). ``overview`` > 0 also writes ``<id>_overview.png`` for the
    first ``overview`` subjects. Every file is written atomically.
    """
    config = config or SynthConfig()
    if int(n) < 1:
        raise SpinepipeInputError(None, f"number of subjects must be at least 1, got {n}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpinepipeInputError(out, "output path exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    rows: list[dict[str, Any]] = []
    subjects_meta: dict[str, Any] = {}
    for i in range(int(n)):
        sid = f"synth-{i:03d}"
        s_seed = subject_seed(seed, i)
        subj = generate_subject(s_seed, config)
        image, lesions, classes = subj.image, None, {}
        if lesion_fn is not None:
            lrng = np.random.default_rng(np.random.SeedSequence([int(seed), i, 1]))
            image, lesions, classes = lesion_fn(subj.image, subj.labels, subj.contrast, lrng)
            classes = {int(k): int(v) for k, v in (classes or {}).items()}
        write_image(image, out / f"{sid}_image.nii.gz")
        write_image(subj.labels, out / f"{sid}_vertebrae.nii.gz")
        write_image(subj.structures, out / f"{sid}_structures.nii.gz")
        if lesions is not None:
            write_image(lesions, out / f"{sid}_lesions.nii.gz")
        write_csv(points_table(subj.vertebrae), out / f"{sid}_points.csv")
        for v in subj.vertebrae:
            rows.append(dict(id=sid, level=v.level, **{"class": classes.get(v.label, 0)}, confidence=1.0))
        subjects_meta[sid] = dict(subj.meta, lesions=lesions is not None,
                                  classes={level_name(k): c for k, c in sorted(classes.items())})
        if i < overview:
            from data_prep.overview import save_overview

            lab = ", ".join(subj.meta["variants"]) or "no variant"
            save_overview(image, subj.labels, out / f"{sid}_overview.png", lesions=lesions,
                          title=f"{sid}  {subj.contrast}  {subj.meta['orientation']}  ({lab})")
        ids.append(sid)
        log.info("wrote %s (%s, %s, levels %s)", sid, subj.contrast, image.shape, ",".join(subj.meta["levels"]))
    write_csv(pd.DataFrame(rows, columns=["id", "level", "class", "confidence"]), out / "vertebra_labels.csv")
    meta = dict(generator="data_prep.synth", seed=int(seed), n=int(n), config=config.to_dict(),
                structures=STRUCTURES, subjects=subjects_meta)
    write_text(json.dumps(meta, indent=1, default=_json_default) + "\n", out / SYNTH_META_FILE)
    return ids


def synthetic_only(data_dir: str | os.PathLike | Sequence[str | os.PathLike] | None) -> bool:
    """True when every folder of ``data_dir`` (one folder or a sequence) is a built-in synthetic cohort,
    i.e. holds the ``synth_meta.json`` that :func:`write_cohort` writes. Both stages save this with a model
    (``extra["synthetic_only"]``) and warn when they load such a model: it is fine for synthetic scans and
    poor on real ones (session 30-31 measurements in the two loaders' warnings)."""
    if data_dir is None:
        return False
    folders = as_paths(data_dir)
    return bool(folders) and all((f / SYNTH_META_FILE).is_file() for f in folders)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = [
    "CONTRASTS",
    "STRUCTURES",
    "SynthConfig",
    "SynthSubject",
    "LesionFn",
    "generate_subject",
    "subject_seed",
    "points_table",
    "write_cohort",
]
