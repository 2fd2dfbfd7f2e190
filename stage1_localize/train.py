"""Stage-1 training loop (points-only supervision): ``train_stage1(data_dir, out_dir, config, resume)``.

* Data: a canonical dataset folder (``data_prep.dataset.discover``). Per subject the targets are the
  centroids of ``<id>_points.csv`` (world LPS) or, when absent, the centroids of the
  ``<id>_vertebrae`` label map. Masks are never needed. Every scan is prepared once
  (``preprocess.prepare``: canonical LPS, 3 mm grid, [0, 1] intensities) and kept in memory (a 3 mm
  lumbar scan is ~0.4 M voxels). With ``config.extrapolate_cranial`` the run of points is extended
  head-wards by extrapolated pseudo-centroids (``targets.extrapolate_cranial``: a visible T12 above an
  L1-L5 annotation is taught as T12, not left for the level head to call "L1"; experimental, off by
  default: it lowered identification in the fold-0 trials, see ``config.py``); ``config.extrapolate_caudal``
  likewise adds S1 below an annotated L5 (``targets.extrapolate_caudal``, on by default since session 17,
  level map only), so that the level head calls the sacrum S1 instead of "L5". Level-only pseudo-points
  are never patch centres.
* Each step draws ``batch_size`` augmented patches (``augment.sample_patch``) and builds targets on the
  patch grid (the heatmap loss ignores what lies beyond the annotated run of levels, see ``targets.py``). Loss = weighted BCE on the centre heatmap (weight ``1 + pos_weight * target``, the centres
  are <1 % of voxels) + ``level_loss_weight`` x cross-entropy of the level head inside the balls
  + ``offset_loss_weight`` x smooth-L1 of the offset head (vector to the nearest centroid, in units of
  ``offset_radius_mm``) inside the offset balls.
* Network passes at ``config.train_precision`` (``data_prep.precision``: bfloat16 autocast or float32);
  losses, weights and optimiser state in float32.
* AdamW with nnU-Net's polynomial decay ``lr * (1 - epoch / epochs) ** 0.9``; with ``config.ema_decay``
  the saved model is the exponential moving average of the weights (the raw ones stay in the state).
* Deterministic: the sampling RNG of epoch ``e`` on rank ``r`` is ``default_rng([seed, e, r])`` and torch
  is seeded per epoch, so a resumed run replays exactly the epochs an uninterrupted run would.
* ``torchrun``: ``data_prep.distributed.init_distributed`` joins the group (gloo on CPU, NCCL on GPU);
  the network is wrapped in DistributedDataParallel; rank 0 writes files. GPU used when present.
* Outputs in ``out_dir``: ``model.safetensors`` + ``config.json`` (``data_prep.checkpoint.save_model``,
  kind ``"stage1"``; the config holds the plans) and ``train_state.pt`` + ``train_log.csv`` rewritten at
  the end of every epoch, so ``--resume`` continues from the last finished epoch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from data_prep import checkpoint
from data_prep import precision as precision_mod
from data_prep.distributed import DistInfo, cleanup_distributed, init_distributed, seed_everything
from data_prep.errors import SpinepipeInputError
from data_prep.io import as_paths, read_image, read_labelmap, read_points_csv, write_csv, write_text
from data_prep.scan import Scan, centroids_from_labelmap
from data_prep.synth import synthetic_only
from stage1_localize.augment import sample_patch
from stage1_localize.config import Stage1Config
from stage1_localize.model import LocalizerNet, memory_format, run_net
from stage1_localize.plan import plan_network
from stage1_localize.preprocess import prepare, zscore
from stage1_localize.targets import IGNORE, extrapolate_caudal, extrapolate_cranial, make_targets

log = logging.getLogger(__name__)
LOG_FILE = "train_log.csv"


@dataclass
class TrainSubject:
    """A prepared training scan: the coarse [0, 1] grid and its annotated centroids (grid voxels)."""

    id: str
    grid: Scan
    points_ijk: np.ndarray
    level_ids: list[int]
    #: index of the dataset folder the subject came from (batches balance folders, see ``make_batch``)
    group: int = 0
    #: levels of extrapolated pseudo-centroids among ``level_ids`` (``config.extrapolate_cranial`` / ``_caudal``)
    pseudo_ids: tuple[int, ...] = ()


def list_subjects(data_dir: str | os.PathLike) -> list[tuple[str, Path, Path | None, Path | None]]:
    """``(id, image, points_csv or None, vertebrae_map or None)`` for each subject of a dataset folder."""
    from data_prep.dataset import discover

    return [(s.id, s.image, s.points, s.vertebrae) for s in discover(data_dir)]


def subject_points(image: Scan, points_csv: Path | None, vertebrae: Path | None) -> tuple[list[int], np.ndarray]:
    """VerSe ids and ``(N, 3)`` world LPS centroids: from the points CSV, else the label map's centroids."""
    if points_csv is not None:
        ids, pts = read_points_csv(points_csv)
        return list(ids), pts.require("world")
    if vertebrae is not None:
        cents = centroids_from_labelmap(read_labelmap(vertebrae, reference=image))
        ids = sorted(cents)
        return ids, np.array([cents[i] for i in ids]).reshape(-1, 3)
    return [], np.zeros((0, 3))


