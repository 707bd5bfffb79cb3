"""``ppfr-privacy`` with the spread of the attacker's outputs across faces next to each row.

    python bench/privacy_spread.py --workdir DIR --config configs/privacy.py:demo,... [--config.x=y ...] \\
        [--out FILE] [--pairs 500]

Runs ``ppfr-privacy`` (``ppfr_jax.cli.privacy.main``) unchanged (same rows, attacker, metrics, privacy.json / privacy.md /
grids in ``--workdir``) and records, for every row, what ``run_attack`` recovered on the held-out faces:

* ``recovered_pixel_std``: the std of each pixel across the recovered faces, averaged over pixels and
  colours ([0, 1] units). An attacker that outputs one constant face has 0; the original faces have
  ``original_pixel_std`` (printed with each row).
* ``recovered_pairwise_psnr``: the mean PSNR between two different recovered faces (``--pairs`` random
  pairs, the same pairs for every row); a constant output gives the cap (100 dB), the original faces
  give ``original_pairwise_psnr``.

One JSON line per row: the row's privacy.json record plus these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from _common import emit  # noqa: E402


def spread(images_u8: np.ndarray, pairs: np.ndarray) -> dict:
    x = images_u8.astype(np.float32) / 255.0
    std = float(np.mean(np.std(x, axis=0)))
    mse = np.mean((x[pairs[:, 0]] - x[pairs[:, 1]]) ** 2, axis=(1, 2, 3))
    psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-10)), 100.0)
    return {"pixel_std": std, "pairwise_psnr": float(np.mean(np.minimum(psnr, 100.0)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    ap.add_argument("--pairs", type=int, default=500)
    a, rest = ap.parse_known_args(argv)
    from ppfr_jax import privacy
    from ppfr_jax.cli import privacy as privacy_cli

    seen = []
    original = privacy.suite.run_attack  # the suite's own reference: the one run_privacy calls

    def run_attack(rep, attacker, eval_set, key, **kw):
        res = original(rep, attacker, eval_set, key, **kw)
        n = len(res["recovered"])
        rng = np.random.default_rng(0)
        i = rng.integers(0, n, a.pairs)
        j = (i + 1 + rng.integers(0, n - 1, a.pairs)) % n  # j != i
        pairs = np.stack([i, j], 1)
        rec = spread(res["recovered"], pairs)
        orig = spread(np.asarray(eval_set.images[:n]), pairs)
        seen.append({"recovered_pixel_std": rec["pixel_std"], "recovered_pairwise_psnr": rec["pairwise_psnr"],
                     "original_pixel_std": orig["pixel_std"], "original_pairwise_psnr": orig["pairwise_psnr"]})
        print(f"spread of the recovered faces: pixel std {rec['pixel_std']:.4f} (originals {orig['pixel_std']:.4f}), "
              f"pairwise PSNR {rec['pairwise_psnr']:.2f} dB (originals {orig['pairwise_psnr']:.2f})", flush=True)
        return res

    privacy.suite.run_attack = run_attack
    rc = privacy_cli.main(rest)
    wd = rest[rest.index("--workdir") + 1] if "--workdir" in rest else \
        next(x.split("=", 1)[1] for x in rest if x.startswith("--workdir="))
    out = json.load(open(os.path.join(wd, "privacy.json")))
    for rec, sp in zip(out["rows"], seen):
        line = emit({"bench": "privacy_spread", **{k: v for k, v in rec.items() if k != "representation"},
                     **sp, "reference_accuracy": (out.get("reference_accuracy") or {}).get("accuracy"),
                     "attacker": {k: out["config"]["attacker"][k] for k in ("widths", "steps", "batch_size", "lr")},
                     "privacy_wall_s": out["wall_s"]})
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
