"""Stage-2 benchmark on SEMI-SYNTHETIC data: real scans from ../shared/data with inserted lesions.

    python bench/bench_stage2.py [--quick] [--data ../shared/data] [--work /tmp/spinepipe_bench_stage2]

Every number here comes from real MRI into which ``data_prep.lesions`` inserted simulated corner
lesions, so every table is labelled **semi-synthetic**. Sections (each appended to
``bench/results/stage2.json`` and ``stage2.md`` as soon as it finishes):

1. ``cv``: cross-validation grouped by subject (both cohorts pooled): per-class AUC, balanced accuracy,
   Cohen's kappa; with given masks and with the seg head's own region; evidence mass inside the body
   (Integrated Gradients) and pointing game on lesion vertebrae.
2. ``leakage``: a lesion planted in one vertebra only (``plant_in_neighbour``): how much do the
   neighbours' probabilities move (should be ~0: their regions exclude the planted body).
3. ``ablation``: heads (cls only / +seg / +seg+heatmap / all) x training subjects (10 / 25 / all).
4. ``site_shift``: train on one cohort, test on the other.
   (``--ablation-sizes`` / ``--ablation-heads`` / ``--site-shift-train`` pick rows of 3 and 4, so that
   processes can share them out; ``--merge`` joins their files.)
5. ``annotation``: full masks vs real loose outlines vs boxes vs points (simulated from the masks):
   accuracy and centre-body Dice of the seg head against the expert masks.
6. ``times``: training seconds per epoch, inference seconds per vertebra with / without evidence.

``--quick`` runs everything on a handful of subjects for 2-3 epochs (a smoke test of the harness, not a
result). Never edit the results files by hand.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from bench.overrides import override_config  # noqa: E402
from data_prep.distributed import DistInfo  # noqa: E402
from data_prep.scan import anatomical_rank, level_name  # noqa: E402
from stage2_classify.config import HeadsConfig, Stage2Config, contrast_index  # noqa: E402
from stage2_classify.evidence import (default_baseline, depth_profile, fraction_inside,  # noqa: E402
                                      integrated_gradients, pointing_game, region_shapley)
from stage2_classify.infer import predicted_body  # noqa: E402
from stage2_classify.patches import vertebra_region  # noqa: E402
from stage2_classify.train import Sample, Stage2Trainable, build_samples, collate, train_on_samples  # noqa: E402

log = logging.getLogger("bench_stage2")
LABEL = "semi-synthetic"
COHORTS = ("myosegmentum", "chu2015")


# ---------------------------------------------------------------------------------------------
# metrics (pipeline/metrics.py when present)
# ---------------------------------------------------------------------------------------------
def _metrics(y: np.ndarray, p: np.ndarray, n_classes: int) -> dict:
    from pipeline.metrics import balanced_accuracy, cohen_kappa, one_vs_rest_auc

    pred = p.argmax(1)
    auc = one_vs_rest_auc(y, p, n_classes)
    return {"n": int(len(y)), "auc": [None if np.isnan(a) else round(float(a), 4) for a in auc],
            "balanced_accuracy": round(balanced_accuracy(y, pred), 4), "kappa": _r(cohen_kappa(y, pred)),
            "class_counts": np.bincount(y, minlength=n_classes).tolist()}


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else round(float(x), nd)


# ---------------------------------------------------------------------------------------------
# results writer
# ---------------------------------------------------------------------------------------------
class Results:
    def __init__(self, out_dir: Path, meta: dict, name: str = "stage2"):
        self.out_dir = out_dir
        self.name = name
        self.data = {"label": LABEL, "meta": meta, "sections": {}}

    def add(self, name: str, value) -> None:
        self.data["sections"][name] = value
        self.write()

    def write(self) -> None:
        from data_prep.io import write_text

        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(json.dumps(self.data, indent=1, default=float) + "\n", self.out_dir / f"{self.name}.json")
        write_text(self.markdown(), self.out_dir / f"{self.name}.md")

    def markdown(self) -> str:
        m = self.data["meta"]
        lines = [f"# Stage 2 benchmark ({LABEL})", "",
                 f"Real scans from `{m.get('data')}` with lesions inserted by `data_prep.lesions` "
                 f"(seed {m.get('seed')}); quick={m.get('quick')}; device {m.get('device', 'cpu')}; config overrides "
                 f"{m.get('overrides') or 'none'}. All numbers are **{LABEL}**.", ""]
        for name, sec in self.data["sections"].items():
            if name in JSON_ONLY:
                lines += [f"## {name} ({LABEL})", "", f"{len(sec)} rows, in the JSON file only.", ""]
                continue
            lines.append(f"## {name} ({LABEL})")
            lines.append("")
            lines += md_table(sec if isinstance(sec, list) else [sec], _fmt)
            lines.append("")
        return "\n".join(lines)


JSON_ONLY = {"cv_predictions", "unseen_lesions_predictions"}  # sections too long for the markdown table

#: Lesion-simulator settings of the "unseen lesion style" test (``--unseen-lesions``): the held-out subjects
#: get a second, independent draw of lesions whose shape, site, size, edge and texture distributions differ
#: from the training simulator's defaults (rounded instead of mostly triangular, mostly posterior instead of
#: mostly anterior, larger and taller, rougher, blurrier, more textured, more often two per vertebra). The
#: contrast physics (which sequence shows which lesion bright or dark, and by how much) is unchanged. A proxy
#: for lesions the project did not generate, not a substitute for real ones.
UNSEEN_LESION_STYLE = ["triangle_prob=0.0", "anterior_prob=0.3", "depth_fraction=[0.3, 0.6]", "aspect=[1.2, 2.0]",
                       "edge_irregularity=0.35", "texture_strength=[0.1, 0.25]", "pv_sigma_mm=2.0",
                       "second_lesion_prob=0.5"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "" if v is None else str(v)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def prepare(data: Path, work: Path, seed: int, n_per_cohort: int | None, lesion_config=None) -> dict[str, Path]:
    """Semi-synthetic copies of each cohort (cached in ``work``)."""
    from data_prep.lesions import make_semisynthetic

    out = {}
    for c in COHORTS:
        src = data / c
        ids = sorted(p.name[: -len("_image.nii.gz")] for p in src.glob("*_image.nii.gz"))
        if n_per_cohort:
            ids = ids[:n_per_cohort]
        dst = work / f"semi_{c}_{len(ids)}"
        if not (dst / "vertebra_labels.csv").is_file():
            log.info("inserting lesions into %d %s scans (%s)", len(ids), c, LABEL)
            make_semisynthetic(src, dst, seed, config=lesion_config, ids=ids)
        out[c] = dst
    return out


def script_samples(cfg: Stage2Config, data: Path, work: Path, seed: int, cache: Path | None,
                   logger: logging.Logger) -> tuple[list[Sample], str] | None:
    """The benchmark's full-mask samples for the no-training scripts (``stage2_ceiling``, ``stage2_baseline``):
    from ``cache`` (a ``--samples-cache`` file) when given, else built from ``data`` (lesion seed ``seed``,
    semi-synthetic copies in ``work``). Returns ``(samples, source)``, or None after logging one error line
    (missing cache file or data folder)."""
    if cache is not None:
        if not cache.is_file():
            logger.error("--samples-cache %s: no such file", cache)
            return None
        return load_sample_cache(cache, cfg), str(cache)
    if not (data / "myosegmentum").is_dir():
        logger.error("real data not available: %s is absent; nothing measured", data)
        return None
    return load_samples(prepare(data, work, seed, None), cfg, "full"), str(data)


def weak_copy(src: Path, work: Path, kind: str, seed: int) -> Path:
    from data_prep.weak_labels import derive_weak_labels

    dst = work / f"{src.name}_{kind}"
    if not (dst / "vertebra_labels.csv").is_file():
        derive_weak_labels(src, dst, kind, seed, keep_full_masks=False)
        for extra in src.glob("*_lesions.nii.gz"):
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst


def load_samples(folders: dict[str, Path], cfg: Stage2Config, annotation: str = "full") -> list[Sample]:
    out: list[Sample] = []
    for f in folders.values():
        out.extend(build_samples(f, cfg, annotation=annotation))
    return with_contrast(out)


def with_contrast(samples: list[Sample]) -> list[Sample]:
    """Set each sample's image contrast from its cohort (:data:`data_prep.lesions.COHORT_CONTRAST`; the
    simulator inserted the lesions with that contrast's polarity). Returns ``samples``."""
    from data_prep.lesions import COHORT_CONTRAST

    for s in samples:
        s.contrast = COHORT_CONTRAST.get(cohort_of(s.subject), "")
    return samples


