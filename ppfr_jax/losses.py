"""Losses: softmax cross-entropy over (sharded) class logits, MinusFace's losses."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

MINUS_DEFAULT_WEIGHTS = {"gen": 5.0, "fr": 1.0, "spar": 0.0}


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy over the rows with a label; ``logits`` (B, C) may be class-sharded.

    Same value and gradient ((softmax - onehot) / B) as the reference's
    DistCrossEntropy when every label is in [0, C). A label of -1 marks a row
    without a target (PartialFC v2 dropped its positive class for lack of room,
    ``heads.MarginHead``): it adds nothing, and the mean is over the other rows
    (0.0 if there are none). Written with a one-hot product instead of a gather
    so the label lookup is a reduction over the (sharded) class axis.
    """
    logits = logits.astype(jnp.float32)
    labels = jnp.reshape(labels, (-1,))
    valid = (labels >= 0).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.sum(logits * jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jnp.sum((lse - target) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def top1_accuracy(logits, labels):
    """Fraction of the rows with a label (>= 0; see ``softmax_cross_entropy``) whose argmax is it (0.0 if none)."""
    labels = jnp.reshape(labels, (-1,))
    valid = (labels >= 0).astype(jnp.float32)
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
    return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1.0)


def l1_loss(a, b):
    """Mean absolute error (torch ``L1Loss``)."""
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def kl_sparsity(latent, target: float = 0.01):
    """The reference's KLSparseLoss: KL(target || q) summed over all latent entries.

    q = batch-mean latent divided by its total sum (so q ~ 1 / (C*H*W), which
    is far from ``target``; the reference weights this loss by 0 by default).
    Layout-independent: it sums over everything but the batch axis.
    """
    x = jnp.mean(latent.astype(jnp.float32), axis=0, keepdims=True)
    q = jnp.clip(x / jnp.sum(x), 1e-8, 1 - 1e-8)
    p = target
    return jnp.sum(p * jnp.log(p / q)) + jnp.sum((1 - p) * jnp.log((1 - p) / (1 - q)))


def minus_loss(image, regenerated, latent, logits, labels, weights: Mapping[str, float] | None = None,
               sparsity_target: float = 0.01, ce=None):
    """MinusFace stage-1 loss: gen * L1(X, d(x')*2-1) + fr * CE + spar * KL.

    Args:
      image: (B, H, W, 3) in [-1, 1].
      regenerated: decoded regeneration ``2 * idct(g(x)) - 1``, same shape.
      latent: generator latent (any layout).
      logits, labels: head output and labels.
      weights: {'gen', 'fr', 'spar'}; missing keys take the defaults (5, 1, 0).
      ce: the cross-entropy already computed by the head (``MarginHead(return_loss=True)``,
        e.g. class-chunked); ``logits`` and ``labels`` are then not read.
    Returns:
      dict with loss, loss_gen, loss_fr, loss_ls (weighted terms). Terms with a
      zero weight are still reported (as zeros), never computed into NaN.
    """
    w = dict(MINUS_DEFAULT_WEIGHTS, **(weights or {}))
    unknown = set(w) - set(MINUS_DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown MinusFace loss weight(s) {sorted(unknown)}; expected gen, fr, spar")
    loss_gen = w["gen"] * l1_loss(image, regenerated) if w["gen"] else jnp.float32(0)
    if ce is None:
        ce = softmax_cross_entropy(logits, labels) if w["fr"] else None
    loss_fr = w["fr"] * ce if w["fr"] else jnp.float32(0)
    loss_ls = w["spar"] * kl_sparsity(latent, sparsity_target) if w["spar"] else jnp.float32(0)
    return {"loss": loss_gen + loss_fr + loss_ls, "loss_gen": loss_gen, "loss_fr": loss_fr, "loss_ls": loss_ls}
