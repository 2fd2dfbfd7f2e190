"""Per-vertebra multitask 3D CNN whose class verdict provably depends only on the vertebra's region.

Architecture (small, CPU-friendly): a shared 3D encoder (``levels`` resolutions, two 3x3x3 conv +
InstanceNorm + LeakyReLU blocks each), a U-Net style decoder for the dense auxiliary heads, and heads in
an ``nn.ModuleDict``:

* ``cls``: class logits ``(B, K)``;
* ``seg``: multi-structure segmentation logits ``(B, 5, I, J, K)`` (background, centre body, neighbour
  bodies, discs, lesion; see :data:`stage2_classify.config.SEG_CLASSES`);
* ``heatmap``: centre heatmap logits ``(B, 1, I, J, K)``;
* ``recon``: autoencoder reconstruction of the input ``(B, 1, I, J, K)``.

Evidence guarantee (by construction)
------------------------------------
The encoder takes two channels ``(x, m)``: intensities and a *visibility* mask. The auxiliary path runs it
on ``(image, 1)`` (everything visible). The classification path runs the **same** encoder on
``(image * region, region)`` and pools the features of the two coarsest levels only inside ``region`` (max-pooled down
to each resolution) with masked average, attention and max pooling. Every operation on that path
(convolutions, InstanceNorm -- statistics per sample and channel over a tensor that is itself a function
of ``image * region`` and ``region`` --, LeakyReLU, zero padding, pooling) is a function of
``image * region`` and ``region`` only, so changing any voxel outside ``region`` cannot change the logits.
No BatchNorm (its train-mode statistics would mix samples of a batch). With
``ModelConfig.region_norm`` (default) the cls path first standardises intensities by their mean/std
*inside the region*, which also cancels the scan-level intensity window (an affine map), so even that
does not reach the verdict (up to the window's clipping of extreme voxels). ``tests/stage2_classify/
test_invariance.py`` checks this numerically. When ``region`` is not given it is the seg head's centre
body prediction dilated by ``margin_vox``: the guarantee then holds *given* that region (the region's
shape comes from the full patch; its voxel values never do).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_classify.config import SEG_CENTRE, SEG_CLASSES, SEG_LESION, Stage2Config


def ball_kernel(radius: int) -> torch.Tensor:
    """``(1, 1, d, d, d)`` float ball of ``radius`` voxels (d = 2r + 1)."""
    r = int(radius)
    g = torch.arange(-r, r + 1, dtype=torch.float32)
    zz = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    return (zz <= r * r + 1e-6).float()[None, None]


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(B, 1, I, J, K)`` mask by a ball of ``radius`` voxels (returns float 0/1)."""
    m = (mask > 0.5).float()
    if radius <= 0:
        return m
    k = ball_kernel(radius).to(m)
    return (F.conv3d(m, k, padding=int(radius)) > 0.5).float()