def load_subjects(data_dir, config: Stage1Config) -> list[TrainSubject]:
    """Read and prepare every subject that has point or mask annotations.

    ``data_dir``: one dataset folder or a sequence of them (e.g. one per cohort / site); subjects carry
    the index of their folder as ``group``.
    """
    out = []
    caudal = functools.partial(extrapolate_caudal, sacral_bend_deg=config.sacral_bend_deg,
                               sacral_step_scale=config.sacral_step_scale)
    extrapolations = ((config.extrapolate_cranial, extrapolate_cranial), (config.extrapolate_caudal, caudal))
    for group, folder in enumerate(as_paths(data_dir)):
        for sid, img_path, pts_path, vert_path in list_subjects(folder):
            if pts_path is None and vert_path is None:
                log.warning("%s: no <id>_points.csv or <id>_vertebrae map; skipped for stage-1 training", sid)
                continue
            image = read_image(img_path)
            ids, world = subject_points(image, pts_path, vert_path)
            pseudo: tuple[int, ...] = ()
            for n_levels, extrapolate in extrapolations:
                if n_levels > 0 and len(world):
                    extra_ids, extra = extrapolate(world, ids, n_levels)
                    ids, world = list(ids) + extra_ids, np.concatenate([world, extra]) if len(extra) else world
                    pseudo += tuple(extra_ids)
            grid = prepare(image, config)
            ijk = grid.world_to_voxel(world).coords if len(world) else np.zeros((0, 3))
            out.append(TrainSubject(sid, grid, np.asarray(ijk), ids, group, pseudo))
    if not out:
        raise SpinepipeInputError(data_dir, "no subject with <id>_points.csv or <id>_vertebrae labels to train stage 1 on")
    return out


def draw_subject(subjects: list[TrainSubject], rng: np.random.Generator, balance_groups: bool) -> TrainSubject:
    """One training subject: uniformly, or (``balance_groups``) a uniform dataset folder then a uniform
    subject of it, so each folder (site / cohort) is drawn equally often whatever its size."""
    groups = sorted({s.group for s in subjects})
    if balance_groups and len(groups) > 1:
        g = groups[int(rng.integers(len(groups)))]
        pool = [s for s in subjects if s.group == g]
        return pool[int(rng.integers(len(pool)))]
    return subjects[int(rng.integers(len(subjects)))]


