"""MobileFaceNet, plain (TFace) and as DuetFace's client backbone.

Mirrors TFace ``torchkit/backbone/model_mobilefacenet.py: MobileFaceNet``
with the GDC output (arXiv 1804.07573). ``MobileFaceNet``: NHWC (N, 112,
112, in_channels) -> (N, embedding_size), else ``ValueError``; ``head='gdc'``
(TFace ``common.GDC``) or ``'client'`` (DuetFace's ``ClientBackbone`` output
layer; with ``in_channels=30`` it is DuetFace's client). With
``return_features=True`` it also returns the maps DuetFace's server stages
consume: conv_23 (N,28,28,64), conv_34 (N,14,14,128), conv_45 (N,7,7,128),
conv_6_sep (N,7,7,512). ``MobileFaceNetTiny``: the same layout at toy widths.

Names follow the plain TFace model (``conv_3/model_0/conv_dw/bn``);
``import_torch_state_dict`` maps a TFace or DuetFace ``ClientBackbone``
state_dict (``CLIENT_TORCH_RENAME``), picking the table from the keys.
Architecture and naming: README, Differences from the reference, Backbones.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import PReLU, batch_norm, conv, dense, flatten_nchw

Dtype = Any

INPUT_SIZE = 112


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU (TFace ``Conv_block``); ``linear=True`` drops the PReLU (``LinearBlock``)."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(self.features, self.kernel, self.stride, self.padding, groups=self.groups, name="conv", **kw)(x)
        x = batch_norm(train, name="bn", **kw)(x)
        if not self.linear:
            x = PReLU(param_dtype=self.param_dtype, name="prelu")(x)
        return x


class DepthWise(nn.Module):
    """TFace ``Depth_Wise``: 1x1 expand to ``groups`` -> 3x3 depthwise (stride) -> 1x1 project [+ x].

    (N, H, W, C) -> (N, H/stride, W/stride, features).
    """

    features: int
    groups: int
    stride: int = 2
    residual: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = ConvBlock(self.groups, name="conv", **kw)(x, train)
        y = ConvBlock(self.groups, 3, self.stride, 1, groups=self.groups, name="conv_dw", **kw)(y, train)
        y = ConvBlock(self.features, linear=True, name="project", **kw)(y, train)
        return x + y if self.residual else y


class Residual(nn.Module):
    """TFace ``Residual``: ``num_block`` residual ``DepthWise`` units (stride 1), named ``model_i``."""

    num_block: int
    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.num_block):
            x = DepthWise(x.shape[-1], self.groups, 1, residual=True, name=f"model_{i}",
                          dtype=self.dtype, param_dtype=self.param_dtype)(x, train)
        return x


class OutputLayer(nn.Module):
    """GDC / DuetFace-client output layer: 7x7 depthwise LinearBlock -> flatten -> Linear -> BN1d."""

    embedding_size: int
    client: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ConvBlock(c, 7, groups=c, linear=True, name="conv_6_dw", **kw)(x, train)
        x = flatten_nchw(x)
        x = dense(self.embedding_size, use_bias=self.client, name="linear", **kw)(x)
        return batch_norm(train, name="bn", affine=self.client, **kw)(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet; NHWC (N, 112, 112, C) in, (N, embedding_size) out.

    Call: ``(x, train=False, *, return_features=False)``

    Args:
      x: (N, 112, 112, C); C must equal ``in_channels``.
      train: BatchNorm batch statistics (pass ``mutable=['batch_stats']``).
      return_features: also return the DuetFace client activations.

    Returns:
      embedding (N, embedding_size) in ``dtype``; with ``return_features``,
      ``(embedding, (f1, f3, f5, f7))``: the outputs of conv_23 (N,28,28,64),
      conv_34 (N,14,14,128), conv_45 (N,7,7,128), conv_6_sep (N,7,7,512) -
      the reference client's body_1/3/5/7, i.e. what DuetFace server stage
      0/1/2/3 consumes.
    """

    in_channels: int = 3
    embedding_size: int = 512
    head: str = "gdc"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_input(self, x):
        if self.head not in ("gdc", "client"):
            raise ValueError(f"MobileFaceNet head must be 'gdc' or 'client', got {self.head!r}")
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, self.in_channels):
            # The 7x7 "global" depthwise conv of the output layer needs the
            # final map to be exactly 7x7, i.e. 112x112 input.
            raise ValueError(
                f"MobileFaceNet expects NHWC input (N, {INPUT_SIZE}, {INPUT_SIZE}, {self.in_channels}) "
                f"(in_channels={self.in_channels}), got shape {x.shape}")

    @nn.compact
    def __call__(self, x, train: bool = False, *, return_features: bool = False):
        self._check_input(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = ConvBlock(64, 3, 2, 1, name="conv1", **kw)(x, train)
        x = ConvBlock(64, 3, 1, 1, groups=64, name="conv2_dw", **kw)(x, train)
        f1 = x = DepthWise(64, 128, name="conv_23", **kw)(x, train)
        x = Residual(4, 128, name="conv_3", **kw)(x, train)
        f3 = x = DepthWise(128, 256, name="conv_34", **kw)(x, train)
        x = Residual(6, 256, name="conv_4", **kw)(x, train)
        f5 = x = DepthWise(128, 512, name="conv_45", **kw)(x, train)
        x = Residual(2, 256, name="conv_5", **kw)(x, train)
        f7 = x = ConvBlock(512, name="conv_6_sep", **kw)(x, train)
        emb = OutputLayer(self.embedding_size, client=self.head == "client", name="output_layer", **kw)(x, train)
        return (emb, (f1, f3, f5, f7)) if return_features else emb


class MobileFaceNetTiny(nn.Module):
    """MobileFaceNet's layout at toy widths, for tests and CPU demos (DuetFace's demo client).

    stem 3x3 s2 -> conv_23 (s2, 28x28) -> conv_34 (s2, 14x14) -> conv_45 (s2,
    7x7) -> conv_6_sep (1x1) -> output layer. Same call and returns as
    :class:`MobileFaceNet` (``return_features`` gives the maps at 28, 14, 7, 7
    that DuetFace's server stages consume). ``head='client'`` (default, the
    DuetFace client's output layer) or ``'gdc'`` (a plain recogniser's).
    """

    in_channels: int = 3
    widths: Sequence[int] = (16, 24, 32, 64)
    embedding_size: int = 64
    head: str = "client"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, *, return_features: bool = False):
        if self.head not in ("gdc", "client"):
            raise ValueError(f"MobileFaceNetTiny head must be 'gdc' or 'client', got {self.head!r}")
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, self.in_channels):
            raise ValueError(f"MobileFaceNetTiny expects NHWC input (N, {INPUT_SIZE}, {INPUT_SIZE}, "
                             f"{self.in_channels}), got {x.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.widths
        x = ConvBlock(w[0], 3, 2, 1, name="conv1", **kw)(jnp.asarray(x, self.dtype), train)
        f1 = DepthWise(w[0], 2 * w[0], name="conv_23", **kw)(x, train)
        f3 = DepthWise(w[1], 2 * w[0], name="conv_34", **kw)(f1, train)
        f5 = DepthWise(w[2], 2 * w[1], name="conv_45", **kw)(f3, train)
        f7 = ConvBlock(w[3], name="conv_6_sep", **kw)(f5, train)
        emb = OutputLayer(self.embedding_size, client=self.head == "client", name="output_layer", **kw)(f7, train)
        return (emb, (f1, f3, f5, f7)) if return_features else emb


DuetFaceClient = functools.partial(MobileFaceNet, in_channels=30, head="client")

# Flax module path -> PyTorch module path of TFace's DuetFace ``ClientBackbone``
# (prefix ``client_backbone.``; ``DuetFaceModel`` adds ``client_model.``: pass
# ``strip_prefix='client_model.'``). Longest prefix wins in ``torch_to_flax``.
CLIENT_TORCH_RENAME = {
    "conv1/conv": "client_backbone.input_layer.0",
    "conv1/bn": "client_backbone.input_layer.1",
    "conv1/prelu": "client_backbone.input_layer.2",
    "conv2_dw": "client_backbone.body_0",
    "conv_23": "client_backbone.body_1",
    "conv_3": "client_backbone.body_2",
    "conv_34": "client_backbone.body_3",
    "conv_4": "client_backbone.body_4",
    "conv_45": "client_backbone.body_5",
    "conv_5": "client_backbone.body_6",
    "conv_6_sep": "client_backbone.body_7",
    "output_layer/conv_6_dw/conv": "client_backbone.output_layer.0",
    "output_layer/conv_6_dw/bn": "client_backbone.output_layer.1",
    "output_layer/linear": "client_backbone.output_layer.3",
    "output_layer/bn": "client_backbone.output_layer.4",
}


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], *,
                            strip_prefix: str | None = None) -> dict:
    """TFace MobileFaceNet or DuetFace ``ClientBackbone`` state_dict -> Flax variables.

    The naming scheme is detected from the keys: any ``client_backbone.`` key
    (after ``strip_prefix``) selects ``CLIENT_TORCH_RENAME``. The head must
    match ``variables`` (GDC has no Linear bias and an affine-free BN1d).

    Args:
      state_dict: ``{torch_key: array}`` (PyTorch layouts).
      variables: our ``MobileFaceNet`` variables (arrays or ``jax.eval_shape`` structs).
      strip_prefix: dropped from keys first (``'module.'``, ``'client_model.'``).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.
    """
    keys = [k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k for k in state_dict]
    client = any(k.startswith("client_backbone.") for k in keys)
    return torch_to_flax(state_dict, variables, rename=CLIENT_TORCH_RENAME if client else None,
                         strip_prefix=strip_prefix)


def init_variables(model: MobileFaceNet, batch: int = 1, rng: jax.Array | None = None):
    """Shapes-only init: ``jax.eval_shape`` of ``model.init`` on a (batch, 112, 112, in_channels) input."""
    rng = jax.random.key(0) if rng is None else rng
    x = jax.ShapeDtypeStruct((batch, INPUT_SIZE, INPUT_SIZE, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, rng, x)
