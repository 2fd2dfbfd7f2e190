"""Evidence for a per-vertebra verdict: Integrated Gradients, mass inside the vertebra, pointing game.

The classification path is a function of ``image * region`` only (see :mod:`stage2_classify.model`), so
Integrated Gradients (Captum) puts exactly zero attribution outside the dilated region. What remains to
check -- and what :func:`fraction_inside` measures against the *undilated* body mask -- is how much of the
evidence sits in the body itself rather than in the margin (discs, endplate surroundings). A verdict is
flagged ``evidence_outside_body`` when that fraction is below the configured threshold
(``Stage2Config.evidence_threshold``, default 0.4).

Baseline. IG attributes ``f(x) - f(baseline)`` along the straight path from the baseline to ``x``. The
usual all-zeros baseline is *degenerate* for this network: with ``model.region_norm`` (default) the
classification path first standardises the region's intensities, so ``f(a * x) = f(x)`` for every
``a > 0`` and the whole path from zeros to ``x`` has one output; the attributions then sum to ~0 instead
of ``f(x) - f(0)`` (they reduce to a rescaled gradient x input). The default baseline is therefore the
patch *blurred inside the region* (:func:`blurred_baseline`, Gaussian of ``ig_baseline_sigma_mm``,
normalised by the blurred region so that no outside voxel enters): the same vertebra with its focal
structure (lesions, endplate detail, the body's edge against the margin) smoothed away. Any affine
image of ``x`` would be degenerate again; a blurred one is not (Sturmfels, Lundberg & Lee, "Visualizing
the impact of feature attribution baselines", Distill 2020). ``tests/stage2_classify/test_evidence.py``
checks completeness (attributions sum to ``f(x) - f(baseline)``) on a real network.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.io import write_image
from data_prep.scan import Scan
from stage2_classify.model import ClassifierPath, Stage2Net
from stage2_classify.patches import paste_to_reference

log = logging.getLogger(__name__)

EVIDENCE_FLAG = "evidence_outside_body"


def blurred_baseline(image: torch.Tensor, region: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """The IG baseline: ``image`` ``(B, 1, I, J, K)`` blurred *inside* ``region`` ``(B, 1, I, J, K)``.

    ``G * (image * region) / G * region`` (separable Gaussian ``G`` of ``sigma_vox`` voxels, zero padding)
    inside the region, ``image`` itself outside (the classification path never reads those voxels, so
    their attribution is zero either way). A function of ``image * region`` and ``region`` only; a
    constant image inside the region is its own baseline.
    """
    if sigma_vox <= 0:
        raise ValueError(f"sigma_vox must be > 0, got {sigma_vox}")
    r = (region > 0.5).to(image.dtype)
    rad = max(1, int(np.ceil(3.0 * sigma_vox)))
    g = torch.exp(-0.5 * (torch.arange(-rad, rad + 1, dtype=image.dtype, device=image.device) / sigma_vox) ** 2)
    g = g / g.sum()

    def blur(v: torch.Tensor) -> torch.Tensor:
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = g.numel()
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = rad
            v = torch.nn.functional.conv3d(torch.nn.functional.pad(v, pad), g.reshape(shape))
        return v

    num = blur(image * r)
    den = blur(r)
    inside = num / den.clamp_min(1e-12)
    return torch.where(r > 0.5, inside, image)


def default_baseline(net, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The baseline :func:`integrated_gradients` uses when none is given: :func:`blurred_baseline` with the
    network's ``cfg.ig_baseline_sigma_mm`` (in patch voxels); zeros for a network without a
    :class:`~stage2_classify.config.Stage2Config` (hand-built stand-ins) or with that setting ``None``."""
    cfg = getattr(net, "cfg", None)
    sigma_mm = getattr(cfg, "ig_baseline_sigma_mm", None)
    if sigma_mm is None:
        return torch.zeros_like(image)
    return blurred_baseline(image, region, float(sigma_mm) / float(cfg.patch.spacing_mm))


