"""PartialFC v2 sampled head (MarginHead.sample_rate < 1) on a class-sharded mesh of 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppfr_jax import heads, losses

S, C, B, E = 8, 1024, 32, 16  # shards, classes, global batch, embedding


def _setup(rate, kind="arcface"):
    head = heads.MarginHead(num_classes=C, padded_classes=C, kind=kind, sample_rate=rate, num_shards=S)
    e = jax.random.normal(jax.random.key(1), (B, E))
    y = jax.random.randint(jax.random.key(2), (B,), 0, C)
    k = jax.random.normal(jax.random.key(3), (E, C)) * 0.01
    return head, e, y, k


def _loss(head, train=True):
    def f(k, e, y):
        out, st = head.apply({"params": {"kernel": k}}, e, y, train=train, rngs={"sample": jax.random.key(7)},
                             mutable=["head_state"])
        labels = out[2] if len(out) == 3 else y
        return losses.softmax_cross_entropy(out[0], labels), out
    return f


@pytest.mark.parametrize("kind", ["arcface", "cosface", "curricularface"])
def test_rate_one_is_the_full_softmax(kind):
    # r = 1: num_sample == shard, the sampler is skipped, so the same ops as eval-mode full softmax run:
    # equal up to float32 rounding of the same computation (1e-6 relative)
    h1, e, y, k = _setup(1.0, kind)
    h0 = heads.MarginHead(num_classes=C, padded_classes=C, kind=kind)
    (l1, _), g1 = jax.value_and_grad(_loss(h1), has_aux=True)(k, e, y)
    (l0, _), g0 = jax.value_and_grad(_loss(h0, train=False), has_aux=True)(k, e, y)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-9)


def test_sampled_on_mesh():
    assert jax.device_count() >= S
    mesh = Mesh(np.asarray(jax.devices()[:S]).reshape(S, 1), ("data", "model"))
    rate = 0.25
    head, e, y, k = _setup(rate)
    n = int(rate * C // S)
    ksh = NamedSharding(mesh, P(None, ("data", "model")))
    k = jax.device_put(k, ksh)
    e = jax.device_put(e, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    f = jax.jit(jax.value_and_grad(_loss(head), has_aux=True), out_shardings=((None, None), ksh))
    (loss, (logits, origin, y_s)), g = f(k, e, y)
    assert logits.shape == (B, S * n)
    shapes = {s.data.shape for s in logits.addressable_shards}
    assert shapes == {(B, n)}, shapes  # per device: (global batch, r * C / D)
    # every positive kept, and the remapped label points at that class's column
    y_np, y_s = np.asarray(y), np.asarray(y_s)
    assert (y_s >= 0).all()
    assert ((y_s // n) == (y_np // (C // S))).all()
    # hand-computed softmax over the sampled set: rebuild the sampled classes from the gradient's support
    gn = np.abs(np.asarray(g)).sum(0)
    sampled = np.flatnonzero(gn > 0)
    assert set(y_np) <= set(sampled)
    assert len(sampled) <= S * n
    # unsampled rows: exactly zero gradient (most of the kernel)
    assert (gn == 0).sum() >= C - S * n
    # loss by hand over the sampled logits (ArcFace on the target, cosines elsewhere)
    cos = np.asarray(origin) / 64.0
    lg = np.asarray(logits, np.float64)
    t = lg[np.arange(B), y_s]
    m = lg.max(1)
    ref = np.mean(m + np.log(np.exp(lg - m[:, None]).sum(1)) - t)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    # off-target sampled logits are 64 * cosine of the gathered centre
    en = np.asarray(e) / np.linalg.norm(np.asarray(e), axis=1, keepdims=True)
    kn = np.asarray(k) / np.linalg.norm(np.asarray(k), axis=0, keepdims=True)
    full = en @ kn
    for b in range(4):
        np.testing.assert_allclose(cos[b, y_s[b]], full[b, y_np[b]], atol=1e-5)
        col = np.isclose(cos[b][:, None], full[b][None, :], atol=1e-6).any(1)
        assert col.all()


@pytest.mark.parametrize("rate", [0.0, -0.5, 1.5])
def test_bad_sample_rate(rate):
    head, e, y, k = _setup(rate)
    with pytest.raises(ValueError, match="sample_rate"):
        head.init(jax.random.key(0), e, y)


def test_rate_too_small_for_shard():
    head = heads.MarginHead(num_classes=C, padded_classes=C, sample_rate=0.001, num_shards=S)
    e = jnp.ones((2, E))
    y = jnp.zeros((2,), jnp.int32)
    v = head.init(jax.random.key(0), e, y)
    with pytest.raises(ValueError, match="keeps no class"):
        head.apply(v, e, y, train=True, rngs={"sample": jax.random.key(1)})
