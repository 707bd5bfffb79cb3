"""``ppfr-align``: similarity-align a folder of face photos to a 5-point template.

``ppfr-align --images ROOT --out OUT [--landmarks TABLE]``: one sub-folder per
identity in, the same layout out as 112x112 JPEGs (``ppfr_jax.align``).

- With ``--landmarks``: the five points of every image come from the table. A
  missing landmark row (unless ``--skip-missing``), an undecodable image or an
  unwritable output is one line ``ppfr-align: error: ...`` and exit code 2.
- Without it (raw photos of any size): the detector finds the faces and their
  five points (``ppfr_jax.data.detect``, MTCNN); a photo with several faces
  gives its largest, and the summary line counts them; a photo with no face,
  or one that cannot be decoded, is ``ppfr-align: error: <file>: ...`` and exit
  code 2, or with ``--skip-bad`` skipped and counted. Progress (images/s, ETA)
  is logged every ``--log-every`` seconds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import time

import numpy as np
from absl import logging
from PIL import Image

from ppfr_jax import align, image_io
from ppfr_jax.cli import error_exit, run_cli

PROG = "ppfr-align"


def _align_file(src: str, dst: str, lm: np.ndarray, template_name: str, quality: int) -> None:
    aligned, _ = align.align_face(image_io.decode_rgb(src), lm, template_name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    Image.fromarray(aligned).save(dst, "JPEG", quality=quality)


def _list_images(root: pathlib.Path) -> list[pathlib.Path]:
    exts = set(image_io.EXTENSIONS)
    return sorted(q for q in root.rglob("*") if q.suffix.lower() in exts and q.is_file())


def _detect_all(a: argparse.Namespace, files: list[pathlib.Path], root: pathlib.Path) -> int:
    """Raw-photo mode: detect, take the largest face, align, write; one pass, in file order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow C++ INFO and WARNING lines (mtcnn's no-face path logs one)
    from ppfr_jax.data import detect  # imports TensorFlow (on first detection)

    if logging.get_verbosity() < logging.INFO:  # absl: larger is more verbose (WARNING -1, INFO 0)
        logging.set_verbosity(logging.INFO)
    written, several, no_face, undecodable = 0, [], [], []
    t0 = last = time.monotonic()
    for i, f in enumerate(files, 1):
        rel = f.relative_to(root)
        try:
            image = image_io.decode_rgb(str(f))
            aligned, _, n = detect.detect_and_align(image, a.template, path=f, min_face_size=a.min_face_size)
        except image_io.ImageDecodeError as e:  # names the file already
            if not a.skip_bad:
                return error_exit(PROG, f"{e} (use --skip-bad to skip it)")
            undecodable.append(str(f))
            continue
        except detect.NoFaceError as e:  # names the file already
            if not a.skip_bad:
                return error_exit(PROG, f"{e} (use --skip-bad to skip such photos)")
            no_face.append(str(f))
            continue
        except ValueError as e:  # degenerate landmarks: a singular warp
            return error_exit(PROG, f"{f}: {type(e).__name__}: {e}")
        if n > 1:
            several.append(str(f))
        dst = pathlib.Path(a.out) / rel.with_suffix(".jpg")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(aligned).save(dst, "JPEG", quality=a.quality)
        except OSError as e:
            return error_exit(PROG, f"{dst}: {type(e).__name__}: {e}")
        written += 1
        now = time.monotonic()
        if now - last >= a.log_every and i < len(files):
            last = now
            rate = i / (now - t0)
            logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s; several faces in %d, no face in %d",
                         PROG, i, len(files), rate, (len(files) - i) / rate, len(several), len(no_face))
    dt = time.monotonic() - t0
    print(f"{PROG}: wrote {written} images to {a.out} (template {a.template}, faces detected by MTCNN, "
          f"{len(files) / max(dt, 1e-9):.1f} images/s); took the largest of several faces in {len(several)}"
          + (f" (e.g. {several[0]})" if several else "")
          + f"; skipped {len(no_face)} with no face" + (f" (e.g. {no_face[0]})" if no_face else "")
          + f" and {len(undecodable)} undecodable" + (f" (e.g. {undecodable[0]})" if undecodable else ""))
    return 0


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ppfr-align", description=(
        "Similarity-align face images to a 5-point template (folder per identity in, same layout out); "
        "five points from a table (--landmarks) or, without it, from a face detector (MTCNN) on raw photos."))
    p.add_argument("--images", required=True, help="input root (one sub-folder per identity)")
    p.add_argument("--landmarks", default=None,
                   help="TSV/space table: path x1 y1 ... x5 y5 (paths relative to --images, or ending in "
                        "identity/file); without it, faces and points are detected (raw photos of any size)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--template", default="arcface", choices=sorted(align.TEMPLATES))
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the aligned images")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-missing", action="store_true",
                   help="skip images without a landmark row (default: error)")
    p.add_argument("--skip-bad", action="store_true",
                   help="detection mode: skip (and count) photos with no face or that cannot be decoded "
                        "(default: error)")
    p.add_argument("--min-face-size", type=int, default=20,
                   help="detection mode: smallest face side in pixels the detector looks for")
    p.add_argument("--log-every", type=float, default=10.0,
                   help="detection mode: seconds between progress lines")
    a = p.parse_args(argv)
    root = pathlib.Path(a.images)
    files = _list_images(root)
    if not files:
        return error_exit(PROG, f"no images under {root}")
    if a.landmarks is None:
        return _detect_all(a, files, root)
    try:
        lookup = align.LandmarkLookup(align.read_landmarks_tsv(a.landmarks))
    except FileNotFoundError:
        return error_exit(PROG, f"--landmarks {a.landmarks}: no such file")
    except (OSError, ValueError) as e:  # unreadable, or a malformed row (the message names the line)
        return error_exit(PROG, f"--landmarks {a.landmarks}: {e}")
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
