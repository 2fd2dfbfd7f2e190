"""Write a lower-resolution copy of canonical dataset folders (images + vertebra masks only).

Used to move the real cohorts to a machine with a small transfer limit (the GPU side-by-side of
``bench_stage1.py --nnunet``): ``<id>_image`` is resampled linearly and stored as uint8 when the input
is 8-bit, ``<id>_vertebrae`` with nearest neighbour. Geometry (origin, direction, physical extent) is
kept exactly by :func:`data_prep.scan.resample_to_spacing`; ground-truth centroids computed from the
resampled masks move by well under a voxel. Outlines are not copied.

    python bench/lowres_copy.py ../shared/data OUT --spacing 2 --cohorts myosegmentum chu2015
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.dataset import discover  # noqa: E402
from data_prep.io import read_image, read_labelmap, write_image  # noqa: E402
from data_prep.scan import resample_to_spacing  # noqa: E402

log = logging.getLogger("lowres_copy")


def copy_cohort(src: Path, dst: Path, spacing: float) -> int:
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in discover(src):
        img = read_image(s.image)
        was_u8 = img.array.dtype == np.uint8
        low = resample_to_spacing(img, (spacing,) * 3)
        if was_u8:
            low = low.with_array(np.clip(np.round(low.array), 0, 255).astype(np.uint8))
        write_image(low, dst / f"{s.id}_image.nii.gz")
        if s.vertebrae is not None:
            lab = resample_to_spacing(read_labelmap(s.vertebrae, reference=img), (spacing,) * 3, is_label=True)
            write_image(lab.with_array(lab.array.astype(np.uint8)), dst / f"{s.id}_vertebrae.nii.gz")
        n += 1
    if (src / "subjects.csv").is_file():
        shutil.copy(src / "subjects.csv", dst / "subjects.csv")
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--cohorts", nargs="+", default=["myosegmentum", "chu2015"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for c in args.cohorts:
        n = copy_cohort(args.data / c, args.out / c, args.spacing)
        log.info("%s: %d subjects -> %s (%.1f mm)", c, n, args.out / c, args.spacing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
