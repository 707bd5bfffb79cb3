"""Build the embedded LFW demo set in ``ppfr_jax/demo_data/`` from ../shared/data/lfw.

    python tools/build_demo_data.py [--lfw ../shared/data/lfw] [--out ppfr_jax/demo_data]

What it writes (see ``ppfr_jax/demo_data/README.md`` for provenance and terms):

- ``train/TFR-lfw_demo.txt`` + ``train/TFR-lfw_demo/TFR-lfw_demo-00000.tfrecord`` (+ ``.index``):
  TFace training format, written by ``ppfr_jax.data.records.write_tface_records``.
  Identities: LFW people NOT in ``pairsDevTest.txt`` with at least ``--min-images``
  images; at most ``--max-per-identity`` images each (lowest file numbers), so
  George_W_Bush's 530 do not dominate. Each record: the ArcFace-112 aligned face
  (JPEG, ``--quality``) and its 98 WFLW landmarks in the aligned frame,
  normalised (x = column, y = row) as ``ppfr_jax.align.normalize_points``.
- ``eval/lfw_devtest.bin``: insightface-style verification set = pickle of
  (list of 2*P encoded JPEGs, list of P bools), pairs of LFW View 1
  ``pairsDevTest.txt`` (image 2i and 2i+1 form pair i), ordered in 10 consecutive
  folds that each hold 1/10 of the same-person pairs then 1/10 of the different
  ones (``fold_order``), as LFW's ``pairs.txt`` and insightface's ``lfw.bin`` are.
  The file itself lists its 500 same pairs before its 500 different ones, which would
  make every fold of the unshuffled 10-fold protocol single-class.
  An image used by several pairs is the same bytes object, so pickle stores it once.
- ``eval/lfw_devtest_landmarks.npz``: ``landmarks`` (2P, 98, 2) float32 normalised,
  ``paths`` (2P,) source image of each entry, ``issame`` (P,).
- ``manifest.json``: counts, settings, sha256 of every file written.

Alignment: similarity transform from the 5 points in
``lfw/derived/lfw-deepfunneled_5pt.tsv`` onto the ArcFace 112x112 template
(``ppfr_jax.align``). Deterministic: the same inputs give the same bytes (with
the same PIL/libjpeg).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pathlib
import pickle
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ppfr_jax import align  # noqa: E402
from ppfr_jax.data.records import write_tface_records  # noqa: E402  (TensorFlow only once it writes)

NAME = "TFR-lfw_demo"


def read_pairs(path: pathlib.Path):
    """pairsDevTest.txt -> list of ((name1, n1), (name2, n2), issame)."""
    lines = path.read_text().splitlines()
    out = []
    for line in lines[1:]:
        f = line.split("\t")
        if len(f) == 3:
            out.append(((f[0], int(f[1])), (f[0], int(f[2])), True))
        elif len(f) == 4:
            out.append(((f[0], int(f[1])), (f[2], int(f[3])), False))
        elif line.strip():
            raise ValueError(f"{path}: bad line {line!r}")
    if len(out) != int(lines[0].split()[0]) * 2:
        raise ValueError(f"{path}: header says {lines[0]!r}, found {len(out)} pairs")
    return out


def fold_order(pairs, n_folds: int = 10):
    """Reorder pairs into ``n_folds`` consecutive blocks of (same..., different...).

    Within each class the file order is kept; fold k gets the k-th contiguous slice of
    the same pairs and of the different pairs (sizes differ by at most one).
    """
    same = [p for p in pairs if p[2]]
    diff = [p for p in pairs if not p[2]]
    out = []
    for k in range(n_folds):
        out += same[k * len(same) // n_folds:(k + 1) * len(same) // n_folds]
        out += diff[k * len(diff) // n_folds:(k + 1) * len(diff) // n_folds]
    assert len(out) == len(pairs)
    return out


def rel(name: str, n: int) -> str:
    return f"lfw-deepfunneled/{name}/{name}_{n:04d}.jpg"


class Aligner:
    def __init__(self, lfw: pathlib.Path, quality: int):
        self.lfw = lfw
        self.quality = quality
        self.lm5 = align.read_landmarks_tsv(lfw / "derived" / "lfw-deepfunneled_5pt.tsv")
        with np.load(lfw / "derived" / "lfw-deepfunneled_pfld-ghostone_98pt.npz", allow_pickle=False) as z:
            self.lm98 = dict(zip((str(p) for p in z["paths"]), z["landmarks98"]))
        _, self.size = align.template("arcface")

    def __call__(self, relpath: str) -> tuple[bytes, np.ndarray]:
        """-> (JPEG bytes of the aligned face, (98, 2) float32 normalised landmarks)."""
        with Image.open(self.lfw / relpath) as im:
            face, m = align.align_face(im, self.lm5[relpath], "arcface")
        pts = align.normalize_points(align.transform_points(self.lm98[relpath], m), self.size)
        return align.encode_jpeg(face, self.quality), pts.astype(np.float32)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lfw", default=str(REPO.parent / "shared" / "data" / "lfw"))
    p.add_argument("--out", default=str(REPO / "ppfr_jax" / "demo_data"))
    p.add_argument("--min-images", type=int, default=10)
    p.add_argument("--max-per-identity", type=int, default=100)
    p.add_argument("--quality", type=int, default=90)
    a = p.parse_args(argv)
    lfw, out = pathlib.Path(a.lfw), pathlib.Path(a.out)

    pairs = fold_order(read_pairs(lfw / "pairsDevTest.txt"))
    eval_ids = {x[0] for pr in pairs for x in pr[:2]}
    root = lfw / "lfw-deepfunneled"
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in root.iterdir() if d.is_dir()}
    train_ids = sorted(n for n, c in counts.items() if c >= a.min_images and n not in eval_ids)
    aligner = Aligner(lfw, a.quality)

    # --- training records
    def records():
        for label, name in enumerate(train_ids):
            files = sorted((root / name).glob("*.jpg"))[: a.max_per_identity]
            for f in files:
                r = f"lfw-deepfunneled/{name}/{f.name}"
                jpg, lm = aligner(r)
                yield r, jpg, label, lm

    train_dir = out / "train"
    if train_dir.exists():
        for f in sorted(train_dir.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    info = write_tface_records(records(), train_dir, NAME, shard_size=1_000_000)
    n_train = int(info["count"])

    # --- evaluation pairs
    cache: dict[str, tuple[bytes, np.ndarray]] = {}
    bins, lms, paths, issame = [], [], [], []
    for (a1, a2, same) in pairs:
        for name, n in (a1, a2):
            r = rel(name, n)
            if r not in cache:
                cache[r] = aligner(r)
            jpg, lm = cache[r]
            bins.append(jpg)  # the same object for a repeated image: pickle memoises it
            lms.append(lm)
            paths.append(r)
        issame.append(bool(same))
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    with open(eval_dir / "lfw_devtest.bin", "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    np.savez_compressed(eval_dir / "lfw_devtest_landmarks.npz", landmarks=np.stack(lms).astype(np.float32),
                        paths=np.asarray(paths), issame=np.asarray(issame))

    files = sorted(q for q in out.rglob("*") if q.is_file() and q.suffix not in (".py", ".md", ".pyc")
                   and q.name != "manifest.json" and "__pycache__" not in q.parts)
    per_id = collections.Counter(min(counts[n], a.max_per_identity) for n in train_ids)
    manifest = {
        "built_by": "tools/build_demo_data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"min_images": a.min_images, "max_per_identity": a.max_per_identity,
                     "jpeg_quality": a.quality, "template": "arcface", "size_hw": [112, 112]},
        "train": {"identities": len(train_ids), "images": n_train, "index": f"train/{NAME}.txt",
                  "images_per_identity_histogram": dict(sorted(per_id.items()))},
        "eval": {"pairs": len(issame), "positive": int(sum(issame)), "unique_images": len(cache),
                 "bin": "eval/lfw_devtest.bin", "landmarks": "eval/lfw_devtest_landmarks.npz"},
        "files": {q.relative_to(out).as_posix(): {"bytes": q.stat().st_size, "sha256": sha256(q)} for q in files},
    }
    manifest["total_bytes"] = sum(v["bytes"] for v in manifest["files"].values())
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: manifest[k] for k in ("train", "eval", "total_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
