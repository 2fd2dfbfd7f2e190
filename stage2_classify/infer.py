"""Stage-2 inference: per-vertebra class, probabilities, evidence fraction and flags.

:class:`Classifier` loads a model folder once (``data_prep.checkpoint``; safetensors + JSON, never
unpickled) and classifies every given vertebra of a scan. The region the classification path sees is,
in order of preference: the vertebra's given mask (``masks`` label map or ``Vertebra.mask``), the seg
head's centre-body prediction (largest component near the centroid), or a typical-size ellipsoid around
the centroid (flag ``region_prior``); always dilated by ``margin_mm``, but never onto another vertebral
body (given, or as the seg head predicts it; ``patches.vertebra_region``).

Flags per vertebra: ``region_prior`` (no body found, fallback region), ``mask_missing`` (a label map was
given but this vertebra is not in it), ``patch_outside_fov`` (less than 90 % of the patch inside the
image), ``evidence_outside_body`` (less than ``evidence_threshold`` of |IG| inside the body mask); per scan,
on every vertebra: ``contrast_unseen`` (the scan's contrast signature lies farther than
``contrast_check.threshold`` from every training scan's, or the contrast the caller names is not one the
training data named; :mod:`stage2_classify.domain`; models saved before the check have no reference and
are not checked).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from data_prep.checkpoint import load_model, load_state_into
from data_prep.errors import SpinepipeInputError
from data_prep.scan import Scan, Vertebra, VertebraVerdict
from data_prep.dataset import parse_contrast
from stage2_classify.config import SEG_NEIGHBOUR, Stage2Config, contrast_index
from stage2_classify.domain import (CONTRAST_FLAG, SIGNATURE_NAMES, ContrastReference, centre_signature, patch_signature,
                                    region_signature, scan_signature)
from stage2_classify.evidence import EVIDENCE_FLAG, explain, merge_evidence
from stage2_classify.model import Stage2Net
from stage2_classify.patches import Patch, PatchSampler, ellipsoid_prior, paste_to_reference, vertebra_region

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path("models") / "stage2"
MISSING_MODEL_HINT = "no trained stage-2 model here; run `make train-stage2` (or `spinepipe train-stage2`) first"


@dataclass
class ScanClassification:
    """What :meth:`Classifier.classify_scan` returns (fields of ``pipeline.predict.Classification``)."""

    verdicts: list[VertebraVerdict]
    body_labels: Scan | None = None
    evidence: Scan | None = None


def predicted_body(net: Stage2Net, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The centre vertebral body of a patch without a given mask, as inference uses it.

    ``img``: ``(1, 1, I, J, K)``. Returns ``(body (I, J, K) bool, others, source)``: the seg head's body
    (probability > 0.5, the component nearest the patch centre; source "predicted"), or, when the head is
    off or finds nothing, the ellipsoid prior of ``prior_half_extent_mm`` around the centre ("prior");
    ``others`` (bool, or None without a seg head) = where the head calls a neighbouring body more likely
    than not, which the region must not reach. Not yet dilated (:func:`patches.vertebra_region`).
    """
    shape = tuple(img.shape[2:])
    centre_ijk = (np.array(shape) - 1) / 2.0
    others = None
    if "seg" in net.heads:
        with torch.no_grad():
            seg = net.forward_dense(img)["seg"]
            pb = net.body_probability(seg)[0, 0].cpu().numpy()
            others = torch.softmax(seg, dim=1)[0, SEG_NEIGHBOUR].cpu().numpy() > 0.5
        body = pb > 0.5
        if body.any():
            return _largest_near(body, centre_ijk), others, "predicted"
    half = np.asarray(net.cfg.prior_half_extent_mm) / net.cfg.patch.spacing_mm
    return ellipsoid_prior(shape, centre_ijk, half), others, "prior"


