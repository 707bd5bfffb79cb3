"""Training data for the engine: ``train_source(config, global_batch, start_step)``.

Dispatches on ``config.data.source``: ``synthetic`` (deterministic random
batches, here, no TensorFlow) or the tf.data sources of
``ppfr_jax.input_pipeline`` (``demo``, ``image_folder``, ``tfrecord``,
``tfds``), imported only when asked for: the model/training core imports
without TensorFlow. Every source yields per-host numpy batches
``{'image': uint8 (B_local, 112, 112, 3), 'label': int32 (B_local,)[,
'landmarks': float32 (B_local, 98, 2)]}`` starting at ``start_step`` (exact
resume position).
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


def train_source(config, global_batch: int, start_step: int):
    """-> (iterator of per-host numpy batches, num_classes, dataset_size)."""
    if config.data.source == "synthetic":
        n = int(config.data.num_classes)
        return synthetic_batches(config, global_batch, start_step, n), n, max(global_batch * 10, 1)
    from ppfr_jax import input_pipeline  # TensorFlow enters here only
    return input_pipeline.train_source(config, global_batch, start_step)
