"""Augmentation never flips head-foot; labels stay labels; determinism per generator."""
from __future__ import annotations

import pytest
import torch

from stage2_classify.config import tiny_config
from stage2_classify.train import augment, collate
from tests.stage2_classify.conftest import toy_samples


def test_augment_keeps_superior_up_and_labels_binary():
    cfg = tiny_config()
    cfg.train.aug_prob = 1.0
    batch = collate(toy_samples(cfg, 6, seed=0))
    k = torch.arange(batch["image"].shape[-1], dtype=torch.float32)
    batch["image"] = (k / k.max()).expand_as(batch["image"]).clone()  # intensity grows head-wards (axis 2 = S)
    for seed in range(5):
        out = augment(batch, cfg, torch.Generator().manual_seed(seed))
        x = out["image"][:, 0, 4:-4, 4:-4, 2:-2]  # away from padded borders
        prof = x.mean(dim=(1, 2))  # (B, K)
        assert torch.all(prof[:, -1] > prof[:, 0]), "head-foot flipped"
        for key in ("region", "body", "lesion", "seg_allowed", "box", "ball"):
            assert set(torch.unique(out[key]).tolist()) <= {0.0, 1.0}, key
        assert torch.all(out["region"] >= out["body"]), "region must contain the body"
        assert out["cls"].tolist() == batch["cls"].tolist()
    a = augment(batch, cfg, torch.Generator().manual_seed(1))
    b = augment(batch, cfg, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1)) for key in a)
    assert not torch.equal(a["image"], augment(batch, cfg, torch.Generator().manual_seed(2))["image"])


def test_augment_keeps_soft_body_targets_soft_and_absent_where_absent():
    cfg = tiny_config()
    cfg.train.aug_prob = 1.0
    batch = collate(toy_samples(cfg, 4, seed=0))
    soft = torch.full_like(batch["body_soft"], float("nan"))
    soft[0, 0, 6:10, 6:10, 6:10] = 0.25  # one sample with a soft band, the others without
    batch["body_soft"] = soft
    for seed in range(4):
        out = augment(batch, cfg, torch.Generator().manual_seed(seed))["body_soft"]
        assert torch.isnan(out[1:]).all()  # no target appears where none was given (nor from padding)
        given = out[0][~torch.isnan(out[0])]
        assert given.numel() > 0 and torch.all(given == 0.25)


def test_contrast_dropout_only_with_contrast_input():
    from stage2_classify.config import ModelConfig

    cfg = tiny_config()
    samples = toy_samples(cfg, 64, seed=0)
    for s in samples:
        s.contrast = "water"
    batch = collate(samples)
    assert batch["contrast"].tolist() == [3] * 64
    out = augment(batch, cfg, torch.Generator().manual_seed(0))
    assert out["contrast"].tolist() == [3] * 64  # contrast input off: never hidden, random stream untouched
    cfg.model = ModelConfig(base_channels=8, levels=3, dropout=0.0, contrast_input=True)
    cfg.train.contrast_dropout = 0.5
    hidden = augment(batch, cfg, torch.Generator().manual_seed(0))["contrast"]
    assert set(hidden.tolist()) == {-1, 3} and 12 <= int((hidden == -1).sum()) <= 52
    assert batch["contrast"].tolist() == [3] * 64  # input batch untouched


def test_region_jitter_never_grows_onto_another_body():
    """The region abuts a neighbour (full masks): growing it by a voxel must stop at the neighbour."""
    cfg = tiny_config()
    cfg.train.aug_prob = 0.0  # no warp: only the region jitter acts
    cfg.train.region_jitter_prob = 1.0  # half the samples grown, half shrunk
    batch = collate(toy_samples(cfg, 8, seed=0))
    shape = batch["region"].shape[-3:]
    region = torch.zeros(shape)
    region[2:8, 2:8, 2:7] = 1.0
    others = torch.zeros(shape)
    others[2:8, 2:8, 7:10] = 1.0  # the next body starts right where the region stops
    batch["region"] = region.expand_as(batch["region"]).clone()
    batch["body"] = batch["region"].clone()
    batch["others"] = others.expand_as(batch["region"]).clone()
    grown = 0
    for seed in range(3):
        out = augment(batch, cfg, torch.Generator().manual_seed(seed))
        assert not (out["region"] * batch["others"]).any(), "the jittered region reached the neighbour"
        grown += int((out["region"].sum(dim=(1, 2, 3, 4)) > region.sum()).sum())
    assert grown > 0  # the region did grow elsewhere


def test_shell_shuffle_permutes_only_the_margin_of_exact_bodies_and_only_for_the_cls_path():
    from stage2_classify.train import shuffle_shell

    g = torch.Generator().manual_seed(0)
    image = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 1, 5, 6, 7)  # every value distinct
    body = torch.zeros_like(image)
    body[:, :, 2, 2:4, 2:5] = 1
    region = body.clone()
    region[:, :, 1:4, 1:5, 1:6] = 1
    out = shuffle_shell(image, region, body, torch.tensor([True, False]), g)
    shell = (region > 0.5) & (body < 0.5)
    assert torch.equal(out[1], image[1])  # not picked: untouched
    assert torch.equal(out[0][~shell[0]], image[0][~shell[0]])  # body and outside the region: untouched
    a, b = out[0][shell[0]], image[0][shell[0]]
    assert torch.equal(a.sort().values, b.sort().values) and not torch.equal(a, b)  # a real permutation
    # through augment: only with the setting, only for exact (full-mask) bodies, the dense input untouched
    cfg = tiny_config()
    batch = collate(toy_samples(cfg, 6, seed=0))
    assert batch["exact_body"].all()
    assert "cls_image" not in augment(batch, cfg, torch.Generator().manual_seed(0))
    cfg.train.shell_shuffle_prob = 1.0
    batch["exact_body"][0] = False
    out = augment(batch, cfg, torch.Generator().manual_seed(0))
    moved = (out["cls_image"] != out["image"])
    sh = (out["region"] > 0.5) & (out["body"] < 0.5)
    assert not moved[0].any() and moved[1:].any() and not (moved & ~sh).any()
    for i in range(1, 6):
        assert torch.equal(out["cls_image"][i][sh[i]].sort().values, out["image"][i][sh[i]].sort().values)


