"""Safe model files and training state, shared by both stages.

A model folder (e.g. ``models/stage2/``) holds:

* ``model.safetensors`` — weights only (safetensors: no code can run on load);
* ``config.json`` — ``{"format": "spinepipe-model", "version": 1, "kind": ..., "config_class": ...,
  "config": {...dataclass fields...}, "extra": {...}, "weights_sha256": ...}``.

Loading checks the format tag, the kind (``"stage1"``/``"stage2"``), the config fields against the
dataclass (unknown or missing fields fail), the weights' SHA-256 against the JSON, and finally that the
tensor names and shapes match the network built from the config. Any mismatch raises
:class:`~data_prep.errors.SpinepipeInputError` naming the file.

Training state for ``--resume`` (``train_state.pt``) is written with ``torch.save`` and read back with
``torch.load(weights_only=True)``, PyTorch's restricted unpickler that only rebuilds tensors and plain
containers.

Shared infrastructure lives in ``data_prep`` (the bottom layer) so both stages can use it without
importing each other.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch

from data_prep.errors import SpinepipeInputError
from data_prep.io import atomic_path

FORMAT = "spinepipe-model"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
#: a stage-1 ensemble folder's list of member folders (``stage1_localize.train.train_stage1_ensemble``)
ENSEMBLE = "ensemble.json"

C = TypeVar("C")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_to_dict(cfg: Any) -> dict:
    """Dataclass (possibly nested) -> JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type[C], data: dict, *, source: str | os.PathLike = "config") -> C:
    """Rebuild dataclass ``cls`` from ``data``; nested dataclasses and tuples are restored.

    Raises :class:`SpinepipeInputError` naming ``source`` on unknown or missing fields.
    """
    if not isinstance(data, dict):
        raise SpinepipeInputError(source, f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpinepipeInputError(source, f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise SpinepipeInputError(source, f"missing {cls.__name__} field {name!r}")
            continue
        kwargs[name] = _coerce(hints.get(name), data[name], source)
    return cls(**kwargs)


def load_config_json(cls: type[C], path: str | os.PathLike) -> C:
    """Dataclass ``cls`` from a JSON file holding any subset of its fields (nested as in a saved
    ``config.json``; the rest keep their defaults), checked by ``cls.validate()`` where it has one.

    Raises :class:`SpinepipeInputError` naming ``path`` on unreadable JSON, unknown fields or invalid values.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise SpinepipeInputError(p, f"cannot read config JSON: {exc}") from None
    cfg = config_from_dict(cls, data, source=p)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ValueError as exc:
            raise SpinepipeInputError(p, str(exc)) from None
    return cfg


def _coerce(tp, value, source):
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value, source=source)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source) for v in value)
        return tuple(_coerce(a, v, source) for a, v in zip(args, value)) if args else tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in typing.get_args(tp):
            if a is type(None) and value is None:
                return None
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return config_from_dict(a, value, source=source)
            if typing.get_origin(a) is tuple and isinstance(value, list):
                return _coerce(a, value, source)
    return value


def save_model(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: Any,
    *,
    kind: str,
    extra: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` (atomically, weights first)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
        digest = _sha256(tmp)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "config_class": type(config).__name__,
        "config": config_to_dict(config),
        "extra": extra or {},
        "weights_sha256": digest,
    }
    with atomic_path(folder / CONFIG) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder


def load_model(folder: str | os.PathLike, config_cls: type[C], *, kind: str) -> tuple[dict[str, torch.Tensor], C, dict]:
    """Read a model folder written by :func:`save_model`: ``(state_dict, config, extra)``.

    Never unpickles. Raises :class:`SpinepipeInputError` on a missing, tampered or mismatched file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise SpinepipeInputError(p, "model file not found")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpinepipeInputError(cfg_path, f"not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpinepipeInputError(cfg_path, f"not a spinepipe model config (format tag {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise SpinepipeInputError(cfg_path, f"model format version {meta.get('version')!r}, this spinepipe reads {VERSION}")
    if meta.get("kind") != kind:
        raise SpinepipeInputError(cfg_path, f"expected a {kind} model, got {meta.get('kind')!r}")
    if meta.get("config_class") != config_cls.__name__:
        raise SpinepipeInputError(cfg_path, f"expected config {config_cls.__name__}, got {meta.get('config_class')!r}")
    if _sha256(w_path) != meta.get("weights_sha256"):
        raise SpinepipeInputError(w_path, "weights do not match the checksum in config.json (tampered or mixed-up files)")
    config = config_from_dict(config_cls, meta.get("config", {}), source=cfg_path)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpinepipeInputError(w_path, f"unreadable weights: {exc}") from None
    return state, config, meta.get("extra", {})


def model_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """What a run report should record about the model in ``folder`` (already loaded and verified by
    :func:`load_model`): its absolute path, kind, weights SHA-256 and the scalar fields of ``extra``
    (epochs, training-set size, ``synthetic_only`` ...; lists and tables such as the training subject ids
    are left out). Reads ``config.json`` only."""
    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    extra = {k: v for k, v in (meta.get("extra") or {}).items() if isinstance(v, (str, int, float, bool)) or v is None}
    return {"folder": str(folder.resolve()), "kind": meta.get("kind"), "weights_sha256": meta.get("weights_sha256"),
            **extra}


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict(state)`` with a one-line error naming ``source`` on any name/shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. {unexpected[0]}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k}: expected {tuple(own[k].shape)}, got {tuple(state[k].shape)}")
        raise SpinepipeInputError(source, "weights do not fit the network built from config.json: " + "; ".join(parts))
    module.load_state_dict(state)


def save_train_state(folder: str | os.PathLike, state: dict) -> Path:
    """Atomically write a resumable training state (tensors and plain containers only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / TRAIN_STATE) as tmp:
        torch.save(state, tmp)
    return folder / TRAIN_STATE


def load_train_state(folder: str | os.PathLike) -> dict | None:
    """The state written by :func:`save_train_state`, or None when there is none. Restricted unpickler only."""
    p = Path(folder) / TRAIN_STATE
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the restricted loader means a bad file
        raise SpinepipeInputError(p, f"cannot resume from this training state: {str(exc).splitlines()[0][:200]}") from None


def make_ema(module: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of ``module``'s parameters (``decay`` per update; torch's own
    ``AveragedModel`` + ``get_ema_multi_avg_fn``), or None when ``decay`` is 0 (off).

    Call :func:`update_ema` after every optimiser step; ``ema.module`` is the averaged copy.
    :func:`ema_state` / :func:`load_ema_state` carry it through the training state for resume (through the
    wrapped network's own ``state_dict``, which may rename tensors). Buffers (e.g. the running statistics of
    stage 2's optional ``FeatureNorm``) are copied from the live network, not averaged.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
    if decay == 0.0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))


def update_ema(ema: torch.optim.swa_utils.AveragedModel | None, module: torch.nn.Module) -> None:
    """One :func:`make_ema` step after an optimiser step: average ``module``'s parameters into ``ema`` and copy
    its buffers (``AveragedModel`` alone would leave the copy's buffers at their values at creation). No-op
    for ``None``."""
    if ema is None:
        return
    ema.update_parameters(module)
    with torch.no_grad():
        for mine, live in zip(ema.module.buffers(), module.buffers()):
            mine.copy_(live)


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copy of ``module.state_dict()`` (what :func:`save_model` writes)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def ema_state(ema: torch.optim.swa_utils.AveragedModel) -> dict:
    """``{"weights": ..., "updates": n}`` of a :func:`make_ema` average, for the training state."""
    return {"weights": weights_of(ema.module), "updates": int(ema.n_averaged)}


def load_ema_state(ema: torch.optim.swa_utils.AveragedModel, state: dict | None, source: str | os.PathLike) -> None:
    """Restore what :func:`ema_state` saved; one-line :class:`SpinepipeInputError` naming ``source`` if absent."""
    if not state or "weights" not in state:
        raise SpinepipeInputError(source, "cannot resume: this run averages its weights (ema_decay > 0) "
                                          "but the training state holds no average")
    load_state_into(ema.module, state["weights"], source)
    ema.n_averaged.fill_(int(state["updates"]))