def region_standardise(image: torch.Tensor, region: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(image - mean_r) / std_r`` with mean/std over the voxels of ``region`` (per sample), ``(B, 1, I, J, K)``.

    A function of ``image * region`` and ``region`` only, and invariant to any affine intensity map
    ``a * image + b`` (a > 0) up to ``eps``: the scan-level intensity window then cannot reach the verdict.
    """
    dims = tuple(range(2, image.ndim))
    n = region.sum(dims, keepdim=True).clamp_min(1.0)
    mu = (image * region).sum(dims, keepdim=True) / n
    var = (((image - mu) * region) ** 2).sum(dims, keepdim=True) / n
    return (image - mu) / torch.sqrt(var + eps * eps)


class ConvBlock(nn.Module):
    """Two (conv3x3x3 -> InstanceNorm(affine) -> LeakyReLU) layers."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(cout, cout, 3, padding=1),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """Shared encoder: input ``(B, 2, I, J, K)`` -> list of features, level l at ``(B, c*2**l, I/2**l, ...)``."""

    def __init__(self, base: int, levels: int):
        super().__init__()
        chans = [base * 2**lvl for lvl in range(levels)]
        self.blocks = nn.ModuleList()
        cin = 2
        for c in chans:
            self.blocks.append(ConvBlock(cin, c))
            cin = c
        self.channels = chans

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, blk in enumerate(self.blocks):
            if i > 0:
                x = F.max_pool3d(x, 2)
            x = blk(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-Net decoder: encoder features -> ``(B, base, I, J, K)``."""

    def __init__(self, chans: list[int]):
        super().__init__()
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for lvl in range(len(chans) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(chans[lvl], chans[lvl - 1], 2, stride=2))
            self.blocks.append(ConvBlock(2 * chans[lvl - 1], chans[lvl - 1]))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, blk, skip in zip(self.up, self.blocks, reversed(feats[:-1])):
            x = blk(torch.cat([up(x), skip], dim=1))
        return x


class MaskedPoolClassifier(nn.Module):
    """Multi-scale masked pooling -> logits.

    For each used encoder level: masked average, masked attention and masked max pooling of the
    ``(B, C_l, i_l, j_l, k_l)`` features over the region mask at that resolution; concatenated -> MLP.
    """

    def __init__(self, channels: list[int], n_classes: int, dropout: float):
        super().__init__()
        self.scores = nn.ModuleList([nn.Conv3d(c, 1, 1) for c in channels])
        total = 3 * sum(channels)
        hidden = max(channels)
        self.mlp = nn.Sequential(
            nn.Linear(total, hidden),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    @staticmethod
    def _pool(feat: torch.Tensor, mask: torch.Tensor, score: nn.Module) -> torch.Tensor:
        m = mask.flatten(2)  # (B, 1, N)
        f = feat.flatten(2)  # (B, C, N)
        empty = m.sum(-1, keepdim=True) < 0.5  # (B, 1, 1)
        avg = (f * m).sum(-1) / m.sum(-1).clamp_min(1.0)
        s = score(feat).flatten(2).masked_fill(m < 0.5, float("-inf"))
        s = torch.where(empty.expand_as(s), torch.zeros_like(s), s)
        att = (f * (torch.softmax(s, dim=-1) * m)).sum(-1)
        mx = f.masked_fill(m < 0.5, float("-inf")).amax(-1)
        mx = torch.where(empty.squeeze(-1).expand_as(mx), torch.zeros_like(mx), mx)
        return torch.cat([avg, att, mx], dim=1)

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """``feats[l]`` ``(B, C_l, i_l, j_l, k_l)``, ``masks[l]`` ``(B, 1, i_l, j_l, k_l)`` in {0, 1} -> ``(B, n_classes)``."""
        pooled = [self._pool(f, m, sc) for f, m, sc in zip(feats, masks, self.scores)]
        return self.mlp(torch.cat(pooled, dim=1))


class Stage2Net(nn.Module):
    """Multitask per-vertebra network; see the module docstring for the evidence guarantee."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.levels = cfg.model.levels
        self.margin_vox = cfg.margin_vox
        self.region_norm = bool(cfg.model.region_norm)
        self.encoder = Encoder(cfg.model.base_channels, cfg.model.levels)
        chans = self.encoder.channels
        heads = cfg.heads
        self.dense_heads = [h for h in ("seg", "heatmap", "recon") if getattr(heads, h)]
        self.decoder = Decoder(chans) if self.dense_heads else None
        mods: dict[str, nn.Module] = {}
        if heads.cls:
            self.cls_levels = list(range(max(0, len(chans) - 2), len(chans)))  # the two coarsest levels
            mods["cls"] = MaskedPoolClassifier([chans[i] for i in self.cls_levels], len(cfg.classes), cfg.model.dropout)
        if heads.seg:
            mods["seg"] = nn.Conv3d(chans[0], len(SEG_CLASSES), 1)
        if heads.heatmap:
            mods["heatmap"] = nn.Conv3d(chans[0], 1, 1)
        if heads.recon:
            mods["recon"] = nn.Conv3d(chans[0], 1, 1)
        self.heads = nn.ModuleDict(mods)

    # -- helpers ----------------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        mult = 2 ** (self.levels - 1)
        size = x.shape[-3:]
        pads = [(-s) % mult for s in size]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return x, tuple(int(s) for s in size)  # type: ignore[return-value]

    @staticmethod
    def _crop(x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        return x[..., : size[0], : size[1], : size[2]]

    def body_probability(self, seg_logits: torch.Tensor) -> torch.Tensor:
        """Centre-body probability ``(B, 1, I, J, K)`` = p(centre body) + p(lesion) from seg logits."""
        p = torch.softmax(seg_logits, dim=1)
        return p[:, SEG_CENTRE : SEG_CENTRE + 1] + p[:, SEG_LESION : SEG_LESION + 1]

    # -- paths ------------------------------------------------------------------------------------
    def forward_dense(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Auxiliary heads on the full patch: ``image`` ``(B, 1, I, J, K)`` -> ``seg`` ``(B, 5, I, J, K)``,
        ``heatmap`` ``(B, 1, I, J, K)``, ``recon`` ``(B, 1, I, J, K)`` (those switched on)."""
        out: dict[str, torch.Tensor] = {}
        if self.decoder is None:
            return out
        x, size = self._pad(image)
        feats = self.encoder(torch.cat([x, torch.ones_like(x)], dim=1))
        dec = self.decoder(feats)
        for h in self.dense_heads:
            out[h] = self._crop(self.heads[h](dec), size)
        return out

    def forward_cls(self, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` from ``image`` ``(B, 1, I, J, K)`` seen only through ``region``
        ``(B, 1, I, J, K)`` (binary, already dilated). A function of ``image * region`` and ``region`` only."""
        r = (region > 0.5).to(image.dtype)
        if self.region_norm:
            image = region_standardise(image, r)
        x, _ = self._pad(torch.cat([image * r, r], dim=1))
        feats = self.encoder(x)
        masks = [x[:, 1:2]]
        for _ in range(self.levels - 1):
            masks.append(F.max_pool3d(masks[-1], 2))
        return self.heads["cls"]([feats[i] for i in self.cls_levels], [masks[i] for i in self.cls_levels])

    def predicted_region(self, seg_logits: torch.Tensor) -> torch.Tensor:
        """Region from the seg head: centre-body probability > 0.5, dilated by ``margin_vox`` ``(B, 1, I, J, K)``."""
        return dilate_mask((self.body_probability(seg_logits) > 0.5).float(), self.margin_vox)

    def forward(self, image: torch.Tensor, region_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run all enabled heads.

        Parameters
        ----------
        image: ``(B, 1, I, J, K)`` normalised intensities (any I, J, K; padded internally).
        region_mask: ``(B, 1, I, J, K)`` binary region for the classification path, already dilated by
            the margin. ``None``: predicted by the seg head (then dilated here).

        Returns
        -------
        ``{"cls": (B, K), "seg": (B, 5, I, J, K), "heatmap": (B, 1, I, J, K), "recon": (B, 1, I, J, K),
        "region": (B, 1, I, J, K)}`` for the enabled heads (``region`` whenever ``cls`` is on).
        """
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"expected image of shape (B, 1, I, J, K), got {tuple(image.shape)}")
        out = self.forward_dense(image)
        if "cls" in self.heads:
            if region_mask is None:
                if "seg" not in out:
                    raise ValueError("region_mask is required when the seg head is switched off")
                region_mask = self.predicted_region(out["seg"].detach())
            if region_mask.shape != image.shape:
                raise ValueError(f"region_mask shape {tuple(region_mask.shape)} != image shape {tuple(image.shape)}")
            out["cls"] = self.forward_cls(image, region_mask)
            out["region"] = (region_mask > 0.5).to(image.dtype)
        return out


class ClassifierPath(nn.Module):
    """``f(image) = softmax(cls logits)`` with a fixed region: the module Captum attributes (``(B, 1, I, J, K)`` -> ``(B, K)``)."""

    def __init__(self, net: Stage2Net, region: torch.Tensor, probabilities: bool = True):
        super().__init__()
        self.net = net
        self.register_buffer("region", region)
        self.probabilities = probabilities

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        region = self.region.expand(image.shape[0], *self.region.shape[1:])
        logits = self.net.forward_cls(image, region)
        return torch.softmax(logits, dim=1) if self.probabilities else logits


__all__ = ["Stage2Net", "ClassifierPath", "dilate_mask", "ball_kernel", "region_standardise"]
