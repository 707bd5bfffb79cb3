"""U-Net: MinusFace's generator (and the recovery-attack inversion model).

Mirrors TFace ``tasks/minusface/utils.py: UNet`` (ReLU conv blocks, no
BatchNorm, widths 64-128-256-512-1024, transposed-conv upsampling, skip
concatenation). ``UNet(in_channels, out_channels)``: NHWC (N, H, W,
in_channels) -> ``(out (N, H, W, out_channels), latent)``, the latent being
the deepest encoder map ((N, 7, 7, 1024) for 112x112 input). H and W must be
divisible by ``2 ** (len(widths) - 1)`` (112 -> 7 for the default depth),
else ``ValueError``. In MinusFace's stage 1 the generator runs on the 192 DCT
channels (``UNet(in_channels=192, out_channels=192)``); "toy" mode uses 3 RGB
channels. ``import_torch_state_dict`` is ``torch_to_flax`` plus the
transposed-conv kernel layout (``conv_transpose``). Architecture and naming:
README, Differences from the reference, Backbones.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import conv, subpixel_conv_transpose_x2, torch_default_init

Dtype = Any

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)


_CONVT_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=-1, out_axis=-2)


class ConvTranspose(nn.Module):
    """torch-style ``ConvTranspose2d(in, features, kernel, stride, padding, output_padding)``, NHWC.

    torch's transposed conv is the gradient of a ``Conv2d``: output
    ``y[i*s - p + a] += x[i] * w[a]``, size ``(H-1)*s - 2p + k + op``. The
    kernel is ``(k, k, features, in_features)``: torch's IOHW weight moved to
    ``(H, W, O, I)`` without flipping (see ``torch_conv_transpose_kernel``);
    the parameters are those of ``nn.ConvTranspose(transpose_kernel=True)``
    (names ``kernel``/``bias``, same shapes), so checkpoints do not depend on
    the implementation.

    ``impl``:
      ``'lax'``: dilate the input by ``s``, pad by ``(k-1-p, k-1-p+op)`` and
        cross-correlate with the flipped, I/O-swapped kernel
        (``lax.conv_transpose(transpose_kernel=True)``, as Flax does).
      ``'subpixel'`` (only the U-Net's k=3, s=2, p=1, op=1): the four output
        phases computed as stride-1 convs of the undilated input with the taps
        that reach them, ``y[2m, 2n] = x[m, n] w[1, 1]``,
        ``y[2m, 2n+1] = x[m, n] w[1, 2] + x[m, n+1] w[1, 0]``, and so on
        (9 taps per 2x2 output block instead of 36 on a 75%-zero dilated
        input), then interleaved. XLA:CPU runs the dilated form several times
        slower (forward + backward, U-Net shapes; figures in bench/RESULTS.md).
      ``'auto'``: ``'subpixel'`` on the CPU where it applies, else ``'lax'``
        (GPU/TPU convolution libraries handle the dilated form natively).
    """

    features: int
    kernel: int
    stride: int
    padding: int
    output_padding: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"  # 'auto' | 'subpixel' | 'lax'
    init_scheme: str = "he"  # 'he' | 'torch' (see UNet.init_scheme)

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        if self.init_scheme == "torch":
            # torch computes a ConvTranspose2d's fan-in from weight dim 1, i.e. out_channels * k * k
            kernel_init, bias_init = torch_default_init(self.features * k * k)
        else:
            kernel_init, bias_init = _CONVT_INIT, nn.initializers.zeros
        kernel = self.param("kernel", kernel_init, (k, k, self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = (jnp.asarray(v, self.dtype) for v in (x, kernel, bias))
        subpixel_ok = (k, self.stride, self.padding, self.output_padding) == (3, 2, 1, 1)
        impl = self.impl
        if impl == "auto":
            impl = "subpixel" if subpixel_ok and jax.default_backend() == "cpu" else "lax"
        if impl == "lax":
            lo = k - 1 - self.padding
            pad = ((lo, lo + self.output_padding),) * 2
            y = jax.lax.conv_transpose(x, kernel, (self.stride,) * 2, pad,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), transpose_kernel=True)
        elif impl == "subpixel":
            if not subpixel_ok:
                raise ValueError(f"{self.name}: impl='subpixel' covers kernel 3, stride 2, padding 1, "
                                 f"output_padding 1 only, got {k}, {self.stride}, {self.padding}, "
                                 f"{self.output_padding}")
            y = subpixel_conv_transpose_x2(x, kernel)
        else:
            raise ValueError(f"{self.name}: impl must be 'auto', 'subpixel' or 'lax', got {self.impl!r}")
        return y + bias


def conv_transpose(features: int, kernel: int, stride: int, padding: int, output_padding: int, *,
                   name: str | None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                   impl: str = "auto", init_scheme: str = "he") -> ConvTranspose:
    """torch-style ``ConvTranspose2d(in, features, kernel, stride, padding, output_padding)``; see ``ConvTranspose``."""
    return ConvTranspose(features, kernel, stride, padding, output_padding, dtype=dtype,
                         param_dtype=param_dtype, impl=impl, init_scheme=init_scheme, name=name)


def torch_conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch ``ConvTranspose2d`` weight (I, O, kH, kW) -> our ``conv_transpose`` kernel (kH, kW, O, I)."""
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"ConvTranspose2d weight must be 4-D (in, out, kH, kW), got shape {w.shape}")
    return np.transpose(w, (2, 3, 1, 0))