CACHE_LO, CACHE_SCALE = 0.25, 255.0 / 2.5  # uint8 code = (x + 0.25) * 102


def save_sample_cache(samples: list[Sample], cfg: Stage2Config, path: Path) -> None:
    """Write ``samples`` compactly (lzma pickle; images quantised to 8 bits over [-0.25, 2.25] of the
    normalised window, step 0.0098, below the MRI noise of marrow (~0.07); float16 heatmaps, int8/bool
    masks) with the patch configuration they were built with."""
    import dataclasses
    import lzma
    import pickle

    rows = []
    for s in samples:
        t = s.targets
        rows.append({"image": np.clip(np.round((s.image + CACHE_LO) * CACHE_SCALE), 0, 255).astype(np.uint8), "cls": s.cls,
                     "confidence": s.confidence, "subject": s.subject, "label": s.label,
                     "centre_signature": s.centre_signature,
                     "targets": {f.name: _compact(getattr(t, f.name)) for f in dataclasses.fields(t)}})
    path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(path, "wb", preset=6) as fh:
        pickle.dump({"patch": dataclasses.asdict(cfg.patch), "margin_mm": cfg.margin_mm, "rows": rows}, fh)


def _compact(a):
    """int64 label arrays that fit -> int8, float arrays -> float16; anything else unchanged (exact)."""
    if not isinstance(a, np.ndarray):
        return a
    if a.dtype == np.int64 and (a.size == 0 or (a.min() >= -128 and a.max() <= 127)):
        return a.astype(np.int8)
    if a.dtype.kind == "f":
        return a.astype(np.float16)
    return a


def load_sample_cache(path: Path, cfg: Stage2Config) -> list[Sample]:
    """Samples written by :func:`save_sample_cache` (our own file; refuses a different patch config)."""
    import dataclasses
    import lzma
    import pickle

    from stage2_classify.patches import PatchTargets

    with lzma.open(path, "rb") as fh:
        d = pickle.load(fh)  # noqa: S301 - a cache this script wrote, never user input
    same = json.dumps(d["patch"]) == json.dumps(dataclasses.asdict(cfg.patch))
    if not same or d["margin_mm"] != cfg.margin_mm:
        raise SystemExit(f"error: {path}: built for patch {d['patch']} margin {d['margin_mm']}, "
                         f"this run uses {dataclasses.asdict(cfg.patch)} margin {cfg.margin_mm}")
    out = []
    for r in d["rows"]:
        t = {k: (v.astype(np.int64) if isinstance(v, np.ndarray) and v.dtype == np.int8 else
                 v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float16 else v)
             for k, v in r["targets"].items()}
        out.append(Sample(r["image"].astype(np.float32) / CACHE_SCALE - CACHE_LO, PatchTargets(**t), r["cls"], r["confidence"],
                          r["subject"], r["label"], centre_signature=r.get("centre_signature")))  # absent: older cache
    return with_contrast(out)


