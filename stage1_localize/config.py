"""Typed hyper-parameters of stage 1 (saved with the checkpoint as JSON by ``data_prep.checkpoint``).

Everything that changes what the network sees or predicts lives here, so a model folder
(``model.safetensors`` + ``config.json``) is self-describing: ``Localizer`` rebuilds preprocessing,
network and decoding from the JSON alone.

* :class:`NetworkPlan` — the nnU-Net-style "plans": patch size, pooling / kernel topology, features per
  stage. Filled by :func:`stage1_localize.plan.plan_network` from a dataset fingerprint (it calls
  nnU-Net v2's own ``get_pool_and_conv_props``), or left at the defaults below.
* :class:`AugmentConfig` — augmentation strengths (intensity remaps so the net copes with any contrast;
  rotations (sagittal tilt up to 30 deg), scalings, thick-slice simulation, partial field of view,
  left-right flips only).
* :class:`LabellingConfig` — the anatomical prior used by the pure labelling function.
* :class:`Stage1Config` — all of the above plus spacing, target widths, loss weights and optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

#: Default level vocabulary of the level head (VerSe ids, head-to-foot): T8 .. T12, T13, L1 .. L5, L6, S1.
#: Thoracic levels above T11 are included so a thoracolumbar field of view can be named; the
#: transitional T13 (28) and L6 (25) are states the labeller may use (and flags).
DEFAULT_LEVELS: tuple[int, ...] = (15, 16, 17, 18, 19, 28, 20, 21, 22, 23, 24, 25, 26)


@dataclass
class NetworkPlan:
    """nnU-Net-style plans for a ``PlainConvUNet`` (dynamic_network_architectures), voxel axes (i, j, k).

    After canonical reorientation to LPS: i = right->left, j = anterior->posterior, k = inferior->superior.
    """

    patch_size: tuple[int, int, int] = (32, 64, 96)
    pool_kernels: tuple[tuple[int, int, int], ...] = (
        (1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    conv_kernels: tuple[tuple[int, int, int], ...] = (
        (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    base_features: int = 8
    max_features: int = 64
    n_conv_per_stage: int = 2
    n_conv_per_stage_decoder: int = 1

    @property
    def n_stages(self) -> int:
        return len(self.pool_kernels)

    @property
    def features_per_stage(self) -> list[int]:
        return [min(self.base_features * 2**s, self.max_features) for s in range(self.n_stages)]

    @property
    def divisor(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this (product of the pooling strides per axis)."""
        out = [1, 1, 1]
        for pk in self.pool_kernels:
            for a in range(3):
                out[a] *= int(pk[a])
        return tuple(out)  # type: ignore[return-value]


