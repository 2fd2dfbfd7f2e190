"""Network shapes: odd volume sizes, divisor padding, heads and parameter budget."""
from __future__ import annotations

import time

import pytest
import torch

from stage1_localize.config import Stage1Config
from stage1_localize.model import LocalizerNet, pad_to_divisor, predict_volume


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LocalizerNet(Stage1Config()).eval()


def test_heads_are_a_moduledict_and_small(net):
    assert isinstance(net.heads, torch.nn.ModuleDict)
    assert set(net.heads) == {"heatmap", "levels", "offset"}
    assert set(LocalizerNet(Stage1Config(offset_radius_mm=None)).heads) == {"heatmap", "levels"}
    n_params = sum(p.numel() for p in net.parameters())
    assert 10_000 < n_params < 2_000_000


@pytest.mark.parametrize("shape", [(25, 61, 97), (7, 13, 40), (32, 64, 96)])
def test_forward_on_odd_shapes(net, shape):
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        out = predict_volume(net, x, net.divisor)
    assert out["heatmap"].shape == (1, 1, *shape)
    assert out["levels"].shape == (1, Stage1Config().n_levels, *shape)
    assert out["offset"].shape == (1, 3, *shape)
    assert torch.isfinite(out["heatmap"]).all()


def test_pad_keeps_index_origin():
    x = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 1, 5, 6, 7)
    xp, size = pad_to_divisor(x, (4, 4, 8), value=-1.0)
    assert xp.shape[-3:] == (8, 8, 8) and size == (5, 6, 7)
    assert torch.equal(xp[..., :5, :6, :7], x)
    assert float(xp[0, 0, 7, 7, 7]) == -1.0


def test_cpu_inference_speed(net):
    # a 1 mm lumbar scan of 381 x 381 x 76 is ~ 26 x 128 x 128 at 3 mm; budget is <= 5 s per scan
    x = torch.randn(1, 1, 26, 128, 128)
    t0 = time.perf_counter()
    with torch.no_grad():
        predict_volume(net, x, net.divisor)
    assert time.perf_counter() - t0 < 5.0


def test_planner_uses_nnunet_topology_and_keeps_head_to_foot_context():
    from stage1_localize.plan import plan_network

    # real-data-like extents (mm, canonical i=LR, j=AP, k=SI): 76 x 381 x 381 and 77 x 224 x 224
    plan = plan_network([[76, 381, 381], [77, 224, 224], [76, 381, 381]], (3.0, 3.0, 3.0),
                        max_patch_voxels=24 * 48 * 96)
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.divisor))
    assert plan.patch_size[2] >= plan.patch_size[1] >= plan.patch_size[0]  # SI context kept first
    assert plan.patch_size[0] * 3.0 >= 60.0  # left-right not shrunk below ~60 mm
    assert plan.pool_kernels[0] == (1, 1, 1) and len(plan.conv_kernels) == plan.n_stages
    net = LocalizerNet(Stage1Config(plan=plan))
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *plan.patch_size))
    assert out["heatmap"].shape[-3:] == tuple(plan.patch_size)


class _PointwiseNet(torch.nn.Module):
    """Stand-in network: heatmap logit = x, level logits = (x, -x, 0); translation-equivariant and local."""

    def forward(self, x):
        return {"heatmap": x[:, :1], "levels": torch.cat([x[:, :1], -x[:, :1], torch.zeros_like(x[:, :1])], 1)}


