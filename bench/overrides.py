"""``--set KEY=VALUE`` overrides of a config dataclass, shared by the benchmark scripts."""
from __future__ import annotations

import json


def override_config(cfg, items: list[str]):
    """``["plan.base_features=16", "epochs=60"]`` applied to a copy of the config dataclass ``cfg`` (any
    type: Stage1Config, Stage2Config; validated by ``config_from_dict``)."""
    from data_prep.checkpoint import config_from_dict, config_to_dict

    d = config_to_dict(cfg)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        node = d
        *parents, leaf = key.split(".")
        for k in parents:
            if not isinstance(node.get(k), dict):
                raise SystemExit(f"error: --set {item!r}: {k!r} is not a nested config")
            node = node[k]
        if leaf not in node:
            raise SystemExit(f"error: --set {item!r}: unknown field {leaf!r}")
        node[leaf] = val
    return config_from_dict(type(cfg), d, source="--set")
