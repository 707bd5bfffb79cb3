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


def _overflowing(rate=2 / 128):
    """8 shards of 128 classes keeping 2 columns each; 4 rows whose 4 classes all sit in shard 0: 2 are dropped."""
    head = heads.MarginHead(num_classes=C, padded_classes=C, kind="cosface", sample_rate=rate, num_shards=S)
    e = jax.random.normal(jax.random.key(1), (6, E))
    y = jnp.asarray([3, 5, 7, 9, 200, 900], jnp.int32)  # shard 0 x4, shard 1, shard 7
    k = jax.random.normal(jax.random.key(3), (E, C)) * 0.01
    return head, e, y, k


def test_dropped_positive_rows_take_no_loss_and_no_accuracy():
    """A shard with more positives than num_sample drops some (label -1): those rows must neither add their
    log-sum-exp to the loss nor count as wrong in the training top-1 (the mean is over the rows with a target)."""
    head, e, y, k = _overflowing()
    (loss, out), (gk, ge) = jax.value_and_grad(
        lambda k_, e_: _loss(head)(k_, e_, y), argnums=(0, 1), has_aux=True)(k, e)
    logits, origin, y_s = (np.asarray(a) for a in out)
    assert logits.shape == (6, S * 2)
    valid = y_s >= 0
    assert valid.sum() == 4 and not valid[:4].all() and valid[4:].all(), y_s  # two of shard 0's four dropped
    lg = logits[valid].astype(np.float64)
    t = lg[np.arange(len(lg)), y_s[valid]]
    ref = np.mean(np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1) - t)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    # a dropped row's embedding gets no gradient: it is not in the objective at all
    assert np.abs(np.asarray(ge)[~valid]).max() == 0.0
    acc = float(losses.top1_accuracy(origin, y_s))
    np.testing.assert_allclose(acc, np.mean(np.argmax(origin[valid], 1) == y_s[valid]))


def test_negative_input_label_is_not_wrapped_to_the_last_shard():
    """A label of -1 (a row without a target) must stay -1 after the remap, not become a column of shard S-1."""
    head, e, _, k = _overflowing(rate=0.25)
    y = jnp.asarray([-1, 3, 1023, -1, 500, 7], jnp.int32)  # 1023 sits in the last shard
    _, out = _loss(head)(k, e, y)
    y_s = np.asarray(out[2])
    assert (y_s[[0, 3]] == -1).all() and (y_s[[1, 2, 4, 5]] >= 0).all(), y_s
    assert y_s[2] // int(0.25 * C // S) == S - 1


def test_shard_divisibility_is_checked_only_when_sampling():
    e = jnp.ones((2, E))
    y = jnp.zeros((2,), jnp.int32)
    heads.MarginHead(num_classes=1000, padded_classes=1000, num_shards=3).init(jax.random.key(0), e, y)  # r = 1: fine
    with pytest.raises(ValueError, match="sample_rate=0.5: padded_classes=1000 is not a multiple of num_shards=3"):
        heads.MarginHead(num_classes=1000, padded_classes=1000, num_shards=3, sample_rate=0.5).init(
            jax.random.key(0), e, y)


def test_cross_entropy_and_top1_ignore_rows_without_label():
    logits = jnp.asarray([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0]])
    full = losses.softmax_cross_entropy(logits[:2], jnp.asarray([0, 2]))
    masked = losses.softmax_cross_entropy(logits, jnp.asarray([0, 2, -1]))
    np.testing.assert_allclose(float(masked), float(full), rtol=1e-6)
    g = jax.grad(lambda z: losses.softmax_cross_entropy(z, jnp.asarray([0, 2, -1])))(logits)
    assert np.abs(np.asarray(g)[2]).max() == 0.0
    assert float(losses.softmax_cross_entropy(logits, jnp.asarray([-1, -1, -1]))) == 0.0
    assert float(losses.top1_accuracy(logits, jnp.asarray([0, 2, -1]))) == 0.5
    assert float(losses.top1_accuracy(logits, jnp.asarray([-1, -1, -1]))) == 0.0


def test_class_shard_count_is_the_kernels_mesh_axes():
    from ppfr_jax import sharding
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    assert sharding.class_shard_count(mesh) == 8
    assert sharding.class_shard_count() == jax.device_count()


@pytest.mark.parametrize("spec", ["arcface.py:tiny", "minusface.py:stage1,tiny"])
def test_task_logs_sampled_accuracy_under_its_own_name(spec):
    """Under PartialFC the training top-1 is over the sampled classes only: logged as ``accuracy_sampled``."""
    import os
    from ppfr_jax import config_lib, methods
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    c = config_lib.load_config_spec(os.path.join(root, spec))
    c.head.sample_rate = 0.5
    n = 6
    task = methods.make_task(c, n)
    images = jax.random.randint(jax.random.key(1), (n, 112, 112, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(n, dtype=jnp.int32)  # 6 positives, 3 columns kept: 3 rows dropped
    v = task.init(jax.random.key(0), images, labels)
    state = {k: val for k, val in v.items() if k != "params"}
    loss, (metrics, _) = task.loss(v["params"], state, {"image": images, "label": labels}, jax.random.key(2))
    assert "accuracy_sampled" in metrics and "accuracy" not in metrics
    assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy_sampled"]) <= 1.0
