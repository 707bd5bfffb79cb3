"""PFLD and U-Net: golden parity with the reference and standalone checks.

Tolerances are the golden README's ``suggested_atol`` (10x the float32-vs-
float64 error the reference itself carries for that output), rtol 0: our
float32 convs sum in a different order than PyTorch's, so agreement can only
be expected within the float32 rounding the reference already has.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_summarised_close, golden_state_dict, load_golden, suggested_atol
from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models import pfld, unet


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ----------------------------------------------------------------------------- PFLD


def test_pfld_matches_reference():
    g = load_golden("pfld")
    model = pfld.PFLDInference()
    variables = pfld.import_torch_state_dict(golden_state_dict("pfld"), pfld.init_variables(model))
    features, landmarks = jax.jit(model.apply)(variables, _nhwc(g["x"]))
    assert features.shape == (1, 28, 28, 64) and landmarks.shape == (1, 196)
    np.testing.assert_allclose(np.asarray(landmarks), g["landmarks"], rtol=0,
                               atol=suggested_atol("pfld", "landmarks"))
    np.testing.assert_allclose(_nchw(features), g["features"], rtol=0, atol=suggested_atol("pfld", "features"))


def test_pfld_import_needs_only_bn8_ignored():
    # bn8 is the only state_dict entry the forward does not use; anything else
    # left over would mean a layer we forgot.
    sd = golden_state_dict("pfld")
    shapes = pfld.init_variables(pfld.PFLDInference())
    with pytest.raises(ValueError, match="bn8"):
        torch_to_flax(sd, shapes)


def test_pfld_rejects_wrong_input_shape():
    model = pfld.PFLDInference()
    with pytest.raises(ValueError, match="112, 112, 3"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 112, 112)))


# ----------------------------------------------------------------------------- U-Net


def _torch_conv_transpose_reference(x_nchw, w_iohw, bias, stride, padding, output_padding):
    """PyTorch ConvTranspose2d by its definition: y[o, i*s-p+a, j*s-p+b] += x[c, i, j] w[c, o, a, b]."""
    n, cin, h, wd = x_nchw.shape
    _, cout, k, _ = w_iohw.shape
    full = np.zeros((n, cout, (h - 1) * stride + k + output_padding, (wd - 1) * stride + k + output_padding))
    for a in range(k):
        for b in range(k):
            contrib = np.einsum("nchw,co->nohw", x_nchw, w_iohw[:, :, a, b])
            full[:, :, a:a + (h - 1) * stride + 1:stride, b:b + (wd - 1) * stride + 1:stride] += contrib
    out_h = (h - 1) * stride - 2 * padding + k + output_padding
    out_w = (wd - 1) * stride - 2 * padding + k + output_padding
    return full[:, :, padding:padding + out_h, padding:padding + out_w] + bias[None, :, None, None]


@pytest.mark.parametrize("k,s,p,op,size,impl", [(3, 2, 1, 1, 5, "lax"), (3, 2, 1, 1, 5, "subpixel"),
                                                (3, 2, 1, 1, 4, "auto"), (4, 2, 1, 0, 4, "auto"),
                                                (3, 2, 0, 1, 3, "auto")])
def test_conv_transpose_matches_torch_definition(k, s, p, op, size, impl):
    # (3, 2, 1, 1) is the U-Net's deconv (both implementations; 'auto' is the
    # sub-pixel one on the CPU); the others catch a padding or flip convention
    # that happens to agree only for that one case, and take the lax path.
    rng = np.random.default_rng(0)
    cin, cout = 5, 3
    x = rng.standard_normal((2, cin, size, size))
    w = rng.standard_normal((cin, cout, k, k))  # torch layout IOHW
    b = rng.standard_normal(cout)
    layer = unet.conv_transpose(cout, k, s, p, op, name="deconv", impl=impl)
    params = {"kernel": unet.torch_conv_transpose_kernel(w).astype(np.float32), "bias": b.astype(np.float32)}
    y = jax.jit(layer.apply)({"params": params}, _nhwc(x).astype(np.float32))
    ref = _torch_conv_transpose_reference(x, w, b, s, p, op)
    assert _nchw(y).shape == ref.shape
    np.testing.assert_allclose(_nchw(y), ref, rtol=0, atol=1e-4)


def test_conv_transpose_subpixel_gradients_match_lax():
    # The sub-pixel form must be the same function for training, not only forward.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 6, 5)).astype(np.float32)
    params = {"kernel": rng.standard_normal((3, 3, 4, 5)).astype(np.float32),
              "bias": rng.standard_normal(4).astype(np.float32)}
    t = rng.standard_normal((2, 12, 12, 4)).astype(np.float32)

    def grads(impl):
        layer = unet.conv_transpose(4, 3, 2, 1, 1, name="deconv", impl=impl)
        loss = lambda p, x: jnp.sum((layer.apply({"params": p}, x) - t) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    for a, b in zip(jax.tree.leaves(grads("subpixel")), jax.tree.leaves(grads("lax"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(np.abs(b).max()))
    with pytest.raises(ValueError, match="subpixel"):
        unet.conv_transpose(4, 4, 2, 1, 0, name="deconv", impl="subpixel").init(jax.random.key(0), x)


TINY = (4, 8, 16, 32, 64)


@pytest.mark.slow
def test_unet_default_init_is_torchs():
    # TFace's U-Net sets no init: PyTorch's default, U(+-1/sqrt(fan_in)) for weights and biases,
    # with fan_in = out * k * k for ConvTranspose2d (torch reads weight dim 1).
    model = unet.UNet(in_channels=6, out_channels=6, widths=(8, 16))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 6)) * 50.0
    params = model.init(jax.random.key(1), x)["params"]
    fan_in = {"left_conv_1/conv_ReLU_0": 6 * 9, "left_conv_1/conv_ReLU_2": 8 * 9, "left_conv_2/conv_ReLU_0": 8 * 9,
              "deconv_1": 8 * 9, "right_conv_1/conv_ReLU_0": 16 * 9, "right_conv_2": 8}
    for path, n in fan_in.items():
        node = params
        for part in path.split("/"):
            node = node[part]
        bound = 1 / np.sqrt(n)
        for leaf in ("kernel", "bias"):
            v = np.asarray(node[leaf])
            assert np.abs(v).max() <= bound + 1e-7, (path, leaf)
            if v.size >= 64:  # uniform on [-b, b]: std b / sqrt(3)
                np.testing.assert_allclose(v.std(), bound / np.sqrt(3), rtol=0.25, err_msg=f"{path}/{leaf}")
    out, _ = model.apply({"params": params}, x)
    he = unet.UNet(in_channels=6, out_channels=6, widths=(8, 16), init_scheme="he")
    out_he, _ = he.apply(he.init(jax.random.key(1), x), x)
    # the reference's untrained generator barely moves its input (MinusFace: r = x - g(x) ~ x)
    assert float(jnp.std(out)) < 0.05 * float(jnp.std(x)) < float(jnp.std(out_he))
    with pytest.raises(ValueError, match="init_scheme"):
        unet.UNet(in_channels=6, out_channels=6, widths=(8, 16), init_scheme="xavier").init(jax.random.key(1), x)


def _random_variables(shapes, seed=0):
    """He-scaled numpy weights for ``shapes``: no compiled ``init`` (XLA compiles dominate test time)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "kernel":
            return (rng.standard_normal(s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = unet.UNet(in_channels=6, out_channels=5, widths=TINY)
    variables = _random_variables(unet.init_variables(model, size=32))
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 6)).astype(np.float32)
    return model, variables, x


