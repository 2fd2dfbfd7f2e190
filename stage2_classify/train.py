"""Stage-2 training: per-vertebra patches from a canonical dataset folder, multitask loss, DDP, resume.

Usage::

    python -m stage2_classify.train --data DIR --out models/stage2 [--epochs N] [--resume] [--seed S]
    torchrun --nproc_per_node=2 -m stage2_classify.train --data DIR --out models/stage2

Determinism: every random choice of epoch ``e`` (batch order, augmentation, dropout) is drawn from
generators seeded by ``(seed, e, rank)``, never from state carried over from earlier epochs, so a run
killed during epoch ``e`` and resumed from ``train_state.pt`` (written atomically after every epoch)
reproduces the uninterrupted run exactly, losing at most the interrupted epoch.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from data_prep import synth as synth_mod
from data_prep import checkpoint
from data_prep.checkpoint import (
    config_to_dict,
    ema_state,
    load_ema_state,
    load_train_state,
    make_ema,
    update_ema,
    save_model,
    save_train_state,
    weights_of,
)
from data_prep.distributed import DistInfo, cleanup_distributed, init_distributed, seed_everything
from data_prep.errors import SpinepipeInputError
from data_prep.io import write_csv
from stage2_classify.config import (IMAGE_CONTRASTS, SEG_BG, SEG_CENTRE, SEG_DISC, SEG_NEIGHBOUR, Stage2Config,
                                    contrast_index)
from stage2_classify.domain import (ContrastReference, centre_signature, patch_signature, region_signature,
                                    scan_signature)
from stage2_classify.losses import (
    UncertaintyWeighting,
    box_emptiness_loss,
    box_tightness_loss,
    heatmap_loss,
    inverse_frequency_weights,
    lesion_mil_loss,
    lesion_voxel_loss,
    margin_attribution,
    margin_attribution_share,
    point_loss,
    recon_loss,
    set_cross_entropy,
    soft_body_loss,
    size_prior_loss,
    soft_cross_entropy,
    soft_targets,
    voxel_volume_ml,
)
from stage2_classify.model import Stage2Net
from stage2_classify.patches import Patch, PatchSampler, PatchTargets, build_targets

log = logging.getLogger(__name__)

LOG_FILE = "train_log.csv"
ANNOTATION_KINDS = ("auto", "full", "coarse", "outline", "box", "point", "none")
#: Body annotations whose seg targets are balanced body / not-body (``loss.balance_loose_body``).
LOOSE_BODY_KINDS = ("outline", "coarse")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One vertebra ready for training (all arrays on the patch grid ``(I, J, K)``)."""

    image: np.ndarray
    targets: PatchTargets
    cls: int
    confidence: float = 1.0
    subject: str = ""
    label: int = 0
    #: Image contrast of the scan (one of ``IMAGE_CONTRASTS``; "" = unknown), read with ``model.contrast_input``.
    contrast: str = ""
    #: The scan's centre-part contrast signature (``(2,)``, :func:`stage2_classify.domain.centre_signature`
    #: from the annotation's centroids; ``None``: not measurable), the same for every sample of the scan.
    centre_signature: np.ndarray | None = None


def sample_from_patch(patch: Patch, label: int, cls: int, cfg: Stage2Config, *, confidence: float = 1.0,
                      subject: str = "", kind: str = "full", contrast: str = "", **target_kwargs) -> Sample:
    """Build a :class:`Sample` from a cropped patch (see :func:`~stage2_classify.patches.build_targets`)."""
    t = build_targets(patch, label, cfg, kind=kind, **target_kwargs)
    return Sample(patch.image.astype(np.float32), t, int(cls), float(confidence), subject, int(label), contrast)


def _choose_kind(annotation: str, data) -> str:
    if annotation != "auto":
        return annotation
    if data.vertebrae is not None:
        return "full"
    if data.coarse is not None:
        return "coarse"
    if data.outlines is not None:
        return "outline"
    if data.boxes is not None:
        return "box"
    if data.points is not None:
        return "point"
    return "none"


def _centroid_of(vid: int, data) -> np.ndarray | None:
    from data_prep.scan import centroids_from_labelmap

    for lab in (data.vertebrae, data.coarse, data.outlines):
        if lab is not None:
            c = centroids_from_labelmap(lab, [vid])
            if vid in c:
                return c[vid]
    if data.boxes is not None:
        ids, arr = data.boxes
        if vid in ids:
            return arr[ids.index(vid)].mean(0)
    if data.points is not None:
        ids, pts = data.points
        if vid in ids:
            return pts.coords[ids.index(vid)]
    return None


