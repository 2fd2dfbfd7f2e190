"""Losses: automatic multitask balancing, soft-label classification and weak-label segmentation.

All weak-label losses take probabilities/logits on the patch grid and masks of the same spatial shape
``(B, 1, I, J, K)`` (or ``(B, I, J, K)``), and return a scalar that is exactly zero when the prediction
satisfies the annotation (tests in ``tests/stage2_classify/test_losses.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Multitask balancing
# ---------------------------------------------------------------------------------------------
class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla, CVPR 2018).

    ``total = sum_t exp(-s_t) * L_t + s_t`` with ``s_t = log sigma_t^2`` learned per task (initialised at
    0, i.e. weight 1). A task whose loss stays large gets down-weighted, at the price of the ``+ s_t``
    regulariser: at equilibrium ``exp(-s_t) = 1 / L_t``, so the task with the largest loss (often the
    primary one) ends with the smallest weight.

    ``mode="anchored"``: the ``primary`` task keeps weight 1 (its ``s`` is not learned) and only the
    auxiliary tasks' weights are learned, relative to it; the auxiliaries still balance automatically, but
    cannot out-weigh the task they serve. ``mode="fixed"``: the weights are the given constants and nothing
    is learned.
    """

    MODES = ("uncertainty", "anchored", "fixed")

    def __init__(self, tasks: list[str], mode: str = "uncertainty", fixed: dict[str, float] | None = None,
                 primary: str = "cls"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown loss weighting {mode!r}; expected one of {', '.join(self.MODES)}")
        self.tasks = list(tasks)
        self.mode = mode
        self.primary = primary
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)), requires_grad=(mode != "fixed"))
        self.fixed = {t: float((fixed or {}).get(t, 1.0)) for t in self.tasks}

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum over the tasks present in ``losses`` (scalar)."""
        total = self.log_vars.sum() * 0.0  # keeps the parameter in the graph (DDP)
        for i, t in enumerate(self.tasks):
            if t not in losses:
                continue
            if self.mode == "fixed":
                total = total + self.fixed[t] * losses[t]
            elif self.mode == "anchored" and t == self.primary:
                total = total + losses[t]
            else:
                total = total + torch.exp(-self.log_vars[i]) * losses[t] + self.log_vars[i]
        return total

    def weights(self) -> dict[str, float]:
        if self.mode == "fixed":
            return dict(self.fixed)
        return {t: 1.0 if (self.mode == "anchored" and t == self.primary)
                else float(torch.exp(-self.log_vars[i]).detach()) for i, t in enumerate(self.tasks)}


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------
def soft_targets(labels: torch.Tensor, confidence: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(B,)`` class indices + ``(B,)`` confidences -> ``(B, K)`` target distributions.

    Confidence ``c`` on class ``k`` puts ``c`` on ``k`` and ``(1 - c) / (K - 1)`` on every other class.
    """
    labels = labels.long().view(-1)
    c = confidence.to(torch.float32).view(-1, 1)
    other = (1.0 - c) / (n_classes - 1)
    t = other.expand(-1, n_classes).clone()
    t.scatter_(1, labels.view(-1, 1), c)
    return t


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross entropy against target distributions ``(B, K)``; optional per-class weights ``(K,)``.

    With weights, each sample is weighted by ``sum_k w_k t_k`` and the loss is normalised by the sum of
    sample weights (reduces to the usual weighted CE for one-hot targets).
    """
    logp = F.log_softmax(logits, dim=1)
    per = -(targets * logp).sum(1)
    if class_weights is None:
        return per.mean()
    w = (targets * class_weights.to(logits).view(1, -1)).sum(1)
    return (w * per).sum() / w.sum().clamp_min(_EPS)


def _margin_and_region_attribution(grad: torch.Tensor, delta: torch.Tensor, region: torch.Tensor,
                                   body: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``sum |grad * delta|`` over the margin (``region`` without ``body``) and over ``region``,
    each ``(B,)``; the shared part of :func:`margin_attribution` and :func:`margin_attribution_share`."""
    if not grad.shape == delta.shape == region.shape == body.shape:
        raise ValueError(f"grad, delta, region and body must have one shape, got {tuple(grad.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(region.shape)}, {tuple(body.shape)}")
    a = (grad * delta).abs() * (region > 0.5).to(grad.dtype)
    margin = a * (body <= 0.5).to(grad.dtype)
    return margin.flatten(1).sum(1), a.flatten(1).sum(1)


