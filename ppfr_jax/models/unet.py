"""U-Net: MinusFace's generator (and the recovery-attack inversion model).

Mirrors TFace ``tasks/minusface/utils.py: UNet``: an encoder of ``ConvBlock``s
(two 3x3 convs with bias, each followed by ReLU; no BatchNorm) with 2x2 max
pools between them (widths 64-128-256-512-1024), and a decoder that at each
level upsamples with a 3x3 stride-2 transposed conv (padding 1, output padding
1, so exactly x2), concatenates the encoder feature of that level *before* the
upsampled map on the channel axis, and applies another ``ConvBlock``; a final
1x1 conv (with bias) maps to ``out_channels``. There is no bilinear option and
no padding of mismatched sizes: spatial sizes must be divisible by
``2 ** (len(widths) - 1)`` (112 -> 7 for the default depth).

The latent is the deepest encoder map (``left_conv_5``'s output, (N, 7, 7,
1024) for 112x112 input). In MinusFace's stage 1 the generator runs on the 192
DCT channels (``UNet(in_channels=192, out_channels=192)``); "toy" mode uses 3
RGB channels.

Names follow the PyTorch attribute paths (``left_conv_1/conv_ReLU_0`` for
``left_conv_1.conv_ReLU.0``), so ``import_torch_state_dict`` is
``torch_to_flax`` plus the transposed-conv kernel layout (see
``conv_transpose``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import conv

Dtype = Any

DEFAULT_WIDTHS = (64, 128, 256, 512, 1024)


def conv_transpose(features: int, kernel: int, stride: int, padding: int, output_padding: int, *,
                   name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.ConvTranspose:
    """torch-style ``ConvTranspose2d(in, features, kernel, stride, padding, output_padding)``.

    torch's transposed conv is the gradient of a ``Conv2d``: output
    ``y[i*s - p + a] += x[i] * w[a]``, size ``(H-1)*s - 2p + k + op``. In lax
    terms that is: dilate the input by ``s``, pad by ``(k-1-p, k-1-p+op)``, and
    cross-correlate with the spatially flipped kernel with in/out channels
    swapped. ``transpose_kernel=True`` does the flip and the swap, so the Flax
    kernel is ``(k, k, features, in_features)``: torch's IOHW weight moved to
    ``(H, W, O, I)`` (see ``torch_conv_transpose_kernel``), without flipping.
    """
    lo = kernel - 1 - padding
    return nn.ConvTranspose(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((lo, lo + output_padding), (lo, lo + output_padding)),
        transpose_kernel=True,
        use_bias=True,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=-1, out_axis=-2),
        name=name,
    )


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

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(conv(self.middle, 3, 1, 1, name="conv_ReLU_0", **kw)(x))
        return nn.relu(conv(self.features, 3, 1, 1, name="conv_ReLU_2", **kw)(x))


def _max_pool2(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if len(self.widths) < 2:
            raise ValueError(f"UNet needs at least two widths (one pooling level), got widths={self.widths}")
        block = nn.remat(ConvBlock) if self.remat else ConvBlock
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
                conv(self.out_channels, 1, use_bias=True, name=None, **kw))

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
