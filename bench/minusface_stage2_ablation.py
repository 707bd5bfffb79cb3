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
ABLATIONS = ("none", "no_shuffle", "oracle")


def patch(ablation: str, oracle_k: int = 5) -> None:
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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: minusface_stage2_ablation.py --ablation A [--oracle-k K] -- TRAINING FLAGS "
                         "(see --help)" if "-h" not in argv and "--help" not in argv else __doc__)
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablation", choices=ABLATIONS, required=True)
    ap.add_argument("--oracle-k", type=int, default=5, help="oracle: how many of the largest channels g removes")
    a = ap.parse_args(argv[:cut])
    train_flags = argv[cut + 1:]
    workdir = next((f.split("=", 1)[1] for f in train_flags if f.startswith("--workdir=")), None)
    if workdir is None and "--workdir" in train_flags:
        workdir = train_flags[train_flags.index("--workdir") + 1]
    if not workdir:
        raise SystemExit("minusface_stage2_ablation.py: the training flags need --workdir")
    patch(a.ablation, a.oracle_k)

    from absl import app

    from ppfr_jax.cli import train as train_cli
    try:
        app.run(train_cli._main, argv=[sys.argv[0], *train_flags])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    res = json.load(open(os.path.join(workdir, "results.json")))
    emit({"bench": "minusface_stage2_ablation", "ablation": a.ablation,
          "oracle_k": a.oracle_k if a.ablation == "oracle" else None, "workdir": workdir,
          **{k: res.get(k) for k in ("task", "steps", "devtest_accuracy", "devtest_std", "wall_s")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