@dataclass
class AugmentConfig:
    """Augmentation strengths (probabilities ``p_*`` per sample). Never flips head-to-foot."""

    p_rotate: float = 0.5
    #: Largest rotation about the left-right axis (sagittal tilt); the other two axes get 0.4 of it
    #: (``augment.sample_patch``). 30 since session 39 (12 before). Two 5-fold runs of each, training seeds 0
    #: and 1, real data, points only, today's decoding, each scan scored by the fold model that never saw it:
    #: a spine tilted in the image grid by -30 / -15 / +15 / +30 deg (de-tilting on; 369 vertebrae per tilt;
    #: bench/results/stage1_robustness_tilt5fold.md) is named far better (see that file: about 0.9 against
    #: 0.5-0.8 at 12 deg), whole scans 0.946 / 0.921 against 0.889 / 0.940 (bench/results/
    #: stage1_caudal_check_rot30.md, stage1_rot30_seed1.md against stage1_caudal_check_default_s37.md,
    #: stage1_caudal_check_seed1.md). The cost, on both seeds: the bottom 60 % field of view (nothing above
    #: L3) 0.840 / 0.816 against 0.888 / 0.874, mostly the sacrum read as "L5" -- with wide rotations the
    #: orientation of a body tells S1 from L5 less reliably.
    max_rotation_deg: float = 30.0
    p_scale: float = 0.5
    scale_range: tuple[float, float] = (0.85, 1.15)
    p_flip_lr: float = 0.5
    p_gamma: float = 0.4
    gamma_range: tuple[float, float] = (0.6, 1.6)
    p_remap: float = 0.4          # random monotone piecewise-linear intensity curve
    p_invert: float = 0.15        # contrast inversion (T1 <-> T2-like)
    p_bias: float = 0.3           # smooth multiplicative bias field
    bias_strength: float = 0.35
    p_noise: float = 0.3
    noise_std: float = 0.05       # relative to the [0, 1] intensity range
    p_blur: float = 0.2
    blur_sigma_vox: tuple[float, float] = (0.5, 1.2)
    p_thick_slices: float = 0.3   # simulate anisotropic acquisition: average k slices along one axis
    thick_factor: tuple[int, int] = (2, 3)
    p_partial_fov: float = 0.3    # blank a head or foot slab (points inside it are dropped)
    #: the blanked slab's share of the patch's head-foot extent, drawn uniformly from this range
    #: (0 <= low <= high < 1). Heavier (``p_partial_fov`` 0.5, (0.15, 0.6)) was tried in session 23 against
    #: partial-field-of-view shifts and lost everywhere on folds 0-2, paired with a default rerun of the same
    #: session: identification 0.952 / 0.930 / 0.675 / 0.787 vs 0.974 / 0.974 / 0.786 / 0.882 (whole, 4-mm
    #: slices, top 60 %, bottom 60 %; bench/results/stage1_fovaug.md vs stage1_rerun_s23.md)
    partial_fov_fraction: tuple[float, float] = (0.15, 0.4)
    p_foreground: float = 0.5     # share of patches centred near an annotated vertebra (nnU-Net style)