def test_training_module_hands_cls_image_to_the_classification_path():
    from stage2_classify.train import Stage2Trainable

    cfg = tiny_config()
    torch.manual_seed(0)
    module = Stage2Trainable(cfg).eval()
    batch = collate(toy_samples(cfg, 3, seed=1))
    batch["cls_image"] = batch["image"].flip(-1)
    with torch.no_grad():
        _, _, logits = module(batch)
        want = module.net(batch["cls_image"], batch["region"], batch["contrast"])["cls"]
        plain = module.net(batch["image"], batch["region"], batch["contrast"])["cls"]
    assert torch.allclose(logits, want) and not torch.allclose(logits, plain)


def test_margin_gradient_penalty_trains_the_network_away_from_the_margin():
    """train.margin_grad_penalty: a loss term in [0, 1] for exact bodies only, not computed at weight 0, and a
    few steps on it alone lower the margin's share of the first-order attribution."""
    from stage2_classify.train import Stage2Trainable

    cfg = tiny_config()
    assert cfg.train.margin_grad_penalty == 0.0 and cfg.train.margin_grad_gate == 0.0  # the defaults: off
    torch.manual_seed(0)
    batch = collate(toy_samples(cfg, 6, seed=2))
    _, parts, _ = Stage2Trainable(cfg).train()(batch)
    assert "margin_grad" not in parts  # 0 = off
    cfg.train.margin_grad_penalty = 1.0
    torch.manual_seed(0)
    module = Stage2Trainable(cfg).train()
    assert "margin_grad" not in module.eval()(batch)[1]  # training only
    module.train()
    loose = dict(batch, exact_body=torch.zeros_like(batch["exact_body"]))
    assert float(module(loose)[1]["margin_grad"]) == 0.0  # no exact body, nothing to penalise (logged as 0)
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    shares = []
    for _ in range(12):
        opt.zero_grad()
        _, parts, _ = module(batch)
        shares.append(float(parts["margin_grad"].detach()))
        parts["margin_grad"].backward()  # the penalty alone reaches the weights (double back-propagation)
        opt.step()
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert min(shares[-3:]) < 0.8 * shares[0], shares
    with pytest.raises(ValueError, match="margin_grad_penalty"):
        cfg.train.margin_grad_penalty = -1.0
        cfg.validate()
    from stage2_classify.train import train_on_samples

    cfg.train.margin_grad_penalty, cfg.ig_baseline_sigma_mm = 1.0, None
    cfg.validate()  # a saved model without the IG baseline still loads ...
    with pytest.raises(ValueError, match="ig_baseline_sigma_mm"):  # ... but does not train with the penalty
        train_on_samples(toy_samples(cfg, 2, seed=2), cfg, "/nonexistent/never-written")


def test_margin_gradient_penalty_schedule():
    from stage2_classify.train import margin_weight

    cfg = tiny_config()
    cfg.train.epochs = 8  # no gate (the default): the schedule alone
    assert [margin_weight(cfg, e) for e in range(8)] == [0.0] * 8  # off
    cfg.train.margin_grad_penalty = 2.0
    cfg.train.margin_grad_start, cfg.train.margin_grad_ramp = 0.5, 0.25  # from epoch 4, full at epoch 5
    assert [margin_weight(cfg, e) for e in range(8)] == [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0]
    cfg.train.margin_grad_start, cfg.train.margin_grad_ramp = 0.0, 0.0
    assert [margin_weight(cfg, e) for e in range(8)] == [2.0] * 8


def test_margin_gradient_penalty_gate_follows_the_classification_loss():
    """train.margin_grad_gate: the weight scales with how far the mean classification loss of the last three
    epochs lies below chance (ln K), 0 before three epochs are logged, and closes again at chance."""
    import math

    from stage2_classify.train import margin_weight

    cfg = tiny_config()
    cfg.train.epochs = 10
    cfg.train.margin_grad_penalty = 2.0
    cfg.train.margin_grad_start, cfg.train.margin_grad_ramp = 0.0, 0.0
    cfg.train.margin_grad_gate = 0.1
    cfg.validate()
    chance = math.log(len(cfg.classes))
    losses = [chance, chance, chance, 0.95 * chance, 0.95 * chance, 0.95 * chance, 0.5 * chance, chance, chance, chance]
    rows = [{"epoch": e + 1, "loss_cls": v} for e, v in enumerate(losses)]
    got = [margin_weight(cfg, e, rows) for e in range(10)]
    # epoch e sees rows[:e]: too few rows, then the gate at 0, 1/6, 1/3, 1/2, then open (loss >= 10 % below chance)
    want = [0.0, 0.0, 0.0, 0.0, 2.0 * (0.05 / 3) / 0.1, 2.0 * (0.10 / 3) / 0.1, 1.0, 2.0, 2.0, 2.0]
    assert got == pytest.approx(want, abs=1e-12)
    assert margin_weight(cfg, 10, rows) == 0.0  # back at chance for three epochs: the gate is shut again
    cfg.train.margin_grad_gate = 0.0
    assert margin_weight(cfg, 0, []) == 2.0  # no gate: the schedule alone
    with pytest.raises(ValueError, match="margin_grad_gate"):
        cfg.train.margin_grad_gate = 1.5
        cfg.validate()
