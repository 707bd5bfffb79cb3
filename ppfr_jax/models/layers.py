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
from typing import Any

import flax.linen as nn
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


def batch_norm(train: bool, *, name: str, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, affine: bool = True) -> nn.BatchNorm:
    """torch-compatible BatchNorm (eps 1e-5, torch momentum 0.1 == flax 0.9)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv(features: int, kernel: int | tuple[int, int], stride: int = 1, padding: int = 0, *,
         name: str, groups: int = 1, use_bias: bool = False, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> nn.Conv:
    """torch-style ``Conv2d`` (explicit symmetric padding, no bias by default)."""
    k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    p = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return nn.Conv(
        features,
        k,
        strides=(stride, stride),
        padding=((p[0], p[0]), (p[1], p[1])),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


def flatten_nchw(x):
    """Flatten an NHWC map in torch's (C, H, W) order so Linear weights import as is."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


dense = functools.partial(nn.Dense, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
