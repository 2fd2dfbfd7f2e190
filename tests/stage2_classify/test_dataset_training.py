"""build_samples / train_stage2 on a canonical dataset folder with full and weak annotations."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stage2_classify.config import tiny_config
from stage2_classify.train import build_samples, train_on_samples, train_stage2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from data_prep.lesions import cohort_hook
    from data_prep.synth import SynthConfig, write_cohort
    from data_prep.weak_labels import derive_weak_labels

    root = tmp_path_factory.mktemp("s2data")
    full = root / "full"
    write_cohort(full, 1, 5, SynthConfig(), cohort_hook())
    out = {"full": full}
    for kind in ("boxes", "points", "outlines"):
        derive_weak_labels(full, root / kind, kind, seed=1)
        out[kind] = root / kind
    return out


def test_samples_for_every_annotation_kind(cohort):
    cfg = tiny_config()
    labels = pd.read_csv(cohort["full"] / "vertebra_labels.csv")
    n = len(labels)
    full = build_samples(cohort["full"], cfg)
    assert len(full) == n and {s.targets.kind for s in full} == {"full"}
    assert all(s.targets.body.any() for s in full)
    # synthetic cohorts carry discs (structures): some voxels are labelled disc exactly
    assert any((s.targets.seg_allowed.sum(0) == 1)[s.targets.seg_allowed[3]].any() for s in full)
    assert [s.cls for s in full] == [int(c) for c in labels["class"]]
    # the image contrast comes from synth_meta.json (or --contrast for the whole folder)
    import json

    meta = json.loads((cohort["full"] / "synth_meta.json").read_text())["subjects"]
    assert [s.contrast for s in full] == [meta[s.subject]["contrast"] for s in full]
    assert {s.contrast for s in build_samples(cohort["full"], cfg, contrast="STIR")} == {"stir"}
    # every sample carries its scan's centre-part contrast signature (one per subject; the synthetic scans
    # here have several adjacent levels in view)
    by_subject = {}
    for s in full:
        assert s.centre_signature is not None and s.centre_signature.shape == (2,)
        by_subject.setdefault(s.subject, []).append(s.centre_signature)
    assert all(np.array_equal(v[0], w) for v in by_subject.values() for w in v)
    boxes = build_samples(cohort["boxes"], cfg, annotation="box")
    assert {s.targets.kind for s in boxes} == {"box"} and all(s.targets.box.any() for s in boxes)
    points = build_samples(cohort["points"], cfg, annotation="point")
    assert all(s.targets.point_ball.any() for s in points)
    outl = build_samples(cohort["outlines"], cfg)  # auto -> outlines
    assert {s.targets.kind for s in outl} == {"outline"}
    # outlines supervise some voxels as centre body and leave the band unsupervised
    assert any(((s.targets.seg_allowed.sum(0) == 2) & s.targets.seg_allowed[1]).any() for s in outl)
    # one epoch over a mix of annotation kinds: every weak loss path runs and stays finite
    cfg.train.epochs = 1
    samples = full[:3] + boxes[:3] + points[:3] + outl[:3]
    holder = {}
    train_on_samples(samples, cfg, cohort["full"].parent / "mix", callback=lambda e, m, row: holder.update(row))
    assert all(math.isfinite(v) for k, v in holder.items() if k.startswith("loss"))


def test_train_stage2_entry_point(cohort, tmp_path):
    cfg = tiny_config()
    out = train_stage2(cohort["full"], tmp_path / "m", cfg)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and np.isfinite(log["loss"]).all()


def test_a_model_trained_on_synthetic_scans_only_says_so_when_loaded(cohort, tmp_path, caplog):
    """``extra["synthetic_only"]`` is true for a built-in synthetic cohort (its ``synth_meta.json``), false
    for any other folder; the Classifier warns, once, on loading such a model and only then."""
    import logging
    import shutil

    from data_prep.checkpoint import load_model
    from stage2_classify.config import Stage2Config
    from stage2_classify.infer import Classifier

    cfg = tiny_config()
    cfg.train.epochs = 1
    real_like = tmp_path / "real_like"
    shutil.copytree(cohort["full"], real_like)
    (real_like / "synth_meta.json").unlink()
    synth_model = train_stage2(cohort["full"], tmp_path / "synth", cfg)
    other = train_stage2(real_like, tmp_path / "other", cfg, contrast="t1")
    assert load_model(synth_model, Stage2Config, kind="stage2")[2]["synthetic_only"] is True
    assert load_model(other, Stage2Config, kind="stage2")[2]["synthetic_only"] is False
    with caplog.at_level(logging.WARNING, logger="stage2_classify.infer"):
        Classifier(other)
        assert not caplog.records
        Classifier(synth_model)
    assert len(caplog.records) == 1 and "synthetic scans only" in caplog.records[0].getMessage()
    assert str(synth_model) in caplog.records[0].getMessage()
