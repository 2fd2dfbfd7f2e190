"""Safe model files: round trip, and every kind of tampering or mismatch fails with a clear error."""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field

import pytest
import torch

from data_prep.checkpoint import (
    CONFIG,
    TRAIN_STATE,
    WEIGHTS,
    load_model,
    load_state_into,
    load_train_state,
    save_model,
    save_train_state,
)
from data_prep.errors import SpinepipeInputError


@dataclass
class Inner:
    width: int = 4


@dataclass
class Cfg:
    features: int = 3
    classes: tuple[str, ...] = ("normal", "inflammation", "fat")
    inner: Inner = field(default_factory=Inner)


def _net(features=3):
    return torch.nn.Sequential(torch.nn.Linear(2, features), torch.nn.Linear(features, 1))


def test_round_trip(tmp_path):
    net = _net()
    save_model(tmp_path, net.state_dict(), Cfg(inner=Inner(7)), kind="stage2", extra={"epochs": 3})
    state, cfg, extra = load_model(tmp_path, Cfg, kind="stage2")
    assert cfg == Cfg(inner=Inner(7)) and isinstance(cfg.classes, tuple)
    assert extra == {"epochs": 3}
    other = _net()
    load_state_into(other, state, tmp_path)
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


@pytest.fixture()
def saved(tmp_path):
    save_model(tmp_path, _net().state_dict(), Cfg(), kind="stage2")
    return tmp_path


def test_tampered_weights(saved):
    w = saved / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(SpinepipeInputError, match="checksum"):
        load_model(saved, Cfg, kind="stage2")


def test_pickle_instead_of_safetensors_is_refused(saved):
    """A pickled payload (which could run code) in place of the weights never gets unpickled."""
    (saved / WEIGHTS).write_bytes(pickle.dumps({"x": 1}))
    meta = json.loads((saved / CONFIG).read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256((saved / WEIGHTS).read_bytes()).hexdigest()
    (saved / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(SpinepipeInputError, match="unreadable weights"):
        load_model(saved, Cfg, kind="stage2")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(kind="stage1"), "expected a stage2 model"),
        (lambda m: m.update(format="other"), "not a spinepipe model"),
        (lambda m: m.update(version=99), "version"),
        (lambda m: m["config"].update(bogus=1), "unknown Cfg field"),
        (lambda m: m.update(config_class="Other"), "expected config Cfg"),
    ],
)
def test_mismatched_config(saved, edit, match):
    meta = json.loads((saved / CONFIG).read_text())
    edit(meta)
    (saved / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(SpinepipeInputError, match=match):
        load_model(saved, Cfg, kind="stage2")


def test_corrupt_json(saved):
    (saved / CONFIG).write_text("{not json")
    with pytest.raises(SpinepipeInputError, match="JSON"):
        load_model(saved, Cfg, kind="stage2")


def test_missing_files(tmp_path):
    with pytest.raises(SpinepipeInputError, match="not found"):
        load_model(tmp_path, Cfg, kind="stage2")


def test_shape_mismatch(saved):
    state, _, _ = load_model(saved, Cfg, kind="stage2")
    with pytest.raises(SpinepipeInputError, match="shape"):
        load_state_into(_net(features=5), state, saved)


def test_train_state_round_trip_and_restricted_loading(tmp_path):
    state = {"epoch": 3, "model": _net().state_dict(), "rng": torch.get_rng_state()}
    save_train_state(tmp_path, state)
    back = load_train_state(tmp_path)
    assert back["epoch"] == 3 and torch.equal(back["rng"], state["rng"])
    assert load_train_state(tmp_path / "nothing") is None

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"x": Evil()}, tmp_path / TRAIN_STATE)
    with pytest.raises(SpinepipeInputError, match="cannot resume"):
        load_train_state(tmp_path)


def test_make_ema_exact_values_and_off_switch():
    """First update copies the weights, later ones blend: ema = d * ema + (1 - d) * w."""
    import pytest
    import torch

    from data_prep.checkpoint import make_ema

    lin = torch.nn.Linear(1, 1, bias=False)
    assert make_ema(lin, 0.0) is None
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            make_ema(lin, bad)
    ema = make_ema(lin, 0.75)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema.update_parameters(lin)
    assert ema.module.weight.item() == 2.0
    with torch.no_grad():
        lin.weight.fill_(6.0)
    ema.update_parameters(lin)
    assert ema.module.weight.item() == 0.75 * 2.0 + 0.25 * 6.0  # 3.0
    assert lin.weight.item() == 6.0


def test_ema_state_round_trip_and_missing_average(tmp_path):
    import pytest
    import torch

    from data_prep.checkpoint import ema_state, load_ema_state, make_ema
    from data_prep.errors import SpinepipeInputError

    lin = torch.nn.Linear(2, 1)
    ema = make_ema(lin, 0.5)
    for _ in range(3):
        ema.update_parameters(lin)
    saved = ema_state(ema)
    assert saved["updates"] == 3
    other = make_ema(torch.nn.Linear(2, 1), 0.5)
    load_ema_state(other, saved, tmp_path / "train_state.pt")
    assert int(other.n_averaged) == 3
    assert torch.equal(other.module.weight, ema.module.weight)
    with pytest.raises(SpinepipeInputError, match="train_state.pt.*no average"):
        load_ema_state(other, None, tmp_path / "train_state.pt")


def test_update_ema_averages_parameters_and_copies_buffers():
    import torch

    from data_prep.checkpoint import make_ema, update_ema

    net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1, bias=False))
    ema = make_ema(net, 0.75)
    update_ema(None, net)  # no average: nothing to do
    with torch.no_grad():
        net[1].weight.fill_(2.0)
    net.train()
    net(torch.tensor([[0.0, 10.0], [4.0, 30.0]]))  # running statistics move
    update_ema(ema, net)
    assert torch.equal(ema.module[0].running_mean, net[0].running_mean)
    assert float(net[0].running_mean[1]) > 1.0
    assert int(ema.module[0].num_batches_tracked) == 1
    with torch.no_grad():
        net[1].weight.fill_(6.0)
    update_ema(ema, net)
    assert torch.allclose(ema.module[1].weight, torch.full((1, 2), 3.0))  # 0.75 * 2 + 0.25 * 6