def level_balanced_weights(level_ids_per_subject: list[list[int]], power: float = 1.0) -> list[np.ndarray]:
    """Per subject, ``(N_s,)`` weights ``count(level) ** -power`` where ``count`` is the number of points of
    that level over all subjects: with ``power`` 1 a level annotated in few scans gets proportionally more
    foreground patches, 0 is uniform, in between tempers the balancing.
    E.g. ``[[20, 21], [19, 20]]`` -> ``[[0.5, 1], [1, 0.5]]``; with ``power=0.5`` ``[[0.707, 1], [1, 0.707]]``."""
    counts: dict[int, int] = {}
    for ids in level_ids_per_subject:
        for v in ids:
            counts[int(v)] = counts.get(int(v), 0) + 1
    return [np.array([float(counts[int(v)]) ** -power for v in ids], dtype=np.float64) for ids in level_ids_per_subject]


def centre_weights(subjects: list[TrainSubject], config: Stage1Config) -> dict[int, np.ndarray | None]:
    """Per subject (keyed by ``id(subject)``), the ``(N_s,)`` weights with which a foreground patch is
    centred on each of its points (None: uniform): :func:`level_balanced_weights` with
    ``config.balance_levels``, and zero for level-only pseudo-points (``config.extrapolated_level_only``),
    which are not detections. Level-only pseudo-points are not counted, so the real points' weights are
    those of the same subjects without them (and with ``balance_levels``, as the pseudo-points come last,
    so are the draws among the real points).
    """
    level_only = config.extrapolated_level_only
    real = [np.array([not (level_only and int(v) in s.pseudo_ids) for v in s.level_ids], dtype=bool)
            for s in subjects]
    balanced = (level_balanced_weights([[v for v, r in zip(s.level_ids, keep) if r] for s, keep in zip(subjects, real)],
                                       config.level_balance_power) if config.balance_levels else None)
    out: dict[int, np.ndarray | None] = {}
    for n, (s, keep) in enumerate(zip(subjects, real)):
        if balanced is None and keep.all():
            out[id(s)] = None
            continue
        w = np.zeros(len(keep))
        w[keep] = balanced[n] if balanced is not None else 1.0
        out[id(s)] = w
    return out


def make_batch(subjects: list[TrainSubject], config: Stage1Config, rng: np.random.Generator,
               augment: bool = True) -> dict[str, torch.Tensor]:
    """``{"image": (B,1,I,J,K) z-scored, "heatmap": (B,1,I,J,K), "levels": (B,I,J,K) int64,
    "heatmap_weight": (B,1,I,J,K)}`` (+ ``"offset": (B,3,I,J,K)`` in units of ``offset_radius_mm`` and
    ``"offset_mask": (B,1,I,J,K)`` when ``config.offset_radius_mm`` is set). With ``config.balance_groups`` each patch first draws a dataset
    folder uniformly, then a subject of it (a 13-scan site is not drowned by a 50-scan one); with
    ``config.balance_levels`` the foreground centre is drawn by :func:`level_balanced_weights`."""
    spacing = np.asarray(config.target_spacing, dtype=np.float64)
    imgs, heats, levs, weights, offs, omasks = [], [], [], [], [], []
    point_w = centre_weights(subjects, config)
    for _ in range(config.batch_size):
        s = draw_subject(subjects, rng, config.balance_groups)
        p = sample_patch(s.grid.array, s.points_ijk, s.level_ids, config.plan.patch_size, spacing, rng,
                         config.augment if augment else None, point_weights=point_w[id(s)])
        level_only = ([int(v) in s.pseudo_ids for v in p.level_ids]
                      if config.extrapolated_level_only and s.pseudo_ids else None)
        t = make_targets(p.image.shape, p.points_ijk, p.level_ids, spacing, levels=config.levels,
                         sigma_mm=config.sigma_mm, level_radius_mm=config.level_radius_mm,
                         span_margin_mm=config.span_margin_mm, offset_radius_mm=config.offset_radius_mm,
                         level_only=level_only)
        if config.offset_radius_mm is not None:
            offs.append(t["offset"] / np.float32(config.offset_radius_mm))
            omasks.append(t["offset_mask"])
        imgs.append(zscore(p.image))
        heats.append(t["heatmap"])
        levs.append(t["levels"])
        weights.append(t["heatmap_weight"])
    batch = {
        "image": torch.from_numpy(np.stack(imgs))[:, None].float(),
        "heatmap": torch.from_numpy(np.stack(heats))[:, None].float(),
        "levels": torch.from_numpy(np.stack(levs)).long(),
        "heatmap_weight": torch.from_numpy(np.stack(weights))[:, None].float(),
    }
    if offs:
        batch["offset"] = torch.from_numpy(np.stack(offs)).float()
        batch["offset_mask"] = torch.from_numpy(np.stack(omasks))[:, None].float()
    return batch


