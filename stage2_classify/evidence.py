"""Evidence for a per-vertebra verdict: Integrated Gradients, mass inside the vertebra, pointing game.

The classification path is a function of ``image * region`` only (see :mod:`stage2_classify.model`), so
Integrated Gradients (Captum, baseline = zeros) puts exactly zero attribution outside the dilated region.
What remains to check -- and what :func:`fraction_inside` measures against the *undilated* body mask --
is how much of the evidence sits in the body itself rather than in the margin (discs, endplate
surroundings). A verdict is flagged ``evidence_outside_body`` when that fraction is below the configured
threshold (default 0.9).
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


def integrated_gradients(net: Stage2Net, image: torch.Tensor, region: torch.Tensor, target: int | None = None,
                         n_steps: int = 32, contrast: int = -1) -> tuple[np.ndarray, int]:
    """IG attribution ``(I, J, K)`` of the class probability w.r.t. the input patch.

    ``image`` and ``region`` are ``(1, 1, I, J, K)``; ``target`` defaults to the predicted class;
    ``contrast`` is the scan's index into ``IMAGE_CONTRASTS`` (-1 unknown). Baseline: zeros. Returns
    ``(attribution, target)``.
    """
    from captum.attr import IntegratedGradients

    was_training = net.training
    net.eval()
    try:
        path = ClassifierPath(net, region.detach(), contrast=contrast)
        with torch.no_grad():
            probs = path(image)
        if target is None:
            target = int(probs.argmax(1)[0])
        ig = IntegratedGradients(path)
        attr = ig.attribute(image, baselines=torch.zeros_like(image), target=int(target), n_steps=int(n_steps),
                            internal_batch_size=int(n_steps))
    finally:
        net.train(was_training)
    return attr.detach()[0, 0].cpu().numpy().astype(np.float32), int(target)


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
            threshold: float = 0.9, n_steps: int = 32, target: int | None = None, contrast: int = -1) -> Evidence:
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


__all__ = ["Evidence", "EVIDENCE_FLAG", "explain", "fraction_inside", "integrated_gradients", "merge_evidence",
           "pointing_game", "save_evidence"]
