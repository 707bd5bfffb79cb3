"""Deterministic synthetic training batches (tests, benchmarks): no files, no TensorFlow.

Batch ``k`` depends only on ``(config.seed, k)``: ``image`` uint8
(B_local, 112, 112, 3) in [0, 255] and ``label`` int32 (B_local,) in
``[0, num_classes)``. Each host yields its slice (``global_batch //
process_count`` rows, by ``jax.process_index()``) of the same global batch,
so a run does not depend on how many processes share it, and
``start_step`` resumes exactly.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np


def synthetic_batches(config, global_batch: int, start_step: int, num_classes: int) -> Iterator[dict]:
    """Deterministic random batches (tests, benchmarks): batch k depends only on (seed, k).

    Each host yields its slice of the same global batch, so the training run does not
    depend on how many processes share it.
    """
    local = global_batch // jax.process_count()
    lo = jax.process_index() * local
    step = start_step
    while True:
        rng = np.random.default_rng([config.seed, step])
        images = rng.integers(0, 256, (global_batch, 112, 112, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, (global_batch,), dtype=np.int32)
        yield {"image": images[lo:lo + local], "label": labels[lo:lo + local]}
        step += 1
