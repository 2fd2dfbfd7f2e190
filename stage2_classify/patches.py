"""Fixed-size physical patches around a vertebra and their per-patch training targets.

Patch geometry
--------------
A patch is a grid of ``PatchConfig.shape`` voxels of isotropic ``spacing_mm`` whose **axes are the world
LPS axes** (direction = identity; axis 0 runs right->left, axis 1 anterior->posterior, axis 2
inferior->superior), centred on the vertebra's world centroid. Any input orientation (permuted, flipped,
oblique) and any anisotropic spacing is handled by SimpleITK resampling onto this explicit grid, so a
world point lands at the same patch voxel whatever the input header looks like.

Why world axes and not axes aligned to the local spine curve: (1) the patch depends only on the
centroid, not on neighbours' centroids, so one wrong neighbour from stage 1 cannot rotate (and corrupt)
another vertebra's patch; (2) world-axis boxes (``<id>_boxes.csv`` is in LPS mm) stay axis-aligned
boxes in the patch, which the box tightness prior needs; (3) sagittal spine MRI is acquired close to
these axes and the remaining lordotic tilt (up to ~20 deg) is covered by rotation augmentation about
the left-right axis. :func:`spine_aligned_direction` is provided for callers that want the alternative
(``direction=`` argument), e.g. strongly kyphotic or scoliotic spines.

Every patch carries its geometry as a :class:`~data_prep.scan.Scan` so patch voxels map to world mm
(``geometry.voxel_to_world``) and maps computed on the patch (evidence) can be pasted back onto the
input grid (:func:`paste_to_reference`).

Intensities: the scan is mapped once per scan, by its robust percentiles, to roughly [0, 1]
(:func:`normalise_intensity`). There is deliberately no per-patch normalisation, whose statistics would
span the neighbours; and since the classification path re-standardises intensities inside its own region
(``ModelConfig.region_norm``), this affine scan-level window cancels out of the verdict too (up to the
clipping of extreme voxels).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.special import erf

from data_prep.scan import Scan, to_sitk
from data_prep.weak_labels import shrink2d
from stage2_classify.config import (
    SEG_BG,
    SEG_CENTRE,
    SEG_CLASSES,
    SEG_DISC,
    SEG_LESION,
    SEG_NEIGHBOUR,
    PatchConfig,
    Stage2Config,
)

log = logging.getLogger(__name__)

#: ``data_prep.lesions`` lesion-map values: 1 inflammation, 2 fat, 3 hard-negative spot, 4 outside distractor.
LESION_TRUE_VALUES = (1, 2)
#: Lesion-map value -> class name it marks (the ``lesion`` head's per-voxel class, see :func:`build_targets`).
LESION_VALUE_CLASS = {1: "inflammation", 2: "fat"}
#: ``data_prep.synth`` structure values: 1 body, 2 disc, 3 CSF, 4 cord, 5 posterior elements, 6 muscle, 7 fat.
STRUCT_DISC = 2


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def patch_grid(centre_mm: np.ndarray, cfg: PatchConfig, direction: np.ndarray | None = None) -> Scan:
    """Empty patch geometry (zeros array) of ``cfg.shape`` centred on world point ``centre_mm``.

    The continuous index ``(shape - 1) / 2`` maps exactly to ``centre_mm``.
    """
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    shape = np.array(cfg.shape)
    sp = np.full(3, float(cfg.spacing_mm))
    origin = np.asarray(centre_mm, dtype=np.float64).reshape(3) - d @ (sp * (shape - 1) / 2.0)
    return Scan(np.zeros(tuple(shape), dtype=np.float32), sp, origin, d, name="patch")


def spine_aligned_direction(up_mm: np.ndarray) -> np.ndarray:
    """Direction matrix whose third axis follows the local spine axis ``up_mm`` (pointing superior).

    The first axis stays as close as possible to world +x (left), the second completes a right-handed
    frame (roughly posterior). Use with ``direction=`` of the crop functions.
    """
    z = np.asarray(up_mm, dtype=np.float64).reshape(3)
    if np.linalg.norm(z) < 1e-9:
        raise ValueError("spine axis vector must be non-zero")
    z = z / np.linalg.norm(z)
    if z[2] < 0:
        z = -z
    x = np.array([1.0, 0.0, 0.0]) - z[0] * z
    if np.linalg.norm(x) < 1e-6:
        raise ValueError("spine axis is parallel to left-right; cannot build a sagittal frame")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


def _resample(img: sitk.Image, grid: Scan, interp: int, default: float, pixel: int) -> np.ndarray:
    out = sitk.Resample(
        img,
        [int(s) for s in grid.shape],
        sitk.Transform(),
        interp,
        [float(o) for o in grid.origin],
        [float(s) for s in grid.spacing],
        [float(v) for v in grid.direction.ravel()],
        float(default),
        pixel,
    )
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(2, 1, 0))


def normalise_intensity(scan: Scan, percentiles: tuple[float, float] = (1.0, 99.0)) -> Scan:
    """Map the scan's robust ``percentiles`` window to [0, 1] (float32; values outside clipped to [-1, 3])."""
    a = np.asarray(scan.array, dtype=np.float32)
    lo, hi = np.percentile(a, percentiles)
    scale = float(hi - lo) if hi > lo else 1.0
    return scan.with_array(np.clip((a - lo) / scale, -1.0, 3.0).astype(np.float32))


