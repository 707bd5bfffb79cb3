"""``ppfr-protect``: face photos -> one protected ``.npz`` per image (+ X_p preview PNG).

Runs a run's client half (``deploy.Deployment.protect``, or an exported ONNX
client with ``--onnx``) and writes what the client would send. Output names
are random (``<16 hex digits>.npz``): an image's file name is often the
person's identity, and protected files are made to be sent; which image each
came from goes to a manifest kept beside, never inside, ``--out``
(``--keep-names`` names them ``<image stem>.npz`` instead). No existing file is
ever overwritten. Photos that are not already aligned 112x112 faces (any size)
are detected and aligned on the client first (``--align``: MTCNN, the largest
face, ``ppfr_jax.data.detect``). Every bad input is one line
``ppfr-protect: error: ...`` and exit status 2 (``--skip-bad``: photos without a
face or that do not decode are skipped and counted instead).

Examples::

    ppfr-protect --workdir runs/minusface_stage2_demo --images faces/ --out protected/
    ppfr-protect --config configs/minusface.py:stage2,tiny --untrained --images a.png --out /tmp/p  # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import secrets
import sys
from typing import Sequence

import numpy as np
from PIL import Image

from ppfr_jax import evaluate, image_io
from ppfr_jax.cli import run_cli
from ppfr_jax.cli.deploy_args import add_run_args, deployment_from_args, positive_int
from ppfr_jax.deploy import IMAGE_SIZE, METHOD_NAMES, DeployError, preview_image, save_protected
from ppfr_jax.deploy.onnx import OnnxClient

IMAGE_EXTS = image_io.EXTENSIONS


def collect_images(specs: Sequence[str], keep_names: bool = False) -> list[str]:
    """Files as given, folders expanded to their images (not recursive, sorted). Raises DeployError.

    ``keep_names``: also refuse two inputs that would be written under the same name.
    """
    out = []
    for s in specs:
        p = pathlib.Path(s)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DeployError(f"{s}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise DeployError(f"{s}: no such file or folder")
    if keep_names:
        stems: dict[str, str] = {}
        for f in out:
            stem = pathlib.Path(f).stem
            if stem in stems:
                raise DeployError(f"{stems[stem]} and {f} would both be written as {stem}.npz; rename one")
            stems[stem] = f
    return out


def default_manifest(out: str) -> str:
    """``<out>.manifest.json`` beside the output folder (never inside it: it must not travel with the files)."""
    return os.path.abspath(out).rstrip(os.sep) + ".manifest.json"


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _opaque_name(out: str, taken: set[str]) -> str:
    """A random 64-bit hex name that no file in ``out`` has (nor will get in this run)."""
    while True:
        name = secrets.token_hex(8)
        if name not in taken and not any(os.path.exists(os.path.join(out, name + ext)) for ext in (".npz", ".xp.png")):
            taken.add(name)
            return name


def _write_new(path: str, write) -> None:
    """Create ``path`` (never replacing an existing file) and fill it with ``write(fileobj)``."""
    try:
        f = open(path, "xb")
    except FileExistsError:
        raise DeployError(f"{path}: already exists; ppfr-protect never overwrites a file (remove it, or choose "
                          f"another --out)") from None
    except OSError as e:
        raise DeployError(f"{path}: cannot create it ({e.strerror or e})") from None
    try:
        with f:
            write(f)
    except BaseException as e:
        os.unlink(path)  # no half-written file is left behind
        if isinstance(e, OSError):
            raise DeployError(f"{path}: writing failed ({e.strerror or e})") from None
        raise


def _update_manifest(path: str, entries: dict[str, str], out: str) -> None:
    """Merge ``entries`` (output file -> input image) into the JSON manifest at ``path`` (atomically)."""
    old: dict = {}
    if os.path.exists(path):
        try:
            old = json.loads(pathlib.Path(path).read_text())["files"]
            if not isinstance(old, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise DeployError(f"--manifest {path}: exists and is not a ppfr-protect manifest; ppfr-protect never "
                              f"overwrites a file (move it, or pass another --manifest)") from None
    doc = {"note": "client-side record of which image each protected file came from; it names the people in "
                   "them: keep it on this machine, never send it with the files",
           "out": os.path.abspath(out), "files": {**old, **entries}}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise DeployError(f"--manifest {path}: cannot write it ({e.strerror or e})") from None


def _prepare_out(out: str, manifest: str | None) -> None:
    if not out:
        raise DeployError("--out: empty path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DeployError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DeployError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DeployError(f"--out {out}: the folder is not writable")
    if manifest is not None:
        if _inside(manifest, out):
            raise DeployError(f"--manifest {manifest}: inside --out {out}; the manifest names the people in the "
                              f"images and must stay on the client, away from the files that are sent")
        if os.path.isdir(manifest):
            raise DeployError(f"--manifest {manifest}: is a folder")


def _faces(files: list[str], *, detect_all: bool, skip_bad: bool) -> tuple[list[str], np.ndarray, str]:
    """Decode ``files``; detect and align the ones that are not aligned 112x112 faces (all with ``detect_all``).

    Returns:
      (the files kept, their faces uint8 (N, 112, 112, 3), a note for the summary line: faces detected,
      photos with several faces (the largest was taken), skipped photos).
    Raises:
      DeployError naming the file: it does not decode or has no face (unless ``skip_bad``), or nothing is left.
    """
    kept, faces, detected, several, skipped = [], [], 0, [], []
    for f in files:
        try:
            img = image_io.decode_rgb(f)
            if img.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) and not detect_all:
                face = img
            else:
                from ppfr_jax.data import detect  # TensorFlow (MTCNN) only when a photo needs it
                face, _, n = detect.detect_and_align(img, "arcface", path=f)
                detected += 1
                if n > 1:
                    several.append(f)
        except (image_io.ImageDecodeError, ValueError) as e:  # NoFaceError is a ValueError; names the file
            if not skip_bad:
                raise DeployError(f"{e} (use --skip-bad to skip such photos)") from None
            skipped.append(f)
            continue
        kept.append(f)
        faces.append(face)
    if not kept:
        raise DeployError(f"no usable face in the {len(files)} image(s) given (skipped: {skipped[:3]}...)")
    notes = ""
    if detected:
        notes += f"; {detected} photo(s) detected and aligned (MTCNN)"
    if several:
        notes += f", {len(several)} with several faces: the largest was taken (e.g. {several[0]})"
    if skipped:
        notes += f"; skipped {len(skipped)} without a usable face (e.g. {skipped[0]})"
    return kept, np.stack(faces), notes


def _protect(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="ppfr-protect", description=(
        "Run the client half of a DuetFace / MinusFace run on face photos (aligned 112x112 faces as they are, "
        "other photos detected and aligned first) and "
        "write what the client would send: <out>/<random name>.npz (and <name>.xp.png for MinusFace). The "
        "image each file came from is recorded in a manifest beside --out (not inside it): keep that on the "
        "client. Existing files are never overwritten."))
    p.add_argument("--method", choices=METHOD_NAMES, default=None, help="check that the run is of this method")
    add_run_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (created); holds only what may be sent")
    p.add_argument("--manifest", default=None,
                   help="where to record which image each output came from (JSON, merged into an existing "
                        "manifest; default: <out>.manifest.json beside the output folder; never inside --out)")
    p.add_argument("--keep-names", action="store_true",
                   help="name each output after its input image (<image stem>.npz) instead of a random name. "
                        "WARNING: image names such as Jane_Doe_0001.jpg name the person, and that name then "
                        "travels with the protected file")
    p.add_argument("--onnx", default=None, help="run this exported client (ppfr-export) with onnxruntime "
                                                "instead of JAX; it must come from the same run")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--no-preview", action="store_true", help="MinusFace: do not write the X_p PNG")
    p.add_argument("--align", choices=("auto", "detect", "none"), default="auto",
                   help="auto (default): 112x112 images are taken as aligned faces, any other size is a photo "
                        "whose largest face is detected (MTCNN) and aligned; detect: detect in every image; "
                        "none: every image must already be an aligned 112x112 face")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) photos without a face or that do not decode, instead of stopping")
    a = p.parse_args(argv)
    manifest = None if a.keep_names else (a.manifest or default_manifest(a.out))
    files = collect_images(a.images, keep_names=a.keep_names)
    _prepare_out(a.out, manifest)
    if a.align == "none":
        try:
            images, _, _ = evaluate.decode_images(files, size_hw=(IMAGE_SIZE, IMAGE_SIZE))
        except evaluate.BadInputError as e:
            raise DeployError(f"{e} (--align none takes faces already aligned to {IMAGE_SIZE}x{IMAGE_SIZE}; "
                              f"align them with ppfr-align, or leave --align at auto)") from None
        notes = ""
    else:
        files, images, notes = _faces(files, detect_all=a.align == "detect", skip_bad=a.skip_bad)
    dep = deployment_from_args(a, a.method)
    preview = dep.client_input.preview if not a.no_preview else None
    taken: set[str] = set()
    names = [pathlib.Path(f).stem if a.keep_names else _opaque_name(a.out, taken) for f in files]
    if a.keep_names:  # refuse before computing anything, not half-way through
        for n in names:
            for ext in (".npz",) + ((".xp.png",) if preview else ()):
                if os.path.exists(os.path.join(a.out, n + ext)):
                    raise DeployError(f"{os.path.join(a.out, n + ext)}: already exists; ppfr-protect never "
                                      f"overwrites a file (remove it, or choose another --out)")
    runner = OnnxClient(a.onnx, expect=dep) if a.onnx else None
    written: dict[str, str] = {}
    try:
        for i in range(0, len(files), a.batch_size):
            batch = images[i:i + a.batch_size]
            extra = dep.client_extra(batch)
            outs = runner.run(batch, extra) if runner else dep.protect(batch, extra)
            for j, f in enumerate(files[i:i + a.batch_size]):
                name = names[i + j]
                sample = {k: v[j] for k, v in outs.items()}
                _write_new(os.path.join(a.out, name + ".npz"),
                           lambda fh: save_protected(fh, dep, sample, backend="onnxruntime" if runner else "jax"))
                written[name + ".npz"] = os.path.abspath(f)
                if preview:
                    png = Image.fromarray(preview_image(sample[preview]))
                    _write_new(os.path.join(a.out, name + ".xp.png"), lambda fh: png.save(fh, "PNG"))
    finally:
        if manifest is not None and written:  # even after a failure: what was written stays traceable
            _update_manifest(manifest, written, a.out)
    where = (f"; which image each came from: {manifest} (keep it on this machine: it names the people)"
             if manifest else "; named after the input images (--keep-names)")
    print(f"ppfr-protect: {len(files)} protected file(s) in {a.out} ({dep.method}, client {dep.client_fingerprint}, "
          f"{'onnxruntime' if runner else 'jax'}; from {dep.source}){where}{notes}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("ppfr-protect", _protect, argv)


if __name__ == "__main__":
    sys.exit(main())