def integrated_gradients(net: Stage2Net, image: torch.Tensor, region: torch.Tensor, target: int | None = None,
                         n_steps: int = 32, contrast: int = -1, baseline: torch.Tensor | None = None,
                         return_delta: bool = False):
    """IG attribution ``(I, J, K)`` of the class probability w.r.t. the input patch.

    ``image``, ``region`` and ``baseline`` are ``(1, 1, I, J, K)``; ``target`` defaults to the predicted
    class; ``contrast`` is the scan's index into ``IMAGE_CONTRASTS`` (-1 unknown); ``baseline`` defaults to
    :func:`default_baseline` (see the module docstring for why not zeros). Returns ``(attribution,
    target)``, plus the completeness gap ``sum(attribution) - (f(image) - f(baseline))`` with
    ``return_delta``.
    """
    from captum.attr import IntegratedGradients

    was_training = net.training
    net.eval()
    try:
        path = ClassifierPath(net, region.detach(), contrast=contrast)
        with torch.no_grad():
            if target is None:
                target = int(path(image).argmax(1)[0])
            if baseline is None:
                baseline = default_baseline(net, image, region)
        if baseline.shape != image.shape:
            raise ValueError(f"baseline shape {tuple(baseline.shape)} != image shape {tuple(image.shape)}")
        ig = IntegratedGradients(path)
        # the completeness gap costs two more forward passes: only when asked for
        res = ig.attribute(image, baselines=baseline.detach(), target=int(target), n_steps=int(n_steps),
                           internal_batch_size=int(n_steps), return_convergence_delta=return_delta)
    finally:
        net.train(was_training)
    attr, delta = res if return_delta else (res, None)
    out = attr.detach()[0, 0].cpu().numpy().astype(np.float32)
    if return_delta:
        return out, int(target), float(delta.reshape(-1)[0])
    return out, int(target)


def region_shapley(net: Stage2Net, image: torch.Tensor, region: torch.Tensor, body: torch.Tensor, target: int,
                   contrast: int = -1, baseline: torch.Tensor | None = None) -> tuple[float, float]:
    """Exact Shapley values ``(body, margin)`` of the class-``target`` probability for two groups of voxels:
    the body and the rest of the region (Captum ``ShapleyValues`` with a feature mask; a group "absent" =
    its voxels set to ``baseline``, default :func:`default_baseline`). Voxels outside the region join the
    margin's group: the verdict cannot read them, so they change nothing (two groups: four forward passes
    and one for the baseline). The two values sum to ``f(image) - f(baseline)``.

    A group-level view next to the voxel-level IG share: how much the verdict owes to the body as a whole
    against the margin as a whole, whatever their voxel counts and edge contrasts. ``image``, ``region``,
    ``body``: ``(1, 1, I, J, K)``.
    """
    from captum.attr import ShapleyValues

    was_training = net.training
    net.eval()
    try:
        r = (region > 0.5).to(image.dtype)
        bd = (body > 0.5).to(image.dtype) * r
        if baseline is None:
            with torch.no_grad():
                baseline = default_baseline(net, image, region)
        groups = (1 - bd).long()  # 0 body, 1 margin (and the unread voxels outside the region)
        path = ClassifierPath(net, region.detach(), contrast=contrast)
        with torch.no_grad():
            sv = ShapleyValues(path).attribute(image, baselines=baseline.detach(), target=int(target),
                                               feature_mask=groups)
    finally:
        net.train(was_training)
    sv = sv[0, 0]
    gb, gm = groups[0, 0] == 0, groups[0, 0] == 1
    return (float(sv[gb][0]) if bool(gb.any()) else 0.0, float(sv[gm][0]) if bool(gm.any()) else 0.0)


