"""nnU-Net v2 "out of the box" reference for the benchmarks (not part of the product).

Everything here drives nnU-Net through its own, unmodified command-line tools (``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train``, ``nnUNetv2_predict``) and, for the speed probe only, its own public trainer API. The only
nnU-Net "choice" we make is which *shipped* trainer variant to train with
(``nnunetv2/training/nnUNetTrainer/variants/training_length``: ``nnUNetTrainer_1epoch`` ...
``nnUNetTrainer_8000epochs``, plus the default ``nnUNetTrainer`` = 1000 epochs), so that nnU-Net's own
learning-rate schedule completes within the wall-clock budget we give our stage 1.

Functions
---------
``prepare(dataset_dir, train_ids, work_dir, dataset_id, name, val_ids=()) -> Path``
    export the subjects (vertebra masks, VerSe ids remapped by :func:`data_prep.nnunet_io.export_nnunet_raw`)
    to ``<work_dir>/nnUNet_raw`` and run ``nnUNetv2_plan_and_preprocess -c 3d_fullres
    --verify_dataset_integrity``; the timing is recorded in ``<work_dir>/nnunet_reference_prepare_<id>.json``.
``train_with_budget(work_dir, dataset_id, fold_or_split, budget_s) -> dict``
    write ``splits_final.json`` (our split), probe seconds per iteration, pick the longest shipped
    variant that fits, run ``nnUNetv2_train ... -device DEVICE`` (``device=``: "cpu" by default, "cuda" on
    a GPU machine) and kill it at the deadline.
``untrained_model(work_dir, dataset_id, fold=0) -> dict``
    a model folder with nnU-Net's *initialised* weights (``checkpoint_untrained.pth``), made by its own
    trainer API: a speed reference for the predictor where training is out of reach; never for accuracy.
``predict(work_dir, dataset_id, fold, scan_paths, out_dir) -> dict``
    ``nnUNetv2_predict -device DEVICE`` with nnU-Net's defaults (mirroring TTA on, step size 0.5), timed;
    per-scan centroids (largest connected component per label, world LPS mm, VerSe ids).
``evaluate_centroids(pred, gt) -> dict``
    :func:`pipeline.metrics.identification` per scan + :func:`pipeline.metrics.summarize_identification`.

Budget enforcement
------------------
The budget is wall-clock seconds for the whole of :func:`train_with_budget` (speed probe included, unless
``sec_per_iter`` is given). Epoch time is estimated as ``iters_per_epoch * s_train_iter + val_iters *
s_val_iter + overhead`` from the probe, the variant with the most epochs whose estimate fits
``safety * (budget left - startup)`` is chosen (``nnUNetTrainer_1epoch`` if none fits), and the training
process group is terminated at the deadline. The checkpoint used is ``checkpoint_final.pth`` if training
finished, else the newer complete one of ``checkpoint_latest.pth`` (every 50 epochs) / ``checkpoint_best.pth``
(written whenever nnU-Net's EMA pseudo-Dice improves, so after the first epoch); if none exists the record
says ``{"trained": False, "reason": ...}``. After ``checkpoint_final.pth`` nnU-Net runs its own validation
of the val cases; that is not training and is stopped unless ``run_final_validation=True``.

Caveats for a side-by-side comparison
-------------------------------------
* nnU-Net's budget granularity is one epoch = 250 training + 50 validation iterations (fixed in
  ``nnUNetTrainer``, no shipped variant changes it); with the 1-epoch variant the poly LR schedule decays to
  0 within those 250 iterations. On a 2-core CPU even one epoch of a tiny cohort can exceed a few minutes.
* nnU-Net plans patch and batch size for an 8 GB GPU, not for a CPU; the CPU is what we give it here.
* Timings depend on the machine load (shared cores): probe and training record ``os.getloadavg()``.
* The centroid of the largest component of each predicted label is nnU-Net's localisation; levels it
  never predicts are misses, and labels absent from the training cohort can never be predicted.

Smoke mode: ``python bench/nnunet_reference.py --smoke`` (tiny synthetic cohort, writes
``bench/results/nnunet_smoke.json`` and ``.md``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import io  # noqa: E402
from data_prep.dataset import discover  # noqa: E402
from data_prep.errors import SpinepipeInputError  # noqa: E402
from data_prep.nnunet_io import LABEL_MAP_FILE, dataset_folder_name, export_nnunet_raw, nnunet_env  # noqa: E402
from data_prep.scan import Scan, centroids_from_labelmap  # noqa: E402

log = logging.getLogger(__name__)

CONFIGURATION = "3d_fullres"
PLANS = "nnUNetPlans"
#: shipped trainers (nnunetv2/training/nnUNetTrainer/variants/training_length + the default) -> epochs
TRAINER_EPOCHS: dict[str, int] = {
    "nnUNetTrainer_1epoch": 1, "nnUNetTrainer_5epochs": 5, "nnUNetTrainer_10epochs": 10,
    "nnUNetTrainer_20epochs": 20, "nnUNetTrainer_50epochs": 50, "nnUNetTrainer_100epochs": 100,
    "nnUNetTrainer_250epochs": 250, "nnUNetTrainer_500epochs": 500, "nnUNetTrainer_750epochs": 750,
    "nnUNetTrainer": 1000, "nnUNetTrainer_2000epochs": 2000, "nnUNetTrainer_4000epochs": 4000,
    "nnUNetTrainer_8000epochs": 8000,
}
#: nnUNetTrainer defaults (checked against the trainer instance by the probe)
ITERS_PER_EPOCH = 250
VAL_ITERS_PER_EPOCH = 50
SAVE_EVERY = 50
EPOCH_OVERHEAD_S = 3.0  # progress plot, checkpoint_best write, logging (per epoch)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+): (.*)$")


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (is nnunetv2 installed in this environment?)")
    return found


def _env(work_dir: Path, n_proc_da: int | None) -> dict[str, str]:
    """nnU-Net's environment; ``n_proc_da=None`` leaves nnU-Net's own default number of augmentation workers."""
    env = dict(os.environ)
    env.update(nnunet_env(work_dir, create=True))
    if n_proc_da is None:
        env.pop("nnUNet_n_proc_DA", None)
    else:
        env["nnUNet_n_proc_DA"] = str(int(n_proc_da))
    env["nnUNet_def_n_proc"] = "1"
    env["nnUNet_compile"] = "f"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for pkg in ("nnunetv2", "torch"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "unknown"
    return out


def _dataset_name(work_dir: Path, dataset_id: int) -> str:
    pre = Path(nnunet_env(work_dir)["nnUNet_raw"])
    hits = sorted(p.name for p in pre.glob(f"Dataset{int(dataset_id):03d}_*") if p.is_dir())
    if len(hits) != 1:
        raise SpinepipeInputError(pre, f"expected exactly one nnU-Net dataset with id {dataset_id}, found {hits}")
    return hits[0]


def _write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return io.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _nice_prefix(nice: int) -> list[str]:
    """``nice -n k`` so that the child runs at niceness ``nice`` (absolute; never stacks on ours)."""
    k = int(nice) - os.nice(0)
    return ["nice", "-n", str(k)] if k > 0 else []


def _run(cmd: list[str], env: dict[str, str], log_path: Path, nice: int, timeout: float | None = None) -> float:
    """Run ``cmd`` (stdout+stderr to ``log_path``); return seconds. Raises RuntimeError on failure."""
    full = _nice_prefix(nice) + cmd
    log.info("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(full, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"{Path(cmd[0]).name} exceeded {timeout:.0f} s (log: {log_path})") from None
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed with exit code {rc}; see {log_path}:\n" + _tail(log_path))
    return dt


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Terminate the process group we started for ``proc`` (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _complete_checkpoint(path: Path) -> bool:
    """A torch checkpoint file that is fully written (valid zip with intact CRCs; nothing is unpickled)."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