def fov_fraction(scan: Scan, grid: Scan) -> float:
    """Fraction of the patch voxels whose centres lie inside ``scan``'s field of view."""
    idx = np.indices(grid.shape).reshape(3, -1).T.astype(np.float64)
    ijk = scan.world_to_voxel(grid.voxel_to_world(idx)).coords
    inside = np.all((ijk > -0.5) & (ijk < np.array(scan.shape) - 0.5), axis=1)
    return float(inside.mean())


class PatchSampler:
    """Crops patches from one scan (and label maps on its grid) around many centroids.

    Converts to SimpleITK once. Images are resampled linearly, label maps by nearest neighbour.

    Parameters
    ----------
    image: the scan (any orientation/spacing); normalised with :func:`normalise_intensity` unless
        ``normalise=False``.
    labelmaps: optional named label maps (``"vertebrae"``, ``"lesions"``, ``"structures"``,
        ``"outlines"``...) on any grid (each is resampled from its own geometry).
    """

    def __init__(self, image: Scan, cfg: PatchConfig, labelmaps: dict[str, Scan] | None = None,
                 normalise: bool = True):
        self.cfg = cfg
        self.image = normalise_intensity(image, cfg.intensity_percentiles) if normalise else image
        self._img = to_sitk(self.image.with_array(np.asarray(self.image.array, dtype=np.float32)))
        self._labels: dict[str, sitk.Image] = {}
        for name, lab in (labelmaps or {}).items():
            if lab is not None:
                self._labels[name] = to_sitk(lab.with_array(np.asarray(lab.array).astype(np.int16)))

    def crop(self, centre_mm: np.ndarray, direction: np.ndarray | None = None) -> "Patch":
        grid = patch_grid(centre_mm, self.cfg, direction)
        arr = _resample(self._img, grid, sitk.sitkLinear, 0.0, sitk.sitkFloat32).astype(np.float32)
        labels = {
            name: _resample(img, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
            for name, img in self._labels.items()
        }
        return Patch(arr, grid.with_array(arr, name="patch"), labels, fov_fraction(self.image, grid))


def crop_patch(scan: Scan, centre_mm: np.ndarray, cfg: PatchConfig, *, is_label: bool = False,
               direction: np.ndarray | None = None, default_value: float = 0.0) -> Scan:
    """One patch of ``scan`` (no intensity normalisation) as a Scan carrying the patch geometry."""
    grid = patch_grid(centre_mm, cfg, direction)
    img = to_sitk(scan)
    if is_label:
        arr = _resample(img, grid, sitk.sitkNearestNeighbor, default_value, img.GetPixelID())
    else:
        img = sitk.Cast(img, sitk.sitkFloat32)
        arr = _resample(img, grid, sitk.sitkLinear, default_value, sitk.sitkFloat32)
    return grid.with_array(arr, name=scan.name)


def paste_to_reference(patch_map: Scan, reference: Scan, *, is_label: bool = False) -> Scan:
    """Resample a map defined on a patch grid back onto ``reference``'s grid (zero outside the patch)."""
    img = to_sitk(patch_map.with_array(np.asarray(patch_map.array, dtype=np.float32)))
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    arr = _resample(img, reference, interp, 0.0, sitk.sitkFloat32)
    return reference.with_array(arr.astype(np.float32), name=patch_map.name)


# ---------------------------------------------------------------------------------------------
# Patches and targets
# ---------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """``image``: ``(I, J, K)`` float32; ``geometry``: its Scan; ``labels``: named label crops on the patch grid."""

    image: np.ndarray
    geometry: Scan
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    fov: float = 1.0


def ball(radius_vox: float) -> np.ndarray:
    """Boolean ball structuring element of the given radius (voxels)."""
    r = int(np.ceil(max(radius_vox, 0)))
    g = np.indices((2 * r + 1,) * 3) - r
    return (g**2).sum(0) <= radius_vox**2 + 1e-9


def dilate(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """Binary dilation by a ball of ``radius_vox`` voxels (identity for radius 0)."""
    m = np.asarray(mask, dtype=bool)
    if radius_vox <= 0 or not m.any():
        return m.copy()
    return ndimage.binary_dilation(m, structure=ball(radius_vox))


def vertebra_region(body: np.ndarray, margin_vox: float, others: np.ndarray | None = None) -> np.ndarray:
    """The region the classification path sees: ``body`` dilated by ``margin_vox`` voxels, without the voxels
    of ``others`` (the other vertebral bodies, when known). The margin gives the convolutions context at the
    body's edge (endplates, cortex, a corner lesion's partial volume); across a narrow disc a 4-mm margin
    reaches the neighbour's endplate (13 % of the expert-masked vertebrae in ``../shared/data``), and the
    neighbour's voxels must not reach this vertebra's verdict. ``body`` voxels are always kept."""
    region = dilate(body, margin_vox)
    if others is not None:
        region &= ~np.asarray(others, dtype=bool) | np.asarray(body, dtype=bool)
    return region


def erode(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if radius_vox <= 0:
        return m.copy()
    return ndimage.binary_erosion(m, structure=ball(radius_vox), border_value=0)


def ellipsoid_prior(shape: tuple[int, int, int], centre_ijk: np.ndarray, half_extent_vox: np.ndarray) -> np.ndarray:
    """Boolean axis-aligned ellipsoid (the fallback 'typical body' region)."""
    g = np.indices(shape).astype(np.float64)
    c = np.asarray(centre_ijk, dtype=np.float64).reshape(3, 1, 1, 1)
    h = np.maximum(np.asarray(half_extent_vox, dtype=np.float64).reshape(3, 1, 1, 1), 0.5)
    return (((g - c) / h) ** 2).sum(0) <= 1.0


def gaussian_heatmap(shape: tuple[int, int, int], centre_ijk: np.ndarray, sigma_vox: float) -> np.ndarray:
    """``exp(-|x - c|^2 / (2 sigma^2))`` on the patch grid (peak 1 at ``centre_ijk``)."""
    g = np.indices(shape).astype(np.float64)
    c = np.asarray(centre_ijk, dtype=np.float64).reshape(3, 1, 1, 1)
    return np.exp(-((g - c) ** 2).sum(0) / (2.0 * sigma_vox**2)).astype(np.float32)


def _allowed_all(shape) -> np.ndarray:
    return np.ones((len(SEG_CLASSES),) + tuple(shape), dtype=bool)


def _set(allowed: np.ndarray, where: np.ndarray, classes: tuple[int, ...]) -> None:
    """Restrict the allowed set at ``where`` to ``classes``."""
    for c in range(allowed.shape[0]):
        allowed[c][where] = c in classes


@dataclass
class PatchTargets:
    """Per-patch training targets (all on the patch grid).

    ``seg_allowed`` ``(5, I, J, K)`` bool is the *set* of seg classes compatible with the annotation at
    each voxel (one class = full label; all classes = unsupervised/ignored), see
    :func:`stage2_classify.losses.set_cross_entropy`. ``body`` is the best available centre-body mask
    (used for the evidence fraction), ``region`` the dilated region the classification path sees.
    """

    kind: str  # "full" | "outline" | "box" | "point" | "none"
    body: np.ndarray
    region: np.ndarray
    seg_allowed: np.ndarray
    heatmap: np.ndarray
    lesion: np.ndarray
    box: np.ndarray | None = None  # centre-body box (for tightness/emptiness losses)
    point_ball: np.ndarray | None = None  # centre-body ball (for the point loss + size prior)
    #: Per-voxel lesion class (index into ``cfg.classes``; 0 = no lesion; hard-negative spots are 0) where a
    #: lesion map is given, else None (the lesion head then learns from the vertebra's class alone).
    lesion_class: np.ndarray | None = None
    #: Outlines only: probability that a voxel of the unsupervised band is this body, from where the real
    #: body boundary lies relative to a drawn contour (``loss.outline_soft_sigma_mm``); NaN elsewhere.
    body_soft: np.ndarray | None = None
    #: The other vertebral bodies where they are known (full masks), else None: the region never reaches
    #: them, neither as built here nor when the training's region jitter grows it (``train.augment``).
    others: np.ndarray | None = None


def build_targets(patch: Patch, label: int, cfg: Stage2Config, *, kind: str = "full",
                  box_mm: np.ndarray | None = None, point_mm: np.ndarray | None = None,
                  centroid_mm: np.ndarray | None = None,
                  outline_lr_mm: tuple[float, float] | None = None) -> PatchTargets:
    """Targets for the vertebra with VerSe id ``label`` from the label crops in ``patch.labels``.

    ``kind`` selects the annotation used for the centre body:

    * ``"full"``: ``labels["vertebrae"]`` (VerSe ids); discs from ``labels["structures"]`` when present.
    * ``"outline"``: ``labels["outlines"]`` (filled loose outlines on a few sagittal slices, VerSe ids),
      read as the body boundary moved outward by ``loss.outline_offset_mm`` +- ``loss.outline_band_mm``:
      interior eroded by offset + band = body, outside the outline eroded by offset - band = not this body
      (2D, in the sagittal plane), the band between and un-annotated slices = unsupervised, except that
      sagittal slices beyond this body's outermost outlined slices *in the whole scan* (``outline_lr_mm``:
      world x (LPS, mm) of the first and last outlined slice) by more than ``loss.outline_lateral_margin_mm``
      are not this body (only when both are given).
    * ``"coarse"``: ``labels["coarse"]`` (coarse / biased masks, VerSe ids): like ``"outline"`` in 3D
      with the narrower ``loss.coarse_band_mm`` ignore band around the boundary.
    * ``"box"``: ``box_mm`` ``(2, 3)`` world LPS min/max corners: outside = not this body; the box
      tightness prior is applied by the loss.
    * ``"point"``: ``point_mm`` world point: a ball of ``loss.point_radius_mm`` = body, + size prior.
    * ``"none"``: no body supervision (only class label).

    Lesions (``labels["lesions"]`` values 1/2) are the seg ``lesion`` class wherever they are given, and nowhere
    else when a lesion map is given (it is taken as complete, whatever the body annotation kind), and
    ``lesion_class`` maps them to the class they mark (:data:`LESION_VALUE_CLASS`, by class name).
    """
    shape = patch.image.shape
    sp = cfg.patch.spacing_mm
    geo = patch.geometry
    allowed = _allowed_all(shape)
    region_others = None  # other bodies the region must not reach (known with full masks)
    verts = patch.labels.get("vertebrae")
    lesions = patch.labels.get("lesions")
    structures = patch.labels.get("structures")
    lesion = np.isin(lesions, LESION_TRUE_VALUES) if lesions is not None else np.zeros(shape, bool)
    centre_ijk = (np.array(shape) - 1) / 2.0
    if centroid_mm is not None:
        centre_ijk = geo.world_to_voxel(np.asarray(centroid_mm, dtype=np.float64)).coords[0]
    half = np.asarray(cfg.prior_half_extent_mm) / sp
    box = point_ball = body_soft = None

    if kind == "full":
        if verts is None:
            raise ValueError("kind='full' needs a 'vertebrae' label crop")
        body = verts == label
        others = (verts > 0) & ~body
        if structures is not None:
            disc = structures == STRUCT_DISC
            allowed[:] = False
            allowed[SEG_BG] = True
            _set(allowed, disc & ~(verts > 0), (SEG_DISC,))
        else:
            _set(allowed, ~(verts > 0), (SEG_BG, SEG_DISC))
        if lesions is not None:
            _set(allowed, body & ~lesion, (SEG_CENTRE,))
            _set(allowed, others & ~lesion, (SEG_NEIGHBOUR,))
        else:
            _set(allowed, body, (SEG_CENTRE, SEG_LESION))
            _set(allowed, others, (SEG_NEIGHBOUR, SEG_LESION))
        if body.any():
            centre_ijk = np.argwhere(body).mean(0) if centroid_mm is None else centre_ijk
        region_src, region_others = body, others
    elif kind == "coarse":
        coarse = patch.labels.get("coarse")
        if coarse is None:
            raise ValueError("kind='coarse' needs a 'coarse' label crop")
        band = cfg.loss.coarse_band_mm / sp
        this = coarse == label
        oth = (coarse > 0) & ~this
        not_this = ~dilate(this, band)
        _set(allowed, erode(this, band), (SEG_CENTRE, SEG_LESION))
        _set(allowed, not_this & ~oth, (SEG_BG, SEG_NEIGHBOUR, SEG_DISC, SEG_LESION))
        _set(allowed, erode(oth, band) & not_this, (SEG_NEIGHBOUR, SEG_LESION))
        body = this
        if body.any() and centroid_mm is None:
            centre_ijk = np.argwhere(body).mean(0)
        region_src = dilate(this, band) if this.any() else ellipsoid_prior(shape, centre_ijk, half)
    elif kind == "outline":
        outl = patch.labels.get("outlines")
        if outl is None:
            raise ValueError("kind='outline' needs an 'outlines' label crop")
        sigma = cfg.loss.outline_soft_sigma_mm
        inner_mm = max(cfg.loss.outline_offset_mm + cfg.loss.outline_band_mm, 0.0)  # erode by this: surely the body
        outer_mm = cfg.loss.outline_offset_mm - cfg.loss.outline_band_mm  # outside this: surely not
        px = (sp, sp)  # in-plane pixel size of the isotropic patch (mm)
        body = np.zeros(shape, bool)
        for s in range(shape[0]):  # sagittal slices = patch axis 0 (left-right)
            sl = outl[s]
            if not (sl > 0).any():
                continue
            this = sl == label
            oth = (sl > 0) & ~this
            a = allowed[:, s]
            not_this = ~shrink2d(this, outer_mm, px)
            if this.any():  # this body was outlined on this slice: inside = body, far outside = not it
                core = shrink2d(this, inner_mm, px)
                _set(a, core, (SEG_CENTRE, SEG_LESION))
                _set(a, not_this & ~oth, (SEG_BG, SEG_NEIGHBOUR, SEG_DISC, SEG_LESION))
                body[s] = this
                if sigma is not None:
                    # signed depth inside the drawn contour (mm, < 0 outside); the true boundary lies
                    # outline_offset_mm inside it, give or take sigma -> P(body) = Phi((depth - offset) / sigma)
                    # (the outline's own edge pixels lie on the drawn contour: depth 0, hence the - 1 inside)
                    depth = np.where(this, ndimage.distance_transform_edt(this) - 1.0,
                                     -ndimage.distance_transform_edt(~this)) * sp
                    band_px = ~core & ~not_this & ~oth
                    if body_soft is None:
                        body_soft = np.full(shape, np.nan, np.float32)
                    z = (depth[band_px] - cfg.loss.outline_offset_mm) / sigma
                    body_soft[s][band_px] = 0.5 * (1.0 + erf(z / np.sqrt(2.0)))
            # (a slice where only other bodies were outlined says nothing about where this one is not)
            _set(a, shrink2d(oth, inner_mm, px) & not_this, (SEG_NEIGHBOUR, SEG_LESION))
        if outline_lr_mm is not None and cfg.loss.outline_lateral_margin_mm is not None:
            # beyond the body's outermost outlined slices of the scan (edge slices are outlined) + margin:
            # not this body. World x of each patch slice along its centre line (x = patient left-right, LPS).
            m = cfg.loss.outline_lateral_margin_mm
            c = (np.array(shape) - 1) / 2.0
            line = np.stack([np.arange(shape[0], dtype=np.float64), np.full(shape[0], c[1]), np.full(shape[0], c[2])], 1)
            x = geo.voxel_to_world(line).coords[:, 0]
            lo, hi = min(outline_lr_mm), max(outline_lr_mm)
            far = (x < lo - m - 1e-6) | (x > hi + m + 1e-6)
            allowed[SEG_CENTRE, far] = False
        # Region: the union of this body's outlines extruded across the typical left-right half-width.
        proj = body.any(axis=0)
        region_src = np.zeros(shape, bool)
        lo = int(max(0, np.floor(centre_ijk[0] - half[0])))
        hi = int(min(shape[0], np.ceil(centre_ijk[0] + half[0]) + 1))
        region_src[lo:hi] = proj[None]
        if not region_src.any():
            region_src = ellipsoid_prior(shape, centre_ijk, half)
        body = region_src.copy()  # best 3D estimate (loose)
    elif kind == "box":
        if box_mm is None:
            raise ValueError("kind='box' needs box_mm")
        b = np.asarray(box_mm, dtype=np.float64).reshape(2, 3)
        corners = np.array([[b[i, 0], b[j, 1], b[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        ijk = geo.world_to_voxel(corners).coords
        lo = np.clip(np.floor(ijk.min(0) + 0.5).astype(int), 0, np.array(shape))
        hi = np.clip(np.floor(ijk.max(0) + 0.5).astype(int) + 1, 0, np.array(shape))
        box = np.zeros(shape, bool)
        box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        _set(allowed, ~box, (SEG_BG, SEG_NEIGHBOUR, SEG_DISC, SEG_LESION))
        body = box.copy()
        region_src = box
        centre_ijk = (lo + hi - 1) / 2.0 if box.any() else centre_ijk
    elif kind == "point":
        p = centroid_mm if point_mm is None else point_mm
        if p is None:
            raise ValueError("kind='point' needs point_mm")
        centre_ijk = geo.world_to_voxel(np.asarray(p, dtype=np.float64)).coords[0]
        point_ball = ellipsoid_prior(shape, centre_ijk, np.full(3, cfg.loss.point_radius_mm / sp))
        _set(allowed, point_ball, (SEG_CENTRE, SEG_LESION))
        body = ellipsoid_prior(shape, centre_ijk, half)
        region_src = body
    elif kind == "none":
        body = ellipsoid_prior(shape, centre_ijk, half)
        region_src = body
    else:
        raise ValueError(f"unknown annotation kind {kind!r}")

    if lesions is not None:
        # a given lesion map is complete (it marks every lesion voxel of the patch): lesion there, and
        # nowhere else -- left allowed in weakly or un-annotated voxels, "lesion" becomes a catch-all that
        # the set loss never penalises and the body (centre + lesion probability) swallows the patch
        allowed[SEG_LESION] = False
        _set(allowed, lesion, (SEG_LESION,))
    region = vertebra_region(region_src, cfg.margin_vox, region_others)
    heat = gaussian_heatmap(shape, centre_ijk, cfg.loss.heatmap_sigma_mm / sp)
    lesion_class = None
    if lesions is not None:
        lesion_class = np.zeros(shape, np.int64)
        for value, name in LESION_VALUE_CLASS.items():
            if name in cfg.classes:
                lesion_class[lesions == value] = cfg.classes.index(name)
    return PatchTargets(kind, body.astype(bool), region.astype(bool), allowed, heat, lesion, box, point_ball,
                        lesion_class, body_soft, region_others)


__all__ = [
    "Patch",
    "PatchSampler",
    "PatchTargets",
    "build_targets",
    "ball",
    "crop_patch",
    "dilate",
    "vertebra_region",
    "ellipsoid_prior",
    "erode",
    "fov_fraction",
    "gaussian_heatmap",
    "normalise_intensity",
    "paste_to_reference",
    "patch_grid",
    "spine_aligned_direction",
]
