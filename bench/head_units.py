"""Are the hidden units of stage 2's class head alive? (the session-35 diagnosis of the "chance phase")

The class head is ``pooled features -> Linear -> LeakyReLU -> Dropout -> Linear``. A hidden unit is counted
alive when its pre-activation is positive on more than 2 % of the vertebrae (below that it passes only
the LeakyReLU's 0.01 slope). For each model: alive units, the across-vertebra SD of each class logit, and
the pooled features' mean |x| against their across-vertebra SD (a large common offset lets Adam push every
unit below zero at once).

    python bench/head_units.py --data DIR --model base=models/stage2 [--model ...]
    python bench/head_units.py --data DIR --trace 8 [--set model.cls_feature_norm=batch]

``--data`` is a canonical folder with ``vertebra_labels.csv`` (e.g. the semi-synthetic training copies that
``bench/visibility.py`` writes under ``--work``/merged/NAME); ``--trace N`` trains a fresh model on it for N
epochs (``--set`` overrides, one thread) and measures after every epoch. Results:
``bench/results/<name>.json`` + ``.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from bench.overrides import override_config  # noqa: E402
from data_prep.io import write_text  # noqa: E402

#: A unit is alive when positive on more than this share of the vertebrae.
ALIVE_SHARE = 0.02


@torch.no_grad()
def head_activity(net, batch: dict[str, torch.Tensor], chunk: int = 16) -> dict:
    """Hidden-unit and logit statistics of ``net``'s class head on ``batch`` (collated samples: ``image`` and
    ``region`` ``(N, 1, I, J, K)``, ``contrast`` ``(N,)``), in evaluation mode, ``chunk`` vertebrae at a time."""
    mlp = net.heads["cls"].mlp
    seen: dict[str, list[torch.Tensor]] = {"features": [], "hidden": []}
    hooks = [mlp[0].register_forward_hook(lambda m, i, o: seen["features"].append(i[0])),
             mlp[1].register_forward_hook(lambda m, i, o: seen["hidden"].append(o))]
    was_training = net.training
    net.eval()
    try:
        logits = torch.cat([net(batch["image"][a:a + chunk], batch["region"][a:a + chunk],
                                batch["contrast"][a:a + chunk])["cls"] for a in range(0, len(batch["image"]), chunk)])
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    share = (torch.cat(seen["hidden"]) > 0).float().mean(0)
    x = torch.cat(seen["features"])  # what the first Linear reads (after the optional FeatureNorm)
    return {"alive_units": int((share > ALIVE_SHARE).sum()), "hidden_units": int(share.numel()),
            "logit_sd": [round(float(v), 4) for v in logits.std(0)],
            "feature_mean_abs": round(float(x.abs().mean()), 4),
            "feature_sd_across": round(float(x.std(0).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="canonical folder with vertebra_labels.csv")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a saved stage-2 model")
    ap.add_argument("--trace", type=int, default=0, metavar="EPOCHS", help="train a fresh model this long")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--trace)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (--trace)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinepipe_head_units"), help="--trace model folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default="head_units")
    args = ap.parse_args(argv)
    if not args.model and not args.trace:
        ap.error("give --model NAME=DIR and/or --trace EPOCHS")
    if not (args.data / "vertebra_labels.csv").is_file():
        ap.error(f"--data {args.data}: no vertebra_labels.csv there")

    from data_prep.checkpoint import load_model, load_state_into
    from data_prep.distributed import seed_everything
    from data_prep.errors import SpinepipeInputError
    from stage2_classify.config import Stage2Config
    from stage2_classify.model import Stage2Net
    from stage2_classify.train import build_samples, collate, train_on_samples

    t0 = time.time()
    rows: list[dict] = []
    cache: dict[str, list] = {}

    def samples_for(cfg: Stage2Config) -> list:
        key = json.dumps([cfg.patch.size_mm, cfg.patch.spacing_mm, cfg.margin_mm])
        if key not in cache:
            cache[key] = build_samples(args.data, cfg)
        return cache[key]

    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep:
            ap.error(f"--model {spec!r}: expected NAME=DIR")
        try:
            state, cfg, _ = load_model(folder, Stage2Config, kind="stage2")
        except SpinepipeInputError as e:
            ap.error(f"--model {spec}: {e}")
        net = Stage2Net(cfg)
        load_state_into(net, state, folder)
        rows.append({"model": name, "epoch": cfg.train.epochs,
                     **head_activity(net, collate(samples_for(cfg)))})
    if args.trace:
        cfg = override_config(Stage2Config(), ["train.num_threads=1", f"train.seed={args.seed}"] + args.set)
        samples = samples_for(cfg)
        batch = collate(samples)
        label = "trace" + ("" if not args.set else " " + " ".join(args.set))
        seed_everything(cfg.train.seed)  # the initialisation the training below starts from
        rows.append({"model": label, "epoch": 0, **head_activity(Stage2Net(cfg), batch)})
        train_on_samples(samples, cfg, args.work, stop_after_epoch=args.trace,
                         callback=lambda e, m, row: rows.append({"model": label, "epoch": e,
                                                                 "loss_cls": round(row["loss_cls"], 4),
                                                                 **head_activity(m.net, batch)}))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/head_units.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "data": str(args.data), "alive_share": ALIVE_SHARE, "seconds": round(time.time() - t0, 1)}
    write_text(json.dumps({"meta": meta, "rows": rows}, indent=1), args.out / f"{args.name}.json")
    lines = ["# Stage 2 class head: alive hidden units", "",
             f"Generated by `{meta['command']}` in {meta['seconds']} s on `{args.data}`. A hidden unit is alive "
             f"when positive on more than {ALIVE_SHARE:.0%} of the vertebrae (evaluation mode, every labelled "
             "vertebra of the folder); features = what the head's first Linear reads.", ""]
    write_text("\n".join(lines + md_table(rows)) + "\n", args.out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