def margin_attribution(grad: torch.Tensor, delta: torch.Tensor, region: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Per-sample first-order attribution mass ``sum |grad * delta|`` over the margin (``region`` without
    ``body``), ``(B,)``; shapes as :func:`margin_attribution_share`. Unlike the share it is not scale-free: it
    is about how far the output would move if the margin were replaced by the baseline, so it vanishes for a
    classifier that has not learned to react to the input yet."""
    return _margin_and_region_attribution(grad, delta, region, body)[0]


def margin_attribution_share(grad: torch.Tensor, delta: torch.Tensor, region: torch.Tensor, body: torch.Tensor,
                             eps: float = 1e-12) -> torch.Tensor:
    """Per-sample share of the first-order attribution ``|grad * delta|`` that lies in the margin, ``(B,)``.

    ``grad`` is the gradient of the class output w.r.t. the classification input, ``delta`` the input minus
    the Integrated-Gradients baseline, ``region`` and ``body`` binary masks; all ``(B, 1, I, J, K)``. The
    margin is ``region`` without ``body``. ``grad * delta`` is the one-step (gradient x input) version of
    the IG attribution whose share inside the body the evidence check reports
    (:mod:`stage2_classify.evidence`), so the share in the margin is what ``train.margin_grad_penalty``
    (an input-gradient penalty, "right for the right reasons", Ross, Hughes & Doshi-Velez, IJCAI 2017)
    pushes down. Bounded in [0, 1]; 0 where the region holds no attribution at all.
    """
    margin, total = _margin_and_region_attribution(grad, delta, region, body)
    return margin / total.clamp_min(eps)


# ---------------------------------------------------------------------------------------------
# Segmentation with partial / set-valued labels
# ---------------------------------------------------------------------------------------------
def partial_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross entropy over labelled voxels only (``target == ignore_index`` is skipped).

    ``logits`` ``(B, C, I, J, K)``, ``target`` ``(B, I, J, K)`` int. Returns 0 (with a graph) when every
    voxel is ignored.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def set_cross_entropy(logits: torch.Tensor, allowed: torch.Tensor, positive: torch.Tensor | None = None,
                      balance: torch.Tensor | None = None) -> torch.Tensor:
    """Set-valued ("partial label") cross entropy: ``-log sum_{c in allowed} p_c``, averaged over
    supervised voxels.

    ``allowed`` ``(B, C, I, J, K)`` bool: the classes compatible with the annotation at each voxel. One
    class = ordinary CE; all classes = unsupervised (contributes exactly 0 and is not counted); e.g.
    ``{background, disc}`` where discs are not annotated, ``{centre body, lesion}`` where lesions are not.

    ``positive`` ``(B, I, J, K)`` bool and ``balance`` ``(B,)`` bool: in the samples with ``balance`` set,
    the supervised voxels in ``positive`` and the other supervised voxels each carry half of the sample's
    weight (its number of supervised voxels, as without balancing), when both groups are present. Loose
    outlines supervise far more not-body than body voxels (the body only well inside the outline, the
    not-body everywhere outside it); without this the not-body voxels dominate the mean and the head
    learns "not body" almost everywhere. Every other voxel has weight 1; the result is the weighted mean.
    """
    allowed = allowed.bool()
    logp = F.log_softmax(logits, dim=1)
    masked = logp.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, dim=1)  # (B, I, J, K)
    supervised = ~allowed.all(dim=1) & allowed.any(dim=1)
    if not bool(supervised.any()):
        return logits.sum() * 0.0
    if positive is None or balance is None or not bool(balance.any()):
        return -(lse[supervised]).mean()
    pos = positive.bool() & supervised
    n = supervised.flatten(1).sum(1).float()
    n_pos = pos.flatten(1).sum(1).float()
    n_neg = n - n_pos
    on = balance.bool() & (n_pos > 0) & (n_neg > 0)
    shape = (-1,) + (1,) * (lse.dim() - 1)
    w_pos = torch.where(on, 0.5 * n / n_pos.clamp_min(1), torch.ones_like(n)).view(shape)
    w_neg = torch.where(on, 0.5 * n / n_neg.clamp_min(1), torch.ones_like(n)).view(shape)
    w = torch.where(pos, w_pos, w_neg) * supervised
    return -(lse.masked_fill(~supervised, 0.0) * w).sum() / w.sum()


def soft_body_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft binary cross entropy of a body probability ``(B, 1, I, J, K)`` against soft targets of the same
    shape, averaged over the voxels where the target is not NaN (0 when there are none)."""
    valid = ~torch.isnan(target)
    if not bool(valid.any()):
        return prob.sum() * 0.0
    p = prob[valid].clamp(eps, 1 - eps)
    q = target[valid]
    return -(q * torch.log(p) + (1 - q) * torch.log(1 - p)).mean()


def band_targets(mask: torch.Tensor, inner_vox: int, outer_vox: int, ignore_index: int = 255) -> torch.Tensor:
    """Loose mask -> partial target: 1 inside the mask eroded by ``inner_vox``, 0 outside it dilated by
    ``outer_vox``, ``ignore_index`` in the band between (the annotation's uncertain boundary).

    ``mask`` ``(B, 1, I, J, K)`` (or ``(B, I, J, K)``) -> ``(B, I, J, K)`` long. Used for filled loose outlines
    (wide band) and coarse / biased masks (narrow band). Erosion/dilation use a cube of side ``2r + 1``.
    """
    m = mask.float()
    if m.ndim == 4:
        m = m[:, None]
    inner = m
    if inner_vox > 0:
        inner = 1.0 - F.max_pool3d(1.0 - m, 2 * inner_vox + 1, stride=1, padding=inner_vox)
    outer = m
    if outer_vox > 0:
        outer = F.max_pool3d(m, 2 * outer_vox + 1, stride=1, padding=outer_vox)
    t = torch.full_like(m, float(ignore_index))
    t[outer < 0.5] = 0
    t[inner > 0.5] = 1
    return t[:, 0].long()


def binary_partial_bce(prob: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Binary cross entropy of foreground probability ``prob`` against a 0/1/ignore target
    (:func:`band_targets`). Exactly 0 when ``prob`` is 1 on every positive and 0 on every negative."""
    p = prob.reshape(target.shape) if prob.shape != target.shape else prob
    pos, neg = target == 1, target == 0
    n = int(pos.sum()) + int(neg.sum())
    if n == 0:
        return prob.sum() * 0.0
    lp = -torch.log(p[pos].clamp_min(_EPS)).sum()
    ln = -torch.log1p(-p[neg].clamp_max(1 - _EPS)).sum()
    return (lp + ln) / n


# ---------------------------------------------------------------------------------------------
# Boxes, points, sizes
# ---------------------------------------------------------------------------------------------
def box_tightness_loss(prob: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Tightness prior of a bounding box (Lempitsky et al. 2009; Kervadec et al. 2020).

    A tight box is crossed by the object on every line through it parallel to an axis, so the maximum
    foreground probability along each such line should be 1: loss = mean over all box lines (all three
    axes) of ``-log max_line p``. Exactly 0 when every line contains a voxel with ``p == 1``.

    ``prob`` ``(B, 1, I, J, K)`` foreground probability, ``box`` same shape, bool (one box per sample;
    samples with an empty box are skipped).
    """
    p = prob.reshape(prob.shape[0], *prob.shape[-3:])
    b = box.reshape(box.shape[0], *box.shape[-3:]).bool()
    terms = []
    for axis in (1, 2, 3):
        inside = p.masked_fill(~b, 0.0)
        line_max = inside.amax(dim=axis)
        line_in_box = b.any(dim=axis)
        if bool(line_in_box.any()):
            terms.append(-torch.log(line_max[line_in_box].clamp_min(_EPS)))
    if not terms:
        return prob.sum() * 0.0
    return torch.cat(terms).mean()


def box_emptiness_loss(prob: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Nothing of the object outside its box: mean over voxels outside the box of ``-log(1 - p)``.

    Exactly 0 when ``p == 0`` everywhere outside. Shapes as :func:`box_tightness_loss`.
    """
    p = prob.reshape(prob.shape[0], -1)
    out = ~box.reshape(box.shape[0], -1).bool()
    if not bool(out.any()):
        return prob.sum() * 0.0
    return -torch.log1p(-p[out].clamp_max(1 - _EPS)).mean()


def point_loss(prob: torch.Tensor, ball: torch.Tensor) -> torch.Tensor:
    """Point annotation: the ball around the point is foreground: mean over ball voxels of ``-log p``.

    Exactly 0 when ``p == 1`` on the ball.
    """
    b = ball.reshape(ball.shape[0], -1).bool()
    if not bool(b.any()):
        return prob.sum() * 0.0
    return -torch.log(prob.reshape(prob.shape[0], -1)[b].clamp_min(_EPS)).mean()


def size_prior_loss(prob: torch.Tensor, voxel_volume_ml: float, volume_range_ml: tuple[float, float],
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft size constraint: predicted volume ``V = sum p * voxel_volume`` should lie in ``[lo, hi]`` ml.

    Loss per sample ``(relu(lo - V) + relu(V - hi))^2 / hi^2`` (0 inside the range), mean over samples
    (``valid`` ``(B,)`` bool selects the samples it applies to).
    """
    lo, hi = volume_range_ml
    v = prob.reshape(prob.shape[0], -1).sum(1) * float(voxel_volume_ml)
    pen = (F.relu(lo - v) + F.relu(v - hi)) ** 2 / (hi * hi)
    if valid is not None:
        valid = valid.bool().view(-1)
        if not bool(valid.any()):
            return prob.sum() * 0.0
        pen = pen[valid]
    return pen.mean()


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against a Gaussian heatmap (``(B, 1, I, J, K)``)."""
    return F.binary_cross_entropy_with_logits(logits, target)


def recon_loss(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean squared reconstruction error."""
    return F.mse_loss(recon, image)


def inverse_frequency_weights(counts: list[int] | torch.Tensor) -> torch.Tensor:
    """``K`` class counts -> weights ``N / (K * n_k)`` (classes absent from training get weight 0)."""
    c = torch.as_tensor(counts, dtype=torch.float32)
    k = int((c > 0).sum()) or 1
    w = torch.where(c > 0, c.sum() / (k * c.clamp_min(1)), torch.zeros_like(c))
    return w


def voxel_volume_ml(spacing_mm: float) -> float:
    return float(spacing_mm) ** 3 / 1000.0


__all__ = [
    "UncertaintyWeighting",
    "soft_targets",
    "soft_cross_entropy",
    "partial_cross_entropy",
    "set_cross_entropy",
    "soft_body_loss",
    "band_targets",
    "binary_partial_bce",
    "box_tightness_loss",
    "box_emptiness_loss",
    "point_loss",
    "size_prior_loss",
    "heatmap_loss",
    "recon_loss",
    "inverse_frequency_weights",
    "voxel_volume_ml",
]


def lesion_voxel_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      pos_weight: float = 5.0) -> torch.Tensor:
    """Per-voxel cross entropy of the lesion head inside ``mask``, lesion voxels up-weighted.

    ``logits`` ``(B, K, I, J, K')``, ``target`` ``(B, 1, ...)`` int class per voxel (0 = no lesion, < 0 =
    ignore), ``mask`` ``(B, 1, ...)``. Weighted mean of the CE with weight ``pos_weight`` on lesion voxels
    and 1 elsewhere (lesions are ~1 % of a body; a fully balanced loss would teach the head to fire on a
    quarter of every normal body, which the pooled class features then cannot tell from a lesion).
    0 when no voxel is supervised.
    """
    t = target[:, 0].long()
    m = (mask[:, 0] > 0.5) & (t >= 0)
    if not bool(m.any()):
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, t.clamp_min(0), reduction="none")
    w = torch.where(t > 0, torch.full_like(ce, float(pos_weight)), torch.ones_like(ce)) * m
    return (ce * w).sum() / w.sum()


def lesion_mil_loss(logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multiple-instance loss from vertebra labels alone: the largest probability of lesion class k inside
    ``mask`` should be the vertebra's (soft) probability of class k.

    ``logits`` ``(B, K, I, J, K')``, ``mask`` ``(B, 1, ...)``, ``targets`` ``(B, K)`` soft class targets
    (column 0 = normal). Binary cross entropy over the classes k >= 1, mean over the batch.
    """
    p = torch.softmax(logits, dim=1)[:, 1:].flatten(2)
    m = (mask > 0.5).flatten(2)
    q = (p * m).amax(-1).clamp(1e-6, 1 - 1e-6)  # (B, K-1)
    return F.binary_cross_entropy(q, targets[:, 1:].to(q.dtype))
