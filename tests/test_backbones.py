"""IResNet / MobileFaceNet parity with the reference (golden backbone_*.npz, duetface_client.npz).

Weights: the golden deterministic state_dicts, mapped with each module's
``import_torch_state_dict`` onto a ``jax.eval_shape`` template. Tolerances:
the golden README's ``suggested_atol`` with rtol 0 - ten times the error the
float32 reference itself carries against a float64 run of the same code, so
an independent float32 implementation (other conv/summation orders) lands
inside it while a real mistake (wrong layer, layout, eps) does not.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_state_dict, load_golden, suggested_atol
from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models import iresnet, mobilefacenet


def _nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def _fake_variables(template, seed=0):
    """Numpy-filled variables shaped like ``template``, scaled like the golden recipe.

    Used instead of ``model.init`` because compiling the random initialisers
    costs seconds per parameter on the test CPUs.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            v = z / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            v = {"scale": 1 + 0.1 * z, "var": 1 + 0.25 * np.abs(z), "alpha": 0.25 + 0.05 * z}.get(name, 0.1 * z)
        return v.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, template)


@pytest.mark.parametrize("name,ctor", [("ir18", iresnet.IR18), ("ir50", iresnet.IR50)])
def test_iresnet_matches_reference(name, ctor):
    g = load_golden(f"backbone_{name}")
    model = ctor()
    variables = iresnet.import_torch_state_dict(golden_state_dict(name), iresnet.init_variables(model))
    out = jax.jit(model.apply)(variables, _nhwc(g["x"]))
    np.testing.assert_allclose(np.asarray(out), g["out"], rtol=0, atol=suggested_atol(f"backbone_{name}", "out"))


def test_mobilefacenet_matches_reference():
    g = load_golden("backbone_mobilefacenet")
    model = mobilefacenet.MobileFaceNet()
    variables = mobilefacenet.import_torch_state_dict(golden_state_dict("mobilefacenet"),
                                                      mobilefacenet.init_variables(model))
    out = jax.jit(model.apply)(variables, _nhwc(g["x"]))
    np.testing.assert_allclose(np.asarray(out), g["out"], rtol=0,
                               atol=suggested_atol("backbone_mobilefacenet", "out"))


def test_duetface_client_matches_reference():
    g = load_golden("duetface_client")
    model = mobilefacenet.DuetFaceClient()
    variables = mobilefacenet.import_torch_state_dict(golden_state_dict("duetface_client"),
                                                      mobilefacenet.init_variables(model))
    out, feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, _nhwc(g["x_client"]))
    np.testing.assert_allclose(np.asarray(out), g["out"], rtol=0, atol=suggested_atol("duetface_client", "out"))
    for name, f in zip(("body_1", "body_3", "body_5", "body_7"), feats):
        np.testing.assert_allclose(_nchw(f), g[name], rtol=0, atol=suggested_atol("duetface_client", name),
                                   err_msg=name)


def test_client_state_dict_under_duetface_model_prefix():
    sd = {"client_model." + k: v for k, v in golden_state_dict("duetface_client").items()}
    template = mobilefacenet.init_variables(mobilefacenet.DuetFaceClient())
    v = mobilefacenet.import_torch_state_dict(sd, template, strip_prefix="client_model.")
    assert v["params"]["output_layer"]["linear"]["bias"].shape == (512,)


def test_head_mismatch_is_reported():
    # The client checkpoint has a Linear bias and an affine BN1d that GDC lacks.
    from ppfr_jax.checkpoint_import import CheckpointMismatchError
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        mobilefacenet.import_torch_state_dict(
            golden_state_dict("duetface_client"),
            mobilefacenet.init_variables(mobilefacenet.MobileFaceNet(in_channels=30)))