def stage1_loss(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], config: Stage1Config) -> dict[str, torch.Tensor]:
    """Weighted BCE on the heatmap + level cross-entropy (ignore outside the balls) + offset smooth-L1
    (inside the offset balls; absent head or targets -> 0)."""
    target = batch["heatmap"]
    weight = 1.0 + config.heatmap_pos_weight * target
    if "heatmap_weight" in batch:
        weight = weight * batch["heatmap_weight"]
    heat = F.binary_cross_entropy_with_logits(out["heatmap"], target, weight=weight)
    lv = batch["levels"]
    if bool((lv != IGNORE).any()):
        level = F.cross_entropy(out["levels"], lv, ignore_index=IGNORE)
    else:
        level = out["levels"].sum() * 0.0
    offset = out["heatmap"].sum() * 0.0
    if "offset" in out and "offset" in batch:
        m = batch["offset_mask"]
        if bool(m.any()):
            per_voxel = F.smooth_l1_loss(out["offset"], batch["offset"], reduction="none", beta=0.05)
            offset = (per_voxel * m).sum() / (3.0 * m.sum())
    loss = heat + config.level_loss_weight * level + config.offset_loss_weight * offset
    return {"loss": loss, "heatmap": heat, "levels": level, "offset": offset}


def _config_matches_for_resume(a: Stage1Config, b: Stage1Config) -> bool:
    da, db = checkpoint.config_to_dict(a), checkpoint.config_to_dict(b)
    for key in ("epochs", "detilt_reference_deg"):  # the reference is measured on the data (train_stage1)
        da.pop(key), db.pop(key)
    return da == db


def spine_tilts_deg(subjects: list[TrainSubject]) -> np.ndarray:
    """Per training subject with >= 3 annotated (not pseudo) points, the tilt of its spine's axis in its
    prepared grid (``infer.spine_tilt_deg``, degrees): what the network sees, before augmentation."""
    from stage1_localize.infer import spine_tilt_deg

    out = []
    for s in subjects:
        real = [i for i, v in enumerate(s.level_ids) if v not in s.pseudo_ids]
        if len(real) >= 3:
            out.append(spine_tilt_deg(s.grid.voxel_to_world(s.points_ijk[real]).coords, s.grid))
    return np.asarray(out, dtype=np.float64)


