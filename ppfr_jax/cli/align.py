"""``ppfr-align``: similarity-align a folder of face photos to a 5-point template, landmarks from a table.

``ppfr-align --images ROOT --landmarks TABLE --out OUT``: one sub-folder per
identity in, the same layout out as 112x112 JPEGs (``ppfr_jax.align``). A
missing landmark row, an undecodable image or an unwritable output is one line
``ppfr-align: error: ...`` and exit code 2.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib

import numpy as np
from PIL import Image

from ppfr_jax import align, image_io
from ppfr_jax.cli import error_exit, run_cli

PROG = "ppfr-align"


def _align_file(src: str, dst: str, lm: np.ndarray, template_name: str, quality: int) -> None:
    aligned, _ = align.align_face(image_io.decode_rgb(src), lm, template_name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    Image.fromarray(aligned).save(dst, "JPEG", quality=quality)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ppfr-align", description=(
        "Similarity-align face images to a 5-point template (folder per identity in, same layout out)."))
    p.add_argument("--images", required=True, help="input root (one sub-folder per identity)")
    p.add_argument("--landmarks", required=True,
                   help="TSV/space table: path x1 y1 ... x5 y5 (paths relative to --images, or ending in identity/file)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--template", default="arcface", choices=sorted(align.TEMPLATES))
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the aligned images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-missing", action="store_true",
                   help="skip images without a landmark row (default: error)")
    a = p.parse_args(argv)
    lookup = align.LandmarkLookup(align.read_landmarks_tsv(a.landmarks))
    root = pathlib.Path(a.images)
    exts = set(image_io.EXTENSIONS)
    files = sorted(q for q in root.rglob("*") if q.suffix.lower() in exts and q.is_file())
    if not files:
        return error_exit(PROG, f"no images under {root}")
    jobs, missing = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        lm = lookup.get(rel)
        if lm is None:
            missing.append(rel)
            continue
        jobs.append((str(f), str(pathlib.Path(a.out) / pathlib.Path(rel).with_suffix(".jpg")), lm))
    if missing and not a.skip_missing:
        return error_exit(PROG, f"{len(missing)} images have no landmark row in {a.landmarks}, e.g. {missing[0]} "
                                "(use --skip-missing to skip them)")
    with concurrent.futures.ThreadPoolExecutor(a.workers) as ex:
        futs = [ex.submit(_align_file, s, d, lm, a.template, a.quality) for s, d, lm in jobs]
        for fut, (s, _, _) in zip(futs, jobs):
            try:
                fut.result()
            except image_io.ImageDecodeError as e:  # names the file already
                return error_exit(PROG, e)
            except (OSError, ValueError) as e:  # the landmarks (singular warp) or the output
                return error_exit(PROG, f"{s}: {type(e).__name__}: {e}")
    print(f"ppfr-align: wrote {len(jobs)} images to {a.out} (template {a.template}); "
          f"skipped {len(missing)} without landmarks")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
