"""Kill/resume: 1 epoch + resume == an uninterrupted 2-epoch run with the same seed (bit for bit)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from data_prep.errors import SpinepipeInputError
from stage2_classify.config import tiny_config
from stage2_classify.train import train_on_samples
from tests.stage2_classify.conftest import toy_samples


def _cfg():
    cfg = tiny_config()
    cfg.train.epochs = 2
    cfg.train.batch_size = 4
    cfg.train.aug_prob = 0.7  # exercise the augmentation generators
    cfg.model.dropout = 0.2  # and the dropout RNG
    return cfg


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_resume_matches_uninterrupted(tmp_path, ema_decay):
    cfg = _cfg()
    cfg.train.ema_decay = ema_decay  # with a weight average the saved model is the average: it must resume too
    samples = toy_samples(cfg, 10, seed=1)
    full = train_on_samples(samples, cfg, tmp_path / "full")
    part = train_on_samples(samples, cfg, tmp_path / "part", stop_after_epoch=1)  # "killed" after epoch 1
    w1 = load_file(str(part / "model.safetensors"))
    assert len(pd.read_csv(part / "train_log.csv")) == 1
    train_on_samples(samples, cfg, tmp_path / "part", resume=True)
    a = load_file(str(full / "model.safetensors"))
    b = load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(w1[k], b[k]) for k in b)  # epoch 2 really trained
    la, lb = pd.read_csv(full / "train_log.csv"), pd.read_csv(part / "train_log.csv")
    assert list(lb["epoch"]) == [1, 2]
    pd.testing.assert_series_equal(la["loss"], lb["loss"])
    sa = torch.load(full / "train_state.pt", weights_only=True)
    sb = torch.load(part / "train_state.pt", weights_only=True)
    for k in sa["module"]:
        assert torch.equal(sa["module"][k], sb["module"][k])
    if ema_decay:  # the saved model is the average of the 6 steps, not the raw network
        assert sa["ema"]["updates"] == 6
        assert all(torch.equal(a[k], sa["ema"]["weights"][k]) for k in a)
        assert any(not torch.equal(a[k], sa["module"][f"net.{k}"]) for k in a)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = _cfg()
    samples = toy_samples(cfg, 4, seed=2)
    train_on_samples(samples, cfg, tmp_path / "m", stop_after_epoch=1)
    cfg.train.lr = 0.5
    with pytest.raises(SpinepipeInputError, match="configuration differs"):
        train_on_samples(samples, cfg, tmp_path / "m", resume=True)


def test_resume_cannot_switch_weight_averaging_on(tmp_path):
    cfg = _cfg()
    samples = toy_samples(cfg, 4, seed=2)
    train_on_samples(samples, cfg, tmp_path / "m", stop_after_epoch=1)  # saved without an average
    cfg.train.ema_decay = 0.9
    with pytest.raises(SpinepipeInputError, match="configuration differs"):
        train_on_samples(samples, cfg, tmp_path / "m", resume=True)