@pytest.mark.parametrize("ctor,shape", [
    (iresnet.IR_TINY, (2, 112, 112, 3)),
    (mobilefacenet.DuetFaceClient, (2, 112, 112, 30)),
])
def test_train_mode_updates_batch_stats(ctor, shape):
    model = ctor()
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _fake_variables(jax.eval_shape(model.init, jax.random.key(0), x))
    out, updates = jax.jit(lambda v, x, r: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                       rngs={"dropout": r}))(variables, x, jax.random.key(2))
    assert out.shape == (2, model.embedding_size) and np.isfinite(np.asarray(out)).all()
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 6)])  # BatchNorm1d (the embedding's), BatchNorm2d
def test_batch_norm_running_stats_follow_torch(shape):
    # torch: normalise with the biased batch variance, but move running_var towards the UNBIASED
    # one (n/(n-1), n values per channel); flax's own BatchNorm uses the biased one there (8/7 off at B=8)
    from ppfr_jax.models.layers import batch_norm
    x = np.asarray(jax.random.normal(jax.random.key(0), shape) * 3 + 1, np.float64)
    bn = batch_norm(True, name="bn")
    old = {"mean": np.linspace(-1, 1, shape[-1]), "var": np.linspace(0.5, 2, shape[-1])}
    v = {"params": {"scale": np.full(shape[-1], 1.5, np.float32), "bias": np.full(shape[-1], 0.1, np.float32)},
         "batch_stats": {k: a.astype(np.float32) for k, a in old.items()}}
    y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(v, x.astype(np.float32))
    axes = tuple(range(len(shape) - 1))
    mean, var = x.mean(axes), x.var(axes)
    n = x.size // shape[-1]
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * old["var"] + 0.1 * var * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, 1.5 * (x - mean) / np.sqrt(var + 1e-5) + 0.1, rtol=1e-5, atol=1e-5)
    # inference uses the running statistics as they are
    y_eval = batch_norm(False, name="bn").apply(v, x.astype(np.float32))
    np.testing.assert_allclose(y_eval, 1.5 * (x - old["mean"]) / np.sqrt(old["var"] + 1e-5) + 0.1, rtol=1e-5,
                               atol=1e-5)


def test_iresnet_dropout_is_active_only_in_train():
    model = iresnet.IR_TINY()
    x = jax.random.normal(jax.random.key(1), (2, 112, 112, 3))
    variables = _fake_variables(iresnet.init_variables(model, batch=2))
    train_out = jax.jit(lambda r: model.apply(variables, x, train=True, mutable=["batch_stats"],
                                              rngs={"dropout": r})[0])
    assert not np.allclose(train_out(jax.random.key(0)), train_out(jax.random.key(1)))
    # Without train there is no dropout rng at all: the call would fail if Dropout were active.
    eval_out = jax.jit(model.apply)
    np.testing.assert_array_equal(eval_out(variables, x), eval_out(variables, x))


