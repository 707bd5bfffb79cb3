"""The embedded LFW demo set (built by ``tools/build_demo_data.py``; see README.md here).

``demo_paths()`` gives the files:

- ``train_index``: TFace training index ``train/TFR-lfw_demo.txt`` (read with
  ``ppfr_jax.data.tface_source(train_index, train_root)``): 2,729 ArcFace-aligned
  112x112 faces of 115 LFW identities (not in pairsDevTest), each record with its 98 WFLW
  landmarks (normalised, aligned frame);
- ``eval_bin``: insightface-style ``.bin`` of the 1,000 LFW View 1 DevTest pairs
  (``ppfr_jax.evaluate.load_bin`` / ``load_set("demo")``);
- ``eval_landmarks``: ``.npz`` with the 98 landmarks of every ``.bin`` image.
"""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent
TRAIN_NAME = "TFR-lfw_demo"


def demo_paths() -> dict[str, pathlib.Path]:
    """Paths of the demo files (inside the installed package).

    Keys: ``root``, ``train_root`` (TFace DATA_ROOT/INDEX_ROOT), ``train_index``,
    ``train_shards`` (folder), ``eval_bin``, ``eval_landmarks``, ``manifest``, ``readme``.
    """
    return {
        "root": ROOT,
        "train_root": ROOT / "train",
        "train_index": ROOT / "train" / f"{TRAIN_NAME}.txt",
        "train_shards": ROOT / "train" / TRAIN_NAME,
        "eval_bin": ROOT / "eval" / "lfw_devtest.bin",
        "eval_landmarks": ROOT / "eval" / "lfw_devtest_landmarks.npz",
        "manifest": ROOT / "manifest.json",
        "readme": ROOT / "README.md",
    }


__all__ = ["demo_paths", "ROOT", "TRAIN_NAME"]
