"""What a MinusFace demo run learned: regeneration quality, X_p pictures, accuracies and wall times.

    python bench/minusface_demo.py --stage1 runs/minusface_stage1_demo --stage2 runs/minusface_stage2_demo \\
        [--baseline runs/arcface_as_minus] [--out bench/results/minusface_demo] [--images 2000]

Reads the finished runs (their checkpoints and ``results.json``) and prints one JSON line:

* ``regeneration_psnr`` / ``regeneration_ssim``: the stage-1 generator's decoded regeneration
  ``2 idct(g(dct(X))) - 1`` against the face X, on the first ``--images`` DevTest faces
  (both mapped to [0, 1]; dm-pix PSNR in dB, SSIM), mean and std over faces. An untrained
  U-Net gives ~5 dB (its output is ~1% of x); 20 dB and up is a recognisable regeneration.
* ``residue_psnr``: the decoded residue ``2 idct(x - g(x)) - 1`` against X (what stage 1's
  recogniser sees, as a picture).
* ``xp_psnr`` / ``xp_ssim``: stage 2's protected image X_p (fresh permutations) against X.
* ``residue_top3_share`` / ``residue_effective_channels``: how the residue's energy (mean square
  per DCT channel over the faces) is spread over its 192 channels: the share of the 3 largest, and
  the participation ratio 1 / sum(p_k^2) (1 = one channel holds everything, 192 = all equal). A
  shuffle moves whole channels, so X_p's local energy is permutation-invariant on average only when
  many channels carry it; the DCT of a face itself is ~1.5 effective channels (its three DC maps).
* ``stage1_accuracy``, ``stage2_accuracy``, ``baseline_accuracy`` (DevTest, with std), the
  steps and wall seconds of each run (from its ``results.json``).

``--out DIR`` also writes ``xp_grid.png``: one row per face of face | decoded regeneration |
decoded residue | X_p | X_p again with other permutations (6 faces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402


def _results(workdir: str | None) -> dict:
    if not workdir:
        return {}
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: missing; is {workdir!r} a finished run?")
    return json.load(open(path))


def stage1_views(task, variables, images, key, batch_size: int = 50):
    """Faces (N,112,112,3) uint8 -> dict of [0, 1] images: face, regeneration, residue, xp, xp2; and
    ``energy`` (192,): the residue's sum of squares per DCT channel over all the faces."""
    from ppfr_jax import frequency, tasks
    from ppfr_jax.models import minusface

    from ppfr_jax.methods.minusface import generator_params
    gen = {"params": {"generator": generator_params(variables)}}

    @jax.jit
    def views(x, k):
        xn = tasks.normalize_images(x)
        res = task.model.apply(gen, xn, method=minusface.MinusBackbone.residue)
        k1, k2 = jax.random.split(k)
        r = res["x_residue_up"]
        return {"face": (xn + 1) / 2, "regeneration": frequency.idct_transform(res["x_encode_up"]),
                "residue": frequency.idct_transform(r),
                "xp": frequency.shuffle_decode(r, k1)[..., :3], "xp2": frequency.shuffle_decode(r, k2)[..., :3],
                "energy": jnp.sum(r ** 2, axis=(0, 1, 2))}

    out = []
    for i in range(0, len(images), batch_size):
        out.append(jax.device_get(views(jnp.asarray(images[i:i + batch_size]), jax.random.fold_in(key, i))))
    views = {k: np.concatenate([o[k] for o in out]) for k in out[0] if k != "energy"}
    views["energy"] = np.sum([np.asarray(o["energy"], np.float64) for o in out], axis=0)
    return views


def energy_spread(energy) -> tuple[float, float]:
    """Per-channel energy (C,) >= 0 -> (share of the 3 largest channels, participation ratio 1 / sum p_k^2).

    p = energy / sum(energy). The ratio is 1 when one channel holds everything and C when all are equal.
    Raises ValueError for a negative, non-finite or all-zero energy vector.
    """
    e = np.asarray(energy, np.float64).ravel()
    if e.size == 0 or not np.all(np.isfinite(e)) or np.any(e < 0) or e.sum() <= 0:
        raise ValueError(f"energy must be finite, >= 0 and not all zero; got {e.size} values, sum {e.sum()}")
    p = e / e.sum()
    return float(np.sort(p)[::-1][:3].sum()), float(1.0 / np.sum(p ** 2))


def report(stage1: str, stage2: str | None = None, baseline: str | None = None, out_dir: str = "",
           n_images: int = 2000) -> dict:
    """The figures described in the module docstring, as a dict; writes ``xp_grid.png`` into ``out_dir``."""
    from ppfr_jax import evaluate, methods
    from ppfr_jax.privacy import visual_metrics

    task, variables, step = methods.load_for_inference(stage1)
    if getattr(task, "mode", None) != "stage1":
        raise SystemExit(f"--stage1 {stage1!r}: not a MinusFace stage-1 run (task {type(task).__name__})")
    images, _ = evaluate.load_set("demo").interleaved()
    images = np.asarray(images[:n_images])
    v = stage1_views(task, variables, images, jax.random.key(0))
    rec = {"bench": "minusface_demo", "stage1_workdir": stage1, "stage1_step": step, "images": len(images)}
    for name, key in (("regeneration", "regeneration"), ("residue", "residue"), ("xp", "xp")):
        m = jax.device_get(visual_metrics(v[key], v["face"]))
        rec[f"{name}_psnr"] = float(np.mean(m["psnr"]))
        rec[f"{name}_psnr_std"] = float(np.std(m["psnr"]))
        rec[f"{name}_ssim"] = float(np.mean(m["ssim"]))
    rec["residue_top3_share"], rec["residue_effective_channels"] = energy_spread(v["energy"])
    for label, wd in (("stage1", stage1), ("stage2", stage2), ("baseline", baseline)):
        r = _results(wd)
        if r:
            rec[f"{label}_accuracy"] = r.get("devtest_accuracy")
            rec[f"{label}_std"] = r.get("devtest_std")
            rec[f"{label}_steps"] = r.get("steps")
            rec[f"{label}_wall_s"] = r.get("wall_s")
    if out_dir:
        from PIL import Image
        os.makedirs(out_dir, exist_ok=True)
        rows = []
        for i in range(min(6, len(images))):
            tiles = [v[k][i] for k in ("face", "regeneration", "residue", "xp", "xp2")]
            rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for t in tiles], 1))
        grid = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).round().astype(np.uint8)
        path = os.path.join(out_dir, "xp_grid.png")
        Image.fromarray(grid).save(path)
        rec["grid"] = path
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True, help="workdir of a finished MinusFace stage-1 run")
    ap.add_argument("--stage2", default="", help="workdir of the stage-2 run on that generator")
    ap.add_argument("--baseline", default="", help="workdir of the equal-budget RGB ArcFace run")
    ap.add_argument("--out", default="", help="folder for xp_grid.png")
    ap.add_argument("--images", type=int, default=2000, help="DevTest faces for the PSNR/SSIM figures")
    a = ap.parse_args(argv)
    if a.images < 1:
        ap.error("--images must be >= 1")
    emit(report(a.stage1, a.stage2 or None, a.baseline or None, a.out, a.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