# ---------------------------------------------------------------------------------------------------
# 1. prepare
# ---------------------------------------------------------------------------------------------------
def prepare(
    dataset_dir: str | os.PathLike,
    train_ids: Sequence[str],
    work_dir: str | os.PathLike,
    dataset_id: int,
    name: str,
    val_ids: Sequence[str] = (),
    *,
    num_processes: int = 1,
    nice: int = 10,
    overwrite: bool = False,
) -> Path:
    """Export ``train_ids`` (+ ``val_ids``, which nnU-Net needs preprocessed for its own validation) of a
    canonical dataset to ``<work_dir>/nnUNet_raw/DatasetXXX_<name>`` and plan + preprocess 3d_fullres.

    Labels are the expert vertebra masks ``<id>_vertebrae`` (VerSe ids remapped to 1..L, mapping in
    ``spinepipe_label_map.json``). Returns the raw dataset folder; timings go to
    ``<work_dir>/nnunet_reference_prepare_<id>.json``.
    """
    work = Path(work_dir).resolve()
    ids = list(dict.fromkeys([*train_ids, *val_ids]))
    if not train_ids:
        raise SpinepipeInputError(Path(dataset_dir), "no training subject given")
    subjects = {s.id: s for s in discover(dataset_dir)}
    missing = [i for i in ids if i not in subjects]
    if missing:
        raise SpinepipeInputError(Path(dataset_dir), f"subject(s) not in the dataset: {', '.join(missing)}")
    no_mask = [i for i in ids if subjects[i].vertebrae is None]
    if no_mask:
        raise SpinepipeInputError(Path(dataset_dir), f"subject(s) without <id>_vertebrae mask: {', '.join(no_mask)}")
    env = _env(work, 1)  # n_proc_DA=0 crashes the planner: torch.set_num_threads(0)
    raw = Path(env["nnUNet_raw"])
    pre_folder = Path(env["nnUNet_preprocessed"]) / dataset_folder_name(dataset_id, name)
    if overwrite and pre_folder.exists():
        shutil.rmtree(pre_folder)
    t0 = time.perf_counter()
    # export only the chosen subjects: a folder of symlinks in the canonical layout
    with tempfile.TemporaryDirectory(prefix="nnref_subset_", dir=work) as tmp:
        for i in ids:
            s = subjects[i]
            for p in (s.image, s.vertebrae):
                os.symlink(Path(p).resolve(), Path(tmp) / Path(p).name)
        dest = export_nnunet_raw(tmp, raw, dataset_id, name, label_source="vertebrae", overwrite=overwrite)
    export_s = time.perf_counter() - t0
    log_path = work / f"nnunet_reference_prepare_{int(dataset_id):03d}.log"
    n = str(max(1, int(num_processes)))
    plan_s = _run([_tool("nnUNetv2_plan_and_preprocess"), "-d", str(int(dataset_id)), "-c", CONFIGURATION,
                   "-np", n, "-npfp", n, "--verify_dataset_integrity", "--no_pbar"], env, log_path, nice)
    plans = json.loads((pre_folder / f"{PLANS}.json").read_text())
    cfg = plans["configurations"][CONFIGURATION]
    record = {
        "dataset": dest.name, "dataset_id": int(dataset_id), "train_ids": list(train_ids), "val_ids": list(val_ids),
        "export_s": round(export_s, 2), "plan_and_preprocess_s": round(plan_s, 2),
        "num_processes": int(n), "log": str(log_path),
        "plans": {k: cfg.get(k) for k in ("patch_size", "batch_size", "spacing", "median_image_size_in_voxels")},
        "versions": _versions(),
    }
    _write_json(record, work / f"nnunet_reference_prepare_{int(dataset_id):03d}.json")
    log.info("nnU-Net prepare: export %.1f s, plan+preprocess %.1f s (patch %s, batch %s)", export_s, plan_s,
             cfg.get("patch_size"), cfg.get("batch_size"))
    return dest


