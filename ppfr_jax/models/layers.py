"""Small building blocks shared by the backbones.

Naming convention (it is what makes weight import a table): a submodule is
named after the PyTorch attribute path it mirrors, with ``Sequential`` indices
joined by ``_`` (torch ``res_layer.1`` -> flax ``res_layer_1``). Parameter leaf
names follow Flax (``kernel``, ``bias``, ``scale``, ``mean``, ``var``) plus
``alpha`` for PReLU; ``ppfr_jax.checkpoint_import`` maps them onto the
PyTorch names (``weight``, ``bias``, ``running_mean``, ``running_var``).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class PReLU(nn.Module):
    """Per-channel PReLU on the last axis (torch ``nn.PReLU(C)``; init 0.25)."""

    param_dtype: Dtype = jnp.float32
    init_value: float = 0.25

    @nn.compact
    def __call__(self, x):
        alpha = self.param(
            "alpha", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        alpha = jnp.asarray(alpha, x.dtype)
        return jnp.where(x >= 0, x, alpha * x)


class TorchBatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` whose running variance is updated as torch's: with the UNBIASED batch variance.

    torch's BatchNorm normalises a training batch with the biased variance (as flax does) but
    moves ``running_var`` towards the unbiased one, ``var * n / (n - 1)`` with n the number of
    values per channel (N*H*W); flax moves it towards the biased one. Same variables, same
    outputs; only the ``batch_stats/var`` update differs (by the factor n/(n-1) on the batch's
    share: 8/7 for the embedding BatchNorm1d at batch 8, negligible for the conv BatchNorms).
    """

    def __call__(self, x, use_running_average=None, *, mask=None):
        ura = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        feature_axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        n = x.size // math.prod(x.shape[a] for a in feature_axes)  # values per channel
        update = not ura and not self.is_initializing() and mask is None and n > 1
        old = self.get_variable("batch_stats", "var") if update else None
        y = super().__call__(x, use_running_average, mask=mask)
        if update:
            # flax stored m*old + (1-m)*v; torch's m*old + (1-m)*v*n/(n-1) adds (1-m)*v/(n-1)
            new = self.get_variable("batch_stats", "var")
            self.put_variable("batch_stats", "var", new + (new - self.momentum * old) / (n - 1))
        return y