def build_samples(data_dir: str | Path, cfg: Stage2Config, *, annotation: str = "auto",
                  ids: list[str] | None = None, contrast: str | None = None) -> list[Sample]:
    """Patches + targets for every labelled vertebra of a canonical dataset folder (cached in memory).

    ``annotation`` forces which body annotation is used (``"full"``, ``"coarse"``, ``"outline"``,
    ``"box"``, ``"point"``, ``"none"``; ``"auto"`` = the strongest available per subject). Lesion maps
    (``<id>_lesions``) are used when present, and ``<id>_structures.nii.gz`` (synthetic cohorts) gives
    the disc class with full masks. Each sample's image contrast is ``contrast`` when given, else the
    folder's per-subject one (:func:`data_prep.dataset.read_subject_contrasts`), else unknown.
    """
    from data_prep.dataset import VERTEBRA_LABELS_FILE, discover, load_subject, parse_contrast, read_subject_contrasts
    from data_prep.io import read_labelmap, read_vertebra_labels_csv

    if annotation not in ANNOTATION_KINDS:
        raise ValueError(f"annotation must be one of {ANNOTATION_KINDS}, got {annotation!r}")
    data_dir = Path(data_dir)
    subjects = discover(data_dir)
    labels_path = data_dir / VERTEBRA_LABELS_FILE
    if not labels_path.is_file():
        raise SpinepipeInputError(labels_path, "per-vertebra class labels not found (columns id,level,class[,confidence])")
    table = read_vertebra_labels_csv(labels_path, list(cfg.classes))
    forced = parse_contrast(contrast, "--contrast") if contrast else ""
    contrasts = read_subject_contrasts(data_dir)
    wanted = set(ids) if ids is not None else None
    samples: list[Sample] = []
    for s in subjects:
        if wanted is not None and s.id not in wanted:
            continue
        rows = table[table["id"] == s.id]
        if rows.empty:
            continue
        data = load_subject(s)
        kind = _choose_kind(annotation, data)
        maps = {"vertebrae": data.vertebrae, "lesions": data.lesions, "outlines": data.outlines, "coarse": data.coarse}
        lr_extent = None
        if kind == "outline" and data.outlines is not None:
            from data_prep.weak_labels import fill_outlines, outlined_lr_extent, thicken_slices

            # contours -> filled per-slice regions, each slice as thick as a patch voxel so that none is lost
            # when the patch grid (coarser than the 1-mm outlined slices) samples it
            filled = fill_outlines(data.outlines)
            maps["outlines"] = thicken_slices(filled, cfg.patch.spacing_mm)
            lr_extent = outlined_lr_extent(filled)
        struct_path = data_dir / f"{s.id}_structures.nii.gz"  # synthetic cohorts: discs etc. (data_prep.synth)
        if kind == "full" and struct_path.is_file():
            maps["structures"] = read_labelmap(struct_path, reference=data.image)
        sampler = PatchSampler(data.image, cfg.patch, {k: v for k, v in maps.items() if v is not None})
        first = len(samples)
        centres: dict[int, np.ndarray] = {}
        for r in rows.to_dict("records"):
            vid = int(r["label"])
            centre = _centroid_of(vid, data)
            if centre is None:
                log.warning("%s %s: no annotation locates this vertebra; skipped", s.id, r["level"])
                continue
            kw = {}
            if kind == "box":
                if data.boxes is None or vid not in data.boxes[0]:
                    log.warning("%s %s: no box; skipped", s.id, r["level"])
                    continue
                kw["box_mm"] = data.boxes[1][data.boxes[0].index(vid)]
            if kind == "point":
                kw["point_mm"] = centre
            if kind == "outline" and lr_extent is not None and vid in lr_extent:
                kw["outline_lr_mm"] = lr_extent[vid]
            if kind == "full" and data.vertebrae is None:
                raise SpinepipeInputError(s.image, "annotation 'full' requested but no <id>_vertebrae file")
            centres[vid] = centre
            patch = sampler.crop(centre)
            samples.append(sample_from_patch(patch, vid, int(r["class"]), cfg, confidence=float(r["confidence"]),
                                             subject=s.id, kind=kind, contrast=forced or contrasts.get(s.id, ""), **kw))
        cc = cfg.contrast_check
        centre_sig = centre_signature(sampler.image, centres, cc.body_radius_mm, cc.disc_radius_mm, cc.disc_half_length)
        for sample in samples[first:]:
            sample.centre_signature = centre_sig
        log.info("%s: %d vertebra patches (%s, contrast %s)", s.id, len(rows), kind,
                 forced or contrasts.get(s.id) or "unknown")
    if not samples:
        raise SpinepipeInputError(data_dir, "no labelled vertebra could be cropped (check vertebra_labels.csv ids/levels)")
    return samples