@pytest.mark.parametrize("ctor,shape", [
    (iresnet.IR_TINY, (2, 112, 112, 3)),
    (mobilefacenet.MobileFaceNet, (2, 112, 112, 3)),
])
def test_bf16_compute_with_float32_params(ctor, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _fake_variables(jax.eval_shape(ctor().init, jax.random.key(0), x))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    ref = jax.jit(ctor().apply)(variables, x)
    out = jax.jit(ctor(dtype=jnp.bfloat16).apply)(variables, x)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    # bf16 keeps ~3 significant digits; loose agreement only proves it is the same network.
    assert np.corrcoef(out.ravel(), np.asarray(ref).ravel())[0, 1] > 0.95


def test_wrong_input_is_rejected():
    ir = iresnet.IR_TINY()
    v = iresnet.init_variables(ir)
    with pytest.raises(ValueError, match=r"\(N, 112, 112, C\).*\(1, 96, 96, 3\)"):
        jax.eval_shape(ir.apply, v, jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(ValueError, match="expect 3 input channels, got 4"):
        jax.eval_shape(ir.apply, v, jnp.zeros((1, 112, 112, 4)))
    with pytest.raises(ValueError, match="built for 162 input channels, got 3"):
        jax.eval_shape(iresnet.IR_TINY(in_channels=162).init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    with pytest.raises(ValueError, match=r"\(N, 112, 112, 30\).*\(1, 112, 112, 3\)"):
        jax.eval_shape(mobilefacenet.DuetFaceClient().init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    with pytest.raises(ValueError, match=r"\(N, 112, 112, 3\).*\(1, 3, 112, 112\)"):
        jax.eval_shape(mobilefacenet.MobileFaceNet().init, jax.random.key(0), jnp.zeros((1, 3, 112, 112)))


def test_stage_hook_and_stage_outputs():
    # DuetFace's server inserts a block after each stage through this hook.
    model = iresnet.IR_TINY()
    x = jax.random.normal(jax.random.key(1), (2, 112, 112, 3))
    calls = []

    def hook(stage, unit_index, y):
        calls.append((stage, unit_index, y.shape))
        return y * nn.Dense(1, name="embedding_layer")(jnp.ones((1,)))

    variables = _fake_variables(jax.eval_shape(functools.partial(model.init, stage_hook=hook), jax.random.key(0), x))
    # Modules the hook creates live in the unit, as torch's body.{i}.embedding_layer does.
    assert all("embedding_layer" in variables["params"][f"body_{i}"] for i in range(4))
    calls.clear()
    out, stages = jax.jit(functools.partial(model.apply, stage_hook=hook, return_stages=True))(variables, x)
    assert [c[:2] for c in calls] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert [s.shape for s in stages] == [(2, 56, 56, 8), (2, 28, 28, 16), (2, 14, 14, 16), (2, 7, 7, 32)]
    assert out.shape == (2, 32)


def test_unit_plan_matches_reference_layout():
    plan = iresnet.unit_plan(iresnet.STAGE_SIZES[50], iresnet.BASIC_WIDTHS)
    assert len(plan) == 24
    assert [u.index for u in plan if u.last_in_stage] == [2, 6, 20, 23]
    assert [u.index for u in plan if u.stride == 2] == [0, 3, 7, 21]


@pytest.mark.parametrize("bottleneck", [False, True])
def test_se_and_bottleneck_variants_import_by_reference_names(bottleneck):
    # No IR-SE golden exists; check that the torch names we expect (from the
    # reference module tree) round-trip through the importer.
    model = iresnet.IResNet(stage_sizes=(1, 1, 1, 1), widths=(32, 32, 64, 64), stem_width=16,
                            bottleneck=bottleneck, use_se=True, embedding_size=8)
    template = iresnet.init_variables(model)
    body0 = {
        "res_layer.se_block.fc1.weight": (2, 32, 1, 1),
        "res_layer.se_block.fc2.weight": (32, 2, 1, 1),
        "shortcut_layer.0.weight": (32, 16, 1, 1),
    }
    if bottleneck:
        body0["res_layer.7.weight"] = (32, 8, 1, 1)
        body0["res_layer.6.weight"] = (8,)
    rng = np.random.default_rng(0)
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        keys = [p.key for p in path]
        col, *mods, name = keys
        suffix = {"kernel": "weight", "scale": "weight", "alpha": "weight",
                  "mean": "running_mean", "var": "running_var"}.get(name, name)
        tkey = iresnet.TORCH_RENAME("/".join(mods)) + "." + suffix
        for i in range(64):
            tkey = tkey.replace(f"_{i}.", f".{i}.")
        shape = leaf.shape
        if name == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        z = rng.standard_normal(shape).astype(np.float32)
        sd[tkey] = 1 + np.abs(z) if name == "var" else z
    for k, shape in body0.items():
        assert sd["body.0." + k].shape == shape, k
    v = iresnet.import_torch_state_dict(sd, template)
    np.testing.assert_array_equal(v["params"]["body_0"]["res_layer_se_block"]["fc1"]["kernel"],
                                  sd["body.0.res_layer.se_block.fc1.weight"].transpose(2, 3, 1, 0))
    out = jax.jit(model.apply)(v, jnp.ones((1, 112, 112, 3)))
    assert out.shape == (1, 8) and np.isfinite(np.asarray(out)).all()


def test_plain_mobilefacenet_needs_no_rename():
    template = mobilefacenet.init_variables(mobilefacenet.MobileFaceNet())
    v = torch_to_flax(golden_state_dict("mobilefacenet"), template)
    assert "bias" not in v["params"]["output_layer"]["linear"]


def test_stage_hook_modules_take_duetface_server_names():
    # The reference DuetFace server's state_dict (IR-18 on 162 channels with an
    # InteractiveBlock ``body.{i}.embedding_layer.weight`` ending each stage)
    # must import onto IR18 + hook modules with no renaming.
    class Scalar(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("weight", nn.initializers.zeros, ())

    def hook(stage, unit_index, y):
        return Scalar(name="embedding_layer")(y)

    model = iresnet.IR18()
    template = jax.eval_shape(functools.partial(model.init, stage_hook=hook), jax.random.key(0),
                              jnp.zeros((1, 112, 112, 162)))
    v = iresnet.import_torch_state_dict(golden_state_dict("duetface_model_w05"), template,
                                        strip_prefix="server_model.", ignore=(r"^client_model\.",))
    assert [float(v["params"][f"body_{i}"]["embedding_layer"]["weight"]) for i in (1, 3, 5, 7)] == [0.5] * 4


@pytest.mark.slow
@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 7)])
def test_depthwise_shifted_matches_grouped_conv(stride, padding, kernel):
    """The CPU depthwise path (shifted slices) equals XLA's grouped conv, values and grads."""
    from ppfr_jax.models.layers import DepthwiseConv

    x = jax.random.normal(jax.random.key(0), (2, 15, 14, 6))
    mods = {impl: DepthwiseConv(6, (kernel, kernel), (stride, stride), (padding, padding),
                                use_bias=True, impl=impl) for impl in ("shifted", "lax")}
    params = mods["lax"].init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    outs, grads = {}, {}
    for impl, m in mods.items():
        outs[impl] = m.apply(params, x)
        grads[impl] = jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 2), argnums=(0, 1))(params, x)
    assert outs["lax"].shape == outs["shifted"].shape
    np.testing.assert_allclose(outs["shifted"], outs["lax"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["shifted"]), jax.tree.leaves(grads["lax"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,stride,padding,kernel,sub", [
    ((2, 16, 12, 5), 2, 1, 3, True),    # the case it rewrites (even H, W)
    ((2, 15, 12, 5), 2, 1, 3, False),   # odd height: lax
    ((2, 16, 12, 5), 2, 0, 1, False),   # 1x1 stride-2 shortcut: lax
    ((2, 16, 12, 5), 1, 1, 3, False),   # stride 1, narrow input: lax
    ((2, 11, 9, 40), 1, 1, 3, True),    # stride 1, >= WIDE_INPUT_CHANNELS inputs: dot weight gradient
    ((2, 11, 9, 40), 1, 0, 3, False),   # same channels, no padding: lax
])
def test_cpu_strided_conv_matches_lax(shape, stride, padding, kernel, sub):
    """``cpu_strided_conv`` (what ``layers.conv`` uses on the CPU) == lax, values and both gradients."""
    from ppfr_jax.models import layers

    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], 7))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    pad = [(padding, padding)] * 2

    def loss(f, x, w):
        y = f(x, w, (stride, stride), pad, dimension_numbers=dn, precision="highest")
        return jnp.sum(jnp.sin(y)), y

    (l0, y0), g0 = jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1), has_aux=True)(x, w)
    (l1, y1), g1 = jax.value_and_grad(functools.partial(loss, layers.cpu_strided_conv), (0, 1), has_aux=True)(x, w)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):  # float32 sums of up to 9*5*7 terms in another order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: loss(layers.cpu_strided_conv, x, w)[0]))(x))
    assert ("custom_vjp_call" in jaxpr) == sub