# ---------------------------------------------------------------------------------------------------
# 2. train
# ---------------------------------------------------------------------------------------------------
def write_split(work_dir: str | os.PathLike, dataset_id: int, train_ids: Sequence[str], val_ids: Sequence[str]) -> int:
    """Put our split into ``splits_final.json`` (reusing an identical entry); return its fold index."""
    work = Path(work_dir).resolve()
    name = _dataset_name(work, dataset_id)
    raw_labels = Path(nnunet_env(work)["nnUNet_raw"]) / name / "labelsTr"
    known = {io.strip_image_suffix(p) for p in raw_labels.iterdir()}
    train, val = [str(i) for i in train_ids], [str(i) for i in val_ids]
    unknown = [i for i in train + val if i not in known]
    if unknown:
        raise SpinepipeInputError(raw_labels, f"case(s) not exported to nnU-Net: {', '.join(unknown)} "
                                  "(pass them to prepare())")
    if not train or not val:
        raise SpinepipeInputError(None, "nnU-Net needs at least one training and one validation case")
    path = Path(nnunet_env(work)["nnUNet_preprocessed"]) / name / "splits_final.json"
    splits = json.loads(path.read_text()) if path.exists() else []
    entry = {"train": train, "val": val}
    for k, s in enumerate(splits):
        if sorted(s["train"]) == sorted(train) and sorted(s["val"]) == sorted(val):
            return k
    splits.append(entry)
    _write_json(splits, path)
    return len(splits) - 1


def probe_speed(work_dir: str | os.PathLike, dataset_id: int, fold: int, n_train: int = 4, n_val: int = 2,
                n_proc_da: int | None = 1, nice: int = 10, timeout_s: float = 600.0,
                save_checkpoint: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Public wrapper of the speed probe (seconds per nnU-Net train / val iteration on this machine)."""
    return _probe(Path(work_dir).resolve(), dataset_id, fold, n_train, n_val, n_proc_da, nice, timeout_s,
                  save_checkpoint, device)


def _probe(work: Path, dataset_id: int, fold: int, n_train: int, n_val: int, n_proc_da: int | None, nice: int,
           timeout_s: float, save_checkpoint: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Seconds per train / val iteration with nnU-Net's own trainer (separate results folder
    ``<work>/probe_results``; ``save_checkpoint`` leaves nnU-Net's checkpoint of the few-iteration probe model
    there as ``checkpoint_probe.pth``, for pipeline checks only)."""
    env = _env(work, n_proc_da)
    env["nnUNet_results"] = str(work / "probe_results")
    out = work / f"probe_{int(dataset_id):03d}_fold{fold}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_probe", "--dataset-id", str(int(dataset_id)),
           "--fold", str(fold), "--n-train", str(n_train), "--n-val", str(n_val), "--out", str(out),
           "--device", device]
    if save_checkpoint:
        cmd.append("--save-checkpoint")
    wall = _run(cmd, env, work / f"probe_{int(dataset_id):03d}_fold{fold}.log", nice, timeout=timeout_s)
    res = json.loads(out.read_text())
    res["probe_wall_s"] = round(wall, 2)
    # process start to first iteration (imports, plans, network, data loaders): what a training run pays once
    res["startup_s"] = round(wall - res["warmup_iter_s"] - sum(res["train_iter_s"]) - sum(res["val_iter_s"]), 2)
    return res


def _probe_main(dataset_id: int, fold: int, n_train: int, n_val: int, out: str, save_checkpoint: bool = False,
                device: str = "cpu") -> None:
    """Subprocess body of the probe (nnU-Net public API, unmodified)."""
    import multiprocessing

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    t_import = time.perf_counter()
    if device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())  # what `nnUNetv2_train -device cpu` does
    else:  # what `nnUNetv2_train -device cuda` does
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    tr = get_trainer_from_args(str(dataset_id), CONFIGURATION, fold, "nnUNetTrainer", PLANS,
                               device=torch.device(device))
    tr.on_train_start()
    startup = time.perf_counter() - t_import
    tr.on_train_epoch_start()
    times = []
    for _ in range(n_train + 1):  # first iteration is warm-up
        t = time.perf_counter()
        tr.train_step(next(tr.dataloader_train))
        times.append(time.perf_counter() - t)
        log.info("probe train iteration %d: %.2f s", len(times), times[-1])
    vtimes = []
    with torch.no_grad():
        tr.on_validation_epoch_start()
        for _ in range(n_val):
            t = time.perf_counter()
            tr.validation_step(next(tr.dataloader_val))
            vtimes.append(time.perf_counter() - t)
            log.info("probe val iteration %d: %.2f s", len(vtimes), vtimes[-1])
    res = {
        "in_process_startup_s": round(startup, 2), "train_iter_s": times[1:], "val_iter_s": vtimes,
        "sec_per_iter": float(np.median(times[1:])), "sec_per_val_iter": float(np.median(vtimes)) if vtimes else 0.0,
        "warmup_iter_s": times[0], "num_iterations_per_epoch": int(tr.num_iterations_per_epoch),
        "num_val_iterations_per_epoch": int(tr.num_val_iterations_per_epoch), "save_every": int(tr.save_every),
        "patch_size": [int(x) for x in tr.configuration_manager.patch_size], "batch_size": int(tr.batch_size),
        "torch_threads": torch.get_num_threads(),
    }
    if save_checkpoint:
        tr.save_checkpoint(os.path.join(tr.output_folder, "checkpoint_probe.pth"))
        res["checkpoint"] = os.path.join(tr.output_folder, "checkpoint_probe.pth")
    Path(out).write_text(json.dumps(res, indent=2))
    for dl in (tr.dataloader_train, tr.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    sys.stdout.flush()
    os._exit(0)  # background augmenter threads must not keep the probe alive


UNTRAINED_CHECKPOINT = "checkpoint_untrained.pth"


def untrained_model(work_dir: str | os.PathLike, dataset_id: int, fold: int = 0, nice: int = 10,
                    timeout_s: float = 600.0) -> dict[str, Any]:
    """An nnU-Net model folder with *initialised, untrained* weights, for speed references only.

    nnU-Net's inference cost does not depend on the weights (same network, same sliding window, same
    mirroring TTA, same resampling and export), so when training nnU-Net is out of reach (one epoch of
    250 iterations takes hours on a 2-core CPU, ``bench/results/nnunet_probe_*.md``) its predictor can
    still be timed on a folder made by nnU-Net's own trainer: ``initialize()`` builds the planned
    network, the mirroring axes are set exactly as nnU-Net's training sets them, plans.json /
    dataset.json are copied as ``on_train_start`` does, and ``save_checkpoint`` writes
    ``fold_<f>/checkpoint_untrained.pth``. Its predictions are meaningless; never report their accuracy.
    Needs :func:`prepare` first (the trainer reads the preprocessed folder). Returns the record also
    written to ``<work_dir>/nnunet_reference_untrained_<id>_fold<f>.json``.
    """
    work = Path(work_dir).resolve()
    env = _env(work, 1)
    out = work / f"nnunet_reference_untrained_{int(dataset_id):03d}_fold{int(fold)}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_untrained", "--dataset-id", str(int(dataset_id)),
           "--fold", str(int(fold)), "--out", str(out)]
    _run(cmd, env, work / f"nnunet_reference_untrained_{int(dataset_id):03d}.log", nice, timeout=timeout_s)
    return json.loads(out.read_text())


