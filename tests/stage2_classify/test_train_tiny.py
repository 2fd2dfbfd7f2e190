"""Tiny multitask training on toy patches learns (loss falls, held-out accuracy beats chance)."""
from __future__ import annotations

import pandas as pd
import torch

from data_prep.checkpoint import load_model
from stage2_classify.config import Stage2Config, tiny_config
from stage2_classify.infer import Classifier
from stage2_classify.train import collate, train_on_samples
from tests.stage2_classify.conftest import toy_samples


def test_tiny_training_learns(tmp_path):
    cfg = tiny_config()
    cfg.train.epochs = 30
    cfg.train.batch_size = 6
    cfg.train.lr = 3e-3
    cfg.train.aug_prob = 0.2
    cfg.train.max_rotation_deg = 5.0
    train = toy_samples(cfg, 36, seed=0)
    held = toy_samples(cfg, 30, seed=99)
    out = train_on_samples(train, cfg, tmp_path / "m")
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["epoch"]) == list(range(1, 31))
    assert log["loss"].iloc[-1] < log["loss"].iloc[0] - 0.3
    assert log["loss_cls"].iloc[-3:].mean() < log["loss_cls"].iloc[:3].mean()
    # reload through the safe model files and evaluate on held-out toy patches
    state, cfg2, extra = load_model(out, Stage2Config, kind="stage2")
    assert extra["epoch"] == 30 and cfg2 == cfg
    clf = Classifier(out)
    b = collate(held)
    with torch.no_grad():
        logits = clf.net.forward_cls(b["image"], b["region"])
    acc = float((logits.argmax(1) == b["cls"]).float().mean())
    assert acc > 0.6, acc  # chance = 1/3
    # the seg head learned the centre body (Dice on held-out patches)
    with torch.no_grad():
        pb = clf.net.body_probability(clf.net.forward_dense(b["image"])["seg"]) > 0.5
    body = b["body"] > 0.5
    dice = 2 * float((pb & body).sum()) / float(pb.sum() + body.sum())
    assert dice > 0.6, dice
