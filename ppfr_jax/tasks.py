"""Training tasks: what a step computes, independent of how it is run.

A task owns its Linen modules and exposes pure functions the engine
(``ppfr_jax.train``) jits and shards:

* ``init(rng, images, labels) -> variables`` with collections ``params``,
  ``batch_stats`` and ``head_state``, each a dict keyed by component
  (``backbone``, ``head``, ...);
* ``loss(params, model_state, batch, rng, train) -> (loss, (metrics, new_model_state))``;
* ``embed(variables, images) -> (B, D)`` embeddings for verification;
* ``param_group(path) -> str``: the optimiser group of a parameter
  (``'default'``, ``'frozen'`` or a name in ``config.optim.lr_multipliers``).

``RecognitionTask`` is the ArcFace baseline (RGB, or all 192 DCT channels
for ArcFace-FD); DuetFace and MinusFace subclass it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from ppfr_jax import frequency, heads, losses, models, sharding

TASKS: dict[str, Callable[..., "RecognitionTask"]] = {}


def register(name):
    def deco(cls):
        TASKS[name] = cls
        return cls
    return deco


def build_backbone(name: str, embedding_size: int = 512, dropout: float = 0.4, dtype=jnp.float32):
    """The recogniser ``config.model.backbone`` names (``ppfr_jax.models.BACKBONES``).

    Raises:
      models.UnknownBackboneError naming the known recognizers.
    """
    return models.get_model(name, "recognizer", embedding_size=embedding_size, dropout=dropout, dtype=dtype)


def normalize_images(images):
    """uint8 [0, 255] -> float32 [-1, 1]; float input is taken as already normalised."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


@register("arcface")
class RecognitionTask:
    """Backbone + margin head, on RGB (ArcFace) or on 192 DCT channels (ArcFace-FD)."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, padded_classes: int | None = None):
        self.config = config
        self.num_classes = num_classes
        self.dtype = jnp.bfloat16 if config.get("half_precision", False) else jnp.float32
        m = config.model
        self.backbone = build_backbone(m.backbone, m.embedding_size, m.get("dropout", 0.4), self.dtype)
        h = config.head
        self.head = heads.MarginHead(
            num_classes=num_classes, kind=h.kind, scale=h.scale, margin=h.get("margin", None),
            padded_classes=padded_classes, sample_rate=h.get("sample_rate", 1.0),
            class_chunk=int(h.get("class_chunk", 0)),
            # PartialFC samples per shard of the kernel's class axis (sharding.state_shardings)
            num_shards=sharding.class_shard_count() if padded_classes else 1)

    # -- input ---------------------------------------------------------------------------------
    def model_input(self, images, rng=None):
        """What the backbone sees: (B, 112, 112, 3) normalised RGB in [-1, 1], or its (B, 112, 112, 192) DCT
        channels (``config.model.input == 'dct'``). ``images``: uint8 (B, 112, 112, 3) or float in [-1, 1]."""
        x = normalize_images(images)
        if self.config.model.input == "dct":
            x = frequency.dct_transform(x)
        return x.astype(self.dtype)

    # -- pure functions --------------------------------------------------------------------------
    def init(self, rng, images, labels):
        """-> variables ``{'params': {backbone, head}, 'batch_stats': {backbone}[, 'head_state': {head}]}``.

        Args:
          rng: a ``jax.random`` key.
          images: uint8 (B, 112, 112, 3) (shapes only matter); labels: int32 (B,) in [0, num_classes).
        """
        r_b, r_h = jax.random.split(rng)
        x = self.model_input(images)
        bb = self.backbone.init({"params": r_b, "dropout": r_b}, x, train=False)
        emb = self.backbone.apply(bb, x, train=False)
        hd = self.head.init({"params": r_h, "sample": r_h}, emb, labels)
        variables = {"params": {"backbone": bb["params"], "head": hd["params"]},
                     "batch_stats": {"backbone": bb.get("batch_stats", {})}}
        if "head_state" in hd:
            variables["head_state"] = {"head": hd["head_state"]}
        return variables

    def features(self, params, model_state, images, rng, train, landmarks=None):
        """(embeddings (B, E), new model_state). ``landmarks`` (B, 98, 2) for tasks that use them."""
        del landmarks  # the plain recogniser has no use for them
        x = self.model_input(images, rng)
        out, upd = self.backbone.apply(
            {"params": params["backbone"], "batch_stats": model_state["batch_stats"]["backbone"]},
            x, train=train, rngs={"dropout": rng}, mutable=["batch_stats"])
        new_state = {**model_state, "batch_stats": {**model_state["batch_stats"], "backbone": upd["batch_stats"]}}
        return out, new_state

    def batch_features(self, params, model_state, batch, rng, train):
        """``features`` of a training batch: the image plus the fields a task reads (here ``landmarks``)."""
        return self.features(params, model_state, batch["image"], rng, train, batch.get("landmarks"))

    def loss(self, params, model_state, batch, rng, train=True):
        """The training objective of one batch.

        Args:
          params: the ``params`` collection; model_state: the other collections (``batch_stats``...).
          batch: ``{'image': uint8 (B, 112, 112, 3), 'label': int32 (B,)}`` plus the fields the task reads.
          rng: a ``jax.random`` key (dropout, sampling); train: BatchNorm batch statistics and dropout on.
        Returns:
          ``(loss, (metrics, new_model_state))``: scalar loss, a dict of scalar metrics (``loss``,
          ``accuracy``, ...), the updated model state.
        """
        r_f, r_h = jax.random.split(rng)
        emb, new_state = self.batch_features(params, model_state, batch, r_f, train)
        head_vars = {"params": params["head"]}
        if "head_state" in model_state:
            head_vars["head_state"] = model_state["head_state"]["head"]
        # the loss of the margin logits and the top-1 of the plain cosines (the reference's prec@1, torchkit
        # accuracy_dist on original_outputs: on the margin logits a model that ranks every face right can
        # still score 0); under PartialFC sampling the top-1 is over the sampled classes (the positives plus
        # random negatives), an optimistic figure logged as ``accuracy_sampled``
        metrics, hs = self.head.apply(head_vars, emb.astype(jnp.float32), batch["label"], train=train,
                                      return_loss=True, rngs={"sample": r_h}, mutable=["head_state"])
        if "head_state" in model_state:
            new_state = {**new_state, "head_state": {"head": hs["head_state"]}}
        loss = metrics["loss"]
        return loss, (metrics, new_state)

    def embed(self, variables, images):
        """Verification embeddings (B, E) (not normalised) of uint8 (B, 112, 112, 3) faces, in inference mode."""
        x = self.model_input(images)
        return self.backbone.apply({"params": variables["params"]["backbone"],
                                    "batch_stats": variables["batch_stats"]["backbone"]}, x, train=False)

    def param_group(self, path: tuple[str, ...]) -> str:
        """The optimiser group of the parameter at ``path`` (names): ``'default'``, ``'frozen'`` (never updated) or
        a key of ``config.optim.lr_multipliers``."""
        return "default"

    def decays(self, path: tuple[str, ...]) -> bool:
        """Weight decay on conv/linear kernels only (not BatchNorm, PReLU or biases)."""
        return path[-1] == "kernel"
