"""Integrated Gradients evidence with a hand-built model whose output depends on a known voxel set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from data_prep.io import read_image
from data_prep.scan import Scan
from stage2_classify.evidence import (
    explain,
    fraction_inside,
    integrated_gradients,
    merge_evidence,
    pointing_game,
    save_evidence,
)
from stage2_classify.patches import patch_grid
from stage2_classify.config import PatchConfig


class Hand(nn.Module):
    """logits = [s, -s] with s = sum(w * image * region): depends only on voxels where w != 0."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward_cls(self, image, region):
        s = (image * region * self.w).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


SHAPE = (6, 7, 8)


def _setup():
    w = torch.zeros(1, 1, *SHAPE)
    w[0, 0, 2, 3, 3] = 1.0  # inside the body
    w[0, 0, 3, 3, 4] = 2.0  # inside the body
    w[0, 0, 1, 3, 3] = 1.5  # in the margin (region, not body)
    body = np.zeros(SHAPE, bool)
    body[2:5, 2:5, 2:6] = True
    region = torch.zeros(1, 1, *SHAPE)
    region[0, 0, 1:6, 1:6, 1:7] = 1.0
    image = torch.full((1, 1, *SHAPE), 0.2)
    image[0, 0, 2, 3, 3], image[0, 0, 3, 3, 4], image[0, 0, 1, 3, 3] = 1.0, 0.5, 2.0
    return Hand(w), image, region, body


def test_ig_attribution_fraction_is_exact():
    net, image, region, body = _setup()
    attr, target = integrated_gradients(net, image, region, n_steps=16)
    assert target == 0  # s > 0
    nz = np.argwhere(attr != 0)
    assert {tuple(x) for x in nz} == {(2, 3, 3), (3, 3, 4), (1, 3, 3)}
    # for f = g(w . x) IG is proportional to w_i x_i: inside = (1*1 + 2*0.5) / (1 + 1 + 1.5*2)
    assert fraction_inside(attr, body) == pytest.approx(2.0 / 5.0, rel=1e-5)
    # completeness: attributions sum to f(x) - f(0) (Riemann approximation)
    p = torch.softmax(net.forward_cls(image, region), 1)[0, 0].item()
    assert attr.sum() == pytest.approx(p - 0.5, rel=0.05)


def test_explain_flags_below_threshold_and_pointing_game():
    net, image, region, body = _setup()
    geo = patch_grid(np.zeros(3), PatchConfig(size_mm=tuple(float(s) for s in SHAPE), spacing_mm=1.0))
    ev = explain(net, image, region, body, geo, threshold=0.9, n_steps=8)
    assert ev.flagged and ev.inside == pytest.approx(0.4, rel=1e-4)
    ev2 = explain(net, image, region, np.ones(SHAPE, bool), geo, threshold=0.9, n_steps=8)
    assert not ev2.flagged and ev2.inside == pytest.approx(1.0)
    attr = ev.attribution.array
    lesion = np.zeros(SHAPE, bool)
    lesion[1, 3, 3] = True  # max |attr| is w*x = 3 at (1, 3, 3)
    assert pointing_game(attr, lesion)
    lesion2 = np.zeros(SHAPE, bool)
    lesion2[3, 3, 4] = True
    assert not pointing_game(attr, lesion2)
    assert pointing_game(attr, lesion2, tolerance_vox=3)  # distance sqrt(5)


def test_fraction_inside_edge_cases():
    assert fraction_inside(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), bool)) == 1.0
    a = np.array([[[1.0, -3.0]]])
    assert fraction_inside(a, np.array([[[False, True]]])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        fraction_inside(np.zeros((2, 2, 2)), np.zeros((2, 2, 3), bool))


def test_evidence_pasted_back_and_saved(tmp_path):
    ref = Scan(np.zeros((20, 22, 18), np.float32), spacing=(1.0, 1.0, 2.0), origin=(-5.0, 3.0, 10.0),
               direction=np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).T)
    centre = ref.voxel_to_world(np.array([10.0, 11.0, 9.0])).coords[0]
    geo = patch_grid(centre, PatchConfig(size_mm=(9.0, 9.0, 9.0), spacing_mm=1.0))
    m = np.zeros(geo.shape, np.float32)
    m[4, 4, 4] = 5.0  # patch centre
    pasted = merge_evidence([geo.with_array(m)], ref)
    assert pasted.same_geometry(ref)
    peak = np.unravel_index(np.argmax(pasted.array), ref.shape)
    np.testing.assert_allclose(ref.voxel_to_world(np.array(peak, float)).coords[0], centre, atol=1.0)
    save_evidence(pasted, tmp_path / "ev.nii.gz")
    back = read_image(tmp_path / "ev.nii.gz")
    assert back.same_geometry(ref)
    np.testing.assert_allclose(back.array, pasted.array)


