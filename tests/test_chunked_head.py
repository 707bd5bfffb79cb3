"""Class-chunked margin softmax (``head.class_chunk``): same loss and gradients, never the whole logits."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppfr_jax import config_lib, heads, methods
from ppfr_jax.config_lib import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, E, C, W = 12, 16, 203, 208  # batch, embedding, identities, kernel width (5 padded columns)


def _case():
    e = jax.random.normal(jax.random.key(1), (B, E))
    y = jax.random.randint(jax.random.key(2), (B,), 0, C).at[3].set(-1)  # row 3: no target
    k = jax.random.normal(jax.random.key(3), (E, W)) * 0.01
    # rows 0, 1, 2, 4 near their class centre (cos ~0.9: top-1 4 of the 11 rows with a label), not on it: at
    # cos = 1 the ArcFace target logit moves by 64 sin(m) sqrt(2 ulp) when two dot products round differently
    for b in (0, 1, 2, 4):
        k = k.at[:, int(y[b])].add(e[b] * 0.02)
    return e, y, k


def _value_and_grads(head, e, y, k):
    def f(k, e):
        out = head.apply({"params": {"kernel": k}}, e, y, train=True, return_loss=True,
                         rngs={"sample": jax.random.key(7)})
        return out["loss"], out
    (loss, out), (gk, ge) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(k, e)
    return float(loss), {n: float(v) for n, v in out.items() if n != "loss"}, np.asarray(gk), np.asarray(ge)


@pytest.mark.parametrize("kind,kw", [("arcface", {}), ("arcface", {"easy_margin": True}),
                                     ("arcface", {"margin": 1.2}), ("cosface", {})])
@pytest.mark.parametrize("shards,chunk", [(1, 5), (1, 13), (2, 13), (2, 104), (8, 7), (1, 1000)])
def test_chunked_equals_full_softmax(kind, kw, shards, chunk):
    # float32, the same cosines summed in another order: 1e-6 relative on the loss, 1e-5 on gradients
    # (chunk 13 does not divide the 208 / 104 / 26 columns of a shard: the last chunk overlaps, masked)
    e, y, k = _case()
    full = heads.MarginHead(num_classes=C, padded_classes=W, kind=kind, num_shards=shards, **kw)
    l0, m0, gk0, ge0 = _value_and_grads(full, e, y, k)
    l1, m1, gk1, ge1 = _value_and_grads(full.clone(class_chunk=chunk), e, y, k)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert m1 == m0 and m0["accuracy"] == pytest.approx(4 / 11)  # 11 rows with a label
    np.testing.assert_allclose(gk1, gk0, rtol=1e-5, atol=1e-6 * np.abs(gk0).max())
    np.testing.assert_allclose(ge1, ge0, rtol=1e-5, atol=1e-6 * np.abs(ge0).max())
    assert np.abs(gk1[:, C:]).max() == 0.0  # padded columns take no gradient


def test_chunked_sampled_on_mesh_equals_unchunked():
    """PartialFC + chunks on 8 fake devices, class axis sharded: same sample (same rng), loss and gradient."""
    s = 8
    mesh = Mesh(np.asarray(jax.devices()[:s]).reshape(s, 1), ("data", "model"))
    c, b = 1024, 32
    e = jax.random.normal(jax.random.key(1), (b, E))
    y = jax.random.randint(jax.random.key(2), (b,), 0, c)
    k = jax.random.normal(jax.random.key(3), (E, c)) * 0.01
    ksh = NamedSharding(mesh, P(None, ("data", "model")))
    k = jax.device_put(k, ksh)
    e = jax.device_put(e, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    base = heads.MarginHead(num_classes=c, padded_classes=c, sample_rate=0.25, num_shards=s)
    outs = []
    for head in (base, base.clone(class_chunk=10)):  # 32 sampled columns per shard: chunks 10, 10, 10, 2 (overlap)
        def f(k, e, y, head=head):
            out = head.apply({"params": {"kernel": k}}, e, y, train=True, return_loss=True,
                             rngs={"sample": jax.random.key(5)})
            return out["loss"], out["accuracy_sampled"]
        (loss, acc), g = jax.jit(jax.value_and_grad(f, has_aux=True), out_shardings=((None, None), ksh))(k, e, y)
        outs.append((float(loss), float(acc), np.asarray(g)))
    (l0, a0, g0), (l1, a1, g1) = outs
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert a1 == a0
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6 * np.abs(g0).max())
    assert (np.abs(g1).sum(0) > 0).sum() <= s * 32  # only sampled columns move


def _temp_bytes(head, b, width, e_dim=64):
    def f(k, e, y):
        return head.apply({"params": {"kernel": k}}, e, y, train=True, return_loss=True,
                          rngs={"sample": jax.random.key(0)})["loss"]
    args = (jax.ShapeDtypeStruct((e_dim, width), jnp.float32), jax.ShapeDtypeStruct((b, e_dim), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32))
    return jax.jit(jax.grad(f)).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_step_never_holds_the_logits():
    """XLA's own buffer assignment: the full softmax keeps >= one (B, C) float32 buffer, the chunked one far less."""
    b, width = 256, 32768
    logits_bytes = b * width * 4  # 32 MiB
    full = heads.MarginHead(num_classes=width)
    t_full = _temp_bytes(full, b, width)
    t_chunk = _temp_bytes(full.clone(class_chunk=1024), b, width)
    assert t_full >= logits_bytes, t_full
    # what is left: the normalised kernel and the kernel gradient (2 x 8 MiB) plus a few (256, 1024) chunks
    kernel_bytes, chunk_bytes = 64 * width * 4, b * 1024 * 4
    assert t_chunk < 2 * kernel_bytes + 4 * chunk_bytes < logits_bytes, (t_chunk, logits_bytes)
    # PartialFC: the positives are found by a scatter of the labels, not a (B, shard) comparison
    sampled = heads.MarginHead(num_classes=width, padded_classes=width, sample_rate=0.1, class_chunk=512)
    t_sampled = _temp_bytes(sampled, b, width)
    assert t_sampled < b * width, (t_sampled, b * width)  # one bool (B, shard) buffer would be 8 MiB