def folds_by_subject(samples: list[Sample], k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    subjects = sorted({s.subject for s in samples})
    rng = np.random.default_rng(seed)
    rng.shuffle(subjects)
    groups = [set(subjects[i::k]) for i in range(k)]
    return [([i for i, s in enumerate(samples) if s.subject not in g], [i for i, s in enumerate(samples) if s.subject in g])
            for g in groups]


# ---------------------------------------------------------------------------------------------
# training / evaluation
# ---------------------------------------------------------------------------------------------
def train(samples: list[Sample], cfg: Stage2Config, runs: Path, tag: str,
          device: str = "cpu", on_epoch=None) -> tuple[Stage2Trainable, float]:
    """Train on ``samples``; checkpoints go to ``runs/<tag>`` (``runs`` = ``<work>/runs/<--name>``, so
    concurrent benchmarks with different names can share one ``--work`` and its semi-synthetic data).
    ``on_epoch(epoch, module, log_row)``, if given, runs after every epoch (learning curves; it sees the raw
    training weights). Returns the model as saved (the weight average with ``train.ema_decay`` > 0, loaded
    back from the folder; its ``raw`` attribute then holds the last raw weights) and seconds per epoch."""
    holder: dict = {}
    t0 = time.time()

    def callback(e, m, row):
        holder["module"] = m
        if on_epoch is not None:
            on_epoch(e, m, row)

    train_on_samples(samples, cfg, runs / tag, dist_info=DistInfo(0, 1, 0, torch.device(device)), callback=callback)
    secs = (time.time() - t0) / max(cfg.train.epochs, 1)
    module = holder["module"]
    if cfg.train.ema_decay > 0:
        raw, module = module, load_trained(runs / tag, cfg, device)
        module.raw = raw
    return module, secs


def _inference_region(net, img: torch.Tensor) -> np.ndarray:
    """The region inference builds without masks for one patch ``(1, 1, I, J, K)`` -> ``(I, J, K)`` bool."""
    body, others, _ = predicted_body(net, img)
    return vertebra_region(body, net.margin_vox, others)


@torch.no_grad()
def predict(module: Stage2Trainable, samples: list[Sample], predicted_region: bool = False, bs: int = 8,
            flip_lr: bool = False):
    """Class probabilities ``(N, K)`` of ``samples`` (and body Dice per sample with ``predicted_region``).
    ``flip_lr``: test-time augmentation, the mean of the probabilities of each patch and its left-right
    mirror (axis I of the LPS patch; training flips left-right too)."""
    net = module.net.eval()
    dev = next(net.parameters()).device
    probs, dices = [], []
    for i in range(0, len(samples), bs):
        b = {k: v.to(dev) for k, v in collate(samples[i : i + bs]).items()}
        if predicted_region and "seg" in net.heads:
            seg = net.forward_dense(b["image"])["seg"]
            # the region as inference builds it (stage2_classify.infer.predicted_body: the component nearest
            # the patch centre, or the prior when the head finds nothing), dilated by the margin but not
            # onto the bodies the head calls neighbours
            region = torch.stack([
                torch.from_numpy(_inference_region(net, b["image"][n:n + 1]).astype(np.float32))[None]
                for n in range(b["image"].shape[0])]).to(dev)
            pb = net.body_probability(seg) > 0.5
            body = b["body"] > 0.5
            inter = (pb & body).flatten(1).sum(1).float()
            dices.extend((2 * inter / (pb.flatten(1).sum(1) + body.flatten(1).sum(1)).clamp_min(1)).tolist())
        else:
            region = b["region"]
        p = torch.softmax(net.forward_cls(b["image"], region, b["contrast"]), 1)
        if flip_lr:
            mirrored = net.forward_cls(torch.flip(b["image"], dims=[2]), torch.flip(region, dims=[2]), b["contrast"])
            p = 0.5 * (p + torch.softmax(mirrored, 1))
        probs.append(p.cpu())
    return torch.cat(probs).numpy(), dices


#: Voxels averaged per class by :func:`predict_lesion_head` (about a 2 x 2 x 2 cube at 2 mm).
LESION_TOP_K = 8


@torch.no_grad()
def predict_lesion_head(module: Stage2Trainable, samples: list[Sample], bs: int = 8) -> np.ndarray | None:
    """A verdict read off the voxel-level lesion head of the classification path alone (diagnostic, no MLP):
    per lesion class k the mean of its ``LESION_TOP_K`` highest voxel probabilities inside the pooling mask,
    and 1 - the largest of those for "normal"; rows renormalised to sum to 1. ``(N, K)``; None when the
    model has no lesion head (``heads.seg`` or ``heads.cls`` off)."""
    net = module.net.eval()
    if not getattr(net, "lesion_typing", False):
        return None
    dev = next(net.parameters()).device
    rows = []
    for i in range(0, len(samples), bs):
        b = {k: v.to(dev) for k, v in collate(samples[i : i + bs]).items()}
        path = net.classification_path(b["image"], b["region"], b["contrast"])
        p = torch.softmax(path["lesion"], 1)[:, 1:] * (path["pool"] > 0.5)  # (B, K-1, I, J, K), 0 outside
        top = p.flatten(2).topk(min(LESION_TOP_K, p[0, 0].numel()), dim=-1).values.mean(-1)  # (B, K-1)
        s = torch.cat([1.0 - top.amax(1, keepdim=True), top], 1)
        rows.append((s / s.sum(1, keepdim=True).clamp_min(1e-6)).cpu())
    return torch.cat(rows).numpy()


def evidence_stats(module: Stage2Trainable, samples: list[Sample], n_max: int, steps: int) -> dict:
    """Integrated Gradients on the first ``n_max`` test vertebrae: share of |IG| inside the expert body with
    the given region and with the region inference predicts, pointing game on lesion vertebrae, and the
    completeness gap |sum IG - (f(x) - f(baseline))| / |f(x) - f(baseline)|. Also, paired on the same
    vertebrae, the all-zeros baseline used before session 21 (degenerate with region_norm; see
    ``stage2_classify.evidence``), so that old and new numbers can be compared. With the default baseline,
    also the share of |IG| per voxel layer around the body surface (``depth_profile``) and the body's share
    of the two-group Shapley values, body vs margin (``region_shapley``: |phi_body| / (|phi_body| +
    |phi_margin|)), and the share of |image - baseline| inside the body (IG is that difference times the
    mean gradient along the path, so this is what IG would give for a network weighing every voxel alike)."""
    net = module.net.eval()
    dev = next(net.parameters()).device
    inside, inside_pred, hits, gaps = [], [], [], []
    inside0, hits0, gaps0 = [], [], []
    profiles, shapley, diff_inside = [], [], []
    for s in samples[:n_max]:
        img = torch.from_numpy(s.image)[None, None].to(dev)
        reg = torch.from_numpy(s.targets.region.astype(np.float32))[None, None].to(dev)
        ci = contrast_index(s.contrast)
        with torch.no_grad():  # the default baseline, computed once for IG, the Shapley groups and the difference
            blur = default_baseline(net, img, reg)
        for base, ins, hit, gap in ((blur, inside, hits, gaps), (torch.zeros_like(img), inside0, hits0, gaps0)):
            attr, target, delta = integrated_gradients(net, img, reg, n_steps=steps, contrast=ci, baseline=base,
                                                       return_delta=True)
            ins.append(fraction_inside(attr, s.targets.body))
            if base is blur:
                profiles.append(depth_profile(attr, s.targets.body))
                body = torch.from_numpy(s.targets.body.astype(np.float32))[None, None].to(dev)
                phi_b, phi_m = region_shapley(net, img, reg, body, target, contrast=ci, baseline=blur)
                shapley.append(abs(phi_b) / max(abs(phi_b) + abs(phi_m), 1e-12))
                # where the input differs from the baseline (IG = that difference x the mean gradient)
                diff_inside.append(fraction_inside(((img - blur) * reg)[0, 0].cpu().numpy(), s.targets.body))
            total = float(attr.sum()) - delta  # f(x) - f(baseline)
            gap.append(abs(delta) / max(abs(total), 1e-6))
            if s.cls != 0 and s.targets.lesion.any():
                hit.append(pointing_game(attr, s.targets.lesion, tolerance_vox=1))
        # as deployed without masks: the region from the seg head (or the prior), scored against the expert body
        pred_reg = torch.from_numpy(_inference_region(net, img).astype(np.float32))[None, None].to(dev)
        attr_p, _ = integrated_gradients(net, img, pred_reg, n_steps=steps, contrast=ci)
        inside_pred.append(fraction_inside(attr_p, s.targets.body))
    return {"evidence_inside_mean": _r(np.mean(inside)) if inside else None,
            "evidence_inside_predicted_region_mean": _r(np.mean(inside_pred)) if inside_pred else None,
            "evidence_inside_p10": _r(np.percentile(inside, 10)) if inside else None,
            "frac_below_0.9": _r(np.mean(np.array(inside) < 0.9)) if inside else None,
            "pointing_game": _r(np.mean(hits)) if hits else None, "n_evidence": len(inside), "n_pointing": len(hits),
            "ig_completeness_gap_median": _r(np.median(gaps)) if gaps else None,
            "zero_baseline_evidence_inside_mean": _r(np.mean(inside0)) if inside0 else None,
            "zero_baseline_pointing_game": _r(np.mean(hits0)) if hits0 else None,
            "zero_baseline_completeness_gap_median": _r(np.median(gaps0)) if gaps0 else None,
            "shapley_body_share_mean": _r(np.mean(shapley)) if shapley else None,
            "baseline_difference_inside_mean": _r(np.mean(diff_inside)) if diff_inside else None,
            "depth_profile": {k: _r(np.mean([p[k] for p in profiles])) for k in profiles[0]} if profiles else None}


def evaluate(module, test: list[Sample], cfg: Stage2Config) -> dict:
    y = np.array([s.cls for s in test])
    p_mask, _ = predict(module, test)
    out = {"given_mask": _metrics(y, p_mask, len(cfg.classes))}
    if "seg" in module.net.heads:
        p_pred, dice = predict(module, test, predicted_region=True)
        out["predicted_region"] = _metrics(y, p_pred, len(cfg.classes))
        out["body_dice"] = _r(np.mean(dice))
    return out


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def _curve_recorder(fold: int, test: list[Sample], cfg: Stage2Config, every: int, rows: list[dict], res: Results):
    """``on_epoch`` callback that scores the held-out fold every ``every`` epochs (given masks) into section
    ``cv_curve``, written at once so a stopped run keeps its curve. Reporting only: nothing is selected on
    these scores (the final epoch is what ``cv_folds`` evaluates). ``None`` when ``every`` is 0."""
    if every <= 0:
        return None
    y = np.array([s.cls for s in test])

    def on_epoch(epoch: int, module, row: dict) -> None:
        if epoch % every and epoch != cfg.train.epochs:
            return
        p, _ = predict(module, test)
        m = _metrics(y, p, len(cfg.classes))
        rows.append({"fold": fold, "epoch": epoch, "train_loss": _r(row.get("loss")), "train_acc": _r(row.get("train_acc")),
                     "auc": m["auc"], "balanced_accuracy": m["balanced_accuracy"], "kappa": m["kappa"]})
        res.add("cv_curve", rows)

    return on_epoch


def section_cv(samples, cfg, work, args, res: Results):
    rows, ys, ps = [], [], []
    ev_all = []
    paired: dict[str, list[np.ndarray]] = {}
    folds = folds_by_subject(samples, args.folds, args.seed)
    bad = [f for f in (args.fold_ids or []) if not 0 <= f < len(folds)]
    if bad:
        raise SystemExit(f"error: --fold-ids {bad}: expected fold numbers 0..{len(folds) - 1} (--folds {args.folds})")
    run = [f for f in range(len(folds)) if not args.fold_ids or f in args.fold_ids]
    curve: list[dict] = []
    depth_rows: list[dict] = []
    extra = getattr(args, "extra_train_samples", [])
    unseen = getattr(args, "unseen_test_samples", None)
    preds_unseen: list[dict] = []
    for f in run:
        tr, te = folds[f]
        test = [samples[i] for i in te]
        train_subjects = {samples[i].subject for i in tr}
        train_set = [samples[i] for i in tr] + [x for x in extra if x.subject in train_subjects]
        if getattr(args, "pretrained", None):
            module, spe = load_trained(Path(args.pretrained.format(fold=f)), cfg, args.device), None
        else:
            module, spe = train(train_set, cfg, args.runs, f"cv{f}", args.device,
                                on_epoch=_curve_recorder(f, test, cfg, args.curve_every, curve, res))
        if unseen is not None:
            test_subjects = {s.subject for s in test}
            alt = [x for x in unseen if x.subject in test_subjects]
            p_alt, _ = predict(module, alt)
            preds_unseen += [{"subject": x.subject, "label": x.label, "cls": x.cls, "fold": f,
                              "p": [round(float(v), 4) for v in pr]} for x, pr in zip(alt, p_alt)]
            attach_cnr(preds_unseen, alt)
            _pooled_sections(res, args.folds, run, preds_unseen, [], cfg.classes, prefix="unseen_lesions")
        ev = evaluate(module, test, cfg)
        evs = evidence_stats(module, test, args.n_evidence, cfg.ig_steps)
        depth = evs.pop("depth_profile")
        if depth:
            depth_rows.append({"fold": f, "n_evidence": evs["n_evidence"], **depth})
            res.add("evidence_depth", depth_rows)
        ev_all.append(evs)
        p, _ = predict(module, test)
        ys.append(np.array([s.cls for s in test]))
        ps.append(p)
        # paired variants of the same run (section cv_paired): left-right test-time flip, raw weights
        variants = {"p_flip": (module, True)}
        if getattr(module, "raw", None) is not None:
            variants.update({"p_raw": (module.raw, False), "p_raw_flip": (module.raw, True)})
        for key, (mod, flip) in variants.items():
            paired.setdefault(key, []).append(predict(mod, test, flip_lr=flip)[0])
        p_lesion = predict_lesion_head(module, test)
        if p_lesion is not None:
            paired.setdefault("p_lesion_head", []).append(p_lesion)
        rows.append({"fold": f, "n_train": None if getattr(args, "pretrained", None) else len(train_set), "n_test": len(te), **_flat(ev), **evs, "s_per_epoch": _r(spe, 2)})
        res.add("cv_folds", rows)
    order = [i for f in run for i in folds[f][1]]
    preds = [{"subject": samples[i].subject, "label": samples[i].label, "cls": int(y), "p": [round(float(x), 4) for x in pr]}
             for i, y, pr in zip(order, np.concatenate(ys), np.concatenate(ps))]
    for key, chunks in paired.items():
        for row, pr in zip(preds, np.concatenate(chunks)):
            row[key] = [round(float(x), 4) for x in pr]
    attach_cnr(preds, samples)
    _pooled_sections(res, args.folds, run, preds, ev_all, cfg.classes)


#: Lesion visibility bins (contrast-to-noise ratio, see :func:`lesion_cnr`) of section ``*_by_visibility``.
CNR_BINS = (0.0, 1.0, 2.0, 3.0, np.inf)


def lesion_cnr(sample: Sample) -> float | None:
    """Visibility of a lesion vertebra's lesion on its patch: the absolute value of :func:`lesion_contrast`
    (``None`` for a vertebra without lesion voxels: normal, or no lesion map)."""
    c = lesion_contrast(sample)
    return None if c is None else abs(c)


def lesion_contrast(sample: Sample) -> float | None:
    """Signed contrast of a lesion vertebra's lesion on its patch: (mean intensity of the lesion voxels -
    median of the body's other marrow) / standard deviation of that marrow (the marrow excludes the lesion
    dilated by two voxels); > 0 brighter than the marrow. ``None`` for a vertebra without lesion voxels
    (normal, or no lesion map) or with under 10 marrow voxels."""
    from scipy import ndimage as ndi

    t = sample.targets
    if t.lesion_class is None:
        return None
    body = np.asarray(t.body, bool)
    les = (np.asarray(t.lesion_class) > 0) & body
    if not les.any():
        return None
    marrow = body & ~ndi.binary_dilation(les, iterations=2)
    if marrow.sum() < 10:
        return None
    m = sample.image[marrow]
    return float((sample.image[les].mean() - np.median(m)) / max(float(m.std()), 1e-6))


def _detection_auc(lesion_scores: list[float], normal_scores: list[float]) -> float | None:
    """ROC AUC of p(lesion) for lesion vs normal vertebrae (rounded; None unless both groups are present)."""
    from pipeline.metrics import one_vs_rest_auc

    if not lesion_scores or not normal_scores:
        return None
    y = np.array([1] * len(lesion_scores) + [0] * len(normal_scores))
    score = np.array(list(lesion_scores) + list(normal_scores))
    return _r(one_vs_rest_auc(y, np.stack([1 - score, score], 1), 2)[1])


def _by_visibility(preds: list[dict]) -> list[dict]:
    """Detection AUC (lesion vs normal, scored by 1 - p(normal)) of the lesion vertebrae in each
    :data:`CNR_BINS` bin against the normal vertebrae of the same cohort, per cohort and pooled, from
    prediction rows carrying ``subject`` and ``cnr``. Per cohort matters: the cohorts' normals sit at
    different p(lesion) levels (``bench/visibility.py``), so pooled bins mix a detection question with a
    cohort one."""
    rows = []
    for cohort in (*sorted({cohort_of(r["subject"]) for r in preds}), "pooled"):
        mine = [r for r in preds if cohort in ("pooled", cohort_of(r["subject"]))]
        normal = [r for r in mine if r["cls"] == 0]
        for lo, hi in zip(CNR_BINS[:-1], CNR_BINS[1:]):
            les = [r for r in mine if r["cls"] != 0 and r.get("cnr") is not None and lo <= r["cnr"] < hi]
            auc = _detection_auc([1 - r["p"][0] for r in les], [1 - r["p"][0] for r in normal])
            rows.append({"cohort": cohort, "cnr": f"[{lo:g}, {hi:g})", "n_lesion_vertebrae": len(les),
                         "n_normal": len(normal), "detection_auc": auc})
    return rows


def _by_level(preds: list[dict]) -> list[dict]:
    """Per cohort and vertebral level (VerSe id): how many normal / lesion vertebrae, the mean p(lesion)
    (= 1 - p(normal)) of each, and the detection AUC (lesion vs normal by p(lesion); None without both).
    Tells whether the normals the network calls lesions cluster at one level (e.g. degenerative endplate
    changes at L5) or one site. Rows cohort by cohort, head to foot."""
    rows = []
    for c in sorted({cohort_of(r["subject"]) for r in preds}):
        mine = [r for r in preds if cohort_of(r["subject"]) == c]
        for lv in sorted({int(r["label"]) for r in mine}, key=anatomical_rank):
            at = [r for r in mine if int(r["label"]) == lv]
            normal = [1 - r["p"][0] for r in at if r["cls"] == 0]
            lesion = [1 - r["p"][0] for r in at if r["cls"] != 0]
            rows.append({"cohort": c, "level": level_name(lv), "n_normal": len(normal),
                         "normal_mean_p_lesion": _r(np.mean(normal)) if normal else None, "n_lesion": len(lesion),
                         "lesion_mean_p_lesion": _r(np.mean(lesion)) if lesion else None,
                         "detection_auc": _detection_auc(lesion, normal)})
    return rows


def attach_cnr(preds: list[dict], samples: list[Sample]) -> None:
    """Add ``cnr`` (:func:`lesion_cnr`) to prediction rows, matched by (subject, VerSe label)."""
    by_key = {(s.subject, s.label): s for s in samples}
    for r in preds:
        s = by_key.get((r["subject"], r["label"]))
        if s is not None and s.cls == r["cls"]:
            c = lesion_cnr(s)
            r["cnr"] = None if c is None else round(c, 3)


#: Stage2Config fields that only shape the evidence computed from a trained model, not the model itself.
EVALUATION_ONLY = ("evidence_threshold", "ig_steps", "ig_baseline_sigma_mm")


def load_trained(folder: Path, cfg: Stage2Config, device: str) -> Stage2Trainable:
    """A model folder written by an earlier run (``--pretrained``), as the module :func:`train` returns.
    Refuses a folder whose saved configuration differs from this run's (apart from the epoch count and the
    :data:`EVALUATION_ONLY` settings, which this run's configuration sets on the loaded model)."""
    from data_prep.checkpoint import config_to_dict, load_model, load_state_into

    state, saved, _ = load_model(folder, Stage2Config, kind="stage2")
    a, b = config_to_dict(saved), config_to_dict(cfg)
    a["train"].pop("epochs"), b["train"].pop("epochs")
    for key in EVALUATION_ONLY:
        a.pop(key, None), b.pop(key, None)
    if a != b:
        raise SystemExit(f"error: {folder}: its configuration differs from this run's (check --set)")
    for key in EVALUATION_ONLY:  # this run's evidence settings apply to the loaded model
        setattr(saved, key, getattr(cfg, key))
    module = Stage2Trainable(saved)
    load_state_into(module.net, state, folder)
    return module.to(torch.device(device)).eval()


def _pooled_sections(res: Results, n_folds: int, run: list[int], preds: list[dict], ev_all: list[dict], classes,
                     prefix: str = "cv") -> None:
    """Sections ``<prefix>_pooled``, ``<prefix>_by_cohort`` and ``<prefix>_predictions`` from the held-out
    predictions of the folds ``run`` (rows ``{subject, label, cls, p}``) and their evidence statistics."""
    y_all = np.array([r["cls"] for r in preds])
    p_all = np.array([r["p"] for r in preds], dtype=float)
    pooled = _metrics(y_all, p_all, len(classes))
    res.add(f"{prefix}_pooled", {"folds": n_folds, "folds_run": run, **{k: v for k, v in pooled.items()},
                          **{k: _r(np.mean(vals)) if (vals := [e[k] for e in ev_all if e.get(k) is not None]) else None
                             for k in ("evidence_inside_mean", "evidence_inside_predicted_region_mean",
                                       "zero_baseline_evidence_inside_mean", "shapley_body_share_mean",
                                       "baseline_difference_inside_mean")}})
    # per cohort (site / sequence), plus lesion *typing* among lesion vertebrae: on a single T2-TSE image
    # inflammation and fat are both bright (data_prep.lesions.POLARITY), on Dixon water they are opposite
    cohorts = np.array([cohort_of(r["subject"]) for r in preds])
    rows = []
    for c in sorted(set(cohorts)):
        m = cohorts == c
        rows.append({"cohort": c, **_metrics(y_all[m], p_all[m], len(classes)),
                     "typing_auc": typing_auc(y_all[m], p_all[m], classes)})
    rows.append({"cohort": "pooled", **pooled, "typing_auc": typing_auc(y_all, p_all, classes)})
    res.add(f"{prefix}_by_cohort", rows)
    if any(r.get("cnr") is not None for r in preds):
        res.add(f"{prefix}_by_visibility", _by_visibility(preds))
    res.add(f"{prefix}_by_level", _by_level(preds))
    paired = [k for k in PAIRED_VARIANTS if k != "p" and all(k in r for r in preds)]
    if paired:
        res.add(f"{prefix}_paired", [{"variant": PAIRED_VARIANTS[k], **_metrics(y_all, np.array([r[k] for r in preds], float),
                                                                                len(classes))}
                                     for k in ("p", *paired)])
    res.add(f"{prefix}_predictions", preds)


#: Predictions of one run scored in section ``cv_paired`` (same models, same held-out vertebrae): key in the
#: prediction rows -> variant name. ``p`` is what the saved model gives (the weight average with
#: ``train.ema_decay`` > 0).
PAIRED_VARIANTS = {"p": "saved model", "p_flip": "saved model + left-right flip TTA", "p_raw": "last raw weights",
                   "p_raw_flip": "last raw weights + left-right flip TTA",
                   "p_lesion_head": "saved model, verdict from the lesion head alone (top-8 voxels per class)"}


#: Sections whose rows several runs of one configuration can contribute (``--ablation-sizes`` /
#: ``--ablation-heads`` / ``--site-shift-train`` in parallel processes), with the fields that name a row.
TABLE_SECTIONS = {"ablation": ("heads", "n_subjects"), "site_shift": ("train", "test")}
_TABLE_ORDER = {"ablation": lambda r: (r.get("n_subjects") or 0, list(ABLATIONS).index(r["heads"])
                                       if r.get("heads") in ABLATIONS else len(ABLATIONS)),
                "site_shift": lambda r: COHORTS.index(r["train"]) if r.get("train") in COHORTS else len(COHORTS)}


def merge_fold_runs(paths: list[Path], out_dir: Path, name: str, samples: list[Sample] | None = None) -> Results:
    """Merge result files of one configuration run fold by fold (``--fold-ids``, e.g. in parallel processes)
    into one: their ``cv_folds`` and ``cv_curve`` rows, and the pooled / per-cohort metrics recomputed from
    their held-out predictions; the rows of :data:`TABLE_SECTIONS` are concatenated. Refuses files that
    differ in configuration or repeat a fold or a table row."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    ref = runs[0]["meta"]
    for p, r in zip(paths, runs):
        if any(r["meta"].get(k) != ref.get(k) for k in ("config", "seed", "train_lesion_seeds")):
            raise SystemExit(f"error: {p}: configuration or seed differs from {paths[0]}; only runs of one "
                             "configuration can be merged")
    meta = {**ref, "merged_from": [Path(p).name for p in paths]}
    res = Results(out_dir, meta, name=name)
    if "data" in runs[0]["sections"]:
        res.add("data", runs[0]["sections"]["data"])
    for section, key in TABLE_SECTIONS.items():  # rows of the other tables: concatenated, each row once
        rows = [row for r in runs for row in r["sections"].get(section, [])]
        ids = [tuple(row.get(k) for k in key) for row in rows]
        dup = sorted({i for i in ids if ids.count(i) > 1}, key=str)
        if dup:
            raise SystemExit(f"error: {section} row(s) {dup} appear in more than one file")
        if rows:
            res.add(section, sorted(rows, key=_TABLE_ORDER[section]))
    if not any("cv_folds" in r["sections"] for r in runs):
        return res
    folds_rows = [row for r in runs for row in r["sections"].get("cv_folds", [])]
    fold_ids = [row["fold"] for row in folds_rows]
    if len(set(fold_ids)) != len(fold_ids):
        raise SystemExit(f"error: fold(s) {sorted(f for f in set(fold_ids) if fold_ids.count(f) > 1)} appear in more "
                         "than one file")
    depth = [row for r in runs for row in r["sections"].get("evidence_depth", [])]
    if depth:
        res.add("evidence_depth", sorted(depth, key=lambda row: row["fold"]))
    curve = [row for r in runs for row in r["sections"].get("cv_curve", [])]
    if curve:
        res.add("cv_curve", sorted(curve, key=lambda row: (row["fold"], row["epoch"])))
    res.add("cv_folds", sorted(folds_rows, key=lambda row: row["fold"]))
    classes = tuple(ref["config"]["classes"])
    n_folds = runs[0]["sections"]["cv_pooled"]["folds"]
    preds = [row for r in runs for row in r["sections"]["cv_predictions"]]
    if samples is not None:  # the runs' own samples (the cache they were built from): lesion visibility
        attach_cnr(preds, samples)
    _pooled_sections(res, n_folds, sorted(fold_ids), preds, folds_rows, classes)
    unseen = [row for r in runs for row in r["sections"].get("unseen_lesions_predictions", [])]
    if unseen:
        _pooled_sections(res, n_folds, sorted(fold_ids), unseen, [], classes, prefix="unseen_lesions")
    return res


def cohort_of(subject: str) -> str:
    """Cohort name of a subject id (``myosegmentum-001`` -> ``myosegmentum``)."""
    return subject.rsplit("-", 1)[0] if "-" in subject else subject


def typing_auc(y: np.ndarray, p: np.ndarray, classes) -> float | None:
    """AUC of inflammation vs fat among vertebrae whose true class is one of the two, scored by
    p_inflammation / (p_inflammation + p_fat); None when either class is absent."""
    from pipeline.metrics import one_vs_rest_auc

    names = [str(c) for c in classes]
    if "inflammation" not in names or "fat" not in names:
        return None
    a, b = names.index("inflammation"), names.index("fat")
    m = (y == a) | (y == b)
    if len(np.unique(y[m])) < 2:
        return None
    score = p[m, a] / np.clip(p[m, a] + p[m, b], 1e-9, None)
    auc = one_vs_rest_auc((y[m] == a).astype(int), np.stack([1 - score, score], 1), 2)[1]
    return _r(auc)


def _flat(ev: dict) -> dict:
    out = {}
    for k, v in ev.items():
        if isinstance(v, dict):
            out[f"{k}_bacc"] = v["balanced_accuracy"]
            out[f"{k}_kappa"] = v["kappa"]
            out[f"{k}_auc"] = v["auc"]
        else:
            out[k] = v
    return out


def section_leakage(module, folders: dict[str, Path], cfg, args, res: Results):
    """Plant an inflammatory lesion in one vertebra only; neighbours' probabilities should not move."""
    from data_prep.dataset import discover, load_subject
    from data_prep.lesions import COHORT_CONTRAST, plant_in_neighbour
    from data_prep.scan import vertebrae_from_labelmap
    from stage2_classify.infer import Classifier

    clf = Classifier.from_network(module.net)
    rows = []
    rng = np.random.default_rng(args.seed)
    for cohort, folder in folders.items():
        src = Path(args.data) / cohort
        for s in discover(src)[: args.n_leak]:
            d = load_subject(s)
            verts = vertebrae_from_labelmap(d.vertebrae)
            if len(verts) < 3:
                continue
            target = verts[len(verts) // 2].label
            planted = plant_in_neighbour(d.image, d.vertebrae, target, COHORT_CONTRAST[cohort], rng)
            base = clf.classify(d.image, verts, masks=d.vertebrae, with_evidence=False)
            new = clf.classify(planted.image, verts, masks=d.vertebrae, with_evidence=False)
            for b, n in zip(base, new):
                dp = max(abs(b["probabilities"][c] - n["probabilities"][c]) for c in cfg.classes)
                rows.append({"subject": s.id, "level": b["level"], "is_target": b["label"] == target,
                             "max_abs_dp": _r(dp, 6)})
    nb = [r["max_abs_dp"] for r in rows if not r["is_target"]]
    tg = [r["max_abs_dp"] for r in rows if r["is_target"]]
    res.add("leakage", {"n_neighbours": len(nb), "neighbour_max_dp_max": _r(max(nb), 6) if nb else None,
                        "neighbour_max_dp_mean": _r(np.mean(nb), 6) if nb else None,
                        "target_max_dp_mean": _r(np.mean(tg), 6) if tg else None})


ABLATIONS = {
    "cls": HeadsConfig(True, False, False, False),
    "cls+seg": HeadsConfig(True, True, False, False),
    "cls+seg+heatmap": HeadsConfig(True, True, True, False),
    "all": HeadsConfig(True, True, True, True),
}


def section_ablation(samples, cfg, work, args, res: Results):
    (tr, te), = folds_by_subject(samples, 2, args.seed + 1)[:1]
    train_subjects = sorted({samples[i].subject for i in tr})
    sizes = [n for n in (10, 25) if n < len(train_subjects)] + [len(train_subjects)]
    if args.quick:
        sizes = sizes[-1:]
    if args.ablation_sizes:  # a subset of the rows, e.g. to spread the table over processes (join with --merge)
        sizes = [len(train_subjects) if n == "all" else int(n) for n in args.ablation_sizes]
        too_many = [n for n in sizes if n > len(train_subjects)]
        if too_many:
            raise SystemExit(f"error: --ablation-sizes {too_many}: only {len(train_subjects)} training subjects")
    rows = []
    for n in sizes:
        keep = set(train_subjects[:n])
        sub = [samples[i] for i in tr if samples[i].subject in keep]
        for name, heads in ABLATIONS.items():
            if args.quick and name not in ("cls", "all"):
                continue
            if args.ablation_heads and name not in args.ablation_heads:
                continue
            c = copy.deepcopy(cfg)
            c.heads = heads
            module, spe = train(sub, c, args.runs, f"abl_{name}_{n}", args.device)
            ev = evaluate(module, [samples[i] for i in te], c)
            rows.append({"heads": name, "n_subjects": n, **_flat(ev), "s_per_epoch": _r(spe, 2)})
            res.add("ablation", rows)


def section_site_shift(samples, cfg, work, args, res: Results):
    rows = []
    for a, b in ((COHORTS[0], COHORTS[1]), (COHORTS[1], COHORTS[0])):
        if args.site_shift_train and a not in args.site_shift_train:
            continue
        tr = [s for s in samples if s.subject.startswith(a)]
        te = [s for s in samples if s.subject.startswith(b)]
        if not tr or not te:
            continue
        module, _ = train(tr, cfg, args.runs, f"site_{a}", args.device)
        rows.append({"train": a, "test": b, **_flat(evaluate(module, te, cfg))})
        res.add("site_shift", rows)


#: Rows of the annotation table (body annotation the seg head trains from).
ANNOTATION_ROWS = ("full", "outline", "box", "point")


def section_annotation(folders, cfg, work, args, res: Results, full_samples):
    """Same subjects, different body annotations for the seg head; Dice against the expert masks."""
    rows = []
    tr_idx, te_idx = folds_by_subject(full_samples, 2, args.seed + 2)[0]
    te_subjects = {full_samples[i].subject for i in te_idx}
    test = [full_samples[i] for i in te_idx]
    kinds = {"full": ("full", None), "outline": ("outline", None), "box": ("box", "boxes"), "point": ("point", "points")}
    for name, (ann, weak) in kinds.items():
        if name not in args.annotation_kinds or (args.quick and name not in ("full", "box")):
            continue
        if weak is None:
            fold = folders
        else:
            fold = {c: weak_copy(f, work, weak, args.seed) for c, f in folders.items()}
        try:
            samples = load_samples(fold, cfg, annotation=ann)
        except Exception as exc:  # noqa: BLE001 - a missing annotation kind must not stop the benchmark
            rows.append({"annotation": name, "error": str(exc)[:200]})
            res.add("annotation", rows)
            continue
        train_s = [s for s in samples if s.subject not in te_subjects]
        module, spe = train(train_s, cfg, args.runs, f"ann_{name}", args.device)
        ev = evaluate(module, test, cfg)
        row = {"annotation": name, "n_train": len(train_s), **_flat(ev), "s_per_epoch": _r(spe, 2)}
        full = next((r for r in rows if r["annotation"] == "full" and r.get("body_dice")), None)
        if full is not None and row.get("body_dice") is not None:  # the target: outlines >= 0.95 x full
            row["body_dice_vs_full"] = _r(row["body_dice"] / full["body_dice"])
        rows.append(row)
        res.add("annotation", rows)


def section_times(module, samples, cfg, res: Results):
    net = module.net.eval()
    s = samples[: min(8, len(samples))]
    b = collate(s)
    t0 = time.time()
    with torch.no_grad():
        net.forward_dense(b["image"])
        net.forward_cls(b["image"], b["region"])
    t_plain = (time.time() - t0) / len(s)
    t0 = time.time()
    for x in s[:3]:
        integrated_gradients(net, torch.from_numpy(x.image)[None, None],
                             torch.from_numpy(x.targets.region.astype(np.float32))[None, None], n_steps=cfg.ig_steps)
    t_ig = (time.time() - t0) / min(3, len(s))
    res.add("times", {"s_per_vertebra_no_evidence": _r(t_plain, 4), "s_per_vertebra_ig": _r(t_ig, 3),
                      "ig_steps": cfg.ig_steps, "threads": torch.get_num_threads()})


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", default="/tmp/spinepipe_bench_stage2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--fold-ids", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="cv: run only these folds (comma list, 0-based), e.g. to spread folds over processes")
    ap.add_argument("--curve-every", type=int, default=0, metavar="N",
                    help="cv: also score the held-out fold every N epochs (learning curve, section cv_curve)")
    ap.add_argument("--train-lesion-seeds", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="cv: add copies of the *training* subjects with lesions inserted under these further seeds "
                         "(independent classes and lesions; held-out subjects keep --seed's draw only)")
    ap.add_argument("--unseen-lesions", action="store_true",
                    help="cv: also score each fold's model on its held-out subjects with lesions of another style "
                         "(UNSEEN_LESION_STYLE; sections unseen_lesions_*)")
    ap.add_argument("--pretrained", default=None, metavar="DIR_TEMPLATE",
                    help="cv: load each fold's model from this folder ('{fold}' = fold number) instead of training")
    ap.add_argument("--n-evidence", type=int, default=40)
    ap.add_argument("--n-leak", type=int, default=5)
    ap.add_argument("--sections", default="cv,leakage,ablation,site_shift,annotation,times")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a Stage2Config field (dotted, JSON values), e.g. patch.spacing_mm=1.5")
    ap.add_argument("--annotation-kinds", type=lambda v: [x for x in v.split(",") if x], default=list(ANNOTATION_ROWS),
                    help=f"annotation: which body annotations to train from (comma list of {','.join(ANNOTATION_ROWS)})")
    ap.add_argument("--ablation-sizes", type=lambda v: [x for x in v.split(",") if x], default=None,
                    help="ablation: only these numbers of training subjects (comma list; 'all' = the whole "
                         "training half), e.g. to spread the table over processes and join them with --merge")
    ap.add_argument("--ablation-heads", type=lambda v: [x for x in v.split(",") if x], default=None,
                    help=f"ablation: only these head sets (comma list of {','.join(ABLATIONS)})")
    ap.add_argument("--site-shift-train", type=lambda v: [x for x in v.split(",") if x], default=None,
                    help=f"site_shift: only the rows trained on these cohorts (comma list of {','.join(COHORTS)})")
    ap.add_argument("--name", default="stage2", help="result file stem under --out")
    ap.add_argument("--device", default="cpu", help="training/evaluation device of cv/ablation/site_shift/annotation")
    ap.add_argument("--samples-cache", type=Path, default=None,
                    help="cv/ablation/site_shift only: load the full-mask samples from this file when it exists, "
                         "else build them and write it (lets a machine without the data run the sections)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only merge result files of one configuration run fold by fold into --out/--name (with "
                         "--samples-cache of the samples they used: plus detection AUC by lesion visibility)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.annotation_kinds) - set(ANNOTATION_ROWS))
    if unknown:
        ap.error(f"--annotation-kinds: unknown {unknown}; expected some of {list(ANNOTATION_ROWS)}")
    for opt, given, known in (("--ablation-heads", args.ablation_heads, ABLATIONS),
                              ("--site-shift-train", args.site_shift_train, COHORTS)):
        if given and sorted(set(given) - set(known)):
            ap.error(f"{opt}: unknown {sorted(set(given) - set(known))}; expected some of {list(known)}")
    bad_sizes = [n for n in args.ablation_sizes or [] if n != "all" and not (n.isdigit() and int(n) > 0)]
    if bad_sizes:
        ap.error(f"--ablation-sizes: expected positive integers or 'all', got {bad_sizes}")
    if args.merge:
        cache = None
        if args.samples_cache is not None:
            cache = load_sample_cache(args.samples_cache, override_config(Stage2Config(), args.set))
        merge_fold_runs(args.merge, Path(args.out), args.name, cache)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = Path(args.data)
    cached = args.samples_cache is not None and args.samples_cache.is_file()
    wanted = set(args.sections.split(","))
    if cached and wanted & {"leakage", "annotation"}:
        log.error("--samples-cache: sections leakage and annotation need the dataset folders; run them without it")
        return 2
    if args.device != "cpu" and wanted & {"leakage", "times"}:
        log.error("--device %s: sections leakage and times run on the CPU only", args.device)
        return 2
    if not cached and not (data / "myosegmentum").is_dir():
        log.error("real data not available: %s is absent", data)
        return 2
    work = Path(args.work)
    args.runs = work / "runs" / args.name
    cfg = override_config(Stage2Config(), args.set)
    cfg.train.seed = args.seed
    if args.quick:
        cfg.patch.spacing_mm = 4.0
        cfg.train.epochs = 2
        cfg.ig_steps = 8
        args.folds, args.n_evidence, args.n_leak = 2, 6, 1
    if args.epochs:
        cfg.train.epochs = args.epochs
    n_per = 3 if args.quick else None
    torch.manual_seed(args.seed)
    res = Results(Path(args.out), {"data": str(data), "seed": args.seed, "quick": args.quick, "device": args.device,
                                   "overrides": args.set, "argv": sys.argv[1:] if argv is None else list(argv),
                                   "train_lesion_seeds": args.train_lesion_seeds,
                                   "config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__))},
                  name=args.name)
    t0 = time.time()
    if cached:
        samples = load_sample_cache(args.samples_cache, cfg)
        folders = {}
    else:
        folders = prepare(data, work, args.seed, n_per)
        samples = load_samples(folders, cfg, "full")
        if args.samples_cache is not None:
            save_sample_cache(samples, cfg, args.samples_cache)
    args.extra_train_samples = []
    for ls in args.train_lesion_seeds:
        if ls == args.seed:
            raise SystemExit(f"error: --train-lesion-seeds {ls}: equals --seed, whose draw is already used")
        cache = (args.samples_cache.with_name(f"{args.samples_cache.name}.seed{ls}")
                 if args.samples_cache is not None else None)
        if cache is not None and cache.is_file():
            args.extra_train_samples += load_sample_cache(cache, cfg)
        else:
            if not (data / "myosegmentum").is_dir():
                log.error("--train-lesion-seeds: real data not available: %s is absent", data)
                return 2
            extra = load_samples(prepare(data, work / f"lesion_seed{ls}", ls, n_per), cfg, "full")
            if cache is not None:
                save_sample_cache(extra, cfg, cache)
            args.extra_train_samples += extra
    args.unseen_test_samples = None
    if args.unseen_lesions:
        from data_prep.lesions import LesionConfig

        cache = (args.samples_cache.with_name(f"{args.samples_cache.name}.unseen")
                 if args.samples_cache is not None else None)
        if cache is not None and cache.is_file():
            args.unseen_test_samples = load_sample_cache(cache, cfg)
        else:
            if not (data / "myosegmentum").is_dir():
                log.error("--unseen-lesions: real data not available: %s is absent", data)
                return 2
            lcfg = override_config(LesionConfig(), UNSEEN_LESION_STYLE)
            args.unseen_test_samples = load_samples(prepare(data, work / "unseen_lesions", args.seed + 1000, n_per, lcfg),
                                                    cfg, "full")
            if cache is not None:
                save_sample_cache(args.unseen_test_samples, cfg, cache)
    res.add("data", {"n_vertebrae": len(samples), "n_extra_training_copies": len(args.extra_train_samples), "n_subjects": len({s.subject for s in samples}),
                     "class_counts": np.bincount([s.cls for s in samples], minlength=3).tolist(),
                     "prep_seconds": _r(time.time() - t0, 1)})
    if "cv" in wanted:
        section_cv(samples, cfg, work, args, res)
    module = None
    if wanted & {"leakage", "times"}:
        module, _ = train(samples, cfg, args.runs, "all", args.device)
    if "leakage" in wanted:
        section_leakage(module, folders, cfg, args, res)
    if "ablation" in wanted:
        section_ablation(samples, cfg, work, args, res)
    if "site_shift" in wanted:
        section_site_shift(samples, cfg, work, args, res)
    if "annotation" in wanted:
        section_annotation(folders, cfg, work, args, res, samples)
    if "times" in wanted:
        section_times(module, samples, cfg, res)
    res.data["meta"]["total_seconds"] = round(time.time() - t0, 1)
    res.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
