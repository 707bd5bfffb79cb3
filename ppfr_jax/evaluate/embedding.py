"""The one embedding loop: images -> embeddings in fixed-size jitted batches, on one device or over a mesh.

The training engine's verification (:class:`~ppfr_jax.evaluate.evaluator.EvalSuite`, one
:class:`~ppfr_jax.evaluate.evaluator.VerificationEvaluator` per set),
``ppfr-eval`` and the privacy suite all embed through :func:`embed`.

- ``apply_fn``: (B, H, W, 3) model input -> (B, D); or :class:`WithVariables`
  ``(fn, variables)`` calling ``fn(variables, x)``, whose variables are then jit
  arguments (one compile for every set of weights, none baked in as constants).
- ``images``: (N, H, W, 3) uint8, or float already in the model's input range, or a
  :class:`~ppfr_jax.evaluate.sets.LazyImages` (encoded; each batch is decoded when it is embedded, so a
  large set is never decoded whole); ``preprocess`` (e.g. uint8 -> [-1, 1]) runs inside the jit, before the flip.
- ``flip``: None / ``"none"``; ``"sum"``: ``f(x) + f(flip_w(x))``, added in the
  model's dtype (TFace / insightface, the engine's DevTest); ``"concat"``:
  ``[f(x), f(flip_w(x))]`` from one 2B batch (the CASIA MobileFaceNet evaluation).
- ``sharding``: None (default device, batches of ``min(batch_size, N)``) or a
  ``NamedSharding`` splitting the batch axis (``sharding.batch_sharding(mesh)``):
  batches are a multiple of the device count, put on the mesh, and the output
  is replicated. The last batch is zero-padded: one compile per call shape.

Returns (N, D) or (N, 2D) float32 numpy, not normalised. Errors: ``ValueError``
for an unknown ``flip`` or no images.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ppfr_jax.evaluate.sets import LazyImages

FLIPS = (None, "none", "sum", "concat")


@dataclasses.dataclass(frozen=True, eq=False)
class WithVariables:
    """``fn(variables, x)`` with its variables: callable as ``f(x)``; :func:`embed` passes the variables as jit arguments."""

    fn: Callable
    variables: Any

    def __call__(self, x):
        return self.fn(self.variables, x)


def _batch_fn(fn: Callable, with_variables: bool, flip: str | None, preprocess: Callable | None,
              out_sharding: NamedSharding | None) -> Callable:
    """-> jitted ``(variables, x (B, ...)) -> (B, D) float32`` (``variables`` ignored unless ``with_variables``)."""
    prep = preprocess if preprocess is not None else (lambda x: x)
    call = fn if with_variables else (lambda variables, x: fn(x))

    def run(variables, x):
        x = prep(x)
        if flip is None:
            e = call(variables, x).astype(jnp.float32)
        elif flip == "sum":
            e = call(variables, x)
            e = (e + call(variables, x[:, :, ::-1, :])).astype(jnp.float32)
        else:  # concat
            n = x.shape[0]
            both = call(variables, jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)).astype(jnp.float32)
            e = jnp.concatenate([both[:n], both[n:]], axis=-1)
        return e if out_sharding is None else jax.lax.with_sharding_constraint(e, out_sharding)

    return jax.jit(run)


# (fn, flip, preprocess, sharding) -> the jitted batch function: the engine evaluates every few steps
# with new variables and must not recompile. Only the WithVariables form is kept (its fn holds no weights).
_cached_batch_fn = functools.lru_cache(maxsize=16)(_batch_fn)


def embed(apply_fn: Callable, images: np.ndarray, *, flip: str | None = None, batch_size: int = 128,
          sharding: NamedSharding | None = None, preprocess: Callable | None = None) -> np.ndarray:
    """Embeddings of an image array (see the module doc for the arguments).

    Returns:
      (N, D) float32 numpy ((N, 2D) with ``flip="concat"``), not normalised.
    Raises:
      ValueError: ``flip`` not one of None, "none", "sum", "concat"; no images.
    """
    if flip not in FLIPS:
        raise ValueError(f"flip must be None, 'sum' or 'concat', got {flip!r}")
    flip = None if flip == "none" else flip
    out_sharding = None if sharding is None else NamedSharding(sharding.mesh, P())
    if isinstance(apply_fn, WithVariables):
        run = _cached_batch_fn(apply_fn.fn, True, flip, preprocess, out_sharding)
        variables = apply_fn.variables
    else:
        run = _batch_fn(apply_fn, False, flip, preprocess, out_sharding)
        variables = None
    lazy = isinstance(images, LazyImages)
    if not lazy:
        images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("embed: no images")
    if sharding is None:
        bs = min(batch_size, n)
    else:  # every device gets rows: a multiple of the device count, at least one each
        n_dev = len(sharding.device_set)
        bs = max(n_dev, (batch_size // n_dev) * n_dev)
    outs = []
    pending = None
    for i in range(0, n, bs):
        chunk = images.decode(i, i + bs) if lazy else images[i:i + bs]  # decoded while the last batch runs
        if chunk.shape[0] < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])
        x = chunk if sharding is None else jax.device_put(chunk, sharding)
        res = run(variables, x)  # dispatched asynchronously; the previous batch is fetched meanwhile
        if pending is not None:
            outs.append(np.asarray(pending))
        pending = res
    outs.append(np.asarray(pending))
    return np.concatenate(outs)[:n]
