"""``spinepipe localize`` / ``train-stage1``: one-line errors and the centroid CSV."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from data_prep import checkpoint
from data_prep.io import write_image
from data_prep.scan import Scan
from pipeline.cli import main
from stage1_localize.config import NetworkPlan, Stage1Config
from stage1_localize.infer import CENTROID_COLUMNS
from stage1_localize.model import LocalizerNet


def _tiny_model(folder):
    cfg = Stage1Config(plan=NetworkPlan(pool_kernels=((1, 1, 1), (2, 2, 2)), conv_kernels=((3, 3, 3),) * 2,
                                        base_features=4))
    torch.manual_seed(0)
    net = LocalizerNet(cfg)
    with torch.no_grad():
        net.heads["heatmap"].bias.fill_(-20.0)  # no peaks: an empty but valid CSV
    checkpoint.save_model(folder, net.state_dict(), cfg, kind="stage1")


def test_localize_without_model_is_a_one_line_error(tmp_path):
    img = write_image(Scan(np.zeros((8, 8, 8), np.float32)), tmp_path / "a_image.nii.gz")
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "none")])
    assert res.exit_code == 2
    assert "make train-stage1" in res.output and "Traceback" not in res.output


def test_localize_writes_centroid_csv(tmp_path):
    _tiny_model(tmp_path / "m")
    img = write_image(Scan(np.random.default_rng(0).random((30, 20, 40)).astype(np.float32), spacing=(2.0, 2.0, 2.0)),
                      tmp_path / "subj-1_image.nii.gz")
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "out" / "subj-1_centroids.csv")
    assert list(df.columns) == CENTROID_COLUMNS and len(df) == 0


def test_localize_accepts_the_models_parent_folder(tmp_path):
    _tiny_model(tmp_path / "models" / "stage1")
    img = write_image(Scan(np.zeros((30, 20, 40), np.float32), spacing=(2.0, 2.0, 2.0)), tmp_path / "s_image.nii.gz")
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "s_centroids.csv").is_file()


def test_localize_missing_scan(tmp_path):
    _tiny_model(tmp_path / "m")
    res = CliRunner().invoke(main, ["localize", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path), "--models", str(tmp_path / "m")])
    assert res.exit_code == 2 and "not found" in res.output


def test_localize_with_two_models_runs_their_ensemble(tmp_path, monkeypatch):
    """``--models`` repeated: one Localizer over both folders (a models parent folder resolves to stage1/)."""
    from stage1_localize import infer

    _tiny_model(tmp_path / "a")
    _tiny_model(tmp_path / "models" / "stage1")
    seen = []
    real_init = infer.Localizer.__init__

    def spy(self, model_dir=None, **kw):
        seen.append(model_dir)
        real_init(self, model_dir, **kw)

    monkeypatch.setattr(infer.Localizer, "__init__", spy)
    img = write_image(Scan(np.zeros((30, 20, 40), np.float32), spacing=(2.0, 2.0, 2.0)), tmp_path / "s_image.nii.gz")
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "a"),
                                    "--models", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    assert seen == [[tmp_path / "a", tmp_path / "models" / "stage1"]]
    assert (tmp_path / "out" / "s_centroids.csv").is_file()
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out2"), "--models", str(tmp_path / "a"),
                                    "--models", str(tmp_path / "none")])
    assert res.exit_code == 2 and "make train-stage1" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out2").exists()


def test_predict_takes_stage1_folders_instead_of_models_stage1(tmp_path, monkeypatch):
    """``load_models(..., stage1_dirs=)``: two folders -> an ensemble Localizer, none -> MODELS/stage1; and
    ``spinepipe predict --stage1 MISSING`` fails fast with the one-line error naming the folder."""
    import stage2_classify.infer as s2
    from pipeline.commands.predict import load_models

    monkeypatch.setattr(s2, "Classifier", lambda *a, **k: "stand-in classifier")
    for name in ("a", "b", "models/stage1"):
        _tiny_model(tmp_path / name)
    loc, cls = load_models(tmp_path / "models", stage1_dirs=(tmp_path / "a", tmp_path / "b"))
    assert len(loc.members) == 2 and cls == "stand-in classifier"
    assert len(load_models(tmp_path / "models")[0].members) == 1
    img = write_image(Scan(np.zeros((30, 20, 40), np.float32), spacing=(2.0, 2.0, 2.0)), tmp_path / "s_image.nii.gz")
    res = CliRunner().invoke(main, ["predict", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "models"),
                                    "--stage1", str(tmp_path / "a"), "--stage1", str(tmp_path / "none")])
    assert res.exit_code == 2 and "none" in res.output and "make train-stage1" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_train_stage1_members_trains_an_ensemble_that_localize_reads_from_the_parent(tmp_path, monkeypatch):
    """``train-stage1 --members 2`` goes to ``train_stage1_ensemble`` with the seed and epochs asked for;
    ``localize --models PARENT`` then finds the ensemble in PARENT/stage1 (ensemble.json, no config.json)."""
    from stage1_localize import train

    calls = []

    def fake_ensemble(data_dir, out_dir, cfg, members, resume):
        calls.append((cfg.seed, cfg.epochs, members, resume))
        for m in range(members):
            _tiny_model(out_dir / f"member{m}")
        (out_dir / checkpoint.ENSEMBLE).write_text('{"kind": "stage1-ensemble", "members": ["member0", "member1"]}')
        return out_dir

    monkeypatch.setattr(train, "train_stage1_ensemble", fake_ensemble)
    monkeypatch.setattr(train, "train_stage1", lambda *a, **k: pytest.fail("single-model training called"))
    data = tmp_path / "data"
    data.mkdir()
    res = CliRunner().invoke(main, ["train-stage1", "--data", str(data), "--out", str(tmp_path / "models" / "stage1"),
                                    "--members", "2", "--seed", "3", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert calls == [(3, 2, 2, False)] and "ensemble of 2" in res.output
    img = write_image(Scan(np.zeros((30, 20, 40), np.float32), spacing=(2.0, 2.0, 2.0)), tmp_path / "s_image.nii.gz")
    res = CliRunner().invoke(main, ["localize", str(img), "-o", str(tmp_path / "out"), "--models", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train-stage1", "--data", str(data), "--members", "0"])
    assert res.exit_code == 2 and "--members" in res.output


def test_train_stage1_config_json_reaches_training_and_bad_configs_are_one_line_errors(tmp_path, monkeypatch):
    """``train-stage1 --config`` fills any subset of Stage1Config (nested), the rest keep their defaults, and
    ``--seed`` overrides it; an unknown field or unreadable JSON is a one-line error naming the file."""
    from stage1_localize import train

    seen = []
    monkeypatch.setattr(train, "train_stage1", lambda data_dir, out_dir, cfg, resume: seen.append(cfg) or out_dir)
    data = tmp_path / "data"
    data.mkdir()
    cfg_path = tmp_path / "s1.json"
    cfg_path.write_text('{"augment": {"max_rotation_deg": 12}, "seed": 5, "epochs": 7}')
    res = CliRunner().invoke(main, ["train-stage1", "--data", str(data), "--out", str(tmp_path / "m"),
                                    "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    assert seen[-1].augment.max_rotation_deg == 12.0 and seen[-1].seed == 5 and seen[-1].epochs == 7
    assert seen[-1].augment.p_rotate == Stage1Config().augment.p_rotate  # untouched fields keep their defaults
    res = CliRunner().invoke(main, ["train-stage1", "--data", str(data), "--out", str(tmp_path / "m"),
                                    "--config", str(cfg_path), "--seed", "2"])
    assert res.exit_code == 0 and seen[-1].seed == 2 and seen[-1].epochs == 7
    for text, expected in (('{"augment": {"max_rotaton_deg": 12}}', "unknown AugmentConfig field"),
                           ("{not json", "cannot read config JSON")):
        cfg_path.write_text(text)
        res = CliRunner().invoke(main, ["train-stage1", "--data", str(data), "--config", str(cfg_path)])
        lines = res.output.strip().splitlines()
        assert res.exit_code != 0 and len(lines) == 1 and str(cfg_path) in lines[0] and expected in lines[0], res.output
    assert len(seen) == 2