def collate(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Stack samples into ``(B, 1, I, J, K)`` tensors (``seg_allowed``: ``(B, 5, I, J, K)``)."""
    def stack(fn, dtype=torch.float32):
        return torch.from_numpy(np.stack([fn(s) for s in samples])).to(dtype)[:, None]

    shape = samples[0].image.shape
    zeros = np.zeros(shape, bool)
    batch = {
        "image": stack(lambda s: s.image),
        "region": stack(lambda s: s.targets.region),
        "body": stack(lambda s: s.targets.body),
        "lesion": stack(lambda s: s.targets.lesion),
        "heatmap": stack(lambda s: s.targets.heatmap),
        "box": stack(lambda s: s.targets.box if s.targets.box is not None else zeros),
        "ball": stack(lambda s: s.targets.point_ball if s.targets.point_ball is not None else zeros),
        "seg_allowed": torch.from_numpy(np.stack([s.targets.seg_allowed for s in samples])).float(),
        "lesion_class": stack(lambda s: s.targets.lesion_class if s.targets.lesion_class is not None
                              else np.full(shape, -1, np.int64)),
        "has_lesion_map": torch.tensor([s.targets.lesion_class is not None for s in samples]),
        "cls": torch.tensor([s.cls for s in samples], dtype=torch.long),
        "confidence": torch.tensor([s.confidence for s in samples], dtype=torch.float32),
        "has_box": torch.tensor([s.targets.box is not None for s in samples]),
        "has_ball": torch.tensor([s.targets.point_ball is not None for s in samples]),
        "loose_body": torch.tensor([s.targets.kind in LOOSE_BODY_KINDS for s in samples]),
        "exact_body": torch.tensor([s.targets.kind == "full" for s in samples]),
        "contrast": torch.tensor([contrast_index(s.contrast) for s in samples], dtype=torch.long),
        "body_soft": stack(lambda s: s.targets.body_soft if s.targets.body_soft is not None
                           else np.full(shape, np.nan, np.float32)),
        "others": stack(lambda s: s.targets.others if s.targets.others is not None else zeros),
    }
    return batch


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------
def augment(batch: dict[str, torch.Tensor], cfg: Stage2Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random spatial + intensity augmentation of a collated batch (new dict; inputs untouched).

    Spatial (patch axes = world L, P, S): rotation mostly about the left-right axis (sagittal plane,
    +-``max_rotation_deg``; +-3 deg about the others), translation +-4 mm, left-right flip. Never a
    head-foot flip. Boxes stay axis-aligned: box samples get translation/flip only.
    Intensity (pivot-based, no patch statistics): gamma, contrast about 0.5, smooth multiplicative bias
    field, Gaussian noise. Region jitter: with ``train.region_jitter_prob`` the classification region
    grows or shrinks by one voxel (never below the body, never onto another body), like a predicted mask
    at inference. Contrast dropout: with ``model.contrast_input``, the scan's contrast is hidden (-1) with
    ``train.contrast_dropout``.
    """
    tc = cfg.train
    out = dict(batch)
    img = batch["image"]
    dev = img.device  # random draws stay on the CPU generator (same numbers on any device), then move
    b = img.shape[0]
    size = img.shape[-3:]
    sp = cfg.patch.spacing_mm

    def u(lo, hi, n=()):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    thetas = []
    flips = []
    for i in range(b):
        if float(u(0, 1)) > tc.aug_prob:
            thetas.append(torch.cat([torch.eye(3), torch.zeros(3, 1)], 1))
            flips.append(False)
            continue
        deg = math.radians(tc.max_rotation_deg)
        small = math.radians(3.0)
        if bool(batch["has_box"][i]):
            r = torch.eye(3)
        else:
            angles = [float(u(-deg, deg)), float(u(-small, small)), float(u(-small, small))]
            r = torch.from_numpy(Rotation.from_euler("xyz", angles).as_matrix().astype(np.float32))
        t_mm = u(-4.0, 4.0, (3,))
        # (i, j, k) physical -> grid_sample's (x=k, y=j, z=i) normalised coordinates
        half = torch.tensor([(size[2] - 1) / 2 * sp, (size[1] - 1) / 2 * sp, (size[0] - 1) / 2 * sp]).clamp_min(1e-6)
        perm = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float32)  # ijk <-> xyz
        rg = perm @ r @ perm
        a = torch.diag(1 / half) @ rg @ torch.diag(half)
        t = (perm @ t_mm) / half
        thetas.append(torch.cat([a, t[:, None]], 1))
        flips.append(bool(tc.lr_flip) and float(u(0, 1)) < 0.5)
    theta = torch.stack(thetas).to(dev)
    grid = F.affine_grid(theta, (b, 1, *size), align_corners=True)

    def warp(x, mode):
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)

    for k in ("image", "heatmap"):
        out[k] = warp(batch[k], "bilinear")
    for k in ("region", "body", "lesion", "box", "ball", "seg_allowed", "lesion_class", "others"):
        out[k] = warp(batch[k], "nearest")
    if "body_soft" in batch:  # NaN = no soft target, also where the warp samples outside the patch
        soft = batch["body_soft"]
        given = warp((~torch.isnan(soft)).float(), "nearest") > 0.5
        out["body_soft"] = torch.where(given, warp(torch.nan_to_num(soft), "nearest"), torch.full_like(soft, float("nan")))
    flip = torch.tensor(flips, device=dev)
    if flip.any():
        for k in ("image", "heatmap", "region", "body", "lesion", "box", "ball", "seg_allowed", "lesion_class",
                  "body_soft", "others"):
            if k not in out:
                continue
            x = out[k].clone()
            x[flip] = torch.flip(x[flip], dims=[2])  # axis 0 of (I, J, K) = left-right
            out[k] = x

    # region jitter: grow or shrink the classification region by one voxel (as a predicted mask would),
    # never onto another vertebral body (where the annotation says where they are)
    reg = out["region"]
    grown = torch.maximum(F.max_pool3d(reg, 3, stride=1, padding=1) * (1.0 - out["others"]), reg)
    shrunk = 1.0 - F.max_pool3d(1.0 - reg, 3, stride=1, padding=1)
    pick = u(0, 1, (b, 1, 1, 1, 1)).to(dev)
    out["region"] = torch.where(pick < tc.region_jitter_prob / 2, grown,
                                torch.where(pick < tc.region_jitter_prob, torch.maximum(shrunk, out["body"]), reg))

    # hide the contrast sometimes (unknown at inference); drawn only when it is used, so that runs without
    # contrast input keep their random stream
    if cfg.model.contrast_input and "contrast" in batch and tc.contrast_dropout > 0:
        hide = u(0, 1, (b,)) < tc.contrast_dropout
        out["contrast"] = torch.where(hide.to(dev), torch.full_like(batch["contrast"], -1), batch["contrast"])

    x = out["image"]
    gam = torch.exp(u(-0.3, 0.3, (b, 1, 1, 1, 1))).to(dev)
    x = torch.sign(x) * x.abs().pow(gam)
    x = (x - 0.5) * u(0.8, 1.25, (b, 1, 1, 1, 1)).to(dev) + 0.5
    coords = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s, device=dev) for s in size], indexing="ij"))  # (3, I, J, K)
    coef = u(-0.15, 0.15, (b, 3, 1, 1, 1)).to(dev)
    x = x * torch.exp((coef * coords[None]).sum(1, keepdim=True))
    x = x + u(0.0, tc.noise_std_max, (b, 1, 1, 1, 1)).to(dev) * torch.randn(x.shape, generator=gen).to(dev)
    out["image"] = x
    if tc.shell_shuffle_prob > 0:  # drawn only when on, so that other runs keep their random stream
        out["cls_image"] = shuffle_shell(x, out["region"], out["body"], batch["exact_body"].to(dev)
                                         & (u(0, 1, (b,)) < tc.shell_shuffle_prob).to(dev), gen)
    return out