def train_stage1(
    data_dir,
    out_dir: str | os.PathLike,
    config: Stage1Config | None = None,
    resume: bool = False,
    *,
    auto_plan: bool = True,
    subjects: list[TrainSubject] | None = None,
) -> Path:
    """Train the stage-1 localiser on ``data_dir`` (a dataset folder or a sequence of folders, balanced
    per ``config.balance_groups``) and write ``out_dir`` (see module docstring).

    ``auto_plan`` replaces ``config.plan`` by the planner's choice for this dataset (ignored on resume,
    where the saved plans are kept). ``subjects`` (already prepared) skips reading ``data_dir``.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = dataclasses.replace(config) if config is not None else Stage1Config()
    if (out_dir / checkpoint.ENSEMBLE).is_file():
        raise SpinepipeInputError(out_dir, "holds a stage-1 ensemble; write a single model to another folder")
    dist_info: DistInfo = init_distributed()
    device = dist_info.device
    state = checkpoint.load_train_state(out_dir) if resume else None
    if state is not None:
        _, saved_cfg, _ = checkpoint.load_model(out_dir, Stage1Config, kind="stage1")
        if auto_plan:
            config = dataclasses.replace(config, plan=saved_cfg.plan)
        if not _config_matches_for_resume(saved_cfg, config):
            raise SpinepipeInputError(out_dir / checkpoint.CONFIG,
                                      "cannot resume: the saved config differs from the requested one (other than epochs)")
    if subjects is None:
        subjects = load_subjects(data_dir, config)
    if state is not None:
        config.detilt_reference_deg = saved_cfg.detilt_reference_deg
    else:  # the de-tilt reference of this model: its training scans' usual spine axis (Stage1Config docs)
        tilts = spine_tilts_deg(subjects)
        if len(tilts):
            config.detilt_reference_deg = round(float(np.median(tilts)), 2)
            log.info("training scans' spine axis in the grid: median %.1f deg (%.1f to %.1f, %d scans): "
                     "de-tilt reference", config.detilt_reference_deg, tilts.min(), tilts.max(), len(tilts))
    # saved as extra["synthetic_only"]: such a model names real scans poorly (the 80-epoch demo model on 16
    # real scans, 8 per cohort: identification 0.47, mean error 19.7 mm; session 30); the Localizer warns
    synthetic = synthetic_only(data_dir)
    if auto_plan and state is None:
        extents = [np.asarray(s.grid.shape) * s.grid.spacing for s in subjects]
        config.plan = plan_network(extents, config.target_spacing, base_features=config.plan.base_features,
                                   max_features=config.plan.max_features)

    try:
        precision = precision_mod.resolve(config.train_precision, device)
    except ValueError as e:
        raise SpinepipeInputError(out_dir / checkpoint.CONFIG, str(e)) from None
    seed_everything(config.seed)
    layout = memory_format(config)
    net = LocalizerNet(config).to(device, memory_format=layout)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = checkpoint.make_ema(net, config.ema_decay)
    start_epoch, rows = 0, []
    if state is not None:
        checkpoint.load_state_into(net, state["model"], out_dir / checkpoint.TRAIN_STATE)
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            checkpoint.load_ema_state(ema, state.get("ema"), out_dir / checkpoint.TRAIN_STATE)
        start_epoch = int(state["epoch"])
        if (out_dir / LOG_FILE).is_file():
            rows = pd.read_csv(out_dir / LOG_FILE).to_dict("records")[:start_epoch]
        log.info("resuming stage-1 training at epoch %d", start_epoch)
    model = net
    if dist_info.distributed:
        # the U-Net keeps per-stage deep-supervision heads that are unused without deep supervision
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            lr = config.lr * (1.0 - epoch / config.epochs) ** 0.9
            for g in opt.param_groups:
                g["lr"] = lr
            rng = np.random.default_rng([config.seed, epoch, dist_info.rank])
            torch.manual_seed(config.seed * 100_003 + epoch)
            model.train()
            sums = torch.zeros(4, dtype=torch.float64)
            for _ in range(config.steps_per_epoch):
                batch = {k: v.to(device) for k, v in make_batch(subjects, config, rng).items()}
                losses = stage1_loss(run_net(model, batch["image"].contiguous(memory_format=layout), precision),
                                     batch, config)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
                opt.step()
                checkpoint.update_ema(ema, net)  # no-op without an average
                sums += torch.tensor([float(losses[k].detach()) for k in ("loss", "heatmap", "levels", "offset")],
                                     dtype=torch.float64)
            if dist_info.distributed:
                torch.distributed.all_reduce(sums)
                sums /= dist_info.world_size
            means = (sums / config.steps_per_epoch).tolist()
            row = {"epoch": epoch + 1, "loss": means[0], "heatmap_loss": means[1], "level_loss": means[2],
                   "offset_loss": means[3], "lr": lr, "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            if dist_info.is_main:
                _save(out_dir, net, opt, config, epoch + 1, rows, subjects, ema, precision, synthetic)
                log.info("epoch %d/%d loss %.4f (heatmap %.4f, levels %.4f, offset %.4f) %.1fs", epoch + 1, config.epochs,
                         *means, row["seconds"])
    finally:
        cleanup_distributed()
    return out_dir


def _save(out_dir: Path, net: torch.nn.Module, opt, config: Stage1Config, epoch: int, rows: list[dict],
          subjects: list[TrainSubject], ema: torch.nn.Module | None = None, precision: str = "float32",
          synthetic: bool = False) -> None:
    """Model folder (the weight average when ``ema`` is given, else the raw weights) + resumable state."""
    state = checkpoint.weights_of(net)
    extra = {"epochs_done": epoch, "n_train_subjects": len(subjects),
             "train_subjects": [s.id for s in subjects][:1000], "torch": torch.__version__,
             "weights": "ema" if ema is not None else "raw", "train_precision": precision,
             "synthetic_only": synthetic}
    checkpoint.save_model(out_dir, checkpoint.weights_of(ema.module) if ema is not None else state, config,
                          kind="stage1", extra=extra)
    train_state = {"epoch": epoch, "model": state, "optimizer": opt.state_dict(),
                   "config": json.dumps(checkpoint.config_to_dict(config))}
    if ema is not None:
        train_state["ema"] = checkpoint.ema_state(ema)
    checkpoint.save_train_state(out_dir, train_state)
    write_csv(pd.DataFrame(rows), out_dir / LOG_FILE)


def _train_member(data_dir, out_dir: Path, config: Stage1Config, resume: bool, threads: int) -> Path:
    """One ensemble member in its own process (:func:`train_stage1_ensemble`), on ``threads`` torch threads."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {out_dir.name}: %(message)s")
    return train_stage1(data_dir, out_dir, config, resume=resume)