def test_unet_shapes_and_methods(tiny):
    model, variables, x = tiny

    @jax.jit
    def run(v, x):
        out, latent = model.apply(v, x)
        feats = model.apply(v, x, method=unet.UNet.encode)
        return out, latent, feats, model.apply(v, feats, method=unet.UNet.decode)

    out, latent, feats, decoded = run(variables, x)
    assert out.shape == (2, 32, 32, 5) and latent.shape == (2, 2, 2, 64)
    assert [f.shape[1:] for f in feats] == [(32, 32, 4), (16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)]
    np.testing.assert_allclose(np.asarray(feats[-1]), np.asarray(latent), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(out), rtol=0, atol=1e-5)
    assert variables["params"]["deconv_1"]["kernel"].shape == (3, 3, 32, 64)  # (kH, kW, out, in)


def test_unet_remat_same_values_and_grads():
    model = unet.UNet(in_channels=3, out_channels=3, widths=(4, 8, 16))
    remat = unet.UNet(in_channels=3, out_channels=3, widths=(4, 8, 16), remat=True)
    variables = _random_variables(unet.init_variables(model, size=8))
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)

    def loss(m):
        return lambda p: jnp.sum(m.apply({"params": p}, x)[0] ** 2)

    @jax.jit
    def both(p):
        return jax.value_and_grad(loss(model))(p), jax.value_and_grad(loss(remat))(p)

    (l0, g0), (l1, g1) = both(variables["params"])
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


