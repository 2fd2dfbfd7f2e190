"""Per-vertebra multitask 3D CNN whose class verdict provably depends only on the vertebra's region.

Architecture (small, CPU-friendly): a shared 3D encoder (``levels`` resolutions, two 3x3x3 conv +
InstanceNorm + LeakyReLU blocks each), a U-Net style decoder for the dense auxiliary heads, and heads in
an ``nn.ModuleDict``:

* ``cls``: class logits ``(B, K)``;
* ``seg``: multi-structure segmentation logits ``(B, 5, I, J, K)`` (background, centre body, neighbour
  bodies, discs, lesion; see :data:`stage2_classify.config.SEG_CLASSES`);
* ``heatmap``: centre heatmap logits ``(B, 1, I, J, K)``;
* ``recon``: autoencoder reconstruction of the input ``(B, 1, I, J, K)``;
* ``lesion`` (with ``cls`` and ``seg``): per-voxel lesion class ``(B, K, I, J, K)`` (0 = no lesion) computed on
  the *classification path*; its per-class statistics feed the class verdict.

Evidence guarantee (by construction)
------------------------------------
The encoder takes two channels ``(x, m)``: intensities and a *visibility* mask. The auxiliary path runs it
on ``(image, 1)`` (everything visible). The classification path runs the **same** encoder (and its own decoder) on
``(image * region, region)`` and pools the full-resolution decoder features and the coarsest encoder features
with masked average, attention and max pooling inside the *pooling mask*: ``region`` eroded back by the margin
(max-pooled down to the coarse resolution). Every operation on that path (convolutions, transposed convolutions, InstanceNorm -- statistics per sample and channel over a tensor that is itself a function
of ``image * region`` and ``region`` --, LeakyReLU, zero padding, pooling) is a function of
``image * region`` and ``region`` only, so changing any voxel outside ``region`` cannot change the logits.
No BatchNorm in the convolutions (its train-mode statistics would mix samples of a batch, and the two paths
would share running statistics of unmasked and masked inputs); the optional ``FeatureNorm`` on the pooled
feature vector (``model.cls_feature_norm``) mixes only other vertebrae's pooled features in training and
is a fixed affine map in evaluation. With
``ModelConfig.region_norm`` (default) the cls path first standardises intensities by their mean/std
*inside the region*, which also cancels the scan-level intensity window (an affine map), so even that
does not reach the verdict (up to the window's clipping of extreme voxels). ``tests/stage2_classify/
test_invariance.py`` checks this numerically. The region is the body dilated by ``margin_vox`` without
the other vertebral bodies (``patches.vertebra_region``). When ``region`` is not given it is the seg
head's centre body prediction so dilated, without the voxels it calls a neighbouring body: the guarantee
then holds *given* that region (the region's shape comes from the full patch; its voxel values never do).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stage2_classify.config import IMAGE_CONTRASTS, SEG_CENTRE, SEG_CLASSES, SEG_LESION, SEG_NEIGHBOUR, Stage2Config


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


class FeatureNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over a ``(B, F)`` feature vector that also takes a batch of one in training (then it
    uses, and does not update, the running statistics, as in evaluation).

    In training a vertebra's output depends on the other vertebrae of its batch, but only through *their*
    pooled features, so no voxel outside its own region reaches it; in evaluation it is a fixed affine map
    per feature.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` -> ``(B, F)``."""
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class MaskedPoolClassifier(nn.Module):
    """Multi-scale masked pooling -> logits.

    For each used feature level: masked average, masked attention and masked max pooling of the
    ``(B, C_l, i_l, j_l, k_l)`` features over the mask at that resolution; concatenated with the optional
    ``extra`` features ``(B, n_extra)`` -> (optional :class:`FeatureNorm`) -> MLP.
    """

    def __init__(self, channels: list[int], n_classes: int, dropout: float, n_extra: int = 0,
                 feature_norm: str = "none"):
        super().__init__()
        self.scores = nn.ModuleList([nn.Conv3d(c, 1, 1) for c in channels])
        total = 3 * sum(channels) + n_extra
        hidden = max(channels)
        if feature_norm not in ("none", "batch"):
            raise ValueError(f"feature_norm must be 'none' or 'batch', got {feature_norm!r}")
        self.norm = FeatureNorm(total) if feature_norm == "batch" else nn.Identity()
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

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor],
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """``feats[l]`` ``(B, C_l, i_l, j_l, k_l)``, ``masks[l]`` ``(B, 1, i_l, j_l, k_l)`` in {0, 1},
        ``extra`` ``(B, n_extra)`` -> ``(B, n_classes)``."""
        pooled = [self._pool(f, m, sc) for f, m, sc in zip(feats, masks, self.scores)]
        if extra is not None:
            pooled.append(extra)
        return self.mlp(self.norm(torch.cat(pooled, dim=1)))


