"""Stage-1 network: nnU-Net v2's ``PlainConvUNet`` (as nnU-Net configures it) + two 1x1x1 heads.

The U-Net body is built through ``nnunetv2.utilities.get_network_from_plans.get_network_from_plans``
with the same architecture kwargs nnU-Net writes into its plans (3D convs, InstanceNorm with affine,
LeakyReLU, strided-conv downsampling from the planned pooling topology), so it is the network nnU-Net
would train, only narrower (8 base features by default) and at a coarse spacing so it runs on a CPU.
Its final 1x1x1 "segmentation" layer outputs ``base_features`` channels, followed by a LeakyReLU and
the task heads in an ``nn.ModuleDict``:

* ``"heatmap"``: 1 channel, logits of the vertebral-centre heatmap (sigmoid -> [0, 1]);
* ``"levels"``: ``len(config.levels)`` channels, logits of the per-voxel level distribution;
* ``"offset"`` (when ``config.offset_radius_mm`` is set): 3 channels, the vector from the voxel to the
  nearest vertebral centre along (i, j, k), in units of ``offset_radius_mm`` (multiply to get mm).

Deep supervision is off: the targets are smooth and the network small; it saves CPU time.
"""
from __future__ import annotations

import torch
from torch import nn

from data_prep import precision as precision_mod
from stage1_localize.config import Stage1Config


def arch_kwargs(config: Stage1Config) -> dict:
    """nnU-Net plans-style ``arch_kwargs`` for ``dynamic_network_architectures``' PlainConvUNet."""
    p = config.plan
    return {
        "n_stages": p.n_stages,
        "features_per_stage": p.features_per_stage,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in p.conv_kernels],
        "strides": [list(k) for k in p.pool_kernels],
        "n_conv_per_stage": [p.n_conv_per_stage] * p.n_stages,
        "n_conv_per_stage_decoder": [p.n_conv_per_stage_decoder] * (p.n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }


ARCH_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def memory_format(config: Stage1Config) -> torch.memory_format:
    """The layout of the network's weights and activations (``Stage1Config.channels_last``)."""
    return torch.channels_last_3d if config.channels_last else torch.contiguous_format