def shuffle_shell(image: torch.Tensor, region: torch.Tensor, body: torch.Tensor, which: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    """A copy of ``image`` ``(B, 1, I, J, K)`` whose voxels in ``region`` but not in ``body`` (both
    ``(B, 1, I, J, K)``, binary) are randomly permuted among themselves, for the samples where ``which``
    ``(B,)`` is true; every other voxel unchanged (``train.shell_shuffle_prob``)."""
    out = image.clone()
    for i in torch.nonzero(which).flatten().tolist():
        shell = ((region[i] > 0.5) & (body[i] < 0.5)).flatten()
        idx = torch.nonzero(shell).flatten()
        if idx.numel() < 2:
            continue
        flat = out[i].reshape(-1).clone()
        perm = torch.randperm(idx.numel(), generator=gen).to(idx.device)
        flat[idx] = flat[idx[perm]]
        out[i] = flat.reshape(out[i].shape)
    return out


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
class Stage2Trainable(nn.Module):
    """Network + loss balancing in one module (so DDP synchronises both)."""

    def __init__(self, cfg: Stage2Config, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.net = Stage2Net(cfg)
        tasks = cfg.heads.enabled()
        fixed = dict(zip(("cls", "seg", "heatmap", "recon"), cfg.loss.fixed_weights))
        self.weighting = UncertaintyWeighting(tasks, cfg.loss.weighting, fixed)
        self.register_buffer("class_weights", class_weights if class_weights is not None
                             else torch.ones(len(cfg.classes)))
        #: Weight of ``train.margin_grad_penalty``'s term in this epoch (:func:`margin_weight`; the training loop
        #: sets it before every epoch); 0 = the term is not computed.
        self.margin_weight = float(cfg.train.margin_grad_penalty)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """``(total loss, per-head losses, class logits (B, K) or None)``."""
        cfg = self.cfg
        cls_image = batch.get("cls_image")
        penalty_on = self.margin_weight > 0 and self.training and "cls" in self.net.heads
        penalised = penalty_on and bool(batch["exact_body"].any())
        if penalised:  # the classification input becomes a leaf whose gradient the penalty reads
            cls_image = (batch["image"] if cls_image is None else cls_image).detach().clone().requires_grad_(True)
        out = self.net(batch["image"], batch["region"] if "cls" in self.net.heads else None, batch.get("contrast"),
                       cls_image)
        parts: dict[str, torch.Tensor] = {}
        if "cls" in out:
            t = soft_targets(batch["cls"], batch["confidence"], len(cfg.classes))
            parts["cls"] = soft_cross_entropy(out["cls"], t, self.class_weights)
            weak = ~batch["has_lesion_map"]
            if "lesion" in out and bool(weak.any()):
                # lesion typing from the class label alone where no lesion map exists (multiple instance);
                # with a map, the voxel loss below supervises the same head (MIL there only slows it down)
                parts["cls"] = parts["cls"] + lesion_mil_loss(out["lesion"][weak], out["pool"][weak], t[weak])
        if "seg" in out:
            allowed = batch["seg_allowed"] > 0.5
            balance = batch["loose_body"] & cfg.loss.balance_loose_body
            positive = None
            if bool(balance.any()):  # body voxels: only the centre body (or a lesion in it) is allowed there
                positive = allowed[:, SEG_CENTRE] & ~allowed[:, [SEG_BG, SEG_NEIGHBOUR, SEG_DISC]].any(1)
            seg = set_cross_entropy(out["seg"], allowed, positive, balance)
            pbody = self.net.body_probability(out["seg"])
            soft = batch["body_soft"]
            if bool((~torch.isnan(soft)).any()):  # outlines: where the boundary probably lies in the band
                seg = seg + soft_body_loss(pbody, soft)
            if bool(batch["has_box"].any()):
                sel = batch["has_box"]
                seg = seg + box_tightness_loss(pbody[sel], batch["box"][sel] > 0.5)
                pc = torch.softmax(out["seg"][sel], 1)[:, SEG_CENTRE:SEG_CENTRE + 1]
                seg = seg + box_emptiness_loss(pc, batch["box"][sel] > 0.5)
            if bool(batch["has_ball"].any()):
                sel = batch["has_ball"]
                seg = seg + point_loss(pbody[sel], batch["ball"][sel] > 0.5)
                seg = seg + size_prior_loss(pbody[sel], voxel_volume_ml(cfg.patch.spacing_mm), cfg.loss.body_volume_ml)
            if "lesion" in out and bool(batch["has_lesion_map"].any()):
                sel = batch["has_lesion_map"]
                seg = seg + lesion_voxel_loss(out["lesion"][sel], batch["lesion_class"][sel], out["pool"][sel])
            parts["seg"] = seg
        if "heatmap" in out:
            parts["heatmap"] = heatmap_loss(out["heatmap"], batch["heatmap"])
        if "recon" in out:
            parts["recon"] = recon_loss(out["recon"], batch["image"])
        total = self.weighting(parts)
        if penalised:
            parts["margin_grad"] = self.margin_penalty(out["cls"], cls_image, batch)
            total = total + self.margin_weight * parts["margin_grad"]
        elif penalty_on:  # no exact body in this batch: logged as 0, so that every DDP rank logs the same keys
            parts["margin_grad"] = total.new_zeros(())
        return total, parts, out.get("cls")

    def margin_penalty(self, logits: torch.Tensor, cls_image: torch.Tensor,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``train.margin_grad_penalty``'s term: the mean, over the samples with exact body masks, of the share
        of ``|d(sum_k log p_k)/d(cls_image) x (cls_image - baseline)|`` in the margin (region minus body;
        :func:`~stage2_classify.losses.margin_attribution_share`), or of its sum over the margin with
        ``train.margin_grad_form="mass"`` (:func:`~stage2_classify.losses.margin_attribution`). ``logits``
        ``(B, K)`` computed from the leaf ``cls_image`` ``(B, 1, I, J, K)``; the baseline is the evidence
        check's (the input blurred inside the region). The gradient is taken with ``create_graph=True``, so
        the penalty trains the network (double back-propagation through the classification path)."""
        from stage2_classify.evidence import default_baseline

        score = F.log_softmax(logits, dim=1).sum()  # every class's log-probability (Ross et al. 2017)
        grad, = torch.autograd.grad(score, cls_image, create_graph=True)
        region = batch["region"]
        with torch.no_grad():
            delta = cls_image - default_baseline(self.net, cls_image, region)
        measure = margin_attribution_share if self.cfg.train.margin_grad_form == "share" else margin_attribution
        per_sample = measure(grad, delta, region, batch["body"])
        sel = batch["exact_body"].to(per_sample.device)
        return per_sample[sel].mean()


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------
def _epoch_order(n: int, seed: int, epoch: int, world: int, rank: int, batch_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_rank = math.ceil(n / world)
    full = (perm * (world + 1))[: per_rank * world]
    mine = full[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


#: Epochs of classification loss that :func:`margin_weight`'s gate averages (one epoch's loss is noisy).
GATE_EPOCHS = 3


def margin_weight(cfg: Stage2Config, epoch: int, log_rows: Sequence[Mapping[str, float]] = ()) -> float:
    """Weight of the margin's input-gradient penalty in (0-based) ``epoch``: 0 before ``train.margin_grad_start``
    x ``train.epochs``, then rising linearly to ``train.margin_grad_penalty`` over ``train.margin_grad_ramp`` x
    ``train.epochs`` epochs (at once with a ramp of 0). With ``train.margin_grad_gate`` > 0 that weight is
    multiplied by how far the classifier has left chance: ``clip((ln K - L) / (gate x ln K), 0, 1)``, ``L`` the
    mean ``loss_cls`` of the last :data:`GATE_EPOCHS` rows of ``log_rows`` (the epochs before ``epoch``; 0
    until there are that many)."""
    tc = cfg.train
    n = max(1, tc.epochs)
    start, ramp = tc.margin_grad_start * n, tc.margin_grad_ramp * n
    if tc.margin_grad_penalty <= 0 or epoch < start:
        return 0.0
    w = float(tc.margin_grad_penalty) * (1.0 if ramp <= 0 else min(1.0, (epoch + 1 - start) / ramp))
    if tc.margin_grad_gate > 0:
        recent = [float(r["loss_cls"]) for r in list(log_rows)[:epoch][-GATE_EPOCHS:] if "loss_cls" in r]
        if len(recent) < GATE_EPOCHS:
            return 0.0
        chance = math.log(len(cfg.classes))
        w *= min(1.0, max(0.0, (chance - sum(recent) / len(recent)) / (tc.margin_grad_gate * chance)))
    return w


def _lr(cfg: Stage2Config, epoch: int) -> float:
    """Cosine decay over ``train.epochs`` with one warm epoch at full rate."""
    e, n = epoch, max(1, cfg.train.epochs)
    return cfg.train.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(e, n) / n)))


def train_on_samples(samples: list[Sample], cfg: Stage2Config, out_dir: str | Path, *, resume: bool = False,
                     stop_after_epoch: int | None = None, dist_info: DistInfo | None = None,
                     callback: Callable[[int, "Stage2Trainable", dict], None] | None = None,
                     synthetic_only: bool = False) -> Path:
    """Train on in-memory samples; write ``out_dir`` (model, ``train_state.pt``, ``train_log.csv``).

    ``stop_after_epoch`` ends the run after that many epochs in total (simulates an interruption; the
    state written is exactly what a killed run leaves). Under ``torchrun`` pass ``dist_info`` (or let it
    be initialised here): the model is wrapped in ``DistributedDataParallel``, each rank trains on its
    shard of every epoch, rank 0 writes the files. ``callback(epoch, module, log_row)`` runs on every
    rank after each epoch (benchmarks, tests). ``synthetic_only``: the samples all come from built-in
    synthetic cohorts (saved as ``extra["synthetic_only"]``; the :class:`~stage2_classify.infer.Classifier`
    warns when it loads such a model).
    """
    cfg.validate()
    # checked here, not in validate(): a saved model without the IG baseline must still load
    if cfg.train.margin_grad_penalty > 0 and cfg.ig_baseline_sigma_mm is None:
        raise ValueError("train.margin_grad_penalty > 0 needs ig_baseline_sigma_mm (the baseline it measures "
                         "against); set train.margin_grad_penalty=0 to train without the penalty")
    out_dir = Path(out_dir)
    di = dist_info or init_distributed()
    tc = cfg.train
    threads = torch.get_num_threads()
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    try:
        return _train_loop(samples, cfg, out_dir, resume, stop_after_epoch, di, callback, synthetic_only)
    finally:
        torch.set_num_threads(threads)


def _train_loop(samples, cfg: Stage2Config, out_dir: Path, resume: bool, stop_after_epoch: int | None,
                di: DistInfo, callback, synthetic_only: bool = False) -> Path:
    tc = cfg.train
    seed_everything(tc.seed)
    counts = np.bincount([s.cls for s in samples], minlength=len(cfg.classes))
    cw = (torch.tensor(cfg.loss.class_weights, dtype=torch.float32) if cfg.loss.class_weights
          else inverse_frequency_weights(counts.tolist()))
    module = Stage2Trainable(cfg, cw).to(di.device)
    # loss-balancing weights learn slowly and without decay (a fast learner collapses onto the easiest head)
    groups = [{"params": list(module.net.parameters()), "lr_scale": 1.0, "weight_decay": tc.weight_decay},
              {"params": list(module.weighting.parameters()), "lr_scale": cfg.loss.weighting_lr_scale, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tc.lr)
    ema = make_ema(module.net, tc.ema_decay)  # the network only (not the loss-balancing weights)
    start, rows = 0, []
    if resume:
        state = load_train_state(out_dir)
        if state is None:
            log.warning("%s: no train_state.pt to resume from; starting from scratch", out_dir)
        else:
            saved = state.get("config")
            if saved != config_to_dict(cfg):
                raise SpinepipeInputError(out_dir / "train_state.pt",
                                          "cannot resume: the saved training configuration differs from this run's")
            module.load_state_dict(state["module"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                load_ema_state(ema, state.get("ema"), out_dir / "train_state.pt")
            start = int(state["epoch"])
            rows = list(state.get("log", []))
            log.info("resuming at epoch %d", start + 1)
    train_mod: nn.Module = module
    if di.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_mod = DDP(module, device_ids=[di.device.index] if di.device.type == "cuda" else None)
    end = tc.epochs if stop_after_epoch is None else min(tc.epochs, stop_after_epoch)
    for epoch in range(start, end):
        t0 = time.time()
        torch.manual_seed(tc.seed * 7919 + epoch * 131 + di.rank)  # dropout etc.
        gen = torch.Generator().manual_seed(tc.seed * 1000003 + epoch * 1009 + di.rank)
        for grp in opt.param_groups:
            grp["lr"] = _lr(cfg, epoch) * grp["lr_scale"]
        module.margin_weight = margin_weight(cfg, epoch, rows)
        module.train()
        sums: dict[str, float] = {}
        n_seen, n_correct, n_batches = 0, 0, 0
        for idx in _epoch_order(len(samples), tc.seed, epoch, di.world_size, di.rank, tc.batch_size):
            batch = {k: v.to(di.device) for k, v in collate([samples[i] for i in idx]).items()}
            if tc.aug_prob > 0:
                batch = augment(batch, cfg, gen)  # on the training device
            opt.zero_grad(set_to_none=True)
            total, parts, logits = train_mod(batch)
            total.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
            opt.step()
            update_ema(ema, module.net)  # no-op without an average
            n_batches += 1
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
            for k, v in parts.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + float(v.detach())
            if logits is not None:
                n_correct += int((logits.argmax(1) == batch["cls"]).sum())
            n_seen += len(idx)
        if di.distributed:  # log statistics of the whole epoch, not of rank 0's shard
            keys = sorted(sums)
            t = torch.tensor([sums[k] for k in keys] + [n_batches, n_correct, n_seen], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            sums = dict(zip(keys, t[: len(keys)].tolist()))
            n_batches, n_correct, n_seen = (int(x) for x in t[len(keys):].tolist())
        row = {"epoch": epoch + 1, **{k: v / max(n_batches, 1) for k, v in sums.items()},
               "train_acc": n_correct / max(n_seen, 1), "lr": _lr(cfg, epoch), "seconds": time.time() - t0,
               **{f"w_{k}": v for k, v in module.weighting.weights().items()}}
        if tc.margin_grad_penalty > 0:
            row["w_margin_grad"] = module.margin_weight
        rows.append(row)
        if di.is_main:
            _write_epoch(out_dir, module, opt, cfg, epoch + 1, rows, len(samples), ema, synthetic_only=synthetic_only)
        log.info("epoch %d/%d loss %.4f acc %.3f (%.1fs)", epoch + 1, tc.epochs, row["loss"], row["train_acc"], row["seconds"])
        if callback is not None:
            callback(epoch + 1, module, row)
        if di.distributed:
            torch.distributed.barrier()
    if di.is_main and start >= end and not (out_dir / "config.json").exists():
        _write_epoch(out_dir, module, opt, cfg, end, rows, len(samples), ema, synthetic_only=synthetic_only)
    if di.is_main and end >= tc.epochs:  # finished: record what the training scans look like
        ref = contrast_reference(ema.module if ema is not None else module.net, samples)
        if ref is not None:
            _write_epoch(out_dir, module, opt, cfg, end, rows, len(samples), ema, reference=ref,
                         synthetic_only=synthetic_only)
    return out_dir


def contrast_reference(net: Stage2Net, samples: list[Sample]) -> ContrastReference | None:
    """The training scans' contrast signatures (:mod:`stage2_classify.domain`), one row per subject: the
    centre part its samples carry (from the annotation's centroids) and the region part measured as inference
    measures it, on each sample's patch with the network's own body and neighbouring-body predictions (so
    loose or missing masks do not matter; median over the subject's vertebrae). ``None`` when no subject
    gives either part."""
    from stage2_classify.infer import predicted_body

    cfg = net.cfg
    region: dict[str, list] = {}
    centre: dict[str, np.ndarray | None] = {}
    contrasts: set[str] = set()
    was_training = net.training
    net.eval()
    try:
        for s in samples:
            img = torch.from_numpy(np.ascontiguousarray(s.image))[None, None].to(next(net.parameters()).device)
            body, others, source = predicted_body(net, img)
            region.setdefault(s.subject, []).append(
                None if source == "prior" else patch_signature(s.image, body, others, cfg.patch.spacing_mm,
                                                               cfg.contrast_check.band_mm))
            if centre.get(s.subject) is None:
                centre[s.subject] = s.centre_signature
            contrasts.add(s.contrast)
    finally:
        net.train(was_training)
    rows = [sig for sig in (scan_signature(centre[k], region_signature(v)) for k, v in region.items()) if sig is not None]
    if not rows:
        log.info("no training scan gave a contrast signature: unseen contrasts will not be flagged")
        return None
    n_region = sum(bool(np.isfinite(r[2])) for r in rows)
    log.info("contrast reference from %d of %d training scans (%d with the region part)", len(rows), len(region), n_region)
    return ContrastReference(np.array(rows), tuple(contrasts))


def _write_epoch(out_dir: Path, module: Stage2Trainable, opt, cfg: Stage2Config, epoch: int, rows: list[dict],
                 n_samples: int, ema: nn.Module | None = None, reference: ContrastReference | None = None,
                 synthetic_only: bool = False) -> None:
    """Model folder (the weight average when ``ema`` is given, else the raw weights) + resumable state;
    ``reference``: the training scans' contrast signatures (``extra["contrast_reference"]``)."""
    extra = {"epoch": epoch, "n_samples": n_samples, "loss_weights": module.weighting.weights(),
             "weights": "ema" if ema is not None else "raw", "synthetic_only": bool(synthetic_only)}
    if reference is not None:
        extra["contrast_reference"] = reference.to_dict()
    save_model(out_dir, weights_of(ema.module) if ema is not None else module.net.state_dict(), cfg, kind="stage2",
               extra=extra)
    state = {"epoch": epoch, "module": module.state_dict(), "optimizer": opt.state_dict(),
             "config": config_to_dict(cfg), "log": rows}
    if ema is not None:
        state["ema"] = ema_state(ema)
    save_train_state(out_dir, state)
    write_csv(pd.DataFrame(rows), out_dir / LOG_FILE)


def train_stage2(data_dir: str | Path, out_dir: str | Path, config: Stage2Config | None = None,
                 resume: bool = False, *, annotation: str = "auto", ids: list[str] | None = None,
                 contrast: str | None = None) -> Path:
    """Train stage 2 on a canonical dataset folder; returns ``out_dir`` (a loadable model folder).
    ``contrast``: the image contrast of every scan (default: per subject from the folder, see
    :func:`build_samples`)."""
    cfg = config or Stage2Config()
    cfg.validate()
    di = init_distributed()
    try:
        samples = build_samples(data_dir, cfg, annotation=annotation, ids=ids, contrast=contrast)
        log.info("%d vertebra patches; classes %s", len(samples),
                 np.bincount([s.cls for s in samples], minlength=len(cfg.classes)).tolist())
        return train_on_samples(samples, cfg, out_dir, resume=resume, dist_info=di,
                                synthetic_only=synth_mod.synthetic_only(data_dir))
    finally:
        cleanup_distributed()


def synthesize_training_data(work_dir: str | Path, n: int = 12, seed: int = 0) -> Path:
    """Write a small synthetic cohort with inserted lesions (``data_prep.synth`` + ``data_prep.lesions``)."""
    from data_prep.lesions import cohort_hook
    from data_prep.synth import SynthConfig, write_cohort

    work_dir = Path(work_dir)
    write_cohort(work_dir, n, seed, SynthConfig(), cohort_hook())
    return work_dir


def load_config_json(path: str | Path) -> Stage2Config:
    """:class:`Stage2Config` from a JSON file of any subset of its fields (``checkpoint.load_config_json``)."""
    return checkpoint.load_config_json(Stage2Config, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stage2_classify.train", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="models/stage2")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--config", help="Stage2Config JSON (fields of the dataclass)")
    ap.add_argument("--annotation", default="auto", choices=ANNOTATION_KINDS)
    ap.add_argument("--contrast", default=None, choices=IMAGE_CONTRASTS,
                    help="image contrast of every scan (default: per subject from subjects.csv / synth_meta.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config_json(args.config) if args.config else Stage2Config()
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.seed is not None:
        cfg.train.seed = args.seed
    try:
        train_stage2(args.data, args.out, cfg, resume=args.resume, annotation=args.annotation, contrast=args.contrast)
    except SpinepipeInputError as exc:
        logging.getLogger(__name__).error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