@dataclass
class LabellingConfig:
    """Costs of the anatomical labelling (min-cost monotone path; see ``labelling.py``)."""

    #: expected distance (mm) between neighbouring centroids, per level family (population prior; scaled
    #: per scan with ``spacing_scan_rel_sd``)
    spacing_thoracic_mm: float = 28.0
    spacing_lumbar_mm: float = 36.0
    spacing_rel_sd: float = 0.3        # relative standard deviation of the spacing prior
    spacing_weight: float = 1.0
    #: the scan's own spacing prior: a first naming under the population prior above gives the scan's scale
    #: (median observed / expected step over the named run, >= 3 named); the naming is then redone with the
    #: expected spacings times that scale and this narrower relative width. Body size varies between people
    #: more than between neighbours in one spine: on the 67 expert-annotated scans of ../shared/data the
    #: scale has log-sd 0.06 (0.88-1.14) and a step departs from its scan's scale by log-sd 0.05; predicted
    #: centroids add ~4-6 mm of noise to a step (~0.15 relative), hence 0.2. With the population width a
    #: doubled step (a missed body) costs only ~1.2 more than a skip, so a confident level head dropped a
    #: detected body or named across a missed one as one step. Decoding only, paired on the session-18
    #: models (bench/results/stage1_scan_spacing.md vs stage1_msf07.md): identification 0.946 -> 0.959,
    #: all-correct annotated run 59 -> 63 of 67 whole scans, mean error 5.2 -> 4.8 mm, better or equal in all
    #: four variants; one scan lost a vertebra (myosegmentum-013, whose level head counts one level low
    #: below a correctly detected L2). 0.15 (the first value tried, before counting the centroid noise) lost
    #: seven vertebrae where a centroid 8 mm off made two steps disagree; 0.1 lost more. None: off
    spacing_scan_rel_sd: Optional[float] = 0.2
    #: tilt prior: a step between named neighbours more than ``max_tilt_deg`` off the superior (LPS +z)
    #: axis costs ``tilt_weight * (angle - max_tilt_deg)^2 / (2 tilt_sd_deg^2)``. The lumbar curve tilts a
    #: step by up to ~35 deg (L5 on the sacrum); a weak peak on a spinous process, ~45 mm behind its body,
    #: passes the distance prior at a near-horizontal step. On by default: on the 5-fold models of
    #: stage1_completion.md (decoding only, bench/results/stage1_tilt1.md) precision rose in all four variants
    #: (strict 0.803 -> 0.808 whole scans, 0.688 -> 0.726 bottom field of view), all-correct scans (strict) in
    #: all four (0.179 -> 0.194 whole scans), identified vertebrae net unchanged (+1 / +1 / +1 / -3); on the
    #: 80-epoch models identification 0.892 -> 0.900, better or equal in every fold (stage1_e80_tilt1.md). 0: off
    tilt_weight: float = 1.0
    max_tilt_deg: float = 35.0
    tilt_sd_deg: float = 10.0
    #: caudal continuation check (``labelling._CaudalCheck``; needs the level map, ``infer.level_probe``):
    #: the run's last step repeated below its caudal end should land where the level map names the next
    #: level (below L5: S1). Cost ``caudal_check_weight * log(p_best / p_next)`` there; 0: off. Session 38,
    #: decoding only, paired on the same models (identification whole / 4-mm slices / top / bottom 60 %):
    #: session-37 default models 0.856 / 0.889 / 0.808 / 0.874 -> 0.889 / 0.902 / 0.808 / 0.888 (mean error
    #: 7.8 -> 6.7 mm; stage1_default_s37.md -> stage1_caudal_check_default_s37.md); 30-deg models 0.946 /
    #: 0.924 / 0.868 / 0.840 -> 0.946 / 0.943 / 0.868 / 0.840 (stage1_rot30_pad_5fold_rerun.md ->
    #: stage1_caudal_check_rot30.md); a fresh seed-1 run trained after the weight was chosen 0.924 / 0.924 /
    #: 0.908 / 0.859 -> 0.940 / 0.940 / 0.908 / 0.874 (stage1_seed1_base.md -> stage1_caudal_check_seed1.md);
    #: three fold-4 models unchanged. 9 scan copies gained, one lost (a bottom-60 % copy whose spurious
    #: peaks then won). 0.5 was chosen after seeing both first sets: 1.0 gained the same on the default models
    #: but lost three bottom-60 % copies of the 30-deg ones. The probe reads the map where the step lands; moving
    #: it to the heat maximum within 10 mm (a step that lands beside a lordotic L5) was mixed (+10 / -10
    #: vertebrae) and is not done. What it cannot fix: a level map that is shifted below the run as well
    #: (chu2015-019) or a step that lands off the body (myosegmentum-008)
    caudal_check_weight: float = 0.5
    skip_cost: float = 1.5             # one missing (undetected) level between two kept candidates
    max_skip: int = 1                  # at most this many missing levels between kept candidates
    drop_bias: float = 1.0             # cost of discarding a candidate at the score floor
    drop_score_weight: float = 1.0     # ... plus this times log(score / score_floor)
    score_floor: float = 0.1           # candidates are peaks above this (keep = Stage1Config.peak_threshold)
    transitional_cost: float = 2.5     # prior cost of using T13 or L6 (about 5-10 % prevalence)
    ambiguity_margin: float = 2.0      # cost gap under which an alternative labelling is flagged
    #: a dropped candidate at least this strong, one plausible vertebral step beyond either end of the
    #: named run, flags the run "level_ambiguous" (a count conflict: one more body than names); 1.0: off
    conflict_score: float = 0.4
    min_prob: float = 1e-4             # floor on probabilities before taking logs
    #: after naming (``labelling.complete_run``): report each standard level the path skipped (L1 -> L3:
    #: L2 undetected) at its interpolated place, moved to the heat maximum nearby; flag "interpolated"
    fill_gaps: bool = True
    #: ... and one level beyond each end of the named run (last step repeated) where the heat nearby
    #: reaches ``fill_min_heat``, e.g. a weak T11 on the slope of T12's peak (no local maximum of its own,
    #: so never a candidate); flag "extrapolated". Both on by default: on the same 5-fold models (60
    #: epochs) identification 0.808 -> 0.870, chu2015 0.689 -> 0.824, precision 0.870 -> 0.803 strict /
    #: 0.901 -> 0.875 annotated run (bench/results/stage1_completion.md vs stage1_rerun_s13.md; most added
    #: vertebrae the benchmark cannot score: a T12 above myosegmentum's L1)
    extend_ends: bool = True
    #: how many levels to add beyond each end, one at a time (each step repeats the last one; stops at
    #: the first level without heat): 2 would reach a chu2015 T11 above an extrapolated T12; on the re-run S1
    #: models it changed nothing (no heat there; bench/results/stage1_sacrum_msf07_ext2.md)
    extend_levels: int = 1
    #: a probed gap / end position closer than this fraction of the local step to a named neighbour is the
    #: shoulder of that neighbour's peak, not another body (a gap keeps its interpolated point, an end adds
    #: nothing). 0.7 (0.6 until session 19): adjacent centroids closer than 0.7 of the neighbouring step
    #: are anatomically implausible from T10 to L5; the peaks found there belong to a body cut by the field
    #: of view. Decoding only, paired on the same models: session-18 default models (stage1.md ->
    #: stage1_msf07.md) all-correct annotated run 57 -> 59 of 67 whole scans, better or equal in all four
    #: variants, no vertebra lost, identification unchanged (0.946); re-run S1 models: one false T12 removed,
    #: nothing lost (stage1_sacrum_msf07.md). Chosen after looking at the session-18 failures (T12 / T10
    #: completions at 0.63-0.69 of the step), so the gain on these scans is optimistic.
    min_step_fraction: float = 0.7
    #: an end level whose repeated step finds no heat (or only a neighbour's shoulder) is still added at
    #: the repeated step itself when that point lies at least this far (mm) inside the scan's field of view:
    #: the spine does not stop between two visible bodies, so a body is there even where the detector is
    #: blind (chu2015's T11s two steps above L1 have heat 0.03-0.04). Flag "extrapolated_no_heat" (no image
    #: evidence; confidence = the heat found). An end level found *with* heat must lie this deep too: nearer
    #: the edge the body is cut and its centroid is out of view (the T12 on myosegmentum's top border).
    #: Needs the field of view (``complete_run(..., fov_depth=...)``); never S1 or a transitional level;
    #: ``None``: off. 15 mm = about half a lumbar body height plus a margin, chosen before measuring, not
    #: tuned. Decoding only, paired on the same models: session-17 default models (stage1_rerun_s17.md ->
    #: stage1_rerun_s17_inside15.md) identification 0.846 -> 0.859, all-correct annotated 40 -> 46 of 67
    #: whole scans, better or equal in all four variants, no vertebra lost; session-16 S1 models 0.916 -> 0.935,
    #: 52 -> 60 of 67 (stage1_sacrum_inside15_depth.md)
    extend_inside_mm: Optional[float] = 15.0
    fill_min_heat: float = 0.1         # heat needed to move a gap / to add an end level
    fill_search_mm: float = 10.0       # search radius around the interpolated / extrapolated point