def _real_net_case():
    """A tiny randomly initialised Stage2Net (region_norm on) and a smooth patch with one bright spot."""
    from stage2_classify.config import tiny_config
    from stage2_classify.model import Stage2Net

    torch.manual_seed(0)
    cfg = tiny_config()
    net = Stage2Net(cfg).eval()
    shape = cfg.patch.shape
    g = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    image = (0.5 + 0.1 * g[0] / shape[0] + 0.05 * torch.rand(shape))[None, None]
    image[..., 4:6, 5:8, 6:9] += 0.4
    region = torch.zeros(1, 1, *shape)
    region[..., 2:9, 3:12, 4:12] = 1.0
    return net, image, region


def test_ig_completeness_on_the_region_normalised_network():
    net, image, region = _real_net_case()
    assert net.cfg.model.region_norm and net.cfg.ig_baseline_sigma_mm is not None
    attr, _, delta = integrated_gradients(net, image, region, n_steps=32, return_delta=True)
    # attributions sum to f(x) - f(blurred baseline): the path is not degenerate
    assert abs(float(attr.sum())) > 0.05
    assert abs(delta) <= 0.1 * abs(float(attr.sum()))
    assert np.all(attr[region[0, 0].numpy() < 0.5] == 0.0)
    # the all-zeros baseline: the standardised path has one output, attributions sum to ~0 and the whole
    # difference f(x) - f(0) is missing (why it is not the default)
    attr0, _, delta0 = integrated_gradients(net, image, region, n_steps=32, baseline=torch.zeros_like(image),
                                            return_delta=True)
    assert abs(float(attr0.sum())) < 0.01 and abs(delta0) > 0.05


def test_blurred_baseline_reads_only_the_region():
    from stage2_classify.evidence import blurred_baseline

    _, image, region = _real_net_case()
    b = blurred_baseline(image, region, 2.0)
    inside = region > 0.5
    changed = image.clone()
    changed[~inside] = 7.0
    b2 = blurred_baseline(changed, region, 2.0)
    assert torch.equal(b[inside], b2[inside])
    assert torch.equal(b2[~inside], changed[~inside])  # outside: the image itself (no attribution there)
    # smooths the spot away, keeps a constant
    assert float(b[..., 4:6, 5:8, 6:9].mean()) < float(image[..., 4:6, 5:8, 6:9].mean()) - 0.2
    const = torch.full_like(image, 0.3)
    assert torch.allclose(blurred_baseline(const, region, 2.0)[inside], const[inside], atol=1e-6)
    with pytest.raises(ValueError, match="sigma_vox"):
        blurred_baseline(image, region, 0.0)


def test_depth_profile_on_a_hand_made_body():
    from stage2_classify.evidence import depth_profile

    body = np.zeros((1, 9, 9), bool)
    body[0, 2:7, 2:7] = True  # a 5 x 5 square: layers of 16, 8 and 1 voxels (6-connected, one slice)
    attr = np.zeros((1, 9, 9))
    attr[0, 4, 4] = 2.0  # centre: third body layer
    attr[0, 2, 4] = -1.0  # body edge
    attr[0, 1, 4] = 1.0  # just outside
    attr[0, 0, 0] = 4.0  # far out (6-connected distance 4 from the square): the "3+" bin
    prof = depth_profile(attr, body, depth=3)
    assert prof == pytest.approx({"body_1": 0.125, "body_2": 0.0, "body_3+": 0.25,
                                  "margin_1": 0.125, "margin_2": 0.0, "margin_3+": 0.5})
    assert depth_profile(np.zeros((1, 9, 9)), body)["body_1"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        depth_profile(np.zeros((1, 9, 8)), body)


def test_region_shapley_matches_the_two_player_formula_and_is_complete():
    from stage2_classify.evidence import default_baseline, region_shapley
    from stage2_classify.model import ClassifierPath

    net, image, region = _real_net_case()
    body = torch.zeros_like(region)
    body[..., 3:8, 4:11, 5:11] = 1.0
    base = default_baseline(net, image, region)
    f = ClassifierPath(net, region)
    with torch.no_grad():
        t = int(f(image).argmax(1)[0])
        p = lambda x: float(f(x)[0, t])  # noqa: E731
        margin = region * (1 - body)
        no_body, no_margin = image * (1 - body) + base * body, image * (1 - margin) + base * margin
        want_b = 0.5 * ((p(image) - p(no_body)) + (p(no_margin) - p(base)))
        want_m = 0.5 * ((p(image) - p(no_margin)) + (p(no_body) - p(base)))
    phi_b, phi_m = region_shapley(net, image, region, body, t)
    assert phi_b == pytest.approx(want_b, abs=1e-6) and phi_m == pytest.approx(want_m, abs=1e-6)
    assert phi_b + phi_m == pytest.approx(want_b + want_m, abs=1e-6)
    with torch.no_grad():
        assert want_b + want_m == pytest.approx(p(image) - p(base), abs=1e-6)
    assert abs(phi_b) > 1e-4 and abs(phi_m) > 1e-4  # both groups matter for a random net: the check can fail
    # voxels outside the region: a dummy group, whatever they hold
    changed = image.clone()
    changed[region < 0.5] = 7.0
    assert region_shapley(net, changed, region, body, t) == pytest.approx((phi_b, phi_m), abs=1e-6)