#: Quantiles of the robustly standardised intensities inside the pooling mask fed to the class head.
PROFILE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
N_PROFILE = len(PROFILE_QUANTILES) + 2


def intensity_profile(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Intensity distribution of the body: ``(B, 1, I, J, K)`` image and mask -> ``(B, N_PROFILE)``.

    Intensities inside ``mask`` are standardised by their median and interquartile range (robust to a
    lesion occupying part of the body, and to any affine intensity scaling), then summarised by the
    quantiles :data:`PROFILE_QUANTILES` and the (sigmoid-softened) fractions of voxels above +2 and below
    -2. Corner lesions are compact tails of this distribution (bright oedema, dark or bright fat
    depending on the contrast), which the class head can use from the first step while the convolutional
    features are still learning. Zeros for an empty mask.
    """
    rows = []
    qs = torch.tensor(PROFILE_QUANTILES + (0.25, 0.75), dtype=image.dtype, device=image.device)
    for b in range(image.shape[0]):
        v = image[b].flatten()[mask[b].flatten() > 0.5]
        if v.numel() < 4:
            rows.append(torch.zeros(N_PROFILE, dtype=image.dtype, device=image.device))
            continue
        med = v.median()
        q = torch.quantile(v, qs)
        iqr = (q[-1] - q[-2]).clamp_min(1e-3)
        z = (v - med) / iqr
        zq = (q[: len(PROFILE_QUANTILES)] - med) / iqr
        hi = torch.sigmoid(4.0 * (z - 2.0)).mean()
        lo = torch.sigmoid(4.0 * (-z - 2.0)).mean()
        rows.append(torch.cat([zq, (10.0 * hi)[None], (10.0 * lo)[None]]))
    return torch.stack(rows)


def lesion_summary(lesion_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-class lesion statistics inside ``mask``: ``(B, K, I, J, K')`` logits, ``(B, 1, ...)`` mask -> ``(B, 3 (K-1))``.

    For each lesion class k >= 1 (0 = no lesion): the maximum, the mean and the mean of the top 1 % of the
    voxel probabilities ``softmax(lesion_logits)[:, k]`` inside ``mask`` (zeros for an empty mask).
    """
    p = torch.softmax(lesion_logits, dim=1)[:, 1:]  # (B, K-1, ...)
    m = (mask > 0.5).flatten(2)  # (B, 1, N)
    f = p.flatten(2) * m  # (B, K-1, N), zero outside
    n = m.sum(-1).clamp_min(1)  # (B, 1)
    mean = f.sum(-1) / n
    mx = f.amax(-1)
    k = max(1, int(0.01 * f.shape[-1]))
    top = f.topk(min(k, f.shape[-1]), dim=-1).values.mean(-1)
    return torch.cat([mx, mean, top], dim=1)


class Stage2Net(nn.Module):
    """Multitask per-vertebra network; see the module docstring for the evidence guarantee."""

    def __init__(self, cfg: Stage2Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.levels = cfg.model.levels
        self.margin_vox = cfg.margin_vox
        self.region_norm = bool(cfg.model.region_norm)
        self.norm_on_body = cfg.model.norm_statistics == "body"
        self.encoder = Encoder(cfg.model.base_channels, cfg.model.levels)
        chans = self.encoder.channels
        heads = cfg.heads
        self.dense_heads = [h for h in ("seg", "heatmap", "recon") if getattr(heads, h)]
        self.decoder = Decoder(chans) if self.dense_heads else None
        # the classification path has its own decoder on the shared encoder: the dense heads (whole patch)
        # and the lesion/class features (masked patch) would otherwise compete for the same decoder
        self.cls_decoder = Decoder(chans) if heads.cls else None
        mods: dict[str, nn.Module] = {}
        n_cls = len(cfg.classes)
        # lesion typing on the classification path: per-voxel class (0 = no lesion), part of segmentation
        self.lesion_typing = bool(heads.cls and heads.seg)
        self.contrast_input = bool(heads.cls and cfg.model.contrast_input)
        n_contrast = len(IMAGE_CONTRASTS) if self.contrast_input else 0
        if heads.cls:
            mods["cls"] = MaskedPoolClassifier([chans[0], chans[-1]], n_cls, cfg.model.dropout,
                                               n_extra=N_PROFILE + (3 * (n_cls - 1) if self.lesion_typing else 0)
                                               + n_contrast, feature_norm=cfg.model.cls_feature_norm)
            if self.contrast_input:  # per-contrast shift of the cls path's full-resolution features
                mods["contrast"] = nn.Linear(n_contrast, chans[0], bias=False)
            if self.lesion_typing:
                mods["lesion"] = nn.Conv3d(chans[0], n_cls, 1)
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

    def pooling_mask(self, region: torch.Tensor) -> torch.Tensor:
        """Where the class features are pooled: ``region`` eroded by ``margin_vox`` (the body again, up to a
        morphological closing), or ``region`` itself where the erosion would be empty. ``(B, 1, I, J, K)``.

        The margin therefore only gives the convolutions context at the body's edge (endplates, cortex);
        what is pooled sits on the body. A function of ``region`` only.
        """
        r = (region > 0.5).to(region.dtype)
        if self.margin_vox <= 0:
            return r
        core = 1.0 - dilate_mask(1.0 - r, self.margin_vox)
        empty = core.flatten(1).sum(1) < 0.5
        return torch.where(empty[:, None, None, None, None], r, core)

    def contrast_code(self, contrast: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """One-hot ``(B, len(IMAGE_CONTRASTS))`` from ``contrast`` ``(B,)`` indices into
        :data:`~stage2_classify.config.IMAGE_CONTRASTS` (-1 or ``None`` = unknown: all zeros)."""
        n = len(IMAGE_CONTRASTS)
        if contrast is None:
            return like.new_zeros(batch, n)
        c = contrast.to(device=like.device, dtype=torch.long).reshape(-1)
        if c.shape[0] != batch:
            raise ValueError(f"expected {batch} contrast indices, got shape {tuple(contrast.shape)}")
        if bool(((c < -1) | (c >= n)).any()):
            raise ValueError(f"contrast indices must be -1 (unknown) or 0..{n - 1} {IMAGE_CONTRASTS}, got {c.tolist()}")
        return F.one_hot(c.clamp_min(0), n).to(like.dtype) * (c >= 0).to(like.dtype)[:, None]

    def forward_cls(self, image: torch.Tensor, region: torch.Tensor,
                    contrast: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits ``(B, K)`` from ``image`` ``(B, 1, I, J, K)`` seen only through ``region``
        ``(B, 1, I, J, K)`` (binary, already dilated). A function of ``image * region``, ``region`` and the
        scan-level ``contrast`` ``(B,)`` (indices, used with ``model.contrast_input``) only."""
        return self.classification_path(image, region, contrast)["cls"]

    def classification_path(self, image: torch.Tensor, region: torch.Tensor,
                            contrast: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The masked path: ``{"cls": (B, K), "lesion": (B, K, I, J, K) (when lesion typing is on),
        "pool": (B, 1, I, J, K)}``, all functions of ``image * region``, ``region`` and ``contrast`` only.

        The whole encoder-decoder runs on ``(image * region, region)``. Full-resolution decoder features
        (small corner lesions are 2-4 voxels across at 2 mm), the coarsest encoder features and, with the
        seg head on, the per-voxel lesion-class probabilities of the ``lesion`` head (its max / mean /
        top-1 % per class, :func:`lesion_summary`) are pooled inside :meth:`pooling_mask`, together with
        the body's intensity distribution (:func:`intensity_profile`). With ``model.contrast_input`` the
        contrast's one-hot code ``(B, 4)`` (:meth:`contrast_code`) shifts the decoder features (learned, per
        channel) and joins the pooled features: the same bright spot means oedema on Dixon water and may be
        fat on T2-TSE.
        """
        r = (region > 0.5).to(image.dtype)
        pool = self.pooling_mask(r)
        if self.region_norm:
            image = region_standardise(image, pool if self.norm_on_body else r)
        x, size = self._pad(torch.cat([image * r, r], dim=1))
        pool_p, _ = self._pad(pool)
        feats = self.encoder(x)
        masks = [pool_p]
        for _ in range(self.levels - 1):
            masks.append(F.max_pool3d(masks[-1], 2))
        dec = self.cls_decoder(feats)
        out: dict[str, torch.Tensor] = {"pool": pool}
        extra = [intensity_profile(image * r, pool)]
        if self.contrast_input:
            code = self.contrast_code(contrast, image.shape[0], image)
            dec = dec + self.heads["contrast"](code)[:, :, None, None, None]
            extra.append(code)
        if self.lesion_typing:
            les = self.heads["lesion"](dec)
            extra.append(lesion_summary(les, pool_p))
            out["lesion"] = self._crop(les, size)
        out["cls"] = self.heads["cls"]([dec, feats[-1]], [masks[0], masks[-1]], torch.cat(extra, dim=1))
        return out

    def predicted_region(self, seg_logits: torch.Tensor) -> torch.Tensor:
        """Region from the seg head ``(B, 5, I, J, K)`` -> ``(B, 1, I, J, K)``: centre-body probability > 0.5,
        dilated by ``margin_vox``, without the voxels where a neighbouring body is more likely than not
        (the margin never reaches another vertebra; see ``patches.vertebra_region``)."""
        body = (self.body_probability(seg_logits) > 0.5).float()
        region = dilate_mask(body, self.margin_vox)
        neighbour = (torch.softmax(seg_logits, dim=1)[:, SEG_NEIGHBOUR : SEG_NEIGHBOUR + 1] > 0.5).float()
        return region * torch.maximum(1.0 - neighbour, body)

    def forward(self, image: torch.Tensor, region_mask: torch.Tensor | None = None,
                contrast: torch.Tensor | None = None, cls_image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run all enabled heads.

        Parameters
        ----------
        image: ``(B, 1, I, J, K)`` normalised intensities (any I, J, K; padded internally).
        region_mask: ``(B, 1, I, J, K)`` binary region for the classification path, already dilated by
            the margin. ``None``: predicted by the seg head (then dilated here).
        contrast: ``(B,)`` indices into :data:`~stage2_classify.config.IMAGE_CONTRASTS` (-1 = unknown);
            read by the classification path with ``model.contrast_input``, else ignored.
        cls_image: ``(B, 1, I, J, K)`` what the classification path reads instead of ``image`` (training
            only: ``train.shell_shuffle_prob``); ``None`` = ``image``.

        Returns
        -------
        ``{"cls": (B, K), "seg": (B, 5, I, J, K), "heatmap": (B, 1, I, J, K), "recon": (B, 1, I, J, K),
        "region": (B, 1, I, J, K), "pool": (B, 1, I, J, K), "lesion": (B, K, I, J, K)}`` for the enabled
        heads (``region`` and ``pool`` whenever ``cls`` is on; ``lesion`` when ``cls`` and ``seg`` are).
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
            if cls_image is not None and cls_image.shape != image.shape:
                raise ValueError(f"cls_image shape {tuple(cls_image.shape)} != image shape {tuple(image.shape)}")
            path = self.classification_path(image if cls_image is None else cls_image, region_mask, contrast)
            out["cls"] = path["cls"]
            out["pool"] = path["pool"]
            if "lesion" in path:
                out["lesion"] = path["lesion"]
            out["region"] = (region_mask > 0.5).to(image.dtype)
        return out


class ClassifierPath(nn.Module):
    """``f(image) = softmax(cls logits)`` with a fixed region: the module Captum attributes (``(B, 1, I, J, K)`` -> ``(B, K)``)."""

    def __init__(self, net: Stage2Net, region: torch.Tensor, probabilities: bool = True, contrast: int = -1):
        super().__init__()
        self.net = net
        self.register_buffer("region", region)
        self.probabilities = probabilities
        self.contrast = int(contrast)  # index into IMAGE_CONTRASTS, -1 = unknown

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        region = self.region.expand(image.shape[0], *self.region.shape[1:])
        if self.contrast < 0:  # unknown: the two-argument call (any network with forward_cls(image, region))
            logits = self.net.forward_cls(image, region)
        else:
            contrast = torch.full((image.shape[0],), self.contrast, dtype=torch.long, device=image.device)
            logits = self.net.forward_cls(image, region, contrast)
        return torch.softmax(logits, dim=1) if self.probabilities else logits


__all__ = ["Stage2Net", "ClassifierPath", "dilate_mask", "ball_kernel", "region_standardise"]