class LocalizerNet(nn.Module):
    """U-Net body + ``heads`` (``nn.ModuleDict``: ``heatmap``, ``levels``)."""

    def __init__(self, config: Stage1Config):
        super().__init__()
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        self.divisor = config.plan.divisor
        f0 = config.plan.features_per_stage[0]
        self.body = get_network_from_plans(
            ARCH_CLASS,
            arch_kwargs(config),
            ["conv_op", "norm_op", "dropout_op", "nonlin"],
            config.in_channels,
            f0,
            allow_init=True,
            deep_supervision=False,
        )
        self.act = nn.LeakyReLU(0.01)
        self.heads = nn.ModuleDict({
            "heatmap": nn.Conv3d(f0, 1, kernel_size=1),
            "levels": nn.Conv3d(f0, config.n_levels, kernel_size=1),
        })
        if config.offset_radius_mm is not None:
            self.heads["offset"] = nn.Conv3d(f0, 3, kernel_size=1)
        # start the heatmap near its (mostly zero) target: sigmoid(-4) ~ 0.018
        nn.init.constant_(self.heads["heatmap"].bias, -4.0)
        self._aliases = _aliases(self)

    # dynamic_network_architectures registers some modules twice (decoder.encoder is the encoder,
    # ``all_modules`` repeats conv/norm). safetensors refuses shared tensors, so the state dict holds
    # each tensor once under its canonical name and loading fills the aliases back in.
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for alias in self._aliases:
            sd.pop(prefix + alias, None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        full = dict(state_dict)
        for alias, canonical in self._aliases.items():
            if canonical in full and alias not in full:
                full[alias] = full[canonical]
        return super().load_state_dict(full, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` ``(B, C, I, J, K)`` with I, J, K multiples of ``self.divisor`` ->
        ``{"heatmap": (B, 1, I, J, K) logits, "levels": (B, L, I, J, K) logits}`` plus
        ``"offset": (B, 3, I, J, K)`` (units of ``offset_radius_mm``) when the offset head exists."""
        feats = self.act(self.body(x))
        return {name: head(feats) for name, head in self.heads.items()}


def _aliases(module: nn.Module) -> dict[str, str]:
    """``{alias name: canonical name}`` for parameters/buffers registered under several names."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    sd = nn.Module.state_dict(module, keep_vars=True)
    for name, t in sd.items():
        key = id(t)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def pad_to_divisor(x: torch.Tensor, divisor: tuple[int, int, int], value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Pad ``(B, C, I, J, K)`` at the *high* end of each axis to multiples of ``divisor``.

    Padding only at the end keeps voxel indices unchanged (index 0 stays index 0), so predicted peaks
    map back to the input grid without any offset. Returns the padded tensor and the original size.
    """
    size = tuple(int(s) for s in x.shape[-3:])
    pad = [(-s) % d for s, d in zip(size, divisor)]
    if any(pad):
        x = nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=value)
    return x, size  # type: ignore[return-value]


def run_net(net: nn.Module, x: torch.Tensor, precision: str = "float32") -> dict[str, torch.Tensor]:
    """``net(x)`` at ``precision`` (``data_prep.precision``: bfloat16 autocast or float32); the head
    outputs are returned as float32 whatever the precision."""
    with precision_mod.autocast(precision, x.device):
        out = net(x)
    return {name: t.float() for name, t in out.items()}


def predict_volume(net: nn.Module, x: torch.Tensor, divisor: tuple[int, int, int],
                   precision: str = "float32") -> dict[str, torch.Tensor]:
    """Run ``net`` on a whole ``(B, C, I, J, K)`` volume of any size (padded, then cropped back)."""
    xp, (i, j, k) = pad_to_divisor(x, divisor, value=float(x.min()) if x.numel() else 0.0)
    out = run_net(net, xp, precision)
    return {name: t[..., :i, :j, :k] for name, t in out.items()}


def activate(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw head outputs -> maps: sigmoid heatmap, softmax levels (over dim 1), offsets unchanged."""
    act = {"heatmap": torch.sigmoid, "levels": lambda t: torch.softmax(t, dim=1)}
    return {name: act.get(name, lambda t: t)(t) for name, t in out.items()}


def predict_sliding_window(net: nn.Module, x: torch.Tensor, patch_size: tuple[int, int, int],
                           divisor: tuple[int, int, int], step: float = 0.5,
                           precision: str = "float32", pad_to_patch: bool = False) -> dict[str, torch.Tensor]:
    """nnU-Net-style sliding-window prediction of a ``(1, C, I, J, K)`` volume with the *training* patch size.

    Returns ``{"heatmap": (1, 1, I, J, K) probabilities, "levels": (1, L, I, J, K) probabilities}`` (and
    ``"offset": (1, 3, I, J, K)`` when the net has that head): :func:`activate` per tile, averaged with nnU-Net's Gaussian importance map (``compute_gaussian``,
    sigma = 1/8 of the tile) over tiles placed by ``compute_steps_for_sliding_window`` (overlap
    ``1 - step``). Tiles therefore see what training patches saw (the same extent, hence the same
    InstanceNorm statistics); axes shorter than the tile are padded (with the volume minimum) to the
    tile size, or, when the whole volume fits in one tile and ``pad_to_patch`` is False, only to the
    divisor (the network then sees a smaller input than any training patch; with ``pad_to_patch`` it
    sees the tile, the padding like the blank beyond a training patch's field of view). ``precision``:
    the network passes' arithmetic (:func:`run_net`); the maps are accumulated in float32.
    """
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    if x.ndim != 5 or x.shape[0] != 1:
        raise ValueError(f"expected a (1, C, I, J, K) volume, got {tuple(x.shape)}")
    size = tuple(int(s) for s in x.shape[-3:])
    tile = tuple(int(p) for p in patch_size)
    if all(s <= t for s, t in zip(size, tile)) and not pad_to_patch:
        return activate(predict_volume(net, x, divisor, precision))
    # pad short axes up to the tile so every tile has the training extent
    pad = [max(0, t - s) for s, t in zip(size, tile)]
    xp = nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=float(x.min()))
    full = tuple(int(s) for s in xp.shape[-3:])
    steps = compute_steps_for_sliding_window(full, tile, step)
    gauss = compute_gaussian(tile, 1.0 / 8, 1.0, torch.float32, x.device)
    acc: dict[str, torch.Tensor] = {}
    weight = torch.zeros(full, device=x.device)
    for i0 in steps[0]:
        for j0 in steps[1]:
            for k0 in steps[2]:
                sl = (slice(i0, i0 + tile[0]), slice(j0, j0 + tile[1]), slice(k0, k0 + tile[2]))
                out = activate(run_net(net, xp[(slice(None), slice(None)) + sl], precision))
                for name, t in out.items():
                    if name not in acc:
                        acc[name] = torch.zeros((1, t.shape[1]) + full, device=x.device)
                    acc[name][(slice(None), slice(None)) + sl] += t * gauss
                weight[sl] += gauss
    i, j, k = size
    return {name: (t / weight)[..., :i, :j, :k] for name, t in acc.items()}