class ConvBlock(nn.Module):
    """(3x3 conv + bias -> ReLU) x 2; the reference's ``conv_ReLU`` Sequential (indices 0 and 2)."""

    middle: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_scheme: str = "he"  # 'he' | 'torch' (see UNet.init_scheme)

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        torch = self.init_scheme == "torch"
        x = nn.relu(conv(self.middle, 3, 1, 1, name="conv_ReLU_0",
                         inits=torch_default_init(x.shape[-1] * 9) if torch else None, **kw)(x))
        return nn.relu(conv(self.features, 3, 1, 1, name="conv_ReLU_2",
                            inits=torch_default_init(self.middle * 9) if torch else None, **kw)(x))


def _max_pool2(x):
    # keywords: jax2onnx's export patch of nn.max_pool takes window_shape by keyword only
    return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


class UNet(nn.Module):
    """U-Net generator, NHWC.

    Attributes:
      in_channels: input channels (192 for DCT mode, 3 for toy mode); checked.
      out_channels: output channels of the final 1x1 conv.
      widths: encoder widths, shallow to deep; the default is the reference.
        Tiny tuples such as ``(4, 8, 16, 32, 64)`` keep the architecture for tests.
      remat: rematerialise every ``ConvBlock`` in the backward pass
        (``nn.remat``); same numbers, much less activation memory at 112x112
        with 192 input channels.
      init_scheme: ``'torch'`` (default): PyTorch's default layer initialisation,
        which is what the reference trains from (TFace's U-Net sets none):
        weights and biases ``U(+-1/sqrt(fan_in))``. Each conv + ReLU then
        shrinks the signal's second moment ~6x, so an untrained generator's
        output is ~1% of its input's scale and MinusFace's residue starts as
        ``r ~ x``. ``'he'``: He-normal weights, zero biases (an untrained
        generator's output is then as large as its input: ``r`` starts as
        ``x`` minus a random function of ``x``).

    Methods (use ``model.apply(variables, x, method=...)``):
      ``__call__(x) -> (out, latent)``: out (N, H, W, out_channels), latent
        (N, H/16, W/16, widths[-1]) for the default depth.
      ``encode(x) -> features``: tuple of the encoder maps, shallow to deep
        (``features[-1]`` is the latent).
      ``decode(features) -> out``.
    """

    in_channels: int = 3
    out_channels: int = 3
    widths: Sequence[int] = DEFAULT_WIDTHS
    remat: bool = False
    init_scheme: str = "torch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.init_scheme not in ("torch", "he"):
            raise ValueError(f"UNet.init_scheme must be 'torch' or 'he', got {self.init_scheme!r}")
        if len(self.widths) < 2:
            raise ValueError(f"UNet needs at least two widths (one pooling level), got widths={self.widths}")
        block = nn.remat(ConvBlock) if self.remat else ConvBlock
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_scheme=self.init_scheme)
        w = tuple(self.widths)
        depth = len(w)
        # setattr keeps the reference's attribute names (left_conv_1, deconv_1, ...)
        # so the state_dict maps by name.
        for i in range(depth):
            setattr(self, f"left_conv_{i + 1}", block(w[i], w[i], **kw))
        for i in range(1, depth):
            level = depth - 1 - i  # encoder level this decoder stage returns to
            setattr(self, f"deconv_{i}", conv_transpose(w[level], 3, 2, 1, 1, name=None, **kw))
            setattr(self, f"right_conv_{i}", block(w[level], w[level], **kw))
        setattr(self, f"right_conv_{depth}",
                conv(self.out_channels, 1, use_bias=True, name=None, dtype=self.dtype, param_dtype=self.param_dtype,
                     inits=torch_default_init(w[0]) if self.init_scheme == "torch" else None))

    def _check_input(self, x):
        factor = 2 ** (len(self.widths) - 1)
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC input (N, H, W, {self.in_channels}), got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet(in_channels={self.in_channels}) got {x.shape[-1]} input channels "
                             f"(shape {x.shape}); NHWC expected")
        if x.shape[1] % factor or x.shape[2] % factor:
            # The reference concatenates skips without padding: sizes must halve exactly.
            raise ValueError(f"UNet with {len(self.widths)} levels needs H and W divisible by {factor}, "
                             f"got {x.shape[1:3]}")

    def encode(self, x) -> tuple:
        """(N, H, W, in_channels) -> tuple of encoder maps (N, H/2^i, W/2^i, widths[i]); last = latent."""
        self._check_input(x)
        x = jnp.asarray(x, self.dtype)
        feats = []
        for i in range(len(self.widths)):
            if i:
                x = _max_pool2(x)
            x = getattr(self, f"left_conv_{i + 1}")(x)
            feats.append(x)
        return tuple(feats)

    def decode(self, features: Sequence[jax.Array]) -> jax.Array:
        """Encoder maps (as from ``encode``) -> (N, H, W, out_channels)."""
        depth = len(self.widths)
        if len(features) != depth:
            raise ValueError(f"decode expects {depth} encoder maps, got {len(features)}")
        x = features[-1]
        for i in range(1, depth):
            up = getattr(self, f"deconv_{i}")(x)
            x = jnp.concatenate([features[depth - 1 - i], up], axis=-1)  # skip first, as the reference
            x = getattr(self, f"right_conv_{i}")(x)
        return getattr(self, f"right_conv_{depth}")(x)

    def __call__(self, x, train: bool = False):
        """(N, H, W, in_channels) -> (out (N, H, W, out_channels), latent (deepest encoder map)).

        ``train`` is accepted for a uniform model interface; the U-Net has no
        BatchNorm or Dropout.
        """
        del train
        feats = self.encode(x)
        return self.decode(feats), feats[-1]


