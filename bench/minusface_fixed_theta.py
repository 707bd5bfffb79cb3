"""Sanity check for MinusFace stage 2: the same demo run with ONE fixed channel permutation.

    python bench/minusface_fixed_theta.py --stage1 runs/minus_s1 --workdir runs/minus_s2_fixed_theta

Trains ``configs/minusface.py:stage2,demo`` exactly as the demo does, except that every
image, in training and in verification, is shuffled with the same permutation θ
(``frequency.draw_permutations`` replaced for this process only). Comparing its DevTest
accuracy with the normal stage-2 demo (a fresh θ per image and step) separates "the
recogniser cannot learn permutation-invariant features at this budget" from a broken
generator -> residue -> shuffle-decode -> recogniser path. Prints one JSON line.
This is not a protection mode: a fixed θ is what the privacy suite's fixed-θ attacker
exploits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _common import emit  # noqa: E402
from ppfr_jax import config_lib, frequency, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage1", required=True, help="workdir of a configs/minusface.py:stage1,demo run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--theta-seed", type=int, default=1234)
    a = p.parse_args()
    theta = jax.random.permutation(jax.random.key(a.theta_seed), frequency.NUM_CHANNELS).astype(jnp.int32)

    def fixed(key, batch, n_duplicate=1, channels=frequency.NUM_CHANNELS):
        del key
        return jnp.broadcast_to(theta, (n_duplicate, batch, channels))

    frequency.draw_permutations = fixed  # shuffle_decode (the training step) and eval_permutations call it
    config = config_lib.load_config_spec(
        os.path.join(ROOT, "configs", "minusface.py") + f":stage2,demo,stage1_workdir={a.stage1}")
    r = train.train_and_evaluate(config, a.workdir)
    emit({"bench": "minusface_stage2_fixed_theta", "theta_seed": a.theta_seed, "steps": r.get("steps"),
          "devtest_accuracy": r.get("devtest_accuracy"), "devtest_std": r.get("devtest_std"),
          "wall_s": r.get("wall_s"), "workdir": a.workdir, "stage1": a.stage1})


if __name__ == "__main__":
    main()
