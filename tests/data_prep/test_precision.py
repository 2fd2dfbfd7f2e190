"""Network-pass precision settings: what each resolves to, and what autocast does with it."""
from __future__ import annotations

import pytest
import torch

from data_prep import precision


def test_explicit_settings_resolve_to_themselves_and_bad_ones_name_the_choices():
    assert precision.resolve("float32", "cpu") == "float32"
    assert precision.resolve("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match=r"expected one of float32, bfloat16, auto, got 'fp16'"):
        precision.resolve("fp16", "cpu")


@pytest.mark.parametrize("native", [False, True])
def test_auto_follows_the_cpus_native_bfloat16(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.native_bf16("cpu") is native
    assert precision.resolve("auto", "cpu") == ("bfloat16" if native else "float32")


def test_autocast_runs_convolutions_in_bfloat16_only_when_asked():
    conv = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 5, 6, 7)
    with precision.autocast("bfloat16", "cpu"):
        assert conv(x).dtype == torch.bfloat16
    with precision.autocast("float32", "cpu"):
        assert conv(x).dtype == torch.float32
