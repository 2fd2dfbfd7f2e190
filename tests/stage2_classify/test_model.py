"""Model heads on/off, output shapes, odd input shapes, region handling."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stage2_classify.config import HeadsConfig, ModelConfig, tiny_config
from stage2_classify.model import Stage2Net, dilate_mask
from stage2_classify.patches import dilate

SHAPES = {"seg": (1, 5), "heatmap": (1, 1), "recon": (1, 1)}


@pytest.mark.parametrize("flags", [f for f in itertools.product([True, False], repeat=4) if any(f)])
def test_heads_on_off(flags):
    heads = HeadsConfig(*flags)
    net = Stage2Net(tiny_config(heads=heads))
    x = torch.randn(2, 1, 12, 16, 16)
    region = torch.ones_like(x)
    out = net(x, region if heads.cls else None)
    typing = heads.cls and heads.seg  # the lesion-typing head exists with cls + seg
    expected = set(heads.enabled()) | ({"region", "pool"} if heads.cls else set()) | ({"lesion"} if typing else set())
    assert set(out) == expected
    assert set(net.heads.keys()) == set(heads.enabled()) | ({"lesion"} if typing else set())
    if heads.cls:
        assert out["cls"].shape == (2, 3)
    if typing:
        assert out["lesion"].shape == (2, 3, 12, 16, 16)
    for h in ("seg", "heatmap", "recon"):
        if h in out:
            assert out[h].shape == (2, SHAPES[h][1], 12, 16, 16)
    # parameters of switched-off heads do not exist
    assert all(not k.startswith(f"heads.{h}.") for k in net.state_dict() for h in ("cls", "seg", "heatmap", "recon")
               if not getattr(heads, h))


@pytest.mark.parametrize("shape", [(11, 13, 9), (7, 20, 15), (16, 16, 16)])
def test_odd_shapes(shape):
    net = Stage2Net(tiny_config())
    x = torch.randn(1, 1, *shape)
    out = net(x, torch.ones_like(x))
    assert out["seg"].shape == (1, 5, *shape)
    assert out["recon"].shape == (1, 1, *shape)
    assert torch.isfinite(out["cls"]).all()


def test_predicted_region_and_errors():
    net = Stage2Net(tiny_config())
    x = torch.randn(1, 1, 12, 16, 16)
    out = net(x)  # region from the seg head
    assert out["region"].shape == x.shape
    assert set(torch.unique(out["region"]).tolist()) <= {0.0, 1.0}
    no_seg = Stage2Net(tiny_config(heads=HeadsConfig(cls=True, seg=False, heatmap=True, recon=False)))
    with pytest.raises(ValueError, match="region_mask is required"):
        no_seg(x)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(1, 12, 16, 16))
    with pytest.raises(ValueError, match="all heads"):
        Stage2Net(tiny_config(heads=HeadsConfig(False, False, False, False)))
    with pytest.raises(ValueError, match="cls_feature_norm must be 'none' or 'batch', got 'layer'"):
        Stage2Net(tiny_config(model=ModelConfig(base_channels=8, levels=3, dropout=0.0, cls_feature_norm="layer")))


def test_empty_region_gives_finite_logits():
    net = Stage2Net(tiny_config())
    x = torch.randn(1, 1, 12, 16, 16)
    assert torch.isfinite(net(x, torch.zeros_like(x))["cls"]).all()


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_dilate_mask_matches_numpy(radius):
    rng = np.random.default_rng(radius)
    m = rng.random((9, 10, 11)) > 0.97
    t = dilate_mask(torch.from_numpy(m.astype(np.float32))[None, None], radius)[0, 0].numpy() > 0.5
    assert np.array_equal(t, dilate(m, radius))


def test_intensity_profile_affine_invariant_and_sees_a_dark_tail():
    from stage2_classify.model import N_PROFILE, PROFILE_QUANTILES, intensity_profile

    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 1, 10, 10, 10, generator=g)
    mask = torch.zeros_like(img)
    mask[..., 2:8, 2:8, 2:8] = 1
    a = intensity_profile(img, mask)
    b = intensity_profile(3.0 * img + 7.0, mask)
    assert a.shape == (1, N_PROFILE)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    dark = img.clone()
    dark[..., 2:4, 2:4, 2:8] -= 6.0  # a dark "lesion": 24 of 216 voxels
    c = intensity_profile(dark, mask)
    assert c[0, 0] < a[0, 0] - 1.0  # the 1 % quantile drops
    assert c[0, len(PROFILE_QUANTILES) + 1] > a[0, len(PROFILE_QUANTILES) + 1]  # more voxels below -2
    # voxels outside the mask never matter; an empty mask gives zeros
    outside = img.clone()
    outside[..., 0, :, :] = 100.0
    torch.testing.assert_close(intensity_profile(outside, mask), a)
    assert torch.count_nonzero(intensity_profile(img, torch.zeros_like(mask))) == 0


def test_pooling_mask_recovers_the_body_from_the_dilated_region():
    net = Stage2Net(tiny_config())  # margin_vox = 1
    body = torch.zeros(1, 1, 12, 12, 12)
    body[..., 3:9, 4:8, 3:9] = 1
    region = dilate_mask(body, net.margin_vox)
    torch.testing.assert_close(net.pooling_mask(region), body)
    tiny = torch.zeros_like(body)
    tiny[..., 5, 5, 5] = 1  # erosion would be empty: fall back to the region itself
    torch.testing.assert_close(net.pooling_mask(tiny), tiny)


def test_predicted_region_stops_at_predicted_neighbours():
    """Hand-made seg logits ``(1, 5, 1, 1, 9)``: centre body at 2-3, neighbour at 5-7, margin 2 voxels."""
    from stage2_classify.config import SEG_BG, SEG_CENTRE, SEG_NEIGHBOUR

    net = Stage2Net(tiny_config(margin_mm=8.0))
    logits = torch.full((1, 5, 1, 1, 9), -5.0)
    cls = [SEG_BG, SEG_BG, SEG_CENTRE, SEG_CENTRE, SEG_BG, SEG_NEIGHBOUR, SEG_NEIGHBOUR, SEG_NEIGHBOUR, SEG_BG]
    for k, c in enumerate(cls):
        logits[0, c, 0, 0, k] = 5.0
    region = net.predicted_region(logits)[0, 0, 0, 0]
    assert region.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]


def _train_head_on_offset_features(feature_norm: str, seed: int) -> tuple[int, float]:
    """Train a class head alone on pooled-feature-like vectors: a large common offset per feature (as the
    InstanceNorm-ed features pooled in a body have) plus a small across-vertebra spread, the class in one
    feature's spread. -> (hidden units positive on > 2 % of the vectors, training accuracy)."""
    from stage2_classify.model import MaskedPoolClassifier

    torch.manual_seed(seed)
    head = MaskedPoolClassifier([8], 3, 0.1, n_extra=111, feature_norm=feature_norm)  # 3 * 8 + 111 features
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(160, 135, generator=g)
    x = 0.5 + 1.5 * torch.rand(135, generator=g) + 0.13 * z
    y = (z[:, 0] > 0.4).long() + (z[:, 0] > 1.2).long()
    opt = torch.optim.AdamW(head.parameters(), lr=4e-3, weight_decay=1e-4)  # stage 2's training defaults
    for _ in range(300):
        idx = torch.randint(0, len(y), (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(head.mlp(head.norm(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        hidden = head.mlp[1](head.mlp[0](head.norm(x)))
        acc = float((head.mlp(head.norm(x)).argmax(1) == y).float().mean())
    return int(((hidden > 0).float().mean(0) > 0.02).sum()), acc


def test_feature_norm_keeps_the_class_head_alive_on_offset_features():
    """The failure ``model.cls_feature_norm`` mends, on tiny exact inputs: without it Adam pushes the hidden
    LeakyReLU units below zero for every vector and the head predicts (about) one class."""
    runs = {norm: [_train_head_on_offset_features(norm, s) for s in range(3)] for norm in ("none", "batch")}
    assert all(alive >= 6 and acc >= 0.95 for alive, acc in runs["batch"]), runs
    assert max(alive for alive, _ in runs["none"]) <= 4, runs
    assert np.mean([a for _, a in runs["none"]]) < np.mean([a for _, a in runs["batch"]]) - 0.2, runs