def test_unet_rejects_bad_inputs(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="input channels"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="divisible by 16"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 40, 40, 6)))


@pytest.fixture(scope="module")
def stage1_sd():
    return golden_state_dict("minusface_stage1")


def test_unet_import_maps_every_generator_tensor(stage1_sd):
    # Shapes only (no compute): every generator.backbone.* key lands on a leaf.
    shapes = unet.init_variables(unet.UNet(in_channels=192, out_channels=192))
    sd = stage1_sd
    v = unet.import_torch_state_dict(sd, shapes, prefix="generator.backbone.")
    n_gen = sum(k.startswith("generator.backbone.") for k in sd)
    assert len(jax.tree_util.tree_leaves(v)) == n_gen
    np.testing.assert_array_equal(v["params"]["deconv_1"]["kernel"],
                                  np.transpose(sd["generator.backbone.deconv_1.weight"], (2, 3, 1, 0)))


# ----------------------------------------------------------------------------- MinusFace stage 1


def _minusface_stage1_forward(generator, gen_vars, recognizer, rec_vars, x_nhwc):
    """Reference ``MinusBackbone(mode='stage1').forward`` (eval), NHWC: ``ppfr_jax.models.minusface``.

    x in [-1, 1] -> x_up = dct(x); (x_encode_up, latent) = g(x_up);
    x_residue_up = x_up - x_encode_up; x_encode / x_residue = 2 * idct(.) - 1
    (idct clamps to [0, 1]); the recogniser sees the un-clamped 192-channel residue.
    """
    from ppfr_jax.models import minusface

    model = minusface.MinusBackbone(generator=generator, recognizer=recognizer, mode="stage1")
    variables = {"params": {"generator": gen_vars["params"], "recognizer": rec_vars["params"]},
                 "batch_stats": {"recognizer": rec_vars["batch_stats"]}}
    out = model.apply(variables, x_nhwc, train=False)
    keys = ("x_up", "x_encode_up", "x_residue_up", "x_latent", "x_encode", "x_residue", "x_feature")
    return {k: out[k] for k in keys}


def test_minusface_stage1_matches_reference(stage1_sd):
    iresnet = pytest.importorskip("ppfr_jax.models.iresnet")
    g = load_golden("minusface_stage1")
    sd = stage1_sd
    generator = unet.UNet(in_channels=192, out_channels=192)
    gen_vars = unet.import_torch_state_dict(sd, unet.init_variables(generator), prefix="generator.backbone.")
    recognizer, rec_vars = _stage1_recognizer(iresnet, sd)

    out = jax.jit(lambda gv, rv, x: _minusface_stage1_forward(generator, gv, recognizer, rv, x))(
        gen_vars, rec_vars, _nhwc(g["x"]))
    out = {k: _nchw(v) if v.ndim == 4 else np.asarray(v) for k, v in out.items()}

    tol = {k: suggested_atol("minusface_stage1", k) for k in
           ("x_up", "x_encode_up", "x_residue_up", "x_latent", "x_encode", "x_residue", "x_feature")}
    np.testing.assert_allclose(out["x_latent"], g["x_latent"], rtol=0, atol=tol["x_latent"])
    for name in ("x_up", "x_encode_up", "x_residue_up", "x_latent"):
        assert_summarised_close(g, name, out[name], atol=tol[name])
    for name in ("x_encode", "x_residue", "x_feature"):
        np.testing.assert_allclose(out[name], g[name], rtol=0, atol=tol[name], err_msg=name)


def _stage1_recognizer(iresnet, sd):
    """IR-18 with a 192-channel input conv, weights from the ``recognizer.*`` keys."""
    model = iresnet.IR18(in_channels=192)
    rec_sd = {k[len("recognizer."):]: v for k, v in sd.items() if k.startswith("recognizer.")}
    return model, iresnet.import_torch_state_dict(rec_sd, iresnet.init_variables(model))
