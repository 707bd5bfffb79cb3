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
    out, _, y_s = head.apply(v, e, y, train=True, rngs={"sample": jax.random.key(5)})
    assert out.shape == (16, 100)  # int(0.1 * 1000) gathered columns
    # every positive is kept: the remapped label points at a column holding the same centre
    assert bool((y_s >= 0).all())
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


# ----------------------------------------------------------------------------- boundaries (cos theta = +-1)

def _collinear_case(sign):
    """Embeddings whose target class centre is (a scaled copy of) themselves (cos = +-1 exactly in
    float32) or its opposite, plus one ordinary sample."""
    # rows 0 and 1 along a coordinate axis with power-of-two norms: their normalisation is exact in float32
    # on every CPU (a random direction gave 0.9999999 on an AMD EPYC's XLA:CPU dot, not 1)
    emb = jax.random.normal(jax.random.key(1), (3, 16))
    emb = emb.at[0].set(jnp.zeros(16).at[3].set(1.0)).at[1].set(jnp.zeros(16).at[7].set(-4.0))
    kernel = jax.random.normal(jax.random.key(0), (16, 5)) * 0.01
    kernel = kernel.at[:, 1].set(sign * emb[0] * 0.3).at[:, 2].set(sign * emb[1] * 2.0)
    return emb, kernel, jnp.array([1, 2, 4])


HEAD_SETTINGS = [
    ("arcface", {}), ("arcface", {"margin": 0.0}), ("arcface", {"margin": 0.3}), ("arcface", {"margin": 1.2}),
    ("arcface", {"easy_margin": True}), ("cosface", {}), ("cosface", {"margin": 0.0}),
    ("curricularface", {}), ("curricularface", {"margin": 0.3}),
]


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("kind,kw", HEAD_SETTINGS)
def test_margin_heads_finite_gradients_at_cos_plus_minus_one(kind, kw, sign):
    emb, kernel, labels = _collinear_case(sign)
    cos = heads.cosine_logits(emb, kernel)[jnp.arange(3), labels]
    assert np.all(np.abs(np.asarray(cos[:2])) == 1.0), cos  # really on the boundary
    head = heads.MarginHead(num_classes=5, kind=kind, **kw)
    v = head.init(jax.random.key(2), emb, labels)
    extra = {c: x for c, x in v.items() if c != "params"}

    def loss_fn(e, k):
        (out, _), _ = head.apply({"params": {"kernel": k}, **extra}, e, labels, mutable=["head_state"])
        return losses.softmax_cross_entropy(out, labels)

    loss, (ge, gk) = jax.value_and_grad(loss_fn, argnums=(0, 1))(emb, kernel)
    assert np.isfinite(float(loss))
    assert np.isfinite(np.asarray(ge)).all() and np.isfinite(np.asarray(gk)).all()


@pytest.mark.parametrize("fn", ["arcface", "curricularface"])
def test_margin_gradient_is_bounded_and_exact_inside(fn):
    # d cos(theta + m) / d cos(theta) = cos m + sin m * cos / sin: exact away from +-1, bounded at +-1
    m = 0.5
    c = jnp.array([[0.3, 0.0], [0.999, 0.0], [1.0, 0.0], [-1.0, 0.0]], jnp.float32)
    y = jnp.zeros((4,), jnp.int32)
    if fn == "arcface":
        f = lambda c: heads.arcface_margin(c, y, 1.0, m, easy_margin=True)[0][:, 0].sum()
    else:
        f = lambda c: heads.curricular_margin(c, y, jnp.zeros((1,)), 1.0, m)[0][:, 0].sum()
    g = np.asarray(jax.grad(f)(c))[:, 0]
    for i, x in enumerate((0.3, 0.999)):
        want = np.cos(m) + np.sin(m) * x / np.sqrt(1 - x * x)
        np.testing.assert_allclose(g[i], want, rtol=1e-3)
    assert np.isfinite(g).all() and np.abs(g).max() < 1e4


def test_class_sharded_head_finite_gradients_at_the_boundary():
    # the engine's layout: kernel columns sharded over all 8 (fake) devices, batch over the data axis
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    emb = jax.random.normal(jax.random.key(1), (8, 16))
    labels = jnp.arange(8) * 3 % 13
    kernel = jax.random.normal(jax.random.key(0), (16, 16)) * 0.01
    kernel = kernel.at[:, labels[0]].set(emb[0]).at[:, labels[1]].set(-emb[1] * 4)
    for kind in ("arcface", "curricularface", "cosface"):
        head = heads.MarginHead(num_classes=13, padded_classes=16, kind=kind)
        v = head.init(jax.random.key(2), emb, labels)
        extra = {c: x for c, x in v.items() if c != "params"}
        k_sh = jax.device_put(kernel, NamedSharding(mesh, P(None, ("data", "model"))))
        e_sh = jax.device_put(emb, NamedSharding(mesh, P("data")))

        @jax.jit
        def grads(e, k):
            def loss_fn(e, k):
                (out, _), _ = head.apply({"params": {"kernel": k}, **extra}, e, labels, train=True,
                                         rngs={"sample": jax.random.key(0)}, mutable=["head_state"])
                return losses.softmax_cross_entropy(out, labels)
            return jax.value_and_grad(loss_fn, argnums=(0, 1))(e, k)

        loss, (ge, gk) = grads(e_sh, k_sh)
        assert len(gk.sharding.device_set) == 8
        assert np.isfinite(float(loss)) and np.isfinite(np.asarray(ge)).all() and np.isfinite(np.asarray(gk)).all(), kind


@pytest.mark.parametrize("spec", ["arcface.py:tiny", "minusface.py:stage1,tiny"])
def test_training_accuracy_is_top1_on_plain_cosines(spec):
    """``metrics['accuracy']`` is the reference's prec@1 (torchkit ``accuracy_dist`` on ``original_outputs``):
    top-1 of the cosines without the margin. On the margin logits a batch whose every face is nearest its own
    centre can score 0 (ArcFace m=1.5 here turns a target cosine of 1 into cos(1.5) = 0.07), which is how the
    MinusFace stage-2 demo logged 0.000 for hundreds of steps."""
    import os
    from ppfr_jax import config_lib, methods
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    c = config_lib.load_config_spec(os.path.join(root, spec))
    c.head.margin = 1.5
    n = 6
    task = methods.make_task(c, n)
    images = jax.random.randint(jax.random.key(1), (n, 112, 112, 3), 0, 256).astype(jnp.uint8)
    labels = jnp.arange(n, dtype=jnp.int32)
    v = task.init(jax.random.key(0), images, labels)
    params = dict(v["params"])
    state = {k: val for k, val in v.items() if k != "params"}
    emb = task.embed(v, images)  # inference mode = loss(train=False)
    # each class centre is its own face's embedding: every plain cosine ranks the face right
    params["head"] = {"kernel": jnp.asarray(emb, jnp.float32).T}
    cos = np.asarray(heads.cosine_logits(emb, params["head"]["kernel"]))
    assert (np.argmax(cos, 1) == np.arange(n)).all() and np.max(cos[~np.eye(n, dtype=bool)]) > np.cos(1.5)
    (margin_logits, _) = task.head.apply({"params": params["head"]}, emb.astype(jnp.float32), labels)
    assert np.mean(np.argmax(np.asarray(margin_logits), 1) == np.arange(n)) < 1.0  # the old measure falls short
    _, (metrics, _) = task.loss(params, state, {"image": images, "label": labels}, jax.random.key(2), train=False)
    assert float(metrics["accuracy"]) == 1.0