def batch_norm(train: bool, *, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, affine: bool = True) -> nn.BatchNorm:
    """torch-compatible BatchNorm (eps 1e-5, torch momentum 0.1 == flax 0.9, running variance
    updated with the unbiased batch variance: ``TorchBatchNorm``)."""
    return TorchBatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class DepthwiseConv(nn.Module):
    """Depthwise ``Conv2d`` (groups == in == out channels), same parameters as ``nn.Conv``.

    The kernel has ``nn.Conv``'s shape ``(kh, kw, 1, C)`` and name, so checkpoints and
    weight import do not care which implementation ran. ``impl='auto'`` computes it on
    the CPU as kh*kw shifted (strided) slices multiplied and added: XLA:CPU's grouped
    convolution is about 7x slower than that for MobileFaceNet/PFLD shapes. Elsewhere
    (GPU/TPU) it is ``lax.conv_general_dilated`` with ``feature_group_count=C``.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"  # 'auto' | 'shifted' | 'lax'

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c != self.features:
            raise ValueError(f"{self.name}: depthwise conv expects {self.features} input channels, got {c}")
        kh, kw = self.kernel_size
        kernel = self.param("kernel", _CONV_INIT, (kh, kw, 1, c), self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "shifted" if jax.default_backend() == "cpu" else "lax"
        sh, sw = self.strides
        ph, pw = self.padding
        if impl == "lax":
            y = jax.lax.conv_general_dilated(
                x, kernel, (sh, sw), ((ph, ph), (pw, pw)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        elif impl == "shifted":
            xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
            n, hp, wp, _ = xp.shape
            ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
            y = None
            for a in range(kh):
                for b in range(kw):
                    patch = jax.lax.slice(
                        xp, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, c),
                        (1, sh, sw, 1))
                    term = patch * kernel[a, b, 0]
                    y = term if y is None else y + term
        else:
            raise ValueError(f"{self.name}: impl must be 'auto', 'shifted' or 'lax', got {impl!r}")
        if self.use_bias:
            y = y + jnp.asarray(self.param("bias", nn.initializers.zeros, (c,), self.param_dtype), self.dtype)
        return y


def torch_default_init(fan_in: int):
    """PyTorch's default ``Conv2d``/``Linear`` initialisation for a layer with ``fan_in`` inputs.

    ``kaiming_uniform_(a=sqrt(5))`` for the weight and ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    for the bias: both ``U(-b, b)`` with ``b = 1/sqrt(fan_in)``. Returns
    ``(kernel_init, bias_init)``. For modules the reference builds without an explicit
    init (TFace's U-Net), so training starts where the reference's does.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init, init


def _conv_nhwc(x, w, strides, padding, precision=None):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


def subpixel_conv_transpose_x2(x, kernel):
    """torch ``ConvTranspose2d(k=3, s=2, p=1, output_padding=1)`` as four stride-1 convs.

    ``x`` (N, H, W, I), ``kernel`` (3, 3, O, I) (torch's IOHW weight moved to HWOI, not
    flipped) -> (N, 2H, 2W, O). Each 2x2 output block takes the 9 taps that reach it from
    the undilated input, instead of a 3x3 conv over a 75%-zero dilated input, which XLA:CPU
    runs 4-17x slower. Also the input gradient of a stride-2, 3x3, padding-1 conv with that
    conv's HWIO kernel (see ``conv``).
    """
    w = jnp.swapaxes(kernel, 2, 3)  # HWIO
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # x[H] = x[W] = 0 for the last odd row/column
    conv = functools.partial(_conv_nhwc, strides=(1, 1), padding="VALID")

    # Along each axis: even outputs take tap 1 of x[m]; odd outputs take tap 2 of x[m]
    # and tap 0 of x[m+1], i.e. the kernel slice [2, 0] = w[::-2].
    ee = conv(x, w[1:2, 1:2])
    eo = conv(xp[:, :h], w[1:2, ::-2])
    oe = conv(xp[:, :, :wd], w[::-2, 1:2])
    oo = conv(xp, w[::-2, ::-2])
    even = jnp.stack([ee, eo], axis=3)  # (N, H, W, 2, O): column phase
    odd = jnp.stack([oe, oo], axis=3)
    return jnp.stack([even, odd], axis=2).reshape(n, 2 * h, 2 * wd, -1)


_S2, _PAD1 = (2, 2), ((1, 1), (1, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_s2(x, w, precision=None):
    return _conv_nhwc(x, w, _S2, _PAD1, precision)


def _conv3x3_s2_fwd(x, w, precision):
    return _conv3x3_s2(x, w, precision), (x, w)


def _conv3x3_s2_bwd(precision, res, g):
    x, w = res
    # d/dx of y[i] = sum_a x[2i - 1 + a] w[a] is the k3 s2 p1 op1 transposed conv of g (H even)
    dx = subpixel_conv_transpose_x2(g, w.astype(g.dtype)).astype(x.dtype)
    dw = jax.vjp(lambda k: _conv_nhwc(x, k, _S2, _PAD1, precision), w)[1](g)[0]
    return dx, dw


_conv3x3_s2.defvjp(_conv3x3_s2_fwd, _conv3x3_s2_bwd)

_S1 = (1, 1)
# stride-1 3x3 convs with at least this many input channels take the dot weight gradient
WIDE_INPUT_CHANNELS = 32


def conv3x3_weight_grad(x, g, precision=None):
    """Weight gradient of a stride-1, 3x3, padding-1 NHWC conv as ONE matrix product.

    ``x`` (N, H, W, I) the conv's input, ``g`` (N, H, W, O) the gradient of its output ->
    (3, 3, I, O) HWIO. ``dW[a, b] = sum_{n,h,w} x[n, h, w] g[n, h - a + 1, w - b + 1]``, so the
    nine shifted copies of the (narrow) output gradient side by side, (N*H*W, 9*O), contracted
    with x viewed as (N*H*W, I) give all nine taps at once. XLA:CPU runs the same gradient as
    a conv with the batch as its feature axis, behind two transposes of x: 1.5-3.4x slower for
    32-192 input channels (bench/RESULTS.md, "DuetFace demo pipeline").
    """
    n, h, w, ci = x.shape
    co = g.shape[-1]
    gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = jnp.concatenate([gp[:, 2 - a:2 - a + h, 2 - b:2 - b + w] for a in range(3) for b in range(3)], axis=-1)
    dw = jax.lax.dot_general(x.reshape(-1, ci), d.reshape(-1, 9 * co).astype(x.dtype),
                             (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
    return dw.reshape(ci, 3, 3, co).transpose(1, 2, 0, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3_s1(x, w, precision=None):
    return _conv_nhwc(x, w, _S1, _PAD1, precision)


def _conv3x3_s1_fwd(x, w, precision):
    return _conv3x3_s1(x, w, precision), (x, w)


def _conv3x3_s1_bwd(precision, res, g):
    x, w = res
    # the input gradient as lax computes it (dead code, removed by XLA, for a model's input layer)
    dx = jax.vjp(lambda v: _conv_nhwc(v, w, _S1, _PAD1, precision), x)[1](g)[0]
    return dx, conv3x3_weight_grad(x, g, precision).astype(w.dtype)


_conv3x3_s1.defvjp(_conv3x3_s1_fwd, _conv3x3_s1_bwd)


def cpu_strided_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                     preferred_element_type=None):
    """``lax.conv_general_dilated`` with faster CPU gradients for two 3x3, padding-1 cases.

    Stride 2: a sub-pixel input gradient. Stride 1 with at least ``WIDE_INPUT_CHANNELS`` input
    channels: the weight gradient as one matrix product (``conv3x3_weight_grad``).

    Same values and gradients (tests compare them with lax). XLA computes the input gradient
    of a strided conv as a conv over an lhs-dilated (75% zero) gradient, which XLA:CPU runs
    at a fraction of its dense rate (ArcFace IR-18's 112x112 stride-2 conv: 39.5 ms vs 9.7 ms
    this way, batch 8, bench/RESULTS.md). Every other configuration, and every backend but
    the CPU (``conv`` only passes this in there), goes to lax unchanged.
    """
    plain = (lhs_dilation in (None, (1, 1)) and rhs_dilation in (None, (1, 1)) and feature_group_count == 1
             and batch_group_count == 1 and preferred_element_type is None)
    nhwc = dimension_numbers is not None and tuple(getattr(dimension_numbers, "lhs_spec", ())) == (0, 3, 1, 2) \
        and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1) and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2)
    if (plain and nhwc and tuple(window_strides) == _S2 and rhs.shape[:2] == (3, 3)
            and tuple(map(tuple, padding)) == _PAD1 and lhs.ndim == 4
            and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0):
        return _conv3x3_s2(lhs, rhs, precision)
    if (plain and nhwc and tuple(window_strides) == _S1 and rhs.shape[:2] == (3, 3)
            and tuple(map(tuple, padding)) == _PAD1 and lhs.ndim == 4 and lhs.shape[3] >= WIDE_INPUT_CHANNELS):
        return _conv3x3_s1(lhs, rhs, precision)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)


def conv(features: int, kernel: int | tuple[int, int], stride: int = 1, padding: int = 0, *,
         name: str, groups: int = 1, use_bias: bool = False, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32, inits=None) -> nn.Module:
    """torch-style ``Conv2d`` (explicit symmetric padding, no bias by default).

    ``groups == features`` (the depthwise convs of MobileFaceNet and PFLD, where in ==
    out channels) returns :class:`DepthwiseConv`, which has the same parameters.
    ``inits``: optional ``(kernel_init, bias_init)`` (e.g. ``torch_default_init``)
    instead of He-normal (fan-out) weights and zero biases. On the CPU, stride-1 and stride-2
    convs go through ``cpu_strided_conv`` (same parameters and values, faster gradients).
    """
    k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if groups > 1 and groups == features:
        return DepthwiseConv(features, k, (stride, stride), p, use_bias=use_bias, dtype=dtype,
                             param_dtype=param_dtype, name=name)
    return nn.Conv(
        features,
        k,
        strides=(stride, stride),
        padding=((p[0], p[0]), (p[1], p[1])),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=inits[0] if inits else _CONV_INIT,
        bias_init=inits[1] if inits else nn.initializers.zeros,
        conv_general_dilated=cpu_strided_conv if stride in (1, 2) and jax.default_backend() == "cpu" else None,
        name=name,
    )


def flatten_nchw(x):
    """Flatten an NHWC map in torch's (C, H, W) order so Linear weights import as is."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def rbg_init_key(rng) -> jax.Array:
    """An RBG-implementation key for parameter init, deterministic in ``rng`` (a key, or an int seed).

    XLA:CPU compiles each shape of a (partitionable) threefry draw slowly (~3 s per kernel shape, minutes for
    a U-Net + IR net); one RngBitGenerator op per draw compiles in seconds. Same distributions; only the
    initial values differ from a threefry init.
    """
    if isinstance(rng, int):
        return jax.random.key(rng, impl="rbg")
    return jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl="rbg")
