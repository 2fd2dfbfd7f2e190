"""Model heads on/off, output shapes, odd input shapes, region handling."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stage2_classify.config import HeadsConfig, tiny_config
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
    expected = set(heads.enabled()) | ({"region"} if heads.cls else set())
    assert set(out) == expected
    assert set(net.heads.keys()) == set(heads.enabled())
    if heads.cls:
        assert out["cls"].shape == (2, 3)
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
