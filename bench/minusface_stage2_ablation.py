"""What holds MinusFace stage 2 back: the same stage-2 run with one part of X_p changed (a diagnostic).

    python bench/minusface_stage2_ablation.py --ablation no_shuffle -- \\
        --config configs/minusface.py:stage2,demo,stage1_workdir=runs/s1 --workdir runs/s2_noshuffle \\
        --config.head.margin=0.0 --config.num_epochs=3.0 --config.optim.boundaries_epochs='(2.4,)' \\
        --config.optim.warmup_epochs=0.3 --config.eval.every_steps=63

Everything after ``--`` goes to the training command (``python -m ppfr_jax.main``) unchanged; the
run trains and verifies on DevTest as usual, then one JSON line gives the ablation and the run's
``results.json`` figures. ``--ablation``:

* ``none``: the run as configured (the baseline of the comparison).
* ``no_shuffle``: every permutation is the identity, in training and in verification, so
  X_p = idct(x - g(x)): the decoded residue, as a picture. What stage 2 reaches without the shuffle
  (NOT a protected model: never deploy it).
* ``oracle``: the frozen generator is replaced by a fixed low-pass ``g``: the residue is the face's
  DCT with its ``--oracle-k`` largest-energy channels removed (``ORACLE_ORDER``: Y, Cr, Cb DC, then Y's
  two first-order ACs, ...; measured on demo faces: 79.6%, 11.0%, 9.1%, 0.18%, 0.15% of the energy),
  then the usual fresh per-face shuffle. A residue whose energy is spread over many channels (K=5:
  ~9 effective channels, against 1.5 for the face and 2.7 for the demo's 42-step generator), to
  test whether the spread is what stage 2 needs.
* ``canonical``: the method's X_p, but the recogniser sees it canonicalised (``canonical_view``):
  back to its 3 * n_duplicate YCbCr slots (the inverse of idct's colour map, offset removed), each
  slot standardised per image, its sign set by its skewness, the slots sorted by their energy. The
  shuffle puts each residue channel in a random slot under the random carrier (and sign) of the
  frequency it lands on; this removes the slot order, the sign and the scale from what the
  recogniser must learn to ignore (not the carriers) (X_p itself, what a
  client sends, is unchanged: this is a recogniser-side choice).

``--warm-start RGB_WORKDIR`` (with any ablation): the stage-2 recogniser and head start from a
finished RGB ArcFace run with the same backbone and classes (``configs/arcface.py:demo,match=minusface``)
instead of from random weights (``warm_start_variables``); with ``n_duplicate`` > 1 the stem's extra
input channels start at zero.

The patches live in this process only (``frequency.draw_permutations`` /
``MinusBackbone.residue``); the library is unchanged. The checkpoint of an ablated run is marked
only by its workdir name: keep such runs out of the pipeline and the privacy evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import emit  # noqa: E402

# DCT channel = colour * 64 + 8 u + v (colour: Y, Cb, Cr); ranked by energy on demo faces
ORACLE_ORDER = (0, 128, 64, 1, 8, 129, 16, 65, 136, 2, 9, 3)
ABLATIONS = ("none", "no_shuffle", "oracle", "canonical")


def canonical_view(x_p, eps: float = 1e-3):
    """X_p (N, 112, 112, 3k) in [0, 1] -> (N, 112, 112, 3k) float: the k * 3 YCbCr slots, standardised,
    sign by skewness, sorted by energy (largest first). Raises ValueError for a channel count not 3k."""
    import jax.numpy as jnp
    import numpy as np

    from ppfr_jax import frequency

    if x_p.ndim != 4 or x_p.shape[-1] % 3:
        raise ValueError(f"X_p must be (N, H, W, 3 * n_duplicate), got shape {tuple(x_p.shape)}")
    n, h, w, c = x_p.shape
    inv = jnp.asarray(np.linalg.inv(frequency._RGB_FROM_YCBCR), jnp.float32)
    rgb = 255.0 * x_p.astype(jnp.float32).reshape(n, h, w, c // 3, 3) - jnp.asarray(frequency._RGB_OFFSET, jnp.float32)
    z = (jnp.einsum("nhwdc,ec->nhwde", rgb, inv) - 128.0).reshape(n, h, w, c)
    z = z - z.mean(axis=(1, 2), keepdims=True)
    s = jnp.sqrt((z * z).mean(axis=(1, 2), keepdims=True))
    z = z / (s + eps)
    z = z * jnp.where((z ** 3).mean(axis=(1, 2), keepdims=True) >= 0, 1.0, -1.0)
    order = jnp.argsort(-s[:, 0, 0, :], axis=-1)
    return jnp.take_along_axis(z, order[:, None, None, :], axis=-1)


def warm_start_variables(variables: dict, rgb: dict, *, head: bool = True) -> dict:
    """Stage-2 ``variables`` with the recogniser (params + batch_stats) and, if ``head``, the head taken
    from an RGB ArcFace run's variables ``rgb`` (``backbone`` / ``head``). A stem kernel with more input
    channels (n_duplicate > 1) gets the RGB kernel in its first 3 and zeros elsewhere.

    Raises:
      ValueError: a tree or a shape that does not match (another backbone, embedding size or class count).
    """
    import jax
    import jax.numpy as jnp

    def put(dst, src, where):
        if jax.tree_util.tree_structure(dst) != jax.tree_util.tree_structure(src):
            raise ValueError(f"--warm-start: the RGB run's {where} is not this recogniser's (another backbone?)")

        def one(path, d, s_):
            if d.shape == s_.shape:
                return jnp.asarray(s_, d.dtype)
            if d.ndim == 4 and d.shape[:2] + d.shape[3:] == s_.shape[:2] + s_.shape[3:] and d.shape[2] > s_.shape[2]:
                return jnp.zeros(d.shape, d.dtype).at[:, :, : s_.shape[2]].set(jnp.asarray(s_, d.dtype))
            raise ValueError(f"--warm-start: {where}/{jax.tree_util.keystr(path)} has shape {tuple(s_.shape)} in "
                             f"the RGB run, {tuple(d.shape)} here (same backbone, embedding size and classes needed)")
        return jax.tree_util.tree_map_with_path(one, dst, src)

    out = dict(variables)
    out["params"] = dict(variables["params"])
    out["params"]["recognizer"] = put(variables["params"]["recognizer"], rgb["params"]["backbone"], "backbone")
    if "batch_stats" in variables:
        out["batch_stats"] = dict(variables["batch_stats"])
        out["batch_stats"]["recognizer"] = put(variables["batch_stats"]["recognizer"],
                                               rgb["batch_stats"]["backbone"], "backbone batch_stats")
    if head:
        out["params"]["head"] = put(variables["params"]["head"], rgb["params"]["head"], "head")
    return out


def patch(ablation: str, oracle_k: int = 5, warm_start: str = "") -> None:
    """Install the ablation in this process (see the module docstring). Raises ValueError for a bad choice."""
    import jax.numpy as jnp
    import numpy as np

    from ppfr_jax import frequency
    from ppfr_jax.models import minusface

    if ablation not in ABLATIONS:
        raise ValueError(f"--ablation must be one of {ABLATIONS}, got {ablation!r}")
    if ablation == "no_shuffle":
        def identity_permutations(key, batch, n_duplicate=1, channels=frequency.NUM_CHANNELS):
            del key
            return jnp.broadcast_to(jnp.arange(channels, dtype=jnp.int32), (n_duplicate, batch, channels))
        frequency.draw_permutations = identity_permutations
    elif ablation == "oracle":
        if not 1 <= oracle_k <= len(ORACLE_ORDER):
            raise ValueError(f"--oracle-k must be in 1..{len(ORACLE_ORDER)}, got {oracle_k}")
        keep = np.ones(frequency.NUM_CHANNELS, np.float32)
        keep[list(ORACLE_ORDER[:oracle_k])] = 0.0

        def residue(self, x):
            self._check(x)
            x_up = frequency.dct_transform(x.astype(jnp.float32))
            _, latent = self.generator(x_up)  # keeps the generator's params in the tree; its output is unused
            r = x_up * jnp.asarray(keep)
            return {"x_up": x_up, "x_encode_up": x_up - r, "x_residue_up": r, "x_latent": latent}
        minusface.MinusBackbone.residue = residue
    elif ablation == "canonical":
        decode = frequency.shuffle_decode

        def shuffle_decode(*args, **kwargs):
            return canonical_view(decode(*args, **kwargs))
        frequency.shuffle_decode = shuffle_decode
    if warm_start:
        from ppfr_jax import checkpoints
        from ppfr_jax.methods import minusface as method

        rgb, step = checkpoints.restore_variables(warm_start)
        if "backbone" not in rgb.get("params", {}) or "head" not in rgb["params"]:
            raise ValueError(f"--warm-start {warm_start!r}: not an RGB ArcFace run (no params/backbone and head)")
        print(f"stage-2 recogniser and head warm-started from {warm_start} (step {step})", flush=True)
        init = method.MinusFaceStage2.init

        def warm_init(self, rng, images, labels):
            return warm_start_variables(init(self, rng, images, labels), rgb)
        method.MinusFaceStage2.init = warm_init


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: minusface_stage2_ablation.py --ablation A [--oracle-k K] [--warm-start RGB_WORKDIR] -- TRAINING FLAGS "
                         "(see --help)" if "-h" not in argv and "--help" not in argv else __doc__)
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablation", choices=ABLATIONS, required=True)
    ap.add_argument("--oracle-k", type=int, default=5, help="oracle: how many of the largest channels g removes")
    ap.add_argument("--warm-start", default="", metavar="RGB_WORKDIR",
                    help="start the recogniser and head from this finished RGB ArcFace run")
    a = ap.parse_args(argv[:cut])
    train_flags = argv[cut + 1:]
    workdir = next((f.split("=", 1)[1] for f in train_flags if f.startswith("--workdir=")), None)
    if workdir is None and "--workdir" in train_flags:
        workdir = train_flags[train_flags.index("--workdir") + 1]
    if not workdir:
        raise SystemExit("minusface_stage2_ablation.py: the training flags need --workdir")
    patch(a.ablation, a.oracle_k, a.warm_start)

    from absl import app

    from ppfr_jax.cli import train as train_cli
    try:
        app.run(train_cli._main, argv=[sys.argv[0], *train_flags])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    res = json.load(open(os.path.join(workdir, "results.json")))
    emit({"bench": "minusface_stage2_ablation", "ablation": a.ablation,
          "oracle_k": a.oracle_k if a.ablation == "oracle" else None,
          "warm_start": a.warm_start or None, "workdir": workdir,
          **{k: res.get(k) for k in ("task", "steps", "devtest_accuracy", "devtest_std", "wall_s")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