@dataclass
class Stage1Config:
    """All stage-1 hyper-parameters (saved in ``config.json``)."""

    target_spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    levels: tuple[int, ...] = DEFAULT_LEVELS
    in_channels: int = 1
    plan: NetworkPlan = field(default_factory=NetworkPlan)
    # intensity normalisation: percentile clip then z-score (robust to any scaling / contrast)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    # targets
    sigma_mm: float = 6.0              # Gaussian width of the centre heatmap
    level_radius_mm: float = 12.0      # level head supervised inside balls of this radius
    heatmap_pos_weight: float = 20.0   # BCE weight multiplier on the Gaussian (foreground is tiny)
    #: offset head: per-voxel vector (mm) to the nearest centroid, supervised within this radius; it
    #: corrects the coarse heatmap peak at decoding (``targets.offset_map``). None: no offset head.
    offset_radius_mm: Optional[float] = 12.0
    offset_loss_weight: float = 1.0
    #: pseudo-centroids added above the most cranial annotated level by repeating the last step
    #: (L1-L5 annotated -> T12 extrapolated; ``targets.extrapolate_cranial``); 0: off. Experimental: on
    #: fold 0 of the real benchmark it lowered identification in every trial (bench/results/stage1_*_f0.md)
    extrapolate_cranial: int = 0
    #: pseudo-centroids added below the most caudal annotated level (L5 annotated -> S1 one step below;
    #: ``targets.extrapolate_caudal``), so the level head learns to call the sacrum S1; 0: off.
    #: With ``extrapolated_level_only``, on by default since session 17. Two 5-fold trainings each on the
    #: real benchmark: identification 0.921 / 0.916 (stage1_sacrum.md, stage1_sacrum_rerun.md) against
    #: 0.900 / 0.846 without (stage1_e80_tilt1.md, stage1_rerun_s17.md), mean error 5.3 / 5.4 vs 7.0 / 7.9 mm,
    #: precision strict 0.825 / 0.837 vs 0.816 / 0.793; the same-code pair with today's decoding
    #: (stage1_sacrum_inside15_depth.md vs stage1_rerun_s17_inside15.md): 0.935 vs 0.859, all-correct
    #: annotated 0.896 vs 0.687. All-correct under the old decoding was mixed (0.61 / 0.78 vs 0.73 / 0.60)
    extrapolate_caudal: int = 1
    #: one S1 pseudo-point per angle: the extrapolated step into S1 turned this many degrees towards
    #: posterior (lumbosacral angle) and scaled by ``sacral_step_scale`` (``targets.extrapolate_caudal``).
    #: An arc (15, 30, 45) x 0.85 on folds 0-3: 0.856 vs 0.896 without S1 (stage1_sacrum_arc_f0123.md)
    sacral_bend_deg: tuple[float, ...] = (0.0,)
    sacral_step_scale: float = 1.0
    #: extrapolated pseudo-centroids supervise only the level head (not the heatmap, offsets or span) and
    #: are never drawn as the centre of a foreground patch (default since session 17, with extrapolate_caudal)
    extrapolated_level_only: bool = True
    # heatmap loss ignored beyond this margin outside the annotated run of levels (None: off); see targets.py
    span_margin_mm: Optional[float] = 20.0
    level_loss_weight: float = 1.0
    # training. 80 epochs (60 until session 14): the loss is still falling at 60; on the same folds trained the
    # same way (one thread each, session 13) 80 epochs identified 0.851 vs 0.808 plain, 0.892 vs 0.870 with run
    # completion, 0.900 vs 0.873 with completion + tilt prior (stage1_e80*.md vs stage1_rerun_s13 /
    # stage1_completion / stage1_tilt1), all-correct annotated run 0.73 vs 0.54; 888 s for the slowest fold on
    # both cores (budget 20 min)
    epochs: int = 80
    steps_per_epoch: int = 25
    batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-5
    #: keep the network's weights and activations channels-last (``torch.channels_last_3d``) in training and
    #: inference: the same arithmetic up to float rounding (outputs within 1e-5), faster 3-D convolutions on
    #: CPU (oneDNN). On this 2-core machine a network step takes 0.76-0.82 x the time of the contiguous
    #: layout and 20 steps of the real training loop (data, loss, optimiser) 0.79-0.91 x, paired in one
    #: process (``bench/bench_stage1_speed.py`` -> bench/results/stage1_speed.md; 0.79-0.80 on real 28 x 80
    #: x 80 patches); sliding-window prediction 0.95-0.99 x. A real fold-0 training (80 epochs) took 1254 s
    #: (bench/results/stage1_cl_f0.md). False: the contiguous layout (older models load either way)
    channels_last: bool = True
    #: arithmetic of the network passes in inference (``data_prep.precision``): "bfloat16" (autocast mixed
    #: precision: weights and maps stay float32), "float32", or "auto" (bfloat16 where the device computes
    #: it natively: AVX512-BF16 / AMX CPUs, bfloat16 CUDA devices). Older models (saved without the field)
    #: get this default. On the session-23 float32 models (folds 0-2, 41 scans) bfloat16 inference named
    #: the same vertebrae on whole, anisotropic and top-60 % scans and one fewer on the bottom 60 % (0.882
    #: -> 0.874) (bench/results/stage1_bf16_infer.md vs stage1_rerun_s23.md), at 0.57 s per scan on fold 2
    #: (1.3-1.6 s in float32 runs); a sliding-window prediction takes 0.32x the float32 time, paired in one
    #: process (bench/bench_stage1_speed.py -> stage1_speed.md)
    precision: str = "auto"
    #: the same for the training's network passes (losses, weights, optimiser state stay float32); the
    #: value it resolved to is saved in the model's ``extra["train_precision"]``. float32 by default:
    #: bfloat16 saves little training time (session 24, fold 2 alone on both cores: median epoch 7.8 vs
    #: 9.0 s float32; two one-thread trainings side by side: 11-12 vs 14.5-15 s) and named worse: on
    #: folds 0 / 1 two bfloat16 seeds identified 1.000 / 0.821 and 1.000 / 0.833 (142 and 143 of 156
    #: vertebrae), three float32 runs 0.936 / 1.000,
    #: 1.000 / 0.936 and 0.936 / 0.936 (151, 151, 146); seed 0 on folds 0-2 0.916 against 0.974 / 0.956
    #: (stage1_bf16.md, stage1_bf16s1_f*.md, stage1_fp32s1_f*.md vs stage1_rerun_s23.md, stage1_scan_spacing.md).
    #: Every bfloat16 run named the same three or four fold-1 scans one level off, float32 runs one at most.
    #: (On the CPU, InstanceNorm also runs in bfloat16 under autocast; whether a float32 norm would close
    #: the gap is not measured.)
    train_precision: str = "float32"
    #: > 0: the saved model is an exponential moving average of the training weights (``decay`` per step;
    #: torch.optim.swa_utils, ``data_prep.checkpoint.make_ema``); the last raw weights stay in
    #: ``train_state.pt``. 0: the saved model is the last raw weights.
    ema_decay: float = 0.0
    seed: int = 0
    #: several dataset folders (sites / cohorts): draw each folder equally often, then a subject in it
    balance_groups: bool = True
    #: foreground patches centre on a vertebra drawn with probability ~ count(level) ** -level_balance_power
    #: (count = training vertebrae of that level; nnU-Net's class-balanced foreground sampling), so rare
    #: levels (T11 / T12, annotated in one cohort only) are centred more often; see
    #: ``train.level_balanced_weights``. On by default at power 0.5: over 5 folds against a same-code,
    #: same-machine rerun without it (stage1_balance05.md vs stage1_rerun_s10.md) the pooled id rate rose
    #: 0.840 -> 0.878 (4 of 5 folds better), all-correct (annotated run) 0.61 -> 0.69, chu2015's T11 0 -> 4 / 17
    #: and T12 4 -> 11 / 17, partial fields of view unchanged (0.60 / 0.75), but the median error rose
    #: 3.5 -> 4.3 mm. Full balance (power 1) on fold 0 doubled the error (stage1_balance_levels_f0).
    balance_levels: bool = True
    #: with ``balance_levels``: weights ``count(level) ** -power`` (1: full class balance, 0: uniform)
    level_balance_power: float = 0.5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # decoding. Candidates are cheap: the labeller drops spurious ones (cost rising with the peak height)
    # and the spacing prior rejects those that break the sequence, so the threshold is low. On the 5-fold
    # models of bench/results/stage1.md, 0.25 -> 0.1 raised the pooled identification rate 0.74 -> 0.83 by
    # recovering the weaker end-of-run peaks (L5, T11/T12); bench/results/stage1_decode_thr0.1.md.
    peak_threshold: float = 0.1
    #: inference: sliding window with the training patch size (nnU-Net style) instead of the whole volume
    sliding_window: bool = True
    #: inference: a volume smaller than the training patch along every axis is padded (with its minimum,
    #: like the blank beyond a training patch's field of view) to the patch instead of only to the
    #: pooling divisor, so the network sees the extent it was trained on (``model.predict_sliding_window``).
    #: Session 37: a myosegmentum scan (26 x 75 x 75 on the 3-mm grid) fits the 28 x 80 x 80 patch either way,
    #: but its top / bottom 60 % copies (26 x 75 x 45) were seen as 28 x 80 x 48 inputs. Three fold-4
    #: models, top / bottom 60 % identification without -> with: 0.878 / 0.846 -> 1.000 / 0.923, 0.735 /
    #: 0.846 -> 0.837 / 0.846, 0.816 / 0.256 -> 0.939 / 0.692 (bench/results/stage1_pad_f4_*.md); five
    #: default models (one per fold) 0.680 / 0.825 -> 0.808 / 0.874 (stage1_default_s37{_nopad,}.md), whole
    #: scans identical. False: the former behaviour. Models saved before it get True as well (decoding only).
    pad_to_patch: bool = True
    #: test-time augmentation: also predict the left-right mirrored volume and average (a lateral flip
    #: keeps every level name; offsets' i component is negated back). Doubles inference time.
    tta_flip_lr: bool = True
    #: decoding: place each peak with the offset head (when the model has one); False = heatmap-weighted
    #: mean of the peak neighbourhood (for ablations of the offset head on a trained model)
    use_offsets: bool = True
    #: decoding: candidates from the offset head's votes (every voxel with heat >= peak_threshold votes at
    #: voxel + offset; peaks of the smoothed vote map, scored by the heat there; ``infer.vote_peaks``)
    #: instead of local maxima of the heatmap, which merge two vertebrae whose blobs form one ridge.
    #: Off: on the 5-fold models it lowered identification 0.846 -> 0.824 (stage1_decode_offset_voting.md)
    offset_voting: bool = False
    nms_radius_mm: float = 15.0
    max_candidates: int = 40
    border_mm: float = 12.0            # centroid closer than this to the volume edge -> "cut_by_fov"
    #: test-time de-tilting (``infer.spine_tilt_deg`` / ``infer.detilt_direction``): when at least
    #: ``detilt_min_named`` vertebrae are named and their axis (median step angle) lies more than
    #: ``detilt_min_deg`` off ``detilt_reference_deg`` in the sagittal plane of the prepared grid, the scan is
    #: prepared again on a grid rotated about its left-right axis so that the axis lies at the reference, and
    #: localised there (world positions are exact on either grid). The network sees tilts only up to
    #: ``augment.max_rotation_deg`` (30 since session 39; 12 when this was measured) around the training
    #: scans' own. The reference is set by
    #: ``train.train_stage1`` to the median over its training scans (on the 67 real scans of ../shared/data
    #: the whole annotated run lies at 3.3-17.1 deg, median 10.2, +: the upper end posterior; on the built-in
    #: synthetic scans at -23 to +7, median -1.4); None (models saved before session 36): off.
    #: The lumbar curve makes a short run's axis differ from the whole spine's: on the real scans' expert
    #: centroids runs of 5 / 4 / 3 consecutive vertebrae lie up to 6.9 / 13.2 / 24.5 deg from the median
    #: (beyond 12 deg: 0 of 101 / 1 of 168 / 28 of 235), hence 12 deg and at least 4 named
    #: (``bench/stage1_robustness.py``, axis table). Session 36, fold-4 model of the 5-fold benchmark on its
    #: 13 held-out scans resampled onto grids tilted by -30 / -15 / +15 / +30 deg: identification 0.296 /
    #: 1.000 / 0.775 / 0.028 without (a tilted spine reads the sacrum as "L5", every name one level high),
    #: 0.775 / 0.972 / 0.845 / 1.000 with; the unperturbed scans, their anisotropic and partial-field-of-view
    #: copies unchanged (one bottom-60 % copy resampled; bench/results/stage1_robustness*.md,
    #: stage1_detilt_f4_on/off.md); a second fold-4 model 0.282 / 0.831 / 0.620 / 0.085 without, 0.606 /
    #: 0.789 / 0.690 / 0.211 with (stage1_robustness_default_f4_tilts*.md): better on average, not at -15.
    #: Session 39, the 30-deg default (seed-0 models, all 5 folds, stage1_robustness_tilt5fold.md): 0.659 /
    #: 0.829 / 0.946 / 0.642 without, 0.927 / 0.862 / 0.911 / 0.905 with -- still needed at +-30. 0: off
    detilt_min_deg: float = 12.0
    detilt_min_named: int = 4
    detilt_reference_deg: Optional[float] = None
    labelling: LabellingConfig = field(default_factory=LabellingConfig)

    @property
    def n_levels(self) -> int:
        return len(self.levels)
