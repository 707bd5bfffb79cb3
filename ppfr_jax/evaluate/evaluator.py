"""The verification evaluators the training engine calls: ``EvalSuite.from_config(...).run(variables)``.

``EvalSuite`` holds one :class:`VerificationEvaluator` per named set of
``config.eval`` (``config_lib.eval_set_specs``: the paper benchmarks, or the
demo DevTest named ``devtest``) and returns each set's figures and their mean
accuracy, the number the best checkpoint is kept by. Sets are loaded lazily
(``load_set(..., lazy=True)``): each image is decoded once at load to check it,
then again batch by batch while it is embedded, so a 14,000-image set is never
held decoded.

``embed_fn(variables, images uint8 (B, 112, 112, 3)) -> (B, D)`` is the
task's verification embedding (``task.embed``): the evaluator knows nothing
of the engine and never imports it. ``run`` embeds the set's pairs in pair
order (2P rows) through :func:`~ppfr_jax.evaluate.embedding.embed` (the loop
``ppfr-eval`` uses: flip-summed, sharded over the mesh when ``sharding`` is
given, one compile for every call) and applies the 10-fold protocol
(:func:`~ppfr_jax.evaluate.protocol.verify`). It returns what the engine logs
and records: ``{"accuracy": mean fold accuracy in [0, 1], "std": their std
(ddof 0), "threshold": mean of the fold thresholds (squared L2 between unit
embeddings, in [0, 4]; ``ppfr-verify`` turns it into a cosine)}``. Errors: those of :func:`~ppfr_jax.evaluate.sets.load_set`
(``BadInputError``) when the set is read, ``ValueError`` for non-finite embeddings.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from jax.sharding import NamedSharding

from ppfr_jax import config_lib
from ppfr_jax.evaluate.embedding import WithVariables, embed
from ppfr_jax.evaluate.protocol import verify
from ppfr_jax.evaluate.sets import VerificationSet, load_set


class VerificationEvaluator:
    """k-fold verification accuracy of ``embed_fn``'s embeddings on one set.

    Args:
      embed_fn: ``(variables, images) -> (B, D)``, jittable (e.g. ``task.embed``).
      vset: the :class:`VerificationSet`.
      flip: "sum" (default: ``f(x) + f(flip_w(x))``), None or "concat".
      batch_size: rows per jitted batch (rounded to a multiple of the devices with ``sharding``).
      sharding: ``sharding.batch_sharding(mesh)`` to split batches over a mesh; None: one device.
      nrof_folds: folds of the protocol.
    """

    def __init__(self, embed_fn: Callable, vset: VerificationSet, *, flip: str | None = "sum",
                 batch_size: int = 128, sharding: NamedSharding | None = None, nrof_folds: int = 10):
        self.embed_fn = embed_fn
        self.name = vset.name
        self.images, self.issame = vset.interleaved()
        self.flip = flip
        self.batch_size = int(batch_size)
        self.sharding = sharding
        self.nrof_folds = nrof_folds

    @classmethod
    def from_config(cls, config, embed_fn: Callable,
                    sharding: NamedSharding | None = None) -> "VerificationEvaluator | None":
        """``config.eval`` (``pairs``: "demo" / .bin / pairs.txt, ``flip``, ``batch_size``) -> evaluator, or None without pairs."""
        pairs = config.eval.get("pairs")
        if not pairs:
            return None
        return cls(embed_fn, load_set(pairs, lazy=True), flip="sum" if config.eval.get("flip", True) else None,
                   batch_size=config.eval.batch_size, sharding=sharding)

    def embeddings(self, variables: Any) -> np.ndarray:
        """(2P, D) float32 embeddings of the set's images in pair order (not normalised)."""
        return embed(WithVariables(self.embed_fn, variables), self.images, flip=self.flip,
                     batch_size=self.batch_size, sharding=self.sharding)

    def run(self, variables: Any) -> dict[str, float]:
        """-> ``{"accuracy", "std", "threshold"}`` of ``variables`` (see the module doc)."""
        res = verify(self.embeddings(variables), self.issame, nrof_folds=self.nrof_folds)
        return {"accuracy": float(res["accuracy_mean"]), "std": float(res["accuracy_std"]),
                "threshold": float(np.mean(res["best_thresholds"]))}


class EvalSuite:
    """Every verification set of ``config.eval``, evaluated together.

    ``run(variables)`` -> ``{"sets": {name: {"accuracy", "std", "threshold", "pairs"}}, "mean_accuracy":
    mean of the sets' accuracies}`` (accuracies in [0, 1]), sets in ``eval_set_specs`` order.
    """

    def __init__(self, evaluators: dict[str, VerificationEvaluator]):
        if not evaluators:
            raise ValueError("EvalSuite needs at least one set")
        self.evaluators = dict(evaluators)

    @property
    def names(self) -> list[str]:
        return list(self.evaluators)

    @classmethod
    def from_config(cls, config, embed_fn: Callable, sharding: NamedSharding | None = None) -> "EvalSuite | None":
        """``config.eval`` -> the suite (None when it names no set). Raises ``BadInputError`` naming a bad set file."""
        specs = config_lib.eval_set_specs(config)
        if not specs:
            return None
        flip = "sum" if config.eval.get("flip", True) else None
        return cls({name: VerificationEvaluator(embed_fn, load_set(spec, lazy=True), flip=flip,
                                                batch_size=config.eval.batch_size, sharding=sharding)
                    for name, spec in specs.items()})

    def run(self, variables: Any) -> dict:
        sets = {}
        for name, ev in self.evaluators.items():
            sets[name] = dict(ev.run(variables), pairs=int(ev.issame.size))
        return {"sets": sets, "mean_accuracy": float(np.mean([r["accuracy"] for r in sets.values()]))}
