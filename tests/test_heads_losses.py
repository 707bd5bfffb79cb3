"""Heads and losses vs the reference (golden heads.npz, losses.npz).

Tolerances: golden README ``suggested_atol`` (10x the reference's own
float32-vs-float64 error). Logits are scaled by s=64, so 1.4e-4 absolute is
~2e-6 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden, suggested_atol
from ppfr_jax import heads, losses


@pytest.fixture(scope="module")
def hg():
    return load_golden("heads")


def _apply(kind, g, variables=None, **kw):
    head = heads.MarginHead(num_classes=g["kernel"].shape[1], kind=kind, **kw)
    e, y = jnp.asarray(g["embeddings"]), jnp.asarray(g["labels"])
    v = variables or head.init(jax.random.key(0), e, y)
    v = {**v, "params": {"kernel": jnp.asarray(g["kernel"])}}
    return head.apply(v, e, y, mutable=["head_state"])


@pytest.mark.parametrize("kind,name", [("arcface", "arcface"), ("cosface", "cosface")])
def test_margin_heads(hg, kind, name):
    (out, origin), _ = _apply(kind, hg)
    np.testing.assert_allclose(np.asarray(out), hg[f"{name}_out"], rtol=0, atol=suggested_atol("heads", f"{name}_out"))
    np.testing.assert_allclose(np.asarray(origin), hg[f"{name}_origin"], rtol=0,
                               atol=suggested_atol("heads", f"{name}_origin"))


def test_curricularface_running_t(hg):
    head = heads.MarginHead(num_classes=100, kind="curricularface")
    e, y = jnp.asarray(hg["embeddings"]), jnp.asarray(hg["labels"])
    v = head.init(jax.random.key(0), e, y)
    np.testing.assert_array_equal(np.asarray(v["head_state"]["t"]), hg["curricular_t_before"])
    v = {**v, "params": {"kernel": jnp.asarray(hg["kernel"])}}
    (out1, origin1), st = head.apply(v, e, y, mutable=["head_state"])
    np.testing.assert_allclose(np.asarray(out1), hg["curricular_out1"], rtol=0,
                               atol=suggested_atol("heads", "curricular_out1"))
    np.testing.assert_allclose(np.asarray(origin1), hg["curricular_origin1"], rtol=0,
                               atol=suggested_atol("heads", "curricular_origin1"))
    # t is float32 of size ~1e-2: 1e-8 absolute is float32 rounding
    np.testing.assert_allclose(np.asarray(st["head_state"]["t"]), hg["curricular_t_after1"], rtol=1e-5, atol=1e-8)
    (out2, _), st2 = head.apply({**v, **st}, e, y, mutable=["head_state"])
    np.testing.assert_allclose(np.asarray(out2), hg["curricular_out2"], rtol=0,
                               atol=suggested_atol("heads", "curricular_out2"))
    np.testing.assert_allclose(np.asarray(st2["head_state"]["t"]), hg["curricular_t_after2"], rtol=1e-5, atol=1e-8)


def test_padded_classes_take_no_mass(hg):
    (out, _), _ = _apply("arcface", hg)
    head = heads.MarginHead(num_classes=100, padded_classes=104)
    e, y = jnp.asarray(hg["embeddings"]), jnp.asarray(hg["labels"])
    kernel = np.concatenate([hg["kernel"], np.random.default_rng(0).normal(size=(512, 4)).astype(np.float32)], 1)
    out_p, _ = head.apply({"params": {"kernel": jnp.asarray(kernel)}}, e, y)
    # same maths, different matmul width: float32 rounding on logits scaled by 64
    np.testing.assert_allclose(np.asarray(out_p[:, :100]), np.asarray(out), rtol=0, atol=1e-4)
    np.testing.assert_allclose(float(losses.softmax_cross_entropy(out_p, y)),
                               float(losses.softmax_cross_entropy(out, y)), rtol=1e-6)


def test_partial_fc_sampling_keeps_positives():
    head = heads.MarginHead(num_classes=1000, sample_rate=0.1)
    e = jax.random.normal(jax.random.key(1), (16, 32))
    y = jnp.arange(16) * 7
    v = head.init(jax.random.key(0), e, y)
    out, _ = head.apply(v, e, y, train=True, rngs={"sample": jax.random.key(5)})
    kept = np.asarray(out[0] > -1e29)
    assert kept[np.asarray(y)].all()
    assert 40 < kept.sum() < 170  # ~100 expected
    out_eval, _ = head.apply(v, e, y, train=False)
    assert bool((out_eval > -1e29).all())


def test_unknown_head_kind():
    head = heads.MarginHead(num_classes=10, kind="sphereface")
    with pytest.raises(ValueError, match="sphereface"):
        head.init(jax.random.key(0), jnp.ones((2, 4)), jnp.zeros((2,), jnp.int32))


@pytest.fixture(scope="module")
def lg():
    return load_golden("losses")


def test_cross_entropy_value_and_grad(lg):
    logits, labels = jnp.asarray(lg["logits"]), jnp.asarray(lg["labels"])
    val, grad = jax.value_and_grad(losses.softmax_cross_entropy)(logits, labels)
    np.testing.assert_allclose(float(val), lg["dist_ce_raw"], rtol=0, atol=suggested_atol("losses", "dist_ce_raw"))
    np.testing.assert_allclose(np.asarray(grad), lg["dist_ce_grad_logits"], rtol=0,
                               atol=suggested_atol("losses", "dist_ce_grad_logits"))


def test_minus_loss_and_pieces(lg):
    nhwc = lambda a: jnp.transpose(jnp.asarray(a), (0, 2, 3, 1))
    out = losses.minus_loss(nhwc(lg["x"]), nhwc(lg["x_encode"]), nhwc(lg["latent"]), jnp.asarray(lg["logits"]),
                            jnp.asarray(lg["labels"]))
    for k in ("loss", "loss_gen", "loss_fr", "loss_ls"):
        np.testing.assert_allclose(float(out[k]), lg[k], rtol=0, atol=max(suggested_atol("losses", k), 1e-7), err_msg=k)
    np.testing.assert_allclose(float(losses.l1_loss(nhwc(lg["x"]), nhwc(lg["x_encode"]))), lg["l1_raw"], rtol=0,
                               atol=suggested_atol("losses", "l1_raw"))
    np.testing.assert_allclose(float(losses.kl_sparsity(nhwc(lg["latent"]), 0.01)), lg["kl_sparse_target_0p01"],
                               rtol=0, atol=suggested_atol("losses", "kl_sparse_target_0p01"))
    np.testing.assert_allclose(float(losses.kl_sparsity(nhwc(lg["latent"]), 0.05)),
                               lg["kl_sparse_target_0p05_default"], rtol=0,
                               atol=suggested_atol("losses", "kl_sparse_target_0p05_default"))
    with pytest.raises(ValueError, match="bogus"):
        losses.minus_loss(nhwc(lg["x"]), nhwc(lg["x_encode"]), nhwc(lg["latent"]), jnp.asarray(lg["logits"]),
                          jnp.asarray(lg["labels"]), weights={"bogus": 1.0})