@pytest.mark.parametrize("size", [(5, 23, 31), (9, 40, 17), (4, 8, 8)])
def test_sliding_window_matches_pointwise_truth(size):
    from stage1_localize.model import predict_sliding_window

    torch.manual_seed(0)
    x = torch.randn(1, 1, *size)
    out = predict_sliding_window(_PointwiseNet(), x, patch_size=(4, 8, 12), divisor=(1, 1, 1))
    assert out["heatmap"].shape == (1, 1, *size) and out["levels"].shape == (1, 3, *size)
    # every voxel is covered; Gaussian-weighted average of identical per-tile values = the value itself
    torch.testing.assert_close(out["heatmap"], torch.sigmoid(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["levels"].sum(1), torch.ones(1, *size), atol=1e-5, rtol=1e-5)


class _ShapeRecorder(torch.nn.Module):
    """Stand-in network that records each input it sees and returns the pointwise maps."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return _PointwiseNet()(x)


@pytest.mark.parametrize("pad_to_patch, expected", [(True, (4, 8, 12)), (False, (4, 6, 8))])
def test_small_volume_is_padded_to_the_patch_only_when_asked(pad_to_patch, expected):
    """A volume smaller than the patch on every axis: with ``pad_to_patch`` the network sees one patch-sized
    input (the volume at the low corner, the rest at the volume's minimum, like a training patch's blank
    beyond the field of view); without, only the divisor padding. Either way the maps come back cropped."""
    from stage1_localize.model import predict_sliding_window

    torch.manual_seed(0)
    x = torch.randn(1, 1, 3, 5, 7)
    net = _ShapeRecorder()
    out = predict_sliding_window(net, x, patch_size=(4, 8, 12), divisor=(2, 2, 2), pad_to_patch=pad_to_patch)
    assert len(net.seen) == 1 and tuple(net.seen[0].shape[-3:]) == expected
    seen = net.seen[0][0, 0]
    torch.testing.assert_close(seen[:3, :5, :7], x[0, 0])
    outside = torch.ones(expected, dtype=torch.bool)
    outside[:3, :5, :7] = False
    assert bool((seen[outside] == x.min()).all())
    torch.testing.assert_close(out["heatmap"], torch.sigmoid(x), atol=1e-5, rtol=1e-5)


def test_sliding_window_rejects_batches():
    from stage1_localize.model import predict_sliding_window

    with pytest.raises(ValueError, match=r"\(1, C, I, J, K\)"):
        predict_sliding_window(_PointwiseNet(), torch.zeros(2, 1, 8, 8, 8), (4, 4, 4), (1, 1, 1))


def test_draw_subject_balances_dataset_folders():
    import numpy as np

    from stage1_localize.train import TrainSubject, draw_subject

    subs = [TrainSubject(f"a{i}", None, np.zeros((0, 3)), [], group=0) for i in range(9)]
    subs.append(TrainSubject("b0", None, np.zeros((0, 3)), [], group=1))
    rng = np.random.default_rng(0)
    share_b = np.mean([draw_subject(subs, rng, True).id == "b0" for _ in range(4000)])
    assert 0.46 < share_b < 0.54  # the 1-scan folder is drawn as often as the 9-scan folder
    share_b = np.mean([draw_subject(subs, rng, False).id == "b0" for _ in range(4000)])
    assert 0.07 < share_b < 0.13  # uniform over subjects without balancing


def test_bfloat16_passes_hand_back_float32_maps_close_to_float32():
    """Mixed precision changes the arithmetic, not the outputs' dtype or meaning: the sliding-window maps of a
    bfloat16 pass are float32 and within bfloat16 rounding of the float32 maps, and the weights stay float32."""
    from stage1_localize.config import NetworkPlan
    from stage1_localize.model import predict_sliding_window, run_net

    torch.manual_seed(0)
    plan = NetworkPlan(patch_size=(8, 16, 16), pool_kernels=((1, 1, 1), (2, 2, 2)),
                       conv_kernels=((3, 3, 3),) * 2, base_features=4)
    net = LocalizerNet(Stage1Config(plan=plan)).eval()
    x = torch.randn(1, 1, 13, 24, 20)
    with torch.no_grad():
        raw = run_net(net, x[..., :8, :16, :16], "bfloat16")
        assert all(t.dtype == torch.float32 for t in raw.values())
        ref = predict_sliding_window(net, x, plan.patch_size, net.divisor, precision="float32")
        low = predict_sliding_window(net, x, plan.patch_size, net.divisor, precision="bfloat16")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for name in ref:
        assert low[name].dtype == torch.float32
        diff = float((low[name] - ref[name]).abs().max())
        assert 0 < diff < 0.05, (name, diff)  # really bfloat16 (not identical), but close
