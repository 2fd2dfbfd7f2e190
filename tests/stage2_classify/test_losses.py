"""Weak-label and multitask losses on tiny tensors with exact expected values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage2_classify.losses import (
    UncertaintyWeighting,
    band_targets,
    binary_partial_bce,
    box_emptiness_loss,
    box_tightness_loss,
    inverse_frequency_weights,
    partial_cross_entropy,
    point_loss,
    set_cross_entropy,
    size_prior_loss,
    soft_cross_entropy,
    soft_targets,
)

EPS = 1e-6


def test_soft_targets_and_soft_ce():
    t = soft_targets(torch.tensor([0, 2]), torch.tensor([0.7, 1.0]), 3)
    torch.testing.assert_close(t, torch.tensor([[0.7, 0.15, 0.15], [0.0, 0.0, 1.0]]))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    onehot = soft_targets(torch.tensor([1, 2]), torch.ones(2), 3)
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, torch.tensor([1, 2])))
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(soft_cross_entropy(logits, onehot, w),
                               F.cross_entropy(logits, torch.tensor([1, 2]), weight=w))
    manual = -(t[0] * F.log_softmax(logits[0], 0)).sum()
    torch.testing.assert_close(soft_cross_entropy(logits[:1], t[:1]), manual)


def test_partial_cross_entropy_ignores():
    logits = torch.randn(1, 3, 2, 2, 2)
    target = torch.full((1, 2, 2, 2), 255)
    assert float(partial_cross_entropy(logits, target)) == 0.0
    target[0, 0, 0, 0] = 2
    target[0, 1, 1, 1] = 0
    lp = F.log_softmax(logits, 1)
    expected = -(lp[0, 2, 0, 0, 0] + lp[0, 0, 1, 1, 1]) / 2
    torch.testing.assert_close(partial_cross_entropy(logits, target), expected)


def test_set_cross_entropy_exact():
    logits = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5]).view(1, 5, 1, 1, 1).repeat(1, 1, 3, 1, 1)
    allowed = torch.zeros(1, 5, 3, 1, 1, dtype=torch.bool)
    allowed[0, 1, 0] = True  # voxel 0: one class -> ordinary CE
    allowed[0, [0, 3], 1] = True  # voxel 1: {0, 3}
    allowed[0, :, 2] = True  # voxel 2: everything -> unsupervised
    p = torch.softmax(logits[0, :, 0, 0, 0], 0)
    expected = (-torch.log(p[1]) - torch.log(p[0] + p[3])) / 2
    torch.testing.assert_close(set_cross_entropy(logits, allowed), expected)
    assert float(set_cross_entropy(logits, torch.ones_like(allowed))) == 0.0


def test_set_cross_entropy_balanced_body_and_not_body_exact():
    # two samples x 5 voxels: voxel 0 body ({1}), voxels 1-3 not body ({0}), voxel 4 unsupervised
    logits = torch.randn(2, 5, 5, 1, 1, generator=torch.Generator().manual_seed(0))
    allowed = torch.zeros(2, 5, 5, 1, 1, dtype=torch.bool)
    allowed[:, 1, 0] = True
    allowed[:, 0, 1:4] = True
    allowed[:, :, 4] = True
    positive = torch.zeros(2, 5, 1, 1, dtype=torch.bool)
    positive[:, 0] = True
    lp = torch.log_softmax(logits, 1)[..., 0, 0]  # (B, C, 5)
    l_pos = -lp[:, 1, 0]  # (B,)
    l_neg = -lp[:, 0, 1:4]  # (B, 3)
    # sample 0 balanced: its 4 supervised voxels' weight split 2 (body) / 2 (three not-body voxels); sample 1 plain
    expected = (2 * l_pos[0] + (2 / 3) * l_neg[0].sum() + l_pos[1] + l_neg[1].sum()) / 8
    got = set_cross_entropy(logits, allowed, positive, torch.tensor([True, False]))
    torch.testing.assert_close(got, expected)
    # no sample balanced (or no body voxel in the balanced one) = the plain mean
    plain = set_cross_entropy(logits, allowed)
    torch.testing.assert_close(set_cross_entropy(logits, allowed, positive, torch.tensor([False, False])), plain)
    torch.testing.assert_close(set_cross_entropy(logits, allowed, torch.zeros_like(positive), torch.tensor([True, True])), plain)
    # balancing shifts the weight to the rare body voxel: its gradient grows
    lg = logits.clone().requires_grad_(True)
    set_cross_entropy(lg, allowed, positive, torch.tensor([True, True])).backward()
    g_bal = lg.grad[0, :, 0].abs().sum()
    lg.grad = None
    set_cross_entropy(lg, allowed).backward()
    assert g_bal > lg.grad[0, :, 0].abs().sum()


def test_soft_body_loss_exact():
    from stage2_classify.losses import soft_body_loss

    prob = torch.tensor([0.2, 0.7, 0.5, 0.9]).view(1, 1, 4, 1, 1)
    target = torch.tensor([0.0, 0.75, float("nan"), 1.0]).view(1, 1, 4, 1, 1)
    exp = -(math.log(0.8) + 0.75 * math.log(0.7) + 0.25 * math.log(0.3) + math.log(0.9)) / 3
    assert abs(float(soft_body_loss(prob, target)) - exp) < 1e-6
    assert float(soft_body_loss(prob, torch.full_like(target, float("nan")))) == 0.0


def test_band_targets_outline_interior_band_exterior():
    m = torch.zeros(1, 1, 9, 9, 9)
    m[0, 0, 2:7, 2:7, 2:7] = 1
    t = band_targets(m, inner_vox=1, outer_vox=1)
    assert t.shape == (1, 9, 9, 9)
    assert torch.all(t[0, 3:6, 3:6, 3:6] == 1) and int((t == 1).sum()) == 27  # eroded 3^3 cube
    assert int(t[0, 2, 4, 4]) == 255 and int(t[0, 1, 4, 4]) == 255  # boundary band (inside + outside)
    assert int(t[0, 0, 4, 4]) == 0 and int((t == 0).sum()) == 9**3 - 7**3
    # a prediction equal to the eroded core and empty outside the dilation has exactly zero loss
    prob = (t == 1).float()
    assert float(binary_partial_bce(prob, t)) == 0.0
    prob[0, 0, 0, 0] = 0.5  # a negative voxel at 0.5
    assert float(binary_partial_bce(prob, t)) == pytest.approx(math.log(2) / (27 + 9**3 - 7**3), rel=1e-5)


def _latin_box():
    """3x3x3 box inside 5x5x5 with p = 1 on (i + j + k) % 3 == 0: every axis-parallel line hits once."""
    box = torch.zeros(1, 1, 5, 5, 5, dtype=torch.bool)
    box[0, 0, 1:4, 1:4, 1:4] = True
    p = torch.zeros(1, 1, 5, 5, 5)
    for i in range(3):
        for j in range(3):
            for k in range(3):
                if (i + j + k) % 3 == 0:
                    p[0, 0, 1 + i, 1 + j, 1 + k] = 1.0
    return p, box


def test_box_tightness_zero_when_every_line_is_touched():
    p, box = _latin_box()
    assert int(p.sum()) == 9
    assert float(box_tightness_loss(p, box)) == 0.0
    # remove one voxel: exactly three lines (one per axis) become empty -> 3 * -log(eps) / 27 lines
    p[0, 0, 1, 1, 1] = 0.0
    expected = 3 * -math.log(EPS) / 27
    assert float(box_tightness_loss(p, box)) == pytest.approx(expected, rel=1e-5)
    # a mask filling only one slab of the box misses lines along the other axes
    slab = torch.zeros_like(p)
    slab[0, 0, 2, 1:4, 1:4] = 1.0
    assert float(box_tightness_loss(slab, box)) > 0


def test_box_emptiness():
    p, box = _latin_box()
    assert float(box_emptiness_loss(p, box)) == 0.0
    p[0, 0, 0, 0, 0] = 0.5
    n_out = 125 - 27
    assert float(box_emptiness_loss(p, box)) == pytest.approx(math.log(2) / n_out, rel=1e-5)


def test_point_and_size_prior():
    ball = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    ball[0, 0, 1:3, 1:3, 1:3] = True
    p = ball.float()
    assert float(point_loss(p, ball)) == 0.0
    assert float(point_loss(0.5 * p, ball)) == pytest.approx(math.log(2), rel=1e-6)
    # 8 voxels of 1 ml: inside [5, 10] -> 0; range [10, 20] -> ((10 - 8) / 20)^2
    assert float(size_prior_loss(p, 1.0, (5.0, 10.0))) == 0.0
    assert float(size_prior_loss(p, 1.0, (10.0, 20.0))) == pytest.approx((2.0 / 20.0) ** 2)
    assert float(size_prior_loss(p, 1.0, (1.0, 4.0))) == pytest.approx((4.0 / 4.0) ** 2)
    assert float(size_prior_loss(p, 1.0, (10.0, 20.0), valid=torch.tensor([False]))) == 0.0


def test_uncertainty_weighting():
    w = UncertaintyWeighting(["cls", "seg"])
    losses = {"cls": torch.tensor(2.0), "seg": torch.tensor(0.5)}
    total = w(losses)
    assert float(total.detach()) == pytest.approx(2.5)
    total.backward()
    # d/ds (exp(-s) L + s) at s = 0 is 1 - L
    torch.testing.assert_close(w.log_vars.grad, torch.tensor([1 - 2.0, 1 - 0.5]))
    with torch.no_grad():
        w.log_vars[0] = math.log(2.0)
    assert float(w(losses).detach()) == pytest.approx(2.0 / 2 + math.log(2.0) + 0.5)
    assert float(w({"seg": torch.tensor(1.0)}).detach()) == pytest.approx(1.0)  # absent task skipped
    f = UncertaintyWeighting(["cls", "seg"], "fixed", {"cls": 2.0, "seg": 0.5})
    assert float(f(losses)) == pytest.approx(4.25)
    with pytest.raises(ValueError):
        UncertaintyWeighting(["cls"], "magic")


def test_anchored_weighting_keeps_primary_at_one():
    w = UncertaintyWeighting(["cls", "seg", "recon"], "anchored")
    losses = {"cls": torch.tensor(2.0), "seg": torch.tensor(0.5), "recon": torch.tensor(3.0)}
    with torch.no_grad():
        w.log_vars[:] = torch.tensor([5.0, math.log(2.0), 0.0])  # s of cls must be ignored
    total = w(losses)
    assert float(total.detach()) == pytest.approx(2.0 + (0.5 / 2 + math.log(2.0)) + 3.0)
    total.backward()
    # the primary task's s gets no gradient; the auxiliaries' d/ds = 1 - exp(-s) L
    torch.testing.assert_close(w.log_vars.grad, torch.tensor([0.0, 1 - 0.25, 1 - 3.0]))
    assert w.weights() == pytest.approx({"cls": 1.0, "seg": 0.5, "recon": 1.0})


def test_inverse_frequency_weights():
    w = inverse_frequency_weights([10, 5, 0])
    np.testing.assert_allclose(w.numpy(), [15 / 20, 15 / 10, 0.0])


def test_lesion_voxel_loss_weighted_and_masked():
    from stage2_classify.losses import lesion_voxel_loss

    # 1 x 3 classes x 1 x 1 x 4 voxels; voxel 0 lesion of class 2, voxels 1-2 lesion-free, voxel 3 outside mask
    target = torch.tensor([2, 0, 0, 1]).view(1, 1, 1, 1, 4)
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 1, 4)
    # voxel 0 predicted uniform (CE log 3), voxels 1-2 confidently right (CE ~0): weighted mean = 5 log3 / 7
    logits = torch.zeros(1, 3, 1, 1, 4)
    logits[0, 0, 0, 0, 1:3] = 30.0
    expected = 5 * math.log(3) / (5 + 1 + 1)
    assert lesion_voxel_loss(logits, target, mask, pos_weight=5.0).item() == pytest.approx(expected, abs=1e-5)
    assert lesion_voxel_loss(logits, target, mask, pos_weight=1.0).item() == pytest.approx(math.log(3) / 3, abs=1e-5)
    # a confident, correct prediction inside the mask -> ~0 whatever happens outside the mask
    good = torch.full((1, 3, 1, 1, 4), -20.0)
    good[0, 2, 0, 0, 0] = 20.0
    good[0, 0, 0, 0, 1:3] = 20.0
    good[0, 2, 0, 0, 3] = 20.0  # wrong class at the masked-out voxel: ignored
    assert lesion_voxel_loss(good, target, mask).item() < 1e-6
    # ignore label (< 0) and an empty mask contribute nothing
    assert lesion_voxel_loss(logits, torch.full_like(target, -1), mask).item() == 0.0
    assert lesion_voxel_loss(logits, target, torch.zeros_like(mask)).item() == 0.0


def test_lesion_mil_loss_uses_max_inside_mask():
    from stage2_classify.losses import lesion_mil_loss

    logits = torch.full((1, 3, 1, 1, 3), -20.0)
    logits[0, 0] = 20.0  # no lesion anywhere ...
    logits[0, 1, 0, 0, 2] = 40.0  # ... except a class-1 lesion at voxel 2
    normal = torch.tensor([[1.0, 0.0, 0.0]])
    infl = torch.tensor([[0.0, 1.0, 0.0]])
    inside_all = torch.ones(1, 1, 1, 1, 3)
    inside_01 = torch.tensor([1.0, 1.0, 0.0]).view(1, 1, 1, 1, 3)
    assert lesion_mil_loss(logits, inside_all, infl).item() < 1e-4  # max p_1 = 1 matches the label
    assert lesion_mil_loss(logits, inside_all, normal).item() > 5.0  # a lesion in a "normal" vertebra
    assert lesion_mil_loss(logits, inside_01, normal).item() < 1e-4  # ... unless it lies outside the mask


def test_margin_attribution_share_exact():
    from stage2_classify.losses import margin_attribution_share

    shape = (2, 1, 1, 1, 4)
    region = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 4).repeat(2, 1, 1, 1, 1)
    body = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 4).repeat(2, 1, 1, 1, 1)
    grad = torch.tensor([[2.0, -1.0, 0.5, 100.0], [0.0, 0.0, 0.0, 7.0]]).reshape(shape)
    delta = torch.tensor([[1.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]).reshape(shape)
    share = margin_attribution_share(grad, delta, region, body)
    # sample 0: |g d| = 2 (body), 3 and 1 (margin), 100 outside the region (ignored) -> 4 / 6
    # sample 1: no attribution inside the region at all -> 0
    assert torch.allclose(share, torch.tensor([4.0 / 6.0, 0.0]))
    with pytest.raises(ValueError, match="one shape"):
        margin_attribution_share(grad, delta[:, :, :, :, :3], region, body)


def test_margin_attribution_mass_exact():
    from stage2_classify.losses import margin_attribution

    region = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 1, 1, 4)
    body = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 4)
    grad = torch.tensor([2.0, -1.0, 0.5, 100.0]).reshape(1, 1, 1, 1, 4)
    delta = torch.tensor([1.0, 3.0, -2.0, 1.0]).reshape(1, 1, 1, 1, 4)
    assert torch.allclose(margin_attribution(grad, delta, region, body), torch.tensor([4.0]))  # |-3| + |-1|
    assert torch.allclose(margin_attribution(0.5 * grad, delta, region, body), torch.tensor([2.0]))  # not scale-free