def _largest_near(mask: np.ndarray, centre_ijk: np.ndarray) -> np.ndarray:
    """The connected component containing the centre voxel, else the one closest to it."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    c = tuple(int(round(x)) for x in np.clip(centre_ijk, 0, np.array(mask.shape) - 1))
    if lab[c] > 0:
        return lab == lab[c]
    coms = np.array(ndimage.center_of_mass(mask, lab, range(1, n + 1)))
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    d = np.linalg.norm(coms - np.asarray(centre_ijk), axis=1) - 0.01 * np.asarray(sizes)
    return lab == (int(np.argmin(d)) + 1)


class Classifier:
    """Loads a stage-2 model folder once; classifies vertebrae of any scan.

    Raises :class:`SpinepipeInputError` when the folder holds no model (telling to run
    ``make train-stage2``) or a tampered/mismatched one.
    """

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_MODEL_DIR, *, device: str | torch.device = "cpu",
                 contrast: str | None = None, evidence_threshold: float | None = None, ig_steps: int | None = None):
        """``evidence_threshold``: flag a verdict ``evidence_outside_body`` when less than this share of its
        |IG| lies inside the body (0..1); ``ig_steps``: Integrated-Gradients steps per verdict (>= 2);
        ``None`` = the value saved with the model."""
        if evidence_threshold is not None and not 0.0 <= float(evidence_threshold) <= 1.0:
            raise ValueError(f"evidence_threshold must lie in [0, 1], got {evidence_threshold}")
        if ig_steps is not None and (int(ig_steps) != ig_steps or ig_steps < 2):
            raise ValueError(f"ig_steps must be an integer >= 2, got {ig_steps}")
        folder = Path(model_dir)
        #: Default image contrast of the scans this classifier sees (``None`` = unknown), see :meth:`classify`.
        self.contrast = contrast
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise SpinepipeInputError(folder, MISSING_MODEL_HINT)
        state, cfg, extra = load_model(folder, Stage2Config, kind="stage2")
        if evidence_threshold is not None:
            cfg.evidence_threshold = float(evidence_threshold)
        if ig_steps is not None:
            cfg.ig_steps = int(ig_steps)
        self.config: Stage2Config = cfg
        self.extra = extra
        #: Where the model was loaded from (``None`` for :meth:`from_network`); run records name it.
        self.model_dir: Path | None = folder
        if extra.get("synthetic_only"):
            # bench/results/visibility_demo_model.md: the demo's model on 188 real vertebrae with inserted lesions
            log.warning("%s: stage-2 model trained on built-in synthetic scans only: fine for synthetic scans, "
                        "but on real scans its verdicts hardly react to lesions (the demo's model on real scans "
                        "with inserted lesions: AUC 0.66 / 0.53 / 0.57, p(lesion) moved by a median 0.00); train "
                        "it on labelled scans like yours (make train-stage2 DATA=DIR)", folder)
        self.device = torch.device(device)
        try:
            self.net = Stage2Net(cfg)
        except ValueError as exc:
            raise SpinepipeInputError(folder / "config.json", f"invalid stage-2 configuration: {exc}") from None
        load_state_into(self.net, state, folder / "model.safetensors")
        self.net.to(self.device).eval()
        if "cls" not in self.net.heads:
            raise SpinepipeInputError(folder / "config.json", "this stage-2 model has no classification head")
        #: The training scans' contrast signatures (None: a model saved before the check, or none measured).
        self.reference: ContrastReference | None = None
        if "contrast_reference" in extra:
            try:
                self.reference = ContrastReference.from_dict(extra["contrast_reference"])
            except ValueError as exc:
                raise SpinepipeInputError(folder / "config.json", str(exc)) from None

    @classmethod
    def from_network(cls, net: Stage2Net) -> "Classifier":
        """Wrap an in-memory network (tests, benchmarks) without files."""
        self = cls.__new__(cls)
        self.config, self.extra, self.device, self.contrast = net.cfg, {}, torch.device("cpu"), None
        self.model_dir = None
        self.net = net.eval()
        self.reference = None
        return self

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config.classes)

    # -- regions --------------------------------------------------------------------------------
    def _body_mask(self, patch: Patch, vert: Vertebra, use_mask: bool,
                   img: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, str, list[str]]:
        """``(body, others, source, flags)``: the centre body on the patch grid, the other vertebral bodies
        its region must not reach (given masks, else the seg head's neighbours), where the body came from."""
        flags: list[str] = []
        shape = patch.image.shape
        if use_mask:
            labels = patch.labels.get("vertebrae", np.zeros(shape))
            body = labels == vert.label
            if body.any():
                return body, (labels > 0) & ~body, "mask", flags
            flags.append("mask_missing")
        body, others, source = predicted_body(self.net, img)
        if source == "prior":
            flags.append("region_prior")
        return body, others, source, flags

    def _crop(self, sampler: PatchSampler, vert: Vertebra, use_mask: bool, centre_mm: np.ndarray):
        """``(patch, img (1, 1, I, J, K), body, others, source, flags)`` around ``centre_mm`` (world LPS)."""
        patch = sampler.crop(centre_mm)
        img = torch.from_numpy(patch.image)[None, None].to(self.device)
        return (patch, img, *self._body_mask(patch, vert, use_mask, img))

    def _body_centroid(self, patch: Patch, body: np.ndarray, source: str, given_mm: np.ndarray) -> np.ndarray | None:
        """World LPS centroid (mm) of ``body`` on the patch grid, or None when re-centring is off, the body
        is only the prior, or its centroid lies farther than ``recentre_max_mm`` from ``given_mm``."""
        limit = self.config.recentre_max_mm
        if limit <= 0 or source == "prior" or not body.any():
            return None
        centre = patch.geometry.voxel_to_world(np.argwhere(body).mean(0)).coords[0]
        return centre if float(np.linalg.norm(centre - given_mm)) <= limit else None

    # -- main API -------------------------------------------------------------------------------
    def classify(self, scan: Scan, vertebrae: list[Vertebra], masks: Scan | None = None, with_evidence: bool = True,
                 keep_evidence_maps: bool = False, contrast: str | None = None) -> list[dict]:
        """Classify each vertebra of ``scan``.

        Parameters
        ----------
        scan: the image (any orientation/spacing).
        vertebrae: records with world LPS centroids and VerSe labels (e.g. from stage 1). A vertebra's
            own ``mask`` (bool, on ``scan``'s grid) is used when ``masks`` is None.
        masks: optional VerSe label map on any grid (vertebral bodies).
        with_evidence: run Integrated Gradients and report ``evidence_inside``.
        keep_evidence_maps: include the patch attribution (Scan, patch grid) as ``"evidence"``.
        contrast: the scan's image contrast (``t1``, ``t2``, ``stir``, ``water``; default: the one given to
            the constructor, else unknown). Read by models trained with ``model.contrast_input``, whose
            lesion typing depends on it (fat is dark on STIR / Dixon water, bright on T1 / T2-TSE).

        Returns
        -------
        One dict per vertebra (input order): ``label``, ``level``, ``class`` (name), ``class_index``,
        ``probabilities`` (``{class: p}``), ``evidence_inside`` (NaN without evidence), ``flags`` (list),
        ``region_source`` (``"mask"``/``"predicted"``/``"prior"``), ``body_patch`` (bool array),
        ``geometry`` (patch Scan), ``centroid_world`` (world LPS mm: the centroid of the body the verdict
        was computed on when ``centroid_from`` is ``"body"``, the given one when it is ``"input"``; see
        ``Stage2Config.recentre_max_mm``) and ``contrast_novelty`` (the scan's distance to the nearest training
        scan's contrast signature, :mod:`stage2_classify.domain`; NaN when not measured; the same for every
        vertebra of the scan); ``evidence`` when asked.
        """
        cfg = self.config
        named = contrast if contrast is not None else self.contrast
        ci = contrast_index(named)
        if ci < 0 and getattr(self.net, "contrast_input", False):
            log.info("this model reads the image contrast; none given, so it is treated as unknown (--contrast)")
        extra = (torch.tensor([ci], dtype=torch.long, device=self.device),) if ci >= 0 else ()
        if masks is None and any(v.mask is not None for v in vertebrae):
            lab = np.zeros(scan.shape, np.int16)
            for v in vertebrae:
                if v.mask is not None:
                    if np.shape(v.mask) != scan.shape:
                        raise SpinepipeInputError(None, f"vertebra {v.level}: mask shape {np.shape(v.mask)} != scan {scan.shape}")
                    lab[np.asarray(v.mask, bool)] = v.label
            masks = scan.with_array(lab)
        sampler = PatchSampler(scan, cfg.patch, {"vertebrae": masks} if masks is not None else None)
        results = []
        signatures: list[tuple[float, float] | None] = []
        for v in vertebrae:
            patch, img, body, others, source, flags = self._crop(sampler, v, masks is not None, v.centroid_world)
            centroid, centroid_from = np.asarray(v.centroid_world, float), "input"
            moved = self._body_centroid(patch, body, source, centroid)
            if moved is not None and np.linalg.norm(moved - centroid) < 0.5 * cfg.patch.spacing_mm:
                centroid, centroid_from = moved, "body"  # already centred: the same patch, less than half a voxel off
            elif moved is not None:  # crop again around the body (see Stage2Config.recentre_max_mm)
                second = self._crop(sampler, v, masks is not None, moved)
                if second[4] != "prior":  # second[4]: the region source of the new crop
                    patch, img, body, others, source, flags = second
                    again = self._body_centroid(patch, body, source, np.asarray(v.centroid_world, float))
                    centroid, centroid_from = (again if again is not None else moved), "body"
            signatures.append(None if source == "prior" else
                              patch_signature(patch.image, body, others, cfg.patch.spacing_mm, cfg.contrast_check.band_mm))
            region_np = vertebra_region(body, cfg.margin_vox, others)
            region = torch.from_numpy(region_np.astype(np.float32))[None, None].to(self.device)
            with torch.no_grad():
                probs = torch.softmax(self.net.forward_cls(img, region, *extra), 1)[0].cpu().numpy()
            if patch.fov < 0.9:
                flags.append("patch_outside_fov")
            k = int(np.argmax(probs))
            rec = {
                "label": v.label,
                "level": v.level,
                "class": cfg.classes[k],
                "class_index": k,
                "probabilities": {c: float(p) for c, p in zip(cfg.classes, probs)},
                "evidence_inside": float("nan"),
                "flags": flags,
                "region_source": source,
                "centroid_world": centroid,
                "centroid_from": centroid_from,
                "body_patch": body,
                "geometry": patch.geometry,
            }
            if with_evidence:
                ev = explain(self.net, img, region, body, patch.geometry, cfg.evidence_threshold, cfg.ig_steps, target=k,
                             contrast=ci)
                rec["evidence_inside"] = ev.inside
                if ev.flagged:
                    flags.append(EVIDENCE_FLAG)
                if keep_evidence_maps:
                    rec["evidence"] = ev.attribution
            results.append(rec)
        cc = cfg.contrast_check
        # at the given centroids, not the re-centred ones: this part must not depend on the seg head, which is
        # least reliable on the very scans the check is for (re-centred, a water model's synthetic T1 scan fell
        # from novelty >= 3.1 to 0.97 and went unflagged; bench/results/contrast_check.md)
        centre = centre_signature(sampler.image, {v.label: v.centroid_world for v in vertebrae}, cc.body_radius_mm,
                                  cc.disc_radius_mm, cc.disc_half_length)
        self._check_contrast(scan, results, scan_signature(centre, region_signature(signatures)), named)
        return results

    def _check_contrast(self, scan: Scan, results: list[dict], sig: np.ndarray | None, named: str | None) -> None:
        """Set ``contrast_novelty`` on every record and flag them all ``contrast_unseen`` when the scan's
        signature ``sig`` (``(4,)``, :func:`~stage2_classify.domain.scan_signature`) lies beyond
        ``contrast_check.threshold`` of every training scan, or when ``named`` (the caller's contrast) is not
        one the training data named."""
        cc = self.config.contrast_check
        novelty = self.reference.novelty(sig, cc.scales) if self.reference is not None and sig is not None else float("nan")
        reasons = []
        if cc.threshold is not None and novelty > cc.threshold:
            shown = ", ".join(f"{n} {v:.2f}" for n, v in zip(SIGNATURE_NAMES, sig) if np.isfinite(v))
            reasons.append(f"its contrast signature ({shown}) lies {novelty:.1f} units from the nearest training "
                           f"scan (threshold {cc.threshold:g})")
        trained = self.reference.contrasts if self.reference is not None else ()
        if named and trained and parse_contrast(named) not in trained:
            reasons.append(f"its contrast {parse_contrast(named)!r} is not one the training data named ({', '.join(trained)})")
        for rec in results:
            rec["contrast_novelty"] = novelty
            if reasons:
                rec["flags"].append(CONTRAST_FLAG)
        if reasons and results:
            log.warning("%s: the stage-2 verdicts may name lesion kinds wrongly: %s", scan.name or "scan", "; ".join(reasons))

    def classify_scan(self, scan: Scan, vertebrae: list[Vertebra], with_evidence: bool = False) -> ScanClassification:
        """Pipeline entry point (``pipeline.predict.Classifier`` protocol): verdicts, body label map and
        evidence map on ``scan``'s grid."""
        recs = self.classify(scan, vertebrae, with_evidence=with_evidence, keep_evidence_maps=with_evidence)
        verdicts = [VertebraVerdict(r["label"], np.array([r["probabilities"][c] for c in self.classes]),
                                    r["evidence_inside"], list(r["flags"]), r["contrast_novelty"],
                                    r["centroid_world"] if r["centroid_from"] == "body" else None) for r in recs]
        return ScanClassification(verdicts, body_label_map(recs, scan),
                                  evidence_map(recs, scan) if with_evidence else None)


CENTROID_COLUMNS = ["level", "label", "x_mm", "y_mm", "z_mm", "confidence", "flags"]


def read_centroids_csv(path: str | os.PathLike) -> list[Vertebra]:
    """Stage-1 ``<name>_centroids.csv`` (``level,label,x_mm,y_mm,z_mm,confidence,flags``) -> vertebrae.

    ``label`` (VerSe id) is authoritative; ``level`` must agree with it. ``confidence`` and ``flags``
    (``;``-separated) are optional. Raises :class:`SpinepipeInputError` naming the file and line.
    """
    import pandas as pd

    from data_prep.scan import level_id, level_name

    p = Path(path)
    if not p.is_file():
        raise SpinepipeInputError(p, "centroids CSV not found")
    try:
        df = pd.read_csv(p, skipinitialspace=True, dtype={"flags": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpinepipeInputError(p, f"cannot parse CSV: {str(exc).splitlines()[0]}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in ("x_mm", "y_mm", "z_mm") if c not in df.columns]
    if missing or ("label" not in df.columns and "level" not in df.columns):
        raise SpinepipeInputError(p, f"expected columns {','.join(CENTROID_COLUMNS)}, got {','.join(df.columns)}")
    out: list[Vertebra] = []
    seen: set[int] = set()
    for line, r in enumerate(df.to_dict("records"), start=2):
        try:
            vid = int(float(r["label"])) if "label" in r and str(r["label"]).strip() != "" else level_id(str(r["level"]))
            name = level_name(vid)
            if "level" in r and str(r["level"]).strip() and level_id(str(r["level"])) != vid:
                raise ValueError(f"level {r['level']!r} does not match label {vid} ({name})")
            xyz = np.array([float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])])
            conf = float(r["confidence"]) if str(r.get("confidence", "")).strip() != "" else 1.0
        except (ValueError, TypeError) as exc:
            raise SpinepipeInputError(p, f"line {line}: {exc}") from None
        if not np.all(np.isfinite(xyz)) or not np.isfinite(conf):
            raise SpinepipeInputError(p, f"line {line}: non-finite coordinate or confidence")
        if vid in seen:
            raise SpinepipeInputError(p, f"line {line}: level {name} appears twice")
        seen.add(vid)
        flags = [f for f in str(r.get("flags", "")).split(";") if f.strip()]
        out.append(Vertebra(vid, xyz, confidence=conf, flags=flags))
    if not out:
        raise SpinepipeInputError(p, "no vertebra in the centroids CSV")
    return out


def classes_table(records: list[dict], classes: tuple[str, ...]):
    """``<name>_classes.csv`` rows: ``level,label,x_mm,y_mm,z_mm,centroid_from,class,p_<class>...,
    evidence_inside,contrast_novelty,flags``; the position (world LPS mm) is the centroid of the body the
    verdict was computed on (``centroid_from`` = body) or the given one (``input``)."""
    import pandas as pd

    rows = []
    for r in records:
        c = np.asarray(r.get("centroid_world", (np.nan,) * 3), float)
        row = {"level": r["level"], "label": r["label"],
               **{k: round(float(x), 2) if np.isfinite(x) else np.nan for k, x in zip(("x_mm", "y_mm", "z_mm"), c)},
               "centroid_from": r.get("centroid_from", ""), "class": r["class"]}
        row.update({f"p_{c}": round(r["probabilities"][c], 4) for c in classes})
        row["evidence_inside"] = round(r["evidence_inside"], 4) if np.isfinite(r["evidence_inside"]) else np.nan
        nov = r.get("contrast_novelty", float("nan"))
        row["contrast_novelty"] = round(nov, 3) if np.isfinite(nov) else np.nan
        row["flags"] = ";".join(dict.fromkeys(r["flags"]))
        rows.append(row)
    cols = (["level", "label", "x_mm", "y_mm", "z_mm", "centroid_from", "class"] + [f"p_{c}" for c in classes]
            + ["evidence_inside", "contrast_novelty", "flags"])
    return pd.DataFrame(rows, columns=cols)


def body_label_map(records: list[dict], reference: Scan) -> Scan:
    """Paste each vertebra's body mask (patch grid) onto ``reference`` as a VerSe label map (int16)."""
    out = np.zeros(reference.shape, np.int16)
    for r in records:
        if r.get("region_source") == "prior":
            continue
        m = paste_to_reference(r["geometry"].with_array(r["body_patch"].astype(np.float32)), reference, is_label=True)
        out[(m.array > 0.5) & (out == 0)] = int(r["label"])
    return reference.with_array(out, name="labels")


def evidence_map(records: list[dict], reference: Scan) -> Scan | None:
    """All vertebrae's attribution maps on ``reference``'s grid (None when no record kept one)."""
    maps = [r["evidence"] for r in records if "evidence" in r]
    return merge_evidence(maps, reference) if maps else None


__all__ = ["Classifier", "Verdict", "ScanClassification", "body_label_map", "classes_table", "evidence_map",
           "read_centroids_csv", "MISSING_MODEL_HINT"]