def fraction_inside(attr: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> float:
    """``sum |attr| inside mask / sum |attr|`` (1.0 when the attribution is identically zero)."""
    a = np.abs(np.asarray(attr.detach().cpu() if isinstance(attr, torch.Tensor) else attr, dtype=np.float64))
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
    if a.shape != m.shape:
        raise ValueError(f"attribution shape {a.shape} != mask shape {m.shape}")
    total = a.sum()
    if total <= 0:
        return 1.0
    return float(a[m].sum() / total)


def depth_profile(attr: np.ndarray | torch.Tensor, body: np.ndarray | torch.Tensor, depth: int = 3) -> dict[str, float]:
    """Share of ``sum |attr|`` per layer of voxels by their distance to the body surface (voxels, 6-connected
    layers, an ``(I, J, K)`` grid): ``"body_1"`` the body's outermost layer, ``"body_2"`` the next, ...,
    ``"body_{depth}+"`` everything deeper; ``"margin_1"`` the first layer outside the body, ...,
    ``"margin_{depth}+"`` everything farther out. Shows whether evidence outside the body sits against the
    body's edge or all over the margin. Shares sum to 1 (all 0 when the attribution is zero)."""
    from scipy import ndimage as ndi

    a = np.abs(np.asarray(attr.detach().cpu() if isinstance(attr, torch.Tensor) else attr, dtype=np.float64))
    m = np.asarray(body.detach().cpu() if isinstance(body, torch.Tensor) else body).astype(bool)
    if a.shape != m.shape:
        raise ValueError(f"attribution shape {a.shape} != body shape {m.shape}")
    cross = ndi.generate_binary_structure(3, 1)
    total = a.sum()
    out: dict[str, float] = {}
    for side, inner in (("body", m), ("margin", ~m)):
        rest = inner.copy()
        for d in range(1, depth + 1):
            layer = rest if d == depth else rest & ~ndi.binary_erosion(rest, cross, border_value=1)
            out[f"{side}_{d}{'+' if d == depth else ''}"] = float(a[layer].sum() / total) if total > 0 else 0.0
            rest = rest & ~layer
    return out


def pointing_game(attr: np.ndarray | torch.Tensor, lesion_mask: np.ndarray | torch.Tensor, tolerance_vox: int = 0) -> bool:
    """True when the voxel of maximal |attribution| lies in ``lesion_mask`` (dilated by ``tolerance_vox``)."""
    a = np.abs(np.asarray(attr.detach().cpu() if isinstance(attr, torch.Tensor) else attr))
    m = np.asarray(lesion_mask.detach().cpu() if isinstance(lesion_mask, torch.Tensor) else lesion_mask).astype(bool)
    if tolerance_vox > 0:
        from stage2_classify.patches import dilate

        m = dilate(m, tolerance_vox)
    if not m.any():
        return False
    return bool(m.flat[int(np.argmax(a))])


@dataclass
class Evidence:
    """Evidence of one verdict: patch attribution (with its geometry), mass inside the body, flag."""

    attribution: Scan  # on the patch grid
    inside: float
    target: int
    flagged: bool

    def to_reference(self, reference: Scan) -> Scan:
        """The attribution pasted onto ``reference``'s grid (zero outside the patch)."""
        return paste_to_reference(self.attribution, reference)


def explain(net: Stage2Net, image: torch.Tensor, region: torch.Tensor, body: np.ndarray, geometry: Scan,
            threshold: float = 0.4, n_steps: int = 32, target: int | None = None, contrast: int = -1) -> Evidence:
    """IG on the classification path + fraction of |IG| inside the (undilated) ``body`` mask."""
    attr, tgt = integrated_gradients(net, image, region, target, n_steps, contrast)
    inside = fraction_inside(attr, body)
    flagged = inside < threshold
    if flagged:
        log.info("evidence inside body %.3f < %.2f", inside, threshold)
    return Evidence(geometry.with_array(attr, name="evidence"), inside, tgt, flagged)


def merge_evidence(maps: list[Scan], reference: Scan) -> Scan:
    """Paste several patch attribution maps onto ``reference``; overlaps keep the value of largest |.|."""
    out = np.zeros(reference.shape, dtype=np.float32)
    for m in maps:
        pasted = paste_to_reference(m, reference).array
        take = np.abs(pasted) > np.abs(out)
        out[take] = pasted[take]
    return reference.with_array(out, name="evidence")


def save_evidence(evidence_map: Scan, path) -> None:
    """Write an evidence map (float32) as NIfTI/any supported image format, atomically."""
    write_image(evidence_map.with_array(np.asarray(evidence_map.array, dtype=np.float32)), path)


__all__ = ["Evidence", "EVIDENCE_FLAG", "blurred_baseline", "default_baseline", "depth_profile", "explain", "region_shapley", "fraction_inside", "integrated_gradients", "merge_evidence",
           "pointing_game", "save_evidence"]
