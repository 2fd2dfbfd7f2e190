"""Arithmetic precision of network passes: ``"float32"``, ``"bfloat16"`` or ``"auto"``.

``"bfloat16"`` runs the network's forward pass under :func:`torch.autocast`: convolutions and matrix
products in bfloat16, and, on the CPU, the ops that follow them on their bfloat16 outputs too
(InstanceNorm, LeakyReLU: torch's CPU autocast keeps only a short list of ops in float32; checked with
torch 2.14); weights, optimiser state, losses and every output handed back stay float32 (mixed
precision, not a bfloat16 model). bfloat16 keeps float32's exponent range, so unlike float16 it needs
no loss scaling.

``"auto"`` is bfloat16 where the device computes it natively and float32 elsewhere: a CUDA device that
reports bfloat16 support, or a CPU with AVX512-BF16 or AMX instructions (on other CPUs oneDNN emulates
bfloat16 and is slower than float32). :func:`resolve` turns a setting into the dtype actually used, so
that what a training ran with can be written next to its model.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("float32", "bfloat16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 natively (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(check()) for check in checks if callable(check))
    return False


def validate(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; ValueError saying what was expected otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve(precision: str, device: torch.device | str) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``precision`` means on ``device``.

    >>> resolve("float32", "cpu")
    'float32'
    """
    if validate(precision) == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which network passes on ``device`` run at ``precision`` (a no-op for float32)."""
    device = torch.device(device)
    if resolve(precision, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