def _untrained_main(dataset_id: int, fold: int, out: str) -> None:
    """Subprocess body of :func:`untrained_model` (nnU-Net public trainer API, unmodified)."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    tr = get_trainer_from_args(str(dataset_id), CONFIGURATION, fold, "nnUNetTrainer", PLANS,
                               device=torch.device("cpu"))
    tr.initialize()
    tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    os.makedirs(tr.output_folder, exist_ok=True)
    for name, obj in (("plans.json", tr.plans_manager.plans), ("dataset.json", tr.dataset_json)):
        Path(tr.output_folder_base, name).write_text(json.dumps(obj, indent=2))
    tr.save_checkpoint(os.path.join(tr.output_folder, UNTRAINED_CHECKPOINT))
    n_params = sum(int(p.numel()) for p in tr.network.parameters())
    rec = {"weights": "untrained (nnU-Net initialisation): for speed references only",
           "trainer": "nnUNetTrainer", "checkpoint": UNTRAINED_CHECKPOINT, "fold": int(fold),
           "model_folder": tr.output_folder_base, "n_parameters": n_params,
           "patch_size": [int(x) for x in tr.configuration_manager.patch_size],
           "spacing": [float(x) for x in tr.configuration_manager.spacing],
           "mirroring_axes": [int(a) for a in tr.inference_allowed_mirroring_axes], "versions": _versions()}
    Path(out).write_text(json.dumps(rec, indent=2))


def choose_trainer(budget_left_s: float, startup_s: float, sec_per_epoch: float, safety: float = 0.85,
                   max_epochs: int = 1000) -> tuple[str, int, bool]:
    """Longest shipped trainer variant whose epochs fit, capped at nnU-Net's default 1000 epochs
    (``nnUNetTrainer``: more would no longer be "out of the box"); ``(name, epochs, expected_to_fit)``."""
    usable = safety * (budget_left_s - startup_s)
    fits = [(e, n) for n, e in TRAINER_EPOCHS.items() if e * sec_per_epoch <= usable and e <= max_epochs]
    if not fits:
        return "nnUNetTrainer_1epoch", 1, False
    e, n = max(fits)
    return n, e, True


def _parse_training_log(folder: Path) -> dict[str, Any]:
    logs = sorted(folder.glob("training_log_*.txt"))
    out: dict[str, Any] = {"epochs_done": 0, "epoch_times_s": [], "best_epoch": None, "first_epoch_at": None}
    if not logs:
        return out
    epoch = None
    for line in logs[-1].read_text(errors="replace").splitlines():
        m = _LOG_TS.match(line)
        msg = m.group(2) if m else line
        if msg.startswith("Epoch ") and msg[6:].strip().isdigit():
            epoch = int(msg[6:].strip())
            if out["first_epoch_at"] is None and m:
                out["first_epoch_at"] = m.group(1)
        elif msg.startswith("Epoch time:"):
            out["epoch_times_s"].append(float(msg.split(":")[1].split()[0]))
        elif msg.startswith("Yayy! New best EMA"):
            out["best_epoch"] = epoch
    out["epochs_done"] = len(out["epoch_times_s"])
    return out


def train_with_budget(
    work_dir: str | os.PathLike,
    dataset_id: int,
    fold_or_split: int | Mapping[str, Sequence[str]],
    budget_s: float,
    *,
    sec_per_iter: float | None = None,
    sec_per_val_iter: float | None = None,
    startup_s: float = 30.0,
    trainer: str | None = None,
    n_proc_da: int | None = 1,
    probe_iters: int = 4,
    safety: float = 0.85,
    run_final_validation: bool = False,
    run_if_not_expected_to_fit: bool = True,
    nice: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train nnU-Net 3d_fullres (``nnUNetv2_train -device <device>``) for at most ``budget_s`` wall-clock seconds.

    ``fold_or_split``: a fold index of an existing ``splits_final.json`` or ``{"train": [...], "val": [...]}``
    (written to ``splits_final.json``). ``sec_per_iter`` (and ``sec_per_val_iter``, ``startup_s``) skip the
    probe; ``trainer`` forces a variant. ``run_if_not_expected_to_fit=False`` returns ``trained: False`` at once
    when the probe says not even one epoch fits (saves the CPU time of a hopeless run). Returns (and writes to
    ``<work_dir>/nnunet_reference_train_<id>_fold<k>.json``) the record: trained, reason, trainer, fold,
    epochs planned/done, seconds, checkpoint, probe figures.
    """
    t_begin = time.perf_counter()
    deadline = t_begin + float(budget_s)
    work = Path(work_dir).resolve()
    name = _dataset_name(work, dataset_id)
    if isinstance(fold_or_split, Mapping):
        fold = write_split(work, dataset_id, fold_or_split["train"], fold_or_split["val"])
    else:
        fold = int(fold_or_split)
        split_file = Path(nnunet_env(work)["nnUNet_preprocessed"]) / name / "splits_final.json"
        n_splits = len(json.loads(split_file.read_text())) if split_file.exists() else 0
        if not 0 <= fold < n_splits:  # nnU-Net would silently make a random 80:20 split
            raise SpinepipeInputError(split_file, f"fold {fold} not in splits_final.json ({n_splits} split(s)); "
                                      "pass {'train': [...], 'val': [...]} instead")
    record: dict[str, Any] = {"dataset": name, "dataset_id": int(dataset_id), "fold": fold, "budget_s": float(budget_s),
                              "configuration": CONFIGURATION, "n_proc_DA": n_proc_da, "device": device,
                              "versions": _versions(),
                              "host_cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    record["split"] = json.loads((Path(nnunet_env(work)["nnUNet_preprocessed"]) / name
                                  / "splits_final.json").read_text())[fold]
    iters, val_iters = ITERS_PER_EPOCH, VAL_ITERS_PER_EPOCH
    if trainer is None:
        if sec_per_iter is None:
            try:
                pr = _probe(work, dataset_id, fold, probe_iters, 2, n_proc_da, nice,
                            timeout_s=max(30.0, deadline - time.perf_counter()), device=device)
            except RuntimeError as exc:
                record.update(trained=False, reason=f"speed probe did not finish within the budget: {exc}",
                              seconds=round(time.perf_counter() - t_begin, 2))
                return _save_train_record(work, record)
            record["probe"] = pr
            sec_per_iter, sec_per_val_iter, startup_s = pr["sec_per_iter"], pr["sec_per_val_iter"], pr["startup_s"]
            iters, val_iters = pr["num_iterations_per_epoch"], pr["num_val_iterations_per_epoch"]
        if sec_per_val_iter is None:
            sec_per_val_iter = sec_per_iter / 3.0
        sec_per_epoch = iters * sec_per_iter + val_iters * sec_per_val_iter + EPOCH_OVERHEAD_S
        left = deadline - time.perf_counter()
        trainer, epochs, fits = choose_trainer(left, startup_s, sec_per_epoch, safety)
        record.update(estimated_sec_per_epoch=round(sec_per_epoch, 2), expected_to_fit=fits,
                      estimated_startup_s=round(startup_s, 2))
        log.info("nnU-Net: ~%.1f s/epoch, %.0f s left -> %s%s", sec_per_epoch, left, trainer,
                 "" if fits else " (not even one epoch is expected to fit)")
        if not fits and not run_if_not_expected_to_fit:
            record.update(trained=False, trainer=trainer, epochs_planned=epochs, epochs_done=0, checkpoint=None,
                          seconds=round(time.perf_counter() - t_begin, 2),
                          reason=f"not started: one epoch is estimated at {sec_per_epoch:.0f} s "
                                 f"(+{startup_s:.0f} s startup) and only {left:.0f} s of the budget were left")
            return _save_train_record(work, record)
    if trainer not in TRAINER_EPOCHS:
        raise SpinepipeInputError(None, f"unknown trainer {trainer!r}; use one of {', '.join(TRAINER_EPOCHS)}")
    record.update(trainer=trainer, epochs_planned=TRAINER_EPOCHS[trainer])
    out_folder = Path(nnunet_env(work)["nnUNet_results"]) / name / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}"
    if out_folder.exists():
        shutil.rmtree(out_folder)  # a fresh run: no stale checkpoint may pass for this one
    log_path = work / f"nnunet_reference_train_{int(dataset_id):03d}_fold{fold}.log"
    cmd = [_tool("nnUNetv2_train"), str(int(dataset_id)), CONFIGURATION, str(fold), "-tr", trainer, "-p", PLANS,
           "-device", device]
    record["command"] = " ".join(cmd)
    env = _env(work, n_proc_da)
    t_train = time.perf_counter()
    final = out_folder / "checkpoint_final.pth"
    finished_at = None
    stopped = "exited"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(_nice_prefix(nice) + cmd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if finished_at is None and final.exists() and _complete_checkpoint(final):
                    finished_at = now
                    if not run_final_validation:
                        stopped = "stopped after checkpoint_final.pth (nnU-Net's own validation skipped)"
                        break
                if now >= deadline:
                    stopped = "killed at the budget deadline"
                    break
                time.sleep(min(2.0, max(0.1, deadline - now)))
        finally:
            _kill_group(proc)
    t_end = time.perf_counter()
    rc = proc.returncode
    parsed = _parse_training_log(out_folder)
    ckpt, ckpt_epoch = None, None
    if _complete_checkpoint(final):
        ckpt, ckpt_epoch = final.name, parsed["epochs_done"] - 1
        if finished_at is None:
            finished_at = t_end
    else:
        cands = []
        latest, best = out_folder / "checkpoint_latest.pth", out_folder / "checkpoint_best.pth"
        if _complete_checkpoint(latest):
            done = parsed["epochs_done"]
            cands.append((latest.stat().st_mtime, latest.name, (done // SAVE_EVERY) * SAVE_EVERY - 1))
        if _complete_checkpoint(best):
            cands.append((best.stat().st_mtime, best.name, parsed["best_epoch"]))
        if cands:
            _, ckpt, ckpt_epoch = max(cands)
    record.update(
        trained=ckpt is not None,
        checkpoint=ckpt,
        checkpoint_epoch=ckpt_epoch,
        epochs_done=parsed["epochs_done"],
        epoch_times_s=parsed["epoch_times_s"],
        mean_epoch_s=round(float(np.mean(parsed["epoch_times_s"])), 2) if parsed["epoch_times_s"] else None,
        train_process_s=round(t_end - t_train, 2),
        time_to_final_checkpoint_s=round(finished_at - t_train, 2) if finished_at is not None else None,
        seconds=round(t_end - t_begin, 2),
        how_it_ended=stopped,
        exit_code=rc,
        output_folder=str(out_folder),
        log=str(log_path),
        loadavg_end=os.getloadavg()[0],
    )
    if ckpt is None:
        if stopped.startswith("killed"):
            record["reason"] = (f"budget of {budget_s:.0f} s expired after {parsed['epochs_done']} complete epoch(s) "
                                "and before nnU-Net wrote any checkpoint (it writes checkpoint_best.pth at the end "
                                f"of each improving epoch; one epoch = {iters} + {val_iters} iterations)")
        else:
            record["reason"] = f"nnUNetv2_train exited with code {rc} without a checkpoint:\n" + _tail(log_path)
    elif ckpt != final.name:
        record["reason"] = f"training interrupted by the budget; using {ckpt} (epoch {ckpt_epoch})"
    return _save_train_record(work, record)


def _save_train_record(work: Path, record: dict[str, Any]) -> dict[str, Any]:
    _write_json(record, work / f"nnunet_reference_train_{record['dataset_id']:03d}_fold{record['fold']}.json")
    log.info("nnU-Net training: trained=%s checkpoint=%s epochs=%s in %.0f s", record.get("trained"),
             record.get("checkpoint"), record.get("epochs_done"), record.get("seconds", float("nan")))
    return record


# ---------------------------------------------------------------------------------------------------
# 3. predict
# ---------------------------------------------------------------------------------------------------
def _case_name(p: Path) -> str:
    stem = io.strip_image_suffix(p)
    return stem[: -len("_image")] if stem.endswith("_image") else stem


def largest_component_centroids(pred: Scan, nn_to_verse: Mapping[int, int]) -> dict[int, np.ndarray]:
    """World LPS centroids ``{verse_id: (3,)}`` of the largest 26-connected component of each nnU-Net label."""
    from scipy import ndimage

    arr = np.asarray(pred.array)
    out = np.zeros(arr.shape, dtype=np.int16)
    for k in np.unique(arr[arr > 0]).astype(int):
        vid = nn_to_verse.get(int(k))
        if vid is None:
            log.warning("nnU-Net label %d not in the label map; ignored", k)
            continue
        comp, n = ndimage.label(arr == k, structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        out[comp == int(np.argmax(sizes)) + 1] = vid
    return centroids_from_labelmap(pred.with_array(out))


def predict(
    work_dir: str | os.PathLike,
    dataset_id: int,
    fold: int,
    scan_paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    trainer: str | None = None,
    checkpoint: str | None = None,
    separate_calls: bool = True,
    results_dir: str | os.PathLike | None = None,
    nice: int = 10,
    device: str = "cpu",
) -> dict[str, Any]:
    """``nnUNetv2_predict -device <device>`` with nnU-Net's defaults (mirroring TTA, step 0.5) on ``scan_paths``.

    ``scan_paths``: ``{case: path}`` or paths (case = file name without ``_image`` and suffix). Trainer and
    checkpoint default to the record of :func:`train_with_budget`. ``separate_calls``: one nnU-Net call per
    scan (per-scan times include model loading, as a user would see them); otherwise one call for all and
    the per-scan time is the mean. ``results_dir`` overrides ``<work_dir>/nnUNet_results``. Returns ``{"centroids": {case: {verse_id: [x, y, z]}}, "seconds_total",
    "seconds_per_scan": {case: s}, "predictions": {case: path}, ...}``.
    """
    work = Path(work_dir).resolve()
    name = _dataset_name(work, dataset_id)
    if trainer is None or checkpoint is None:
        rec_path = work / f"nnunet_reference_train_{int(dataset_id):03d}_fold{int(fold)}.json"
        if not rec_path.exists():
            raise SpinepipeInputError(rec_path, "no training record; train first or pass trainer= and checkpoint=")
        rec = json.loads(rec_path.read_text())
        if not rec.get("trained"):
            raise SpinepipeInputError(rec_path, f"nnU-Net was not trained: {rec.get('reason')}")
        trainer = trainer or rec["trainer"]
        checkpoint = checkpoint or rec["checkpoint"]
    mapping = json.loads((Path(nnunet_env(work)["nnUNet_raw"]) / name / LABEL_MAP_FILE).read_text())
    nn_to_verse = {int(k): int(v) for k, v in mapping["nnunet_to_verse"].items()}
    items = dict(scan_paths) if isinstance(scan_paths, Mapping) else {_case_name(Path(p)): p for p in scan_paths}
    if not items:
        raise SpinepipeInputError(None, "no scan to predict")
    out = Path(out_dir).resolve()
    inp = out / "nnunet_input"
    seg = out / "nnunet_output"
    for d in (inp, seg):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for case, p in items.items():
        if not _CASE_RE.match(str(case)):
            raise SpinepipeInputError(Path(p), f"case name {case!r} unusable for nnU-Net")
        src = Path(p).resolve()
        dst = inp / f"{case}_0000.nii.gz"
        if io.image_suffix(src) == ".nii.gz":
            os.symlink(src, dst)
        else:
            io.write_image(io.read_image(src), dst)
    env = _env(work, 1)
    # the predictor's own defaults: nnUNet_def_n_proc also caps the torch threads of its sliding window
    # (predict_logits_from_preprocessed_data), so pinning it to 1 (as for planning) would run nnU-Net's
    # network on one core; likewise no -npp / -nps
    env.pop("nnUNet_def_n_proc", None)
    if results_dir is not None:
        env["nnUNet_results"] = str(Path(results_dir).resolve())
    log_path = out / "nnunet_predict.log"
    base = [_tool("nnUNetv2_predict"), "-d", str(int(dataset_id)), "-c", CONFIGURATION, "-f", str(int(fold)),
            "-tr", trainer, "-p", PLANS, "-chk", checkpoint, "-device", device, "--disable_progress_bar"]
    per_scan: dict[str, float] = {}
    t0 = time.perf_counter()
    if separate_calls:
        for case in items:
            one = out / "nnunet_input_one"
            if one.exists():
                shutil.rmtree(one)
            one.mkdir()
            os.symlink(inp / f"{case}_0000.nii.gz", one / f"{case}_0000.nii.gz")
            per_scan[case] = round(_run(base + ["-i", str(one), "-o", str(seg)], env, log_path, nice), 2)
            shutil.rmtree(one)
    else:
        dt = _run(base + ["-i", str(inp), "-o", str(seg)], env, log_path, nice)
        per_scan = {case: round(dt / len(items), 2) for case in items}
    total = time.perf_counter() - t0
    cents: dict[str, dict[int, list[float]]] = {}
    preds: dict[str, str] = {}
    for case in items:
        pth = seg / f"{case}.nii.gz"
        if not pth.exists():
            raise RuntimeError(f"nnU-Net wrote no prediction for {case}; see {log_path}")
        lab = io.read_labelmap(pth)
        cents[case] = {int(v): [float(x) for x in xyz] for v, xyz in largest_component_centroids(lab, nn_to_verse).items()}
        preds[case] = str(pth)
    return {
        "trainer": trainer, "checkpoint": checkpoint, "fold": int(fold), "tta_mirroring": True, "step_size": 0.5,
        "separate_calls": separate_calls, "seconds_total": round(total, 2), "seconds_per_scan": per_scan,
        "mean_seconds_per_scan": round(float(np.mean(list(per_scan.values()))), 2),
        "centroids": cents, "predictions": preds, "log": str(log_path),
    }


# ---------------------------------------------------------------------------------------------------
# 4. evaluate
# ---------------------------------------------------------------------------------------------------
def evaluate_centroids(
    pred: Mapping[str, Mapping[int, Sequence[float]]],
    gt: Mapping[str, Mapping[int, Sequence[float]]],
    radius_mm: float = 20.0,
) -> dict[str, Any]:
    """Identification per scan of ``gt`` (a scan without prediction counts as all-missed) + summary."""
    from pipeline.metrics import identification, summarize_identification

    per = {}
    for sid, g in gt.items():
        p = {int(k): v for k, v in (pred.get(sid) or {}).items()}
        per[sid] = identification(p, {int(k): v for k, v in g.items()}, radius_mm=radius_mm)
    return {
        "summary": summarize_identification(list(per.values())),
        "per_scan": {sid: {"n_gt": s.n_gt, "n_pred": s.n_pred, "identified": s.identified,
                           "id_rate": s.id_rate, "errors_mm": {str(k): v for k, v in s.errors_mm.items()}}
                     for sid, s in per.items()},
    }


def gt_centroids(dataset_dir: str | os.PathLike, ids: Sequence[str]) -> dict[str, dict[int, np.ndarray]]:
    """Reference centroids: ``<id>_points.csv`` if present, else centroids of ``<id>_vertebrae``."""
    subjects = {s.id: s for s in discover(dataset_dir)}
    out = {}
    for i in ids:
        s = subjects[i]
        if s.points is not None:
            vids, pts = io.read_points_csv(s.points)
            out[i] = {int(v): xyz for v, xyz in zip(vids, pts.require("world"))}
        elif s.vertebrae is not None:
            out[i] = centroids_from_labelmap(io.read_labelmap(s.vertebrae))
        else:
            raise SpinepipeInputError(s.image, "no points or vertebrae mask for reference centroids")
    return out


# ---------------------------------------------------------------------------------------------------
# smoke mode
# ---------------------------------------------------------------------------------------------------
def smoke(work_dir: Path | None = None, budget_s: float = 240.0, n_subjects: int = 6, trainer: str | None = None,
          tag: str = "") -> dict[str, Any]:
    """Tiny synthetic cohort -> prepare -> train_with_budget -> predict 2 scans -> evaluate.

    Writes ``bench/results/nnunet_smoke[_<tag>].json`` / ``.md``; ``trainer`` forces a variant (no probe).
    """
    from data_prep.synth import SynthConfig, write_cohort

    t0 = time.perf_counter()
    work = Path(work_dir or tempfile.mkdtemp(prefix="spinepipe_nnunet_smoke_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "cohort"
    cfg = SynthConfig(isotropic_rate=1.0, isotropic_spacing_mm=(3.0, 3.0), fov_si_mm=(170.0, 200.0),
                      fov_ap_mm=(110.0, 130.0), fov_lr_mm=(60.0, 70.0), orientations=("LPI", "PIL"),
                      l6_rate=0.0, t13_rate=0.0, missing_lumbar_rate=0.0)
    ids = write_cohort(data, n_subjects, seed=7, config=cfg)
    train_ids, val_ids, test_ids = ids[:-2], ids[-2:-1], ids[-1:]
    shapes = {i: list(io.read_image(next(data.glob(f"{i}_image.*"))).shape) for i in ids}
    result: dict[str, Any] = {"what": "nnU-Net v2 out-of-the-box smoke run (synthetic, 3 mm isotropic, tiny)",
                              "work_dir": str(work), "subjects": shapes, "train_ids": train_ids,
                              "val_ids": val_ids, "test_ids": test_ids, "budget_s": budget_s}
    try:
        t = time.perf_counter()
        prepare(data, train_ids, work, 901, "SpinepipeSmoke", val_ids=val_ids)
        result["prepare"] = json.loads((work / "nnunet_reference_prepare_901.json").read_text())
        result["prepare"]["wall_s"] = round(time.perf_counter() - t, 2)
        tr = train_with_budget(work, 901, {"train": train_ids, "val": val_ids}, budget_s, trainer=trainer)
        result["train"] = tr
        if tr["trained"]:
            scans = {i: next(data.glob(f"{i}_image.*")) for i in test_ids + val_ids}
            pr = predict(work, 901, tr["fold"], scans, work / "predict")
            result["predict"] = {k: v for k, v in pr.items() if k != "predictions"}
            result["evaluation"] = evaluate_centroids(pr["centroids"], gt_centroids(data, list(scans)))
        else:
            # no trained model: still check the predict path (and its timing, which does not depend on the
            # weights) with nnU-Net's checkpoint of a few-iteration probe model. NOT a result.
            pc = _probe(work, 901, tr["fold"], 2, 1, 1, 10, 300.0, save_checkpoint=True)
            scans = {i: next(data.glob(f"{i}_image.*")) for i in test_ids + val_ids}
            pr = predict(work, 901, tr["fold"], scans, work / "predict_check", trainer="nnUNetTrainer",
                         checkpoint="checkpoint_probe.pth", results_dir=work / "probe_results")
            result["predict_pipeline_check"] = {
                "note": "weights = nnU-Net checkpoint after 3 probe iterations (untrained): checks the predict "
                        "path and its timing only; centroids/metrics are meaningless",
                "probe_checkpoint_iterations": 3,
                **{k: v for k, v in pr.items() if k != "predictions"},
                "evaluation_meaningless": evaluate_centroids(pr["centroids"], gt_centroids(data, list(scans)))["summary"],
            }
            del pc
    except Exception as exc:  # noqa: BLE001 - the smoke record must say what happened
        log.exception("smoke run failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["total_s"] = round(time.perf_counter() - t0, 2)
    stem = "nnunet_smoke" + (f"_{tag}" if tag else "")
    _write_json(result, RESULTS_DIR / f"{stem}.json")
    io.write_text(_smoke_markdown(result), RESULTS_DIR / f"{stem}.md")
    return result


def _smoke_markdown(r: dict[str, Any]) -> str:
    tr, pp = r.get("train", {}), r.get("prepare", {})
    pr = r.get("predict") or r.get("predict_pipeline_check") or {}
    ev = (r.get("evaluation") or {}).get("summary", {})
    probe = tr.get("probe", {})
    rows = [
        ("plan+preprocess (s)", pp.get("plan_and_preprocess_s")),
        ("patch size / batch", f"{pp.get('plans', {}).get('patch_size')} / {pp.get('plans', {}).get('batch_size')}"),
        ("probe s/train iter", probe.get("sec_per_iter")),
        ("probe s/val iter", probe.get("sec_per_val_iter")),
        ("trainer", tr.get("trainer")),
        ("epochs done / planned", f"{tr.get('epochs_done')} / {tr.get('epochs_planned')}"),
        ("mean epoch (s)", tr.get("mean_epoch_s")),
        ("train seconds (incl. probe) / budget", f"{tr.get('seconds')} / {r.get('budget_s')}"),
        ("trained / checkpoint", f"{tr.get('trained')} / {tr.get('checkpoint')}"),
        ("predict s per scan" + (" (untrained probe weights)" if "predict" not in r else ""),
         pr.get("mean_seconds_per_scan")),
        ("id rate / mean error mm", f"{ev.get('id_rate')} / {ev.get('mean_error_mm')}"),
    ]
    lines = ["# nnU-Net reference smoke run (synthetic)", "", "| item | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if "error" in r:
        lines += ["", f"Error: `{r['error']}`"]
    if tr.get("reason"):
        lines += ["", f"Note: {tr['reason']}"]
    return "\n".join(lines) + "\n"


def _probe_markdown(rec: dict[str, Any]) -> str:
    pr, prep = rec["probe"], rec["prepare"]
    rows = [("data", f"{rec['dataset_dir']} (real, native spacing; train {prep['train_ids']}, val {prep['val_ids']})"),
            ("plan+preprocess s", prep["plan_and_preprocess_s"]),
            ("patch / batch", f"{pr['patch_size']} / {pr['batch_size']}"),
            ("s / train iter (median)", round(pr["sec_per_iter"], 2)),
            ("s / val iter (median)", round(pr["sec_per_val_iter"], 2)),
            ("iterations per epoch (train + val)", f"{pr['num_iterations_per_epoch']} + {pr['num_val_iterations_per_epoch']}"),
            ("est. s / epoch", rec["estimated_sec_per_epoch"]),
            ("torch threads / load average", f"{pr['torch_threads']} / {rec['loadavg']:.1f}")]
    return ("# nnU-Net v2 3d_fullres speed probe (CPU, no training)\n\n| item | value |\n|---|---|\n"
            + "".join(f"| {k} | {v} |\n" for k, v in rows))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("_probe")  # internal: speed probe subprocess
    p.add_argument("--dataset-id", type=int, required=True)
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--n-train", type=int, default=4)
    p.add_argument("--n-val", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--save-checkpoint", action="store_true")
    p.add_argument("--device", default="cpu")
    u = sub.add_parser("_untrained")  # internal: untrained speed-reference model subprocess
    u.add_argument("--dataset-id", type=int, required=True)
    u.add_argument("--fold", type=int, required=True)
    u.add_argument("--out", required=True)
    q = sub.add_parser("probe", help="prepare a few real subjects and measure nnU-Net s/iteration (no training)")
    q.add_argument("dataset_dir", type=Path)
    q.add_argument("--train-ids", nargs="+", required=True)
    q.add_argument("--val-ids", nargs="+", required=True)
    q.add_argument("--work-dir", type=Path, required=True)
    q.add_argument("--dataset-id", type=int, default=902)
    q.add_argument("--name", default="SpinepipeProbe")
    q.add_argument("--n-train", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic end-to-end run")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--trainer", default=None, help="force a shipped trainer variant in --smoke (skips the probe)")
    ap.add_argument("--tag", default="", help="suffix of the --smoke result files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "_probe":
        _probe_main(args.dataset_id, args.fold, args.n_train, args.n_val, args.out, args.save_checkpoint, args.device)
        return 0
    if args.cmd == "_untrained":
        _untrained_main(args.dataset_id, args.fold, args.out)
        return 0
    if args.cmd == "probe":
        t = time.perf_counter()
        prepare(args.dataset_dir, args.train_ids, args.work_dir, args.dataset_id, args.name, val_ids=args.val_ids)
        prep = json.loads((args.work_dir.resolve() / f"nnunet_reference_prepare_{args.dataset_id:03d}.json").read_text())
        fold = write_split(args.work_dir, args.dataset_id, args.train_ids, args.val_ids)
        pr = probe_speed(args.work_dir, args.dataset_id, fold, n_train=args.n_train)
        epoch_s = (pr["num_iterations_per_epoch"] * pr["sec_per_iter"]
                   + pr["num_val_iterations_per_epoch"] * pr["sec_per_val_iter"] + EPOCH_OVERHEAD_S)
        rec = {"what": "nnU-Net v2 3d_fullres speed probe (no training)", "dataset_dir": str(args.dataset_dir),
               "prepare": prep, "probe": pr, "estimated_sec_per_epoch": round(epoch_s, 1),
               "total_s": round(time.perf_counter() - t, 1), "loadavg": os.getloadavg()[0]}
        _write_json(rec, RESULTS_DIR / f"nnunet_probe_{args.name}.json")
        io.write_text(_probe_markdown(rec), RESULTS_DIR / f"nnunet_probe_{args.name}.md")
        return 0
    if args.smoke:
        r = smoke(args.work_dir, args.budget_s, trainer=args.trainer, tag=args.tag)
        return 1 if "error" in r else 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
