"""MobileFaceNet trained on CASIA-WebFace (Xiaoccer/MobileFaceNet_Pytorch): the "attacker" recogniser.

An off-the-shelf, independently trained face recogniser used by the privacy
evaluation (how well do recovered faces verify?), architecture of
``Xiaoccer/MobileFaceNet_Pytorch:core/model.py`` (``MobileFacenet``).
``CasiaMobileFaceNet``: NHWC (N, 112, 96, 3) RGB normalised ``(x - 127.5) /
128`` (``preprocess``) -> (N, 128) embeddings, not normalised; another shape
raises ``ValueError``. ``embed_with_flip`` gives the reference evaluation's
(N, 256) feature (image and horizontal flip concatenated, compared by cosine).
``load_casia_mobilefacenet(path)`` reads the weights without torch
(``shared/data/models/mobilefacenet_casia_xiaoccer/068.ckpt``, legacy torch
format). Architecture and naming: README, Differences from the reference,
Backbones.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import PReLU, batch_norm, conv

Dtype = Any

INPUT_HW = (112, 96)
EMBEDDING_SIZE = 128
# (expansion t, channels c, repeats n, first stride s)
BOTTLENECK_SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBlock(nn.Module):
    """Conv (optionally depthwise) -> BN -> PReLU (omitted when ``linear``)."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int = 0
    depthwise: bool = False
    linear: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = x.shape[-1] if self.depthwise else 1
        x = conv(self.features, self.kernel, self.stride, self.padding, groups=groups, name="conv", **kw)(x)
        x = batch_norm(train, name="bn", **kw)(x)
        if self.linear:
            return x
        return PReLU(param_dtype=self.param_dtype, name="prelu")(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 linear project.

    The PyTorch ``conv`` Sequential: 0/3/6 convs, 1/4/7 BNs, 2/5 PReLUs.
    The residual is added only when stride 1 and channels are unchanged.
    """

    features: int
    stride: int
    expansion: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inp = x.shape[-1]
        hidden = inp * self.expansion
        y = conv(hidden, 1, name="conv_0", **kw)(x)
        y = batch_norm(train, name="conv_1", **kw)(y)
        y = PReLU(param_dtype=self.param_dtype, name="conv_2")(y)
        y = conv(hidden, 3, self.stride, 1, groups=hidden, name="conv_3", **kw)(y)
        y = batch_norm(train, name="conv_4", **kw)(y)
        y = PReLU(param_dtype=self.param_dtype, name="conv_5")(y)
        y = conv(self.features, 1, name="conv_6", **kw)(y)
        y = batch_norm(train, name="conv_7", **kw)(y)
        if self.stride == 1 and inp == self.features:
            return x + y
        return y


class CasiaMobileFaceNet(nn.Module):
    """Xiaoccer's MobileFaceNet.

    Call: ``(x, train=False) -> (N, 128)`` embeddings (not L2-normalised).

    Args:
      x: (N, 112, 96, 3) NHWC RGB, already normalised ``(pixel - 127.5) / 128``
        (see ``preprocess``).
    """

    bottleneck_setting: Sequence[Sequence[int]] = BOTTLENECK_SETTING
    embedding_size: int = EMBEDDING_SIZE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[1:] != (*INPUT_HW, 3):
            # linear7's (7, 6) valid kernel only reduces a 112x96 input to 1x1.
            raise ValueError(f"CasiaMobileFaceNet expects NHWC (N, 112, 96, 3), got {x.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = ConvBlock(64, 3, 2, 1, name="conv1", **kw)(x, train)
        x = ConvBlock(64, 3, 1, 1, depthwise=True, name="dw_conv1", **kw)(x, train)
        i = 0
        for t, c, n, s in self.bottleneck_setting:
            for j in range(n):
                x = Bottleneck(c, s if j == 0 else 1, t, name=f"blocks_{i}", **kw)(x, train)
                i += 1
        x = ConvBlock(512, 1, name="conv2", **kw)(x, train)
        x = ConvBlock(512, (7, 6), depthwise=True, linear=True, name="linear7", **kw)(x, train)
        x = ConvBlock(self.embedding_size, 1, linear=True, name="linear1", **kw)(x, train)
        return x.reshape(x.shape[0], -1)


def preprocess(images_uint8) -> jnp.ndarray:
    """(N, 112, 96, 3) RGB pixels in [0, 255] -> the model's input ``(x - 127.5) / 128``."""
    return (jnp.asarray(images_uint8, jnp.float32) - 127.5) / 128.0


def embed_with_flip(model: CasiaMobileFaceNet, variables, x) -> jnp.ndarray:
    """The reference evaluation feature: ``concat(f(x), f(flip_w(x)))``, (N, 256)."""
    both = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)
    emb = model.apply(variables, both, train=False)
    n = x.shape[0]
    return jnp.concatenate([emb[:n], emb[n:]], axis=-1)


def init_variables(model: CasiaMobileFaceNet | None = None, batch: int = 1):
    """Variable shapes (``jax.eval_shape``) for a (batch, 112, 96, 3) input."""
    model = CasiaMobileFaceNet() if model is None else model
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, *INPUT_HW, 3), jnp.float32))


def import_torch_state_dict(state_dict, variables, *, strip_prefix: str | None = None) -> dict:
    """Xiaoccer ``MobileFacenet`` state_dict -> Flax variables shaped like ``variables``."""
    return torch_to_flax(state_dict, variables, strip_prefix=strip_prefix)


def load_casia_mobilefacenet(path: str | os.PathLike, *, dtype: Dtype = jnp.float32):
    """Read ``068.ckpt`` (or any checkpoint of this architecture) without torch.

    Returns:
      ``(model, variables)``: a ``CasiaMobileFaceNet`` and its
      ``{'params', 'batch_stats'}`` as jax arrays; ``model.apply(variables, x)``.
    """
    from ppfr_jax.torch_pickle import load_state_dict

    model = CasiaMobileFaceNet(dtype=dtype)
    sd = load_state_dict(path)
    variables = import_torch_state_dict(sd, init_variables(model))
    return model, jax.tree.map(jnp.asarray, variables)


__all__ = ["CasiaMobileFaceNet", "ConvBlock", "Bottleneck", "preprocess", "embed_with_flip",
           "init_variables", "import_torch_state_dict", "load_casia_mobilefacenet", "INPUT_HW"]