def test_conv3x3_weight_grad_is_the_lax_weight_gradient():
    """The nine taps from one product == lax's weight gradient, tap by tap, channel by channel."""
    from ppfr_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (3, 7, 5, 33))
    g = jax.random.normal(jax.random.key(1), (3, 7, 5, 4))
    w = jnp.zeros((3, 3, 33, 4))
    ref = jax.vjp(lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (1, 1)],
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                         precision="highest"), w)[1](g)[0]
    got = layers.conv3x3_weight_grad(x, g, precision="highest")
    assert got.shape == (3, 3, 33, 4)
    # float32 sums of 3*7*5 = 105 products in another order
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # tap (0, 0) pairs x[h, w] with g[h + 1, w + 1]: a hand-computed entry
    want = float(jnp.sum(x[:, :-1, :-1, 2] * g[:, 1:, 1:, 3]))
    np.testing.assert_allclose(float(got[0, 0, 2, 3]), want, rtol=1e-5)


def test_conv_layer_uses_the_strided_cpu_path_with_the_same_params():
    from ppfr_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    m = layers.conv(6, 3, 2, 1, name="c")
    v = m.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, v) == {"params": {"kernel": (3, 3, 4, 6)}}
    ref = jax.lax.conv_general_dilated(x, v["params"]["kernel"], (2, 2), [(1, 1), (1, 1)],
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-5, atol=1e-5)
    assert m.conv_general_dilated is layers.cpu_strided_conv  # tests run on the CPU


# ----------------------------------------------------------------------------- the one registry


def _param_count(model, channels=3):
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, channels)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))


def test_every_registry_entry_resolves():
    from ppfr_jax import models
    for name, spec in models.BACKBONES.items():
        assert callable(models.factory(name)), name
    assert set(models.CLIENT_BACKBONES) <= set(models.RECOGNIZERS)
    with pytest.raises(models.UnknownBackboneError, match=r"unknown recognizer 'unet'"):
        models.get_model("unet", "recognizer")


def test_mobilefacenet_tiny_is_the_tiny_model_everywhere():
    """``mobilefacenet_tiny`` in an ArcFace config used to build the FULL MobileFaceNet (a lookup of a class
    that did not exist fell back to it); now one entry builds the tiny net for ArcFace and DuetFace alike."""
    from ppfr_jax import tasks
    from ppfr_jax.models import duetface as duetface_models
    tiny = tasks.build_backbone("mobilefacenet_tiny", embedding_size=64)
    full = tasks.build_backbone("mobilefacenet", embedding_size=64)
    assert type(tiny).__name__ == "MobileFaceNetTiny" and tiny.in_channels == 3
    n_tiny, n_full = _param_count(tiny), _param_count(full)
    assert n_tiny * 10 < n_full, (n_tiny, n_full)
    client = duetface_models.build_client("mobilefacenet_tiny", 30, 64)
    assert type(client).__name__ == "MobileFaceNetTiny" and client.head == "client"
    assert _param_count(client, 30) < n_full // 10
