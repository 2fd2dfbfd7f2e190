"""Stage-1 network speed by memory layout and arithmetic (``Stage1Config.channels_last``, ``.precision`` /
``.train_precision``).

Three arms: contiguous float32, channels-last float32 (the default until session 24) and channels-last
bfloat16 autocast (``data_prep.precision``). Times, on random inputs and freshly initialised weights of
the default configuration (no data needed):

* a training step (forward, loss, backward, AdamW step) on one batch of training patches;
* a sliding-window prediction (``model.predict_sliding_window``) of a ``--volume`` grid (3-mm voxels);
* the real training loop (``train.train_stage1``: patch sampling, augmentation, targets, loss, AdamW) for
  ``--loop-steps`` steps on a small built-in synthetic cohort, subjects loaded once;

alternating the arms (``--reps`` each, median reported; the first repetition is a warm-up), with the
largest output difference to the reference arm (channels-last float32, same weights). Compare the ratio,
not the seconds: the machines are noisy. bfloat16 pays off only where the device computes it natively
(``data_prep.precision.native_bf16``, recorded in the results).

    python bench/bench_stage1_speed.py        # -> bench/results/stage1_speed.json + .md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mdtable import md_table  # noqa: E402
from data_prep import precision as precision_mod  # noqa: E402
from data_prep.io import write_text  # noqa: E402
from stage1_localize.config import Stage1Config  # noqa: E402
from stage1_localize.model import LocalizerNet, predict_sliding_window, run_net  # noqa: E402

#: arm -> (memory layout, precision); ratios are to REFERENCE
ARMS = {"contiguous, float32": (torch.contiguous_format, "float32"),
        "channels_last_3d, float32": (torch.channels_last_3d, "float32"),
        "channels_last_3d, bfloat16": (torch.channels_last_3d, "bfloat16")}
REFERENCE = "channels_last_3d, float32"


def _train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, precision: str) -> float:
    t = time.perf_counter()
    out = run_net(net, x, precision)
    loss = sum(v.square().mean() for v in out.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def measure(config: Stage1Config, volume: tuple[int, int, int], reps: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    ref = LocalizerNet(config)
    nets = {}
    for name, (fmt, _) in ARMS.items():
        net = LocalizerNet(config)
        net.load_state_dict(ref.state_dict())
        nets[name] = net.to(memory_format=fmt)
    x = torch.randn(config.batch_size, config.in_channels, *config.plan.patch_size)
    vol = torch.randn(1, config.in_channels, *volume)
    # output difference to the reference arm (same weights, eval mode, one patch)
    with torch.no_grad():
        outs = {n: run_net(net.eval(), x.contiguous(memory_format=ARMS[n][0]), ARMS[n][1]) for n, net in nets.items()}
    diffs = {n: max(float((outs[n][k] - outs[REFERENCE][k]).abs().max()) for k in outs[n]) for n in nets}
    opts = {n: torch.optim.AdamW(net.parameters(), lr=1e-4) for n, net in nets.items()}
    train_s: dict[str, list[float]] = {n: [] for n in nets}
    infer_s: dict[str, list[float]] = {n: [] for n in nets}
    for _ in range(reps + 1):
        for n, net in nets.items():
            net.train()
            train_s[n].append(_train_step(net, opts[n], x.contiguous(memory_format=ARMS[n][0]), ARMS[n][1]))
        for n, net in nets.items():
            net.eval()
            with torch.no_grad():
                t = time.perf_counter()
                predict_sliding_window(net, vol.contiguous(memory_format=ARMS[n][0]), tuple(config.plan.patch_size),
                                       config.plan.divisor, precision=ARMS[n][1])
                infer_s[n].append(time.perf_counter() - t)
    rows = []
    base_t, base_i = np.median(train_s[REFERENCE][1:]), np.median(infer_s[REFERENCE][1:])
    for n in nets:
        t, i = float(np.median(train_s[n][1:])), float(np.median(infer_s[n][1:]))
        rows.append({"arm": n, "train step (s)": round(t, 3), "train ratio": round(t / base_t, 3),
                     "sliding-window prediction (s)": round(i, 3), "prediction ratio": round(i / base_i, 3),
                     "max abs output difference": f"{diffs[n]:.1e}"})
    return rows


def measure_loop(config: Stage1Config, steps: int, reps: int, work: Path) -> dict[str, float]:
    """Median seconds of ``steps`` steps of the real training loop per arm (alternating, ``reps`` each)."""
    from data_prep.synth import write_cohort
    from stage1_localize.train import load_subjects, train_stage1

    data = work / "synthetic"
    write_cohort(data, 4, seed=0)
    subjects = load_subjects(data, config)
    times: dict[str, list[float]] = {n: [] for n in ARMS}
    for rep in range(reps):
        for n, (fmt, prec) in ARMS.items():
            cfg = dataclasses.replace(config, epochs=1, steps_per_epoch=steps,
                                      channels_last=(fmt == torch.channels_last_3d), train_precision=prec)
            t = time.perf_counter()
            train_stage1(data, work / f"model_{rep}_{len(times[n])}_{n.replace(', ', '_')}", cfg, subjects=subjects,
                         auto_plan=False)
            times[n].append(time.perf_counter() - t)
    return {n: float(np.median(v)) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--volume", type=int, nargs=3, default=(64, 96, 128), metavar=("I", "J", "K"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--patch", type=int, nargs=3, default=None, metavar=("I", "J", "K"),
                    help="training patch (default: the configuration's; the benchmark plans e.g. 28 80 80)")
    ap.add_argument("--loop-steps", type=int, default=20, help="steps of the real training loop (0: skip)")
    ap.add_argument("--loop-reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = Stage1Config()
    if args.patch:
        config.plan = dataclasses.replace(config.plan, patch_size=tuple(args.patch))
    t0 = time.time()
    rows = measure(config, tuple(args.volume), args.reps)
    if args.loop_steps > 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            loop = measure_loop(config, args.loop_steps, args.loop_reps, Path(tmp))
        for r in rows:
            r[f"training loop, {args.loop_steps} steps (s)"] = round(loop[r["arm"]], 2)
            r["loop ratio"] = round(loop[r["arm"]] / loop[REFERENCE], 3)
    meta = {"threads": args.threads, "reps": args.reps, "volume": list(args.volume), "loop_steps": args.loop_steps,
            "loop_reps": args.loop_reps,
            "patch": list(config.plan.patch_size), "batch_size": config.batch_size, "torch": torch.__version__,
            "native_bf16": precision_mod.native_bf16("cpu"),
            "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", args.out / "stage1_speed.json")
    write_text("# Stage-1 network speed by memory layout and precision (CPU)\n\n"
               f"Generated by `python bench/bench_stage1_speed.py` on {meta['date']}: {args.threads} torch threads, "
               f"default configuration, random weights and inputs; a training step on a batch of {config.batch_size} "
               f"patches {tuple(config.plan.patch_size)}, a sliding-window prediction of a {tuple(args.volume)} grid; "
               f"median of {args.reps} alternating repetitions after a warm-up; the real training loop "
               f"(`train_stage1`, {args.loop_steps} steps on 4 synthetic scans, median of {args.loop_reps}). "
               f"Ratios are to {REFERENCE} measured in the same run. `Stage1Config.channels_last` picks the layout "
               "(default: channels_last_3d), `Stage1Config.precision` / `train_precision` the arithmetic (auto = bfloat16 where "
               f"the CPU computes it natively; this CPU: {'native' if meta['native_bf16'] else 'not native'}).\n\n"
               + "\n".join(md_table(rows)) + "\n", args.out / "stage1_speed.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
