"""Margin-based classification heads: ArcFace, CosFace, CurricularFace.

Written for class centres sharded across devices (the reference's "dist FC"):
the kernel is (embedding_dim, classes) and the training engine shards its
class axis over the mesh's ``model`` axis; every operation here is either a
matmul, an elementwise op or a reduction over the class axis (no gathers by
label), so under ``jax.jit`` XLA keeps logits sharded by class and turns the
target-logit lookup and the softmax normaliser into cross-device reductions,
never materialising the full logits on one device.

``num_classes`` that does not divide the shard count is handled by padding
the kernel to ``padded_classes`` columns; padded columns get a logit of
``-inf``-like value so they take no probability mass.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppfr_jax import losses

Dtype = Any
_NEG = -1e30  # logit of padded / unsampled classes (finite: keeps 0 * x NaN-free)


def l2_normalize(x, axis):
    """x / ||x|| (the reference divides by the norm with no epsilon; we add a tiny one for zeros)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


def cosine_logits(embeddings, kernel):
    """Clamped cosine between L2-normalised embeddings (B, D) and kernel columns (D, C)."""
    e = l2_normalize(embeddings, 1)
    k = l2_normalize(kernel, 0)
    return jnp.clip(jnp.dot(e, k, precision=jax.lax.Precision.HIGHEST), -1.0, 1.0)


# Floor of 1 - cos^2 in the *derivative* of sin(theta) = sqrt(1 - cos^2): float32's own resolution
# near cos = +-1 (1 - (1 - 2**-24)**2 ~ 1.2e-7), so the gradient is never larger than the one at the
# float32 cosine closest to +-1, and it is finite at exactly +-1 where d sqrt(u)/du is infinite.
_SIN_GRAD_FLOOR = 1.2e-7


@jax.custom_jvp
def _sin_from_cos(c):
    """sin(theta) = sqrt(max(1 - c^2, 0)) for c = cos(theta) in [-1, 1], with a bounded derivative.

    The value is exact; the derivative -c / sin(theta) (infinite at c = +-1, the
    collinear case) is evaluated with sin^2 floored at ``_SIN_GRAD_FLOOR``.
    """
    return jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))


@_sin_from_cos.defjvp
def _sin_from_cos_jvp(primals, tangents):
    (c,), (dc,) = primals, tangents
    s = _sin_from_cos(c)
    return s, -c * jax.lax.rsqrt(jnp.maximum(1.0 - c * c, _SIN_GRAD_FLOOR)) * dc


def _onehot(labels, num_columns, dtype=jnp.float32):
    return jax.nn.one_hot(labels, num_columns, dtype=dtype)


def _target(cos, onehot):
    """cos[b, labels[b]] as a reduction (sharding friendly), shape (B, 1)."""
    return jnp.sum(cos * onehot, axis=1, keepdims=True)


def _arcface_target(t, margin, easy_margin=False):
    """cos(theta + m) of the target cosine ``t``, with the usual fallback (or easy margin)."""
    cos_tm = t * math.cos(margin) - _sin_from_cos(t) * math.sin(margin)
    if easy_margin:
        return jnp.where(t > 0, cos_tm, t)
    return jnp.where(t > math.cos(math.pi - margin), cos_tm, t - math.sin(math.pi - margin) * margin)


def arcface_margin(cos, labels, scale=64.0, margin=0.5, easy_margin=False):
    """ArcFace: replace the target cosine by cos(theta + m) (with the usual fallback).

    Returns (scaled logits with margin, scaled logits without margin).
    """
    onehot = _onehot(labels, cos.shape[1], cos.dtype)
    final = _arcface_target(_target(cos, onehot), margin, easy_margin)
    out = jnp.where(onehot > 0, final, cos)
    return out * scale, jax.lax.stop_gradient(cos) * scale


def cosface_margin(cos, labels, scale=64.0, margin=0.4):
    """CosFace: target cosine minus m."""
    onehot = _onehot(labels, cos.shape[1], cos.dtype)
    out = cos - margin * onehot
    return out * scale, jax.lax.stop_gradient(cos) * scale