def train_stage1_ensemble(data_dir, out_dir: str | os.PathLike, config: Stage1Config | None = None,
                          members: int = 2, resume: bool = False, parallel: bool | None = None) -> Path:
    """Train ``members`` stage-1 models that differ only in their seed (``config.seed + m``) into
    ``out_dir/member<m>/`` and, once all have finished, write ``out_dir/ensemble.json``
    (``{"kind": "stage1-ensemble", "members": [...]}``, :data:`data_prep.checkpoint.ENSEMBLE`), which
    :func:`stage1_localize.infer.model_folders` (hence ``Localizer``, ``localize``, ``predict``) reads as one
    ensemble: the members' maps are averaged.

    ``parallel`` (default: on a CPU without a torchrun group) trains the members at the same time in
    separate processes with ``cpu_count // members`` torch threads each: on the 2-core reference machine
    (session 24, float32) an epoch took 14.5-15 s for each of two one-thread trainings side by side and
    9.0 s for one two-thread training, so the pair costs ~0.8x of training its members one after another
    (the small 3-D convolutions do not keep two threads busy). On a GPU (or with ``parallel=False``) the
    members train one after another in this process.
    """
    out_dir = Path(out_dir)
    config = dataclasses.replace(config) if config is not None else Stage1Config()
    if members < 1:
        raise ValueError(f"members: expected >= 1, got {members}")
    if (out_dir / checkpoint.CONFIG).is_file():
        raise SpinepipeInputError(out_dir, "holds a single stage-1 model; write an ensemble to another folder")
    dirs = [out_dir / f"member{m}" for m in range(members)]
    cfgs = [dataclasses.replace(config, seed=config.seed + m) for m in range(members)]
    if parallel is None:
        parallel = members > 1 and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1
    if (out_dir / checkpoint.ENSEMBLE).is_file():
        (out_dir / checkpoint.ENSEMBLE).unlink()  # retraining: the folder is not an ensemble until every member is done
    if parallel:
        import concurrent.futures
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // members)
        with concurrent.futures.ProcessPoolExecutor(members, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_member, data_dir, d, c, resume, threads) for d, c in zip(dirs, cfgs)]
            for f in futures:
                f.result()
    else:
        for d, c in zip(dirs, cfgs):
            train_stage1(data_dir, d, c, resume=resume)
    write_text(json.dumps({"kind": "stage1-ensemble", "members": [d.name for d in dirs]}, indent=1) + "\n",
               out_dir / checkpoint.ENSEMBLE)
    return out_dir