def test_curricularface_is_refused():
    e, y, k = _case()
    head = heads.MarginHead(num_classes=C, padded_classes=W, kind="curricularface", class_chunk=16)
    v = head.init(jax.random.key(0), e, jnp.maximum(y, 0))
    with pytest.raises(ValueError, match="class_chunk"):
        head.apply(v, e, y, train=True, return_loss=True, mutable=["head_state"])


def _config(spec="arcface.py:tiny"):
    return config_lib.load_config_spec(os.path.join(ROOT, "configs", spec))


def test_config_values():
    c = _config()
    assert c.head.class_chunk == 0  # off by default: the full softmax, as before
    c.head.kind = "curricularface"
    c.head.class_chunk = 4096
    with pytest.raises(ConfigError, match=r"config.head.class_chunk: .*curricularface"):
        config_lib.validate(c)
    c = _config()
    c.head.class_chunk = -1
    with pytest.raises(ConfigError, match=r"head.class_chunk"):
        config_lib.validate(c)


@pytest.mark.parametrize("spec", ["arcface.py:tiny", "minusface.py:stage1,tiny"])
def test_task_loss_is_the_same_chunked(spec):
    """The tasks' training loss and metrics through the chunked head equal the full softmax's."""
    n = 6
    images = jax.random.randint(jax.random.key(1), (n, 112, 112, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(n, dtype=jnp.int32)
    res = []
    for chunk in (0, 4):
        c = _config(spec)
        c.head.class_chunk = chunk
        task = methods.make_task(c, 10)
        v = task.init(jax.random.key(0), images, labels)
        state = {k: val for k, val in v.items() if k != "params"}
        loss, (metrics, _) = task.loss(v["params"], state, {"image": images, "label": labels}, jax.random.key(2))
        res.append((float(loss), {k: float(x) for k, x in metrics.items()}))
    (l0, m0), (l1, m1) = res
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert m0.keys() == m1.keys() and "accuracy" in m0
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_top1_ties_take_the_first_column_and_any_int_labels():
    """Two identical centres (columns 5 and 9 of 2 shards of 8, chunks of 2): the lower column wins, as argmax."""
    e = jax.random.normal(jax.random.key(1), (2, E))
    k = jax.random.normal(jax.random.key(3), (E, 16)) * 0.01
    k = k.at[:, 5].set(e[0]).at[:, 9].set(e[0]).at[:, 12].set(e[1]).at[:, 14].set(e[1])
    for labels, want in (([5, 12], 1.0), ([9, 14], 0.0)):
        for dtype in (jnp.int32, jnp.int16, jnp.uint8):
            y = jnp.asarray(labels, dtype)
            accs = [float(heads.MarginHead(num_classes=16, num_shards=2, class_chunk=ch).apply(
                {"params": {"kernel": k}}, e, y, train=True, return_loss=True)["accuracy"]) for ch in (0, 2)]
            assert accs == [want, want], (labels, dtype, accs)


def test_sharded_chunks_reduce_across_devices_once_per_step():
    """On 8 class shards the scan body reduces within each device: no all-reduce runs per chunk."""
    s = 8
    mesh = Mesh(np.asarray(jax.devices()[:s]).reshape(s, 1), ("data", "model"))
    c, b = 8 * 64, 32
    head = heads.MarginHead(num_classes=c, padded_classes=c, num_shards=s, class_chunk=8)
    ksh = NamedSharding(mesh, P(None, ("data", "model")))

    def f(k, e, y):
        return head.apply({"params": {"kernel": k}}, e, y, train=True, return_loss=True)["loss"]
    args = (jax.ShapeDtypeStruct((E, c), jnp.float32, sharding=ksh),
            jax.ShapeDtypeStruct((b, E), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=NamedSharding(mesh, P("data"))))
    hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), out_shardings=(None, (ksh, None))).lower(*args).compile().as_text()
    bodies = re.findall(r"body=%([\w.\-]+)", hlo)  # the while loops' bodies: the forward and backward scans
    assert len(bodies) >= 2, "expected the forward and backward scans as while loops"
    for name in bodies:
        body = re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.S | re.M).group(0)
        assert "all-reduce(" not in body and "all-gather(" not in body, name