def _torch_module_name(flax_path: str, prefix: str) -> str:
    return prefix + flax_path.replace("/", ".")


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], *,
                            prefix: str = "") -> dict:
    """Reference ``UNet`` state_dict entries -> Flax variables shaped like ``variables``.

    Args:
      state_dict: PyTorch keys/layouts. Only keys starting with ``prefix`` are
        used (e.g. ``prefix='generator.backbone.'`` for a MinusFace
        ``MinusBackbone`` state_dict, whose other keys belong to the recogniser).
      variables: our ``UNet`` variables (arrays or ``jax.eval_shape`` structs).

    Returns:
      ``{'params': ...}`` of numpy arrays.
    """
    sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"no state_dict key starts with prefix {prefix!r}")
    transforms = {
        "/".join(("params", mod, "kernel")): torch_conv_transpose_kernel
        for mod in variables["params"] if mod.startswith("deconv_")
    }
    return torch_to_flax(sub, variables, transforms=transforms)


def init_variables(model: UNet, size: int = 112, batch: int = 1, rng: jax.Array | None = None):
    """Shapes-only init: ``jax.eval_shape`` of ``model.init`` on a (batch, size, size, in_channels) input."""
    rng = jax.random.key(0) if rng is None else rng
    x = jax.ShapeDtypeStruct((batch, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, rng, x)