def curricular_margin(cos, labels, t, scale=64.0, margin=0.5, alpha=0.1):
    """CurricularFace. ``t`` is the running (1,) buffer; returns (out, origin, new_t).

    As in the reference, the hard-example modulation uses the updated ``t`` and
    ``t`` moves on every call: t <- alpha * mean(target cos) + (1 - alpha) * t.
    """
    onehot = _onehot(labels, cos.shape[1], cos.dtype)
    tgt = _target(cos, onehot)
    sin_t = _sin_from_cos(tgt)
    cos_tm = tgt * math.cos(margin) - sin_t * math.sin(margin)
    final = jnp.where(tgt > math.cos(math.pi - margin), cos_tm, tgt - math.sin(math.pi - margin) * margin)
    new_t = jax.lax.stop_gradient(jnp.mean(tgt) * alpha + (1.0 - alpha) * t)
    hard = cos > cos_tm
    out = jnp.where(hard, cos * (new_t + cos), cos)
    out = jnp.where(onehot > 0, final, out)
    return out * scale, jax.lax.stop_gradient(cos) * scale, new_t


class MarginHead(nn.Module):
    """Normalised linear classifier with a margin.

    Attributes:
      num_classes: real number of identities.
      kind: 'arcface' | 'cosface' | 'curricularface'.
      padded_classes: kernel width (>= num_classes; when sampling, a multiple
        of the class shard count, else ValueError). Defaults to num_classes.
      sample_rate: PartialFC v2 sampling in training (insightface
        ``partial_fc_v2.py``): the kernel's class axis is split into
        ``num_shards`` equal shards (the devices it is sharded over); each step
        every shard keeps ``num_sample = int(sample_rate * shard)`` columns: its
        positives of the (global) batch first, then random negatives, sorted.
        Only those columns are gathered, so logits are (B, num_shards *
        num_sample) and unsampled columns get an exact zero gradient (the
        gradient of the gather). 1.0 = off (the full softmax, same code as ever).
        If a shard holds more positives than ``num_sample`` the extra ones are
        dropped (their rows get label -1 and no loss); PartialFC v2 grows the
        sample instead, which static shapes cannot.
      num_shards: the class shard count (the devices the kernel is sharded over).
      class_chunk: 0 (default) or the columns of each class shard whose logits are
        computed at a time by ``return_loss=True`` (``chunked_margin_cross_entropy``:
        the (B, C/D) logits are never held, forward or backward; same loss and
        gradients). ArcFace and CosFace only (ValueError for CurricularFace). Only the
        ``return_loss=True`` call uses it (the logits call returns the full logits).

    Call: ``(embeddings (B, D), labels (B,) int, train=False) -> (logits, origin_logits)``,
    both (B, padded_classes); when sampling ``(logits, origin_logits, labels)``
    with (B, num_shards * num_sample) logits and the labels remapped into that
    index space (-1: no loss). With ``return_loss=True``: ``{'loss', 'accuracy'}``
    (``'accuracy_sampled'`` when sampling: over the sampled classes only), the
    mean cross-entropy of the margin logits and the top-1 of the plain cosines,
    over the rows with a label (``losses.softmax_cross_entropy`` / ``top1_accuracy``).
    Uses the rng stream 'sample' when sampling.
    """

    num_classes: int
    kind: str = "arcface"
    scale: float = 64.0
    margin: float | None = None
    easy_margin: bool = False
    alpha: float = 0.1
    padded_classes: int | None = None
    sample_rate: float = 1.0
    num_shards: int = 1
    class_chunk: int = 0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, embeddings, labels, train: bool = False, return_loss: bool = False):
        width = self.padded_classes or self.num_classes
        if width < self.num_classes:
            raise ValueError(f"padded_classes={width} < num_classes={self.num_classes}")
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (batch, dim), got shape {embeddings.shape}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"head.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.sample_rate < 1.0 and width % self.num_shards:  # the shards only matter when sampling
            raise ValueError(f"head.sample_rate={self.sample_rate}: padded_classes={width} is not a multiple of "
                             f"num_shards={self.num_shards} (PartialFC samples per equal class shard)")
        kernel = self.param("kernel", nn.initializers.normal(0.01), (embeddings.shape[1], width), self.param_dtype)
        kernel = kernel.astype(jnp.float32)
        shard = width // self.num_shards if self.sample_rate < 1.0 else width
        num_sample = int(self.sample_rate * shard)
        sampled = train and num_sample < shard
        if sampled:
            if num_sample < 1:
                raise ValueError(f"head.sample_rate={self.sample_rate} keeps no class of a {shard}-class shard")
            kernel, labels, keep = self._sample(kernel, labels, width, shard, num_sample)
        else:
            keep = jnp.arange(width) < self.num_classes
        acc_key = "accuracy_sampled" if sampled else "accuracy"
        if self.class_chunk < 0:
            raise ValueError(f"config.head.class_chunk must be >= 0 (0 = off), got {self.class_chunk}")
        if return_loss and self.class_chunk > 0:
            return self._chunked_loss(embeddings, kernel, labels, keep, acc_key)
        # the head runs in float32 even under bf16 compute: margins need the precision
        cos = cosine_logits(embeddings.astype(jnp.float32), kernel)
        if self.kind == "arcface":
            out, origin = arcface_margin(cos, labels, self.scale, 0.5 if self.margin is None else self.margin,
                                         self.easy_margin)
        elif self.kind == "cosface":
            out, origin = cosface_margin(cos, labels, self.scale, 0.4 if self.margin is None else self.margin)
        elif self.kind == "curricularface":
            t = self.variable("head_state", "t", lambda: jnp.zeros((1,), jnp.float32))
            out, origin, new_t = curricular_margin(cos, labels, t.value, self.scale,
                                                   0.5 if self.margin is None else self.margin, self.alpha)
            if not self.is_initializing():
                t.value = new_t
        else:
            raise ValueError(f"unknown head kind {self.kind!r}; expected arcface, cosface or curricularface")
        out = jnp.where(keep, out, _NEG)
        origin = jnp.where(keep, origin, _NEG)
        if return_loss:
            return {"loss": losses.softmax_cross_entropy(out, labels), acc_key: losses.top1_accuracy(origin, labels)}
        return (out, origin, labels) if sampled else (out, origin)

    def _chunked_loss(self, embeddings, kernel, labels, keep, acc_key):
        """``return_loss`` through ``chunked_margin_cross_entropy`` on the (D, S, n) view of the kernel."""
        margin = {"arcface": 0.5, "cosface": 0.4}.get(self.kind, 0.5) if self.margin is None else self.margin
        target_fn = _target_logit_fn(self.kind, float(self.scale), float(margin), self.easy_margin)
        s = self.num_shards if kernel.shape[1] % self.num_shards == 0 else 1
        n = kernel.shape[1] // s
        e = l2_normalize(embeddings.astype(jnp.float32), 1)
        k = l2_normalize(kernel, 0).reshape(kernel.shape[0], s, n)
        loss, top1 = chunked_margin_cross_entropy(target_fn, float(self.scale), min(int(self.class_chunk), n), e, k,
                                                  labels, keep.reshape(s, n))
        return {"loss": loss, acc_key: top1}

    def _sample(self, kernel, labels, width, shard, num_sample):
        """PartialFC v2 per-shard sampling -> (gathered kernel (D, S*n), remapped labels (B,), keep (S*n,)).

        Written on a (D, S, shard) view so that, with the class axis sharded over S devices, the score,
        top-k and gather are per shard (batched over the sharded S axis): XLA keeps them local and no
        device ever holds more than its (D, n) slice of centres or (B, n) slice of logits.
        """
        s = self.num_shards
        # (S, shard): the classes of the (global) batch, by a scatter of the labels: a (B, S, shard) comparison
        # would be the step's largest buffer (640 MB per device at 10M classes, 64 devices, batch 4096)
        target = jnp.where((labels >= 0) & (labels < width), labels, width)  # out of range: dropped
        positive = jnp.zeros((width,), bool).at[target].set(True, mode="drop").reshape(s, shard)
        u = jax.random.uniform(self.make_rng("sample"), (s, shard))
        score = jnp.where(positive, 2.0 + u, u)  # positives first, then random negatives
        _, idx = jax.lax.top_k(score, num_sample)
        idx = jnp.sort(idx, axis=1)  # (S, n) local column indices, ascending as PartialFC v2
        sub = jnp.take_along_axis(kernel.reshape(kernel.shape[0], s, shard), idx[None], axis=2)
        g_idx = idx + (jnp.arange(s) * shard)[:, None]  # global class of each sampled column
        # remap: position of each label in its shard's sample (-1 if it was dropped for lack of room)
        # a label < 0 (no target) stays -1: labels // shard would wrap it to the last shard
        lab_shard = jnp.clip(labels // shard, 0, s - 1)
        hit = (g_idx[lab_shard] == labels[:, None]) & (labels >= 0)[:, None]  # (B, n)
        new = jnp.where(jnp.any(hit, 1), lab_shard * num_sample + jnp.argmax(hit, 1), -1)
        keep = (g_idx < self.num_classes).reshape(-1)
        return sub.reshape(kernel.shape[0], s * num_sample), new.astype(labels.dtype), keep


# ----------------------------------------------------------------------------- class-chunked softmax


def _target_logit_fn(kind: str, scale: float, margin: float, easy_margin: bool):
    """The scaled target logit as a function of the target cosine t (B,): ArcFace / CosFace, as above."""
    if kind == "arcface":
        def f(t):
            return _arcface_target(t, margin, easy_margin) * scale
    elif kind == "cosface":
        def f(t):
            return (t - margin) * scale
    else:
        raise ValueError(f"config.head.class_chunk > 0 supports the arcface and cosface heads, not {kind!r} "
                         f"(CurricularFace modulates every logit by the target cosine: set head.class_chunk=0)")
    return f


def _chunk_pieces(e, k, labels, keep, c, chunk):
    """Chunk ``c`` of every shard: cosines (B, S, chunk), its new columns (chunk,), target mask (B, S, chunk).

    The last chunk of a shard whose width is not a multiple of ``chunk`` starts at ``n - chunk``
    (``dynamic_slice`` clamps): its columns already seen are masked out (``fresh``).
    """
    n = k.shape[2]
    start = jnp.minimum(c * chunk, n - chunk)
    col = start + jnp.arange(chunk)
    fresh = col >= c * chunk
    kc = jax.lax.dynamic_slice_in_dim(k, start, chunk, axis=2)
    keepc = jax.lax.dynamic_slice_in_dim(keep, start, chunk, axis=1) & fresh[None]
    raw = jnp.einsum("bd,dsc->bsc", e, kc, precision=jax.lax.Precision.HIGHEST)
    gidx = jnp.arange(k.shape[1])[:, None] * n + col[None]  # (S, chunk) column in the S * n index space
    is_t = (gidx[None] == labels.astype(jnp.int32)[:, None, None]) & fresh[None, None]
    return kc, raw, keepc, gidx, is_t


def _chunked_forward(target_fn, scale, chunk, e, k, labels, keep):
    # every running figure is kept per shard ((B, S) carries, summed / maximised over S once after the
    # scan): with S sharded over devices, the scan body then reduces only within each device
    n = k.shape[2]
    nc = -(-n // chunk)
    b, s = e.shape[0], k.shape[1]

    def body(carry, c):
        m_run, s_run, t, best, arg = carry
        _, raw, keepc, gidx, is_t = _chunk_pieces(e, k, labels, keep, c, chunk)
        cos = jnp.clip(raw, -1.0, 1.0)
        t = t + jnp.sum(jnp.where(is_t, cos, 0.0), axis=2)
        nt = keepc[None] & ~is_t
        z = jnp.where(nt, scale * cos, _NEG)
        m_new = jnp.maximum(m_run, jnp.max(z, axis=2))
        s_run = s_run * jnp.exp(m_run - m_new) + jnp.sum(jnp.where(nt, jnp.exp(z - m_new[..., None]), 0.0), axis=2)
        # top-1 of the plain cosines (as ``top1_accuracy(origin)``: the first maximum wins; within a shard
        # later chunks hold higher columns, so a strict > keeps the first)
        o = jnp.where(keepc[None], scale * cos, _NEG)
        j = jnp.argmax(o, axis=2)  # (B, S)
        v = jnp.take_along_axis(o, j[..., None], 2)[..., 0]
        better = v > best
        arg = jnp.where(better, jnp.take_along_axis(gidx[None], j[..., None], 2)[..., 0], arg)
        best = jnp.where(better, v, best)
        return (m_new, s_run, t, best, arg), None

    init = (jnp.full((b, s), _NEG, jnp.float32), jnp.zeros((b, s), jnp.float32), jnp.zeros((b, s), jnp.float32),
            jnp.full((b, s), -jnp.inf, jnp.float32), jnp.zeros((b, s), jnp.int32))
    (m_run, s_run, t, best, arg), _ = jax.lax.scan(body, init, jnp.arange(nc))
    m_all = jnp.max(m_run, axis=1)
    s_all = jnp.sum(s_run * jnp.exp(m_run - m_all[:, None]), axis=1)
    t = jnp.sum(t, axis=1)
    arg = jnp.take_along_axis(arg, jnp.argmax(best, axis=1)[:, None], 1)[:, 0]  # lowest shard among equal maxima
    tl = target_fn(t)
    lse = jnp.logaddexp(m_all + jnp.log(s_all), tl)
    labels = labels.astype(jnp.int32)
    valid = (labels >= 0).astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid), 1.0)
    loss = jnp.sum((lse - tl) * valid) / count
    top1 = jnp.sum((arg == labels).astype(jnp.float32) * valid) / count
    return (loss, top1), (t, lse, valid, count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_margin_cross_entropy(target_fn, scale, chunk, e, k, labels, keep):
    """Margin softmax cross-entropy over class chunks: never more than (B, S, chunk) logits at once.

    The same loss and gradients as ``softmax_cross_entropy`` on the margin logits of
    ``MarginHead`` (ArcFace / CosFace), computed as an online log-sum-exp over ``chunk``
    columns of every class shard at a time (``lax.scan``); the backward pass recomputes
    each chunk's cosines instead of keeping the (B, C) logits (the memory of a
    class-chunked softmax, e.g. arcface_torch's PartialFC keeps the full buffer).

    Args:
      target_fn: t (B,) -> scaled target logit (``_target_logit_fn``); scale: s.
      chunk: columns per shard per scan step (static int >= 1).
      e: (B, D) L2-normalised embeddings; k: (D, S, n) L2-normalised class centres
        as S shards of n columns (S: the sharded class axis).
      labels: (B,) int in [-1, S * n), -1 = no target (no loss, not counted).
      keep: (S, n) bool, False for padded / unsampled columns (no probability mass).
    Returns:
      (mean loss over rows with a label, top-1 of the plain cosines over those rows).
    """
    return _chunked_forward(target_fn, scale, chunk, e, k, labels, keep)[0]


def _chunked_fwd(target_fn, scale, chunk, e, k, labels, keep):
    out, (t, lse, valid, count) = _chunked_forward(target_fn, scale, chunk, e, k, labels, keep)
    return out, (e, k, labels, keep, t, lse, valid, count)


def _chunked_bwd(target_fn, scale, chunk, res, g):
    e, k, labels, keep, t, lse, valid, count = res
    g_loss = g[0]  # the top-1 has no gradient
    w = g_loss * valid / count  # (B,) d loss / d row loss
    tl, t_vjp = jax.vjp(target_fn, t)
    p_t = jnp.exp(tl - lse)
    d_t = t_vjp(w * (p_t - 1.0))[0]  # (B,) d loss / d target cosine
    n = k.shape[2]
    nc = -(-n // chunk)

    def body(carry, c):
        de, dk = carry  # de per shard (S, B, D), summed after the scan (see _chunked_forward)
        kc, raw, keepc, _, is_t = _chunk_pieces(e, k, labels, keep, c, chunk)
        cos = jnp.clip(raw, -1.0, 1.0)
        inside = (raw >= -1.0) & (raw <= 1.0)
        nt = keepc[None] & ~is_t
        p = jnp.where(nt, jnp.exp(scale * cos - lse[:, None, None]), 0.0)
        gc = scale * p * w[:, None, None] + jnp.where(is_t, d_t[:, None, None], 0.0)
        gc = jnp.where(inside, gc, 0.0)
        de = de + jnp.einsum("bsc,dsc->sbd", gc, kc, precision=jax.lax.Precision.HIGHEST)
        dkc = jnp.einsum("bd,bsc->dsc", e, gc, precision=jax.lax.Precision.HIGHEST)
        start = jnp.minimum(c * chunk, n - chunk)
        old = jax.lax.dynamic_slice_in_dim(dk, start, chunk, axis=2)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, old + dkc, start, axis=2)
        return (de, dk), None

    de0 = jnp.zeros((k.shape[1],) + e.shape, e.dtype)
    (de, dk), _ = jax.lax.scan(body, (de0, jnp.zeros_like(k)), jnp.arange(nc))
    return jnp.sum(de, axis=0), dk, None, None


chunked_margin_cross_entropy.defvjp(_chunked_fwd, _chunked_bwd)
