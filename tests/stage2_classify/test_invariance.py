"""THE evidence guarantee: the class verdict is a function of the voxels inside the dilated region only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_classify.config import HeadsConfig, ModelConfig, tiny_config
from stage2_classify.model import Stage2Net
from stage2_classify.patches import dilate, ellipsoid_prior


def _setup(seed: int, shape=(12, 16, 16), **cfg_kw):
    torch.manual_seed(seed)
    cfg = tiny_config(**cfg_kw)
    net = Stage2Net(cfg)
    rng = np.random.default_rng(seed)
    body = ellipsoid_prior(shape, (np.array(shape) - 1) / 2 + rng.uniform(-1, 1, 3), np.array([4.0, 3.0, 2.5]))
    region = torch.from_numpy(dilate(body, cfg.margin_vox).astype(np.float32))[None, None]
    image = torch.from_numpy(rng.normal(0.5, 0.3, shape).astype(np.float32))[None, None]
    return net, image, region


def _probs(net, image, region):
    with torch.no_grad():
        return torch.softmax(net(image, region)["cls"], dim=1)


@pytest.mark.parametrize("norm", ["region", "body"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outside_voxels_cannot_change_the_verdict(seed, mode, norm):
    net, image, region = _setup(seed, model=ModelConfig(base_channels=8, levels=3, dropout=0.0, norm_statistics=norm))
    getattr(net, mode)()
    p0 = _probs(net, image, region)
    assert float(p0.max()) < 0.99  # not saturated: a change would show
    g = torch.Generator().manual_seed(100 + seed)
    outside = region < 0.5
    for scale in (1.0, 100.0, 1e4):
        changed = image.clone()
        changed[outside] = scale * torch.randn(int(outside.sum()), generator=g)
        p1 = _probs(net, changed, region)
        assert float((p1 - p0).abs().max()) <= 1e-6
    # negative control: one voxel INSIDE the region does change the verdict
    inside = torch.nonzero(region[0, 0] > 0.5).float()
    i, j, k = inside.mean(0).round().long().tolist()  # the region's central voxel
    assert region[0, 0, i, j, k] > 0.5
    changed = image.clone()
    changed[0, 0, i, j, k] += 50.0
    assert float((_probs(net, changed, region) - p0).abs().max()) > 1e-4


def test_invariance_odd_shape_heads_off_and_batch_independence():
    cfg_kw = dict(heads=HeadsConfig(cls=True, seg=False, heatmap=False, recon=True),
                  model=ModelConfig(base_channels=4, levels=3, dropout=0.0))
    net, image, region = _setup(5, shape=(11, 13, 9), **cfg_kw)
    net.train()  # per-sample InstanceNorm only: train mode must not mix samples or see outside voxels
    other = torch.randn_like(image)
    batch = torch.cat([image, other])
    regions = torch.cat([region, torch.ones_like(region)])
    with torch.no_grad():
        p0 = torch.softmax(net(batch, regions)["cls"], 1)[0]
    changed = image.clone()
    changed[region < 0.5] = 1e3
    batch2 = torch.cat([changed, 5 * torch.randn_like(image)])  # other sample changed everywhere
    with torch.no_grad():
        p1 = torch.softmax(net(batch2, regions)["cls"], 1)[0]
    assert float((p1 - p0).abs().max()) <= 1e-6


def test_aux_heads_do_see_outside():
    """Sanity: the auxiliary path uses the full patch (so the invariance above is not trivial)."""
    net, image, region = _setup(3)
    net.eval()
    changed = image.clone()
    changed[region < 0.5] = 10.0
    with torch.no_grad():
        s0 = net(image, region)["seg"]
        assert float((net(changed, region)["seg"] - s0).abs().max()) > 1e-3


def test_integrated_gradients_zero_outside_region():
    from stage2_classify.evidence import integrated_gradients

    net, image, region = _setup(7)
    attr, target = integrated_gradients(net, image, region, n_steps=4)
    assert attr.shape == tuple(image.shape[2:])
    assert np.all(attr[region[0, 0].numpy() < 0.5] == 0.0)
    assert np.abs(attr[region[0, 0].numpy() > 0.5]).sum() > 0


def test_region_standardise_cancels_affine_intensity_maps():
    from stage2_classify.model import region_standardise

    net, image, region = _setup(11)
    net.eval()
    p0 = _probs(net, image, region)
    assert float((_probs(net, 3.7 * image + 12.0, region) - p0).abs().max()) <= 1e-5
    x = region_standardise(image, region)
    inside = x[region > 0.5]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std(unbiased=False)) - 1) < 1e-3


def test_scan_level_verdict_ignores_everything_outside_the_vertebra():
    """End to end (Classifier on a scan with given masks): rewrite all voxels outside a vertebra's
    dilated region -- including bright junk that moves the scan's intensity window -- and its
    probabilities stay put; the other vertebra (whose region contains the rewritten voxels) moves."""
    from data_prep.scan import Scan, vertebrae_from_labelmap
    from stage2_classify.infer import Classifier
    from stage2_classify.patches import dilate as np_dilate

    torch.manual_seed(0)
    cfg = tiny_config()
    net = Stage2Net(cfg)
    shape = (48, 40, 20)
    d = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float).T
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 8, shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    lab[6:18, 10:30, 5:15] = 20
    lab[28:40, 10:30, 5:15] = 21
    arr[lab > 0] = rng.normal(150, 20, int((lab > 0).sum()))
    scan = Scan(arr, (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), d)
    labels = scan.with_array(lab)
    verts = vertebrae_from_labelmap(labels)
    clf = Classifier.from_network(net)
    before = clf.classify(scan, verts, masks=labels, with_evidence=False)
    # keep vertebra 20 and a generous shell (2x the margin, in scan voxels); rewrite everything else
    keep = np_dilate(lab == 20, 4)
    new = arr.copy()
    new[~keep] = rng.uniform(0, 5000, int((~keep).sum()))
    after = clf.classify(scan.with_array(new), verts, masks=labels, with_evidence=False)
    dp20 = max(abs(before[0]["probabilities"][c] - after[0]["probabilities"][c]) for c in cfg.classes)
    dp21 = max(abs(before[1]["probabilities"][c] - after[1]["probabilities"][c]) for c in cfg.classes)
    assert dp20 <= 1e-4
    assert dp21 > 1e-3


def test_contrast_input_is_metadata_not_voxels():
    """With ``model.contrast_input`` the verdict depends on the stated contrast, and still on no outside voxel."""
    net, image, region = _setup(7, model=ModelConfig(base_channels=8, levels=3, dropout=0.0, contrast_input=True))
    net.eval()

    def probs(img, c):
        with torch.no_grad():
            return torch.softmax(net.forward_cls(img, region, None if c is None else torch.tensor([c])), 1)

    p = {c: probs(image, c) for c in (None, -1, 0, 1, 2, 3)}
    assert torch.equal(p[None], p[-1])  # unknown = all-zero code
    assert float((p[3] - p[1]).abs().max()) > 1e-4  # water vs t2: a different verdict is possible
    changed = image.clone()
    changed[region < 0.5] = 1e3 * torch.randn(int((region < 0.5).sum()))
    for c in (-1, 1, 3):
        assert float((probs(changed, c) - p[c]).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="contrast indices"):
        probs(image, 4)
    # a model without contrast input ignores it
    plain, image2, region2 = _setup(7)
    with torch.no_grad():
        a = plain.forward_cls(image2, region2, torch.tensor([3]))
        b = plain.forward_cls(image2, region2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_masks", [True, False])
def test_neighbouring_body_within_the_margin_cannot_reach_the_verdict(use_masks):
    """Two bodies one voxel (4 mm) apart and a 2-voxel margin: the margin covers the gap and would reach
    the neighbour's endplate; its voxels are cut from the region (given masks, or a seg head that calls
    them neighbour), so rewriting the whole neighbour leaves the verdict exactly put. Scan and patch grids
    coincide (4 mm, identity direction, half-integer centroids), so no interpolation mixes voxels."""
    from data_prep.scan import Scan, Vertebra
    from stage2_classify.config import SEG_BG, SEG_CENTRE, SEG_NEIGHBOUR
    from stage2_classify.infer import Classifier

    torch.manual_seed(0)
    net = Stage2Net(tiny_config(margin_mm=8.0))
    shape = (24, 24, 24)
    lab = np.zeros(shape, np.int16)
    lab[8:16, 6:18, 2:10] = 20
    lab[8:16, 6:18, 11:19] = 21  # k = 10 is the 4-mm gap
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 8, shape).astype(np.float32)
    arr[lab > 0] = rng.normal(150, 20, int((lab > 0).sum()))
    scan = Scan(arr, (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    centroid = scan.voxel_to_world(np.argwhere(lab == 20).mean(0)).coords[0]
    verts = [Vertebra(20, centroid)]
    if not use_masks:  # a stand-in seg head: neighbour where the scan says 21, centre where it says 20
        def forward_dense(img):
            logits = torch.full((1, 5, *img.shape[2:]), -5.0)
            patch_lab = torch.from_numpy(crop_lab(centroid))
            for value, c in ((0, SEG_BG), (20, SEG_CENTRE), (21, SEG_NEIGHBOUR)):
                logits[0, c][patch_lab == value] = 5.0
            return {"seg": logits}

        def crop_lab(c):
            from stage2_classify.patches import crop_patch
            return crop_patch(scan.with_array(lab), c, net.cfg.patch, is_label=True).array.astype(np.int64)

        net.forward_dense = forward_dense
    clf = Classifier.from_network(net)
    masks = scan.with_array(lab) if use_masks else None
    before = clf.classify(scan, verts, masks=masks, with_evidence=False)[0]
    assert before["region_source"] == ("mask" if use_masks else "predicted")
    new = arr.copy()
    new[lab == 21] = rng.normal(150, 60, int((lab == 21).sum()))  # a different neighbour, same intensity range
    after = clf.classify(scan.with_array(new), verts, masks=masks, with_evidence=False)[0]
    dp = max(abs(before["probabilities"][c] - after["probabilities"][c]) for c in net.cfg.classes)
    assert dp <= 1e-6
    # negative control: the gap voxels are inside the margin and do move the verdict
    gap = arr.copy()
    gap[8:16, 6:18, 10] += 200.0
    moved = clf.classify(scan.with_array(gap), verts, masks=masks, with_evidence=False)[0]
    assert max(abs(before["probabilities"][c] - moved["probabilities"][c]) for c in net.cfg.classes) > 1e-4


def test_cls_image_feeds_the_classification_path_only_and_norm_statistics_picks_the_mask(monkeypatch):
    import stage2_classify.model as model_mod

    net, image, region = _setup(3, model=ModelConfig(base_channels=8, levels=3, dropout=0.0, norm_statistics="body"))
    net.eval()
    other = image.flip(-1)
    with torch.no_grad():
        mixed, plain, swapped = net(image, region, cls_image=other), net(image, region), net(other, region)
    assert torch.equal(mixed["cls"], swapped["cls"]) and not torch.equal(mixed["cls"], plain["cls"])
    assert torch.equal(mixed["seg"], plain["seg"])  # the dense heads read the untouched image
    seen = []
    real = model_mod.region_standardise
    monkeypatch.setattr(model_mod, "region_standardise", lambda x, m, *a: seen.append(m.clone()) or real(x, m, *a))
    with torch.no_grad():
        net(image, region)
        net.norm_on_body = False
        net(image, region)
    pool = net.pooling_mask(region)
    assert 0 < float(pool.sum()) < float(region.sum())
    assert torch.equal(seen[0], pool) and torch.equal(seen[1], (region > 0.5).float())


def _warm_feature_norm(net, image, region, steps: int = 3):
    """A few train-mode passes so that the FeatureNorm's running statistics are not the identity."""
    net.train()
    with torch.no_grad():
        for s in range(steps):
            g = torch.Generator().manual_seed(s)
            net(torch.cat([image, image + 0.3 * torch.randn(image.shape, generator=g)]), torch.cat([region, region]))


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_norm_keeps_the_guarantee_in_eval_and_in_a_training_batch(seed):
    """``model.cls_feature_norm="batch"``: in evaluation a fixed affine map per feature; in a training batch a
    vertebra's verdict depends on the other vertebrae's pooled features, never on its own outside voxels."""
    net, image, region = _setup(seed, model=ModelConfig(base_channels=8, levels=3, dropout=0.0,
                                                        cls_feature_norm="batch"))
    _warm_feature_norm(net, image, region)
    assert float(net.heads["cls"].norm.running_var.sub(1).abs().max()) > 1e-3  # statistics really moved
    g = torch.Generator().manual_seed(50 + seed)
    others = image + 0.5 * torch.randn((2, *image.shape[1:]), generator=g)
    regions = torch.cat([region] * 3)
    changed = image.clone()
    changed[region < 0.5] = 1e3 * torch.randn(int((region < 0.5).sum()), generator=g)
    for mode in ("eval", "train"):
        getattr(net, mode)()
        p0 = _probs(net, torch.cat([image, others]), regions)
        p1 = _probs(net, torch.cat([changed, others]), regions)
        assert float((p1 - p0).abs().max()) <= 1e-6, mode
    # negative control in training: another vertebra of the batch does move this one's verdict (batch statistics)
    p2 = _probs(net, torch.cat([image, others + 5.0 * torch.randn(others.shape, generator=g)]), regions)
    assert float((p2[0] - p0[0]).abs().max()) > 1e-5


def test_feature_norm_takes_a_batch_of_one_in_training_without_touching_its_statistics():
    net, image, region = _setup(4, model=ModelConfig(base_channels=8, levels=3, dropout=0.0, cls_feature_norm="batch"))
    _warm_feature_norm(net, image, region)
    norm = net.heads["cls"].norm
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    net.train()
    p_train = _probs(net, image, region)  # BatchNorm1d alone would raise on one value per channel
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert int(norm.num_batches_tracked) == before[2]
    net.eval()
    assert float((_probs(net, image, region) - p_train).abs().max()) <= 1e-6
