"""PFLD facial landmark detector (98 landmarks), as used by DuetFace for the ROI.

Mirrors TFace ``tasks/duetface/pfld_model.py: PFLDInference`` (a MobileNet-v2
style network, PFLD paper arXiv 1902.10859): stem convs, inverted residual
blocks, and a multi-scale head that concatenates the global averages of the
14x14 and 7x7 maps with a 7x7 "valid" conv to 1x1 before one Linear layer.

Submodules are named after the PyTorch attribute paths (``conv3_1/conv_0``
for ``conv3_1.conv.0``, ``conv7_0`` for ``conv7.0``), so weight import is
``ppfr_jax.checkpoint_import.torch_to_flax`` with no renaming. The reference
defines ``bn8`` but its forward never uses it; we do not create it and the
importer ignores it.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import batch_norm, conv, dense

Dtype = Any

NUM_LANDMARKS = 98
INPUT_SIZE = 112


class InvertedResidual(nn.Module):
    """MobileNet-v2 block: 1x1 expand -> 3x3 depthwise -> 1x1 project (linear).

    Sequential ``conv`` of the reference: indices 0/3/6 are convs, 1/4/7 BNs,
    2/5 ReLUs.
    """

    features: int
    stride: int
    use_res_connect: bool
    expand_ratio: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] * self.expand_ratio
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = conv(hidden, 1, name="conv_0", **kw)(x)
        y = nn.relu(batch_norm(train, name="conv_1", **kw)(y))
        y = conv(hidden, 3, self.stride, 1, groups=hidden, name="conv_3", **kw)(y)
        y = nn.relu(batch_norm(train, name="conv_4", **kw)(y))
        y = conv(self.features, 1, name="conv_6", **kw)(y)
        y = batch_norm(train, name="conv_7", **kw)(y)
        return x + y if self.use_res_connect else y


# (name, features, stride, use_res_connect, expand_ratio), in forward order.
_BLOCKS = (
    ("conv3_1", 64, 2, False, 2),
    ("block3_2", 64, 1, True, 2),
    ("block3_3", 64, 1, True, 2),
    ("block3_4", 64, 1, True, 2),
    ("block3_5", 64, 1, True, 2),  # its output is the returned feature map
    ("conv4_1", 128, 2, False, 2),
    ("conv5_1", 128, 1, False, 4),
    ("block5_2", 128, 1, True, 4),
    ("block5_3", 128, 1, True, 4),
    ("block5_4", 128, 1, True, 4),
    ("block5_5", 128, 1, True, 4),
    ("block5_6", 128, 1, True, 4),
    ("conv6_1", 16, 1, False, 2),
)


class PFLDInference(nn.Module):
    """PFLD backbone + landmark regressor.

    Call: ``(x, train=False) -> (features, landmarks)``

    Args:
      x: (N, 112, 112, 3) RGB in [0, 1], NHWC.

    Returns:
      features: (N, 28, 28, 64), the ``block3_5`` output (the reference's
        ``out1``, which PFLD's auxiliary pose net consumes).
      landmarks: (N, 196), 98 (x, y) pairs normalised to the image size
        (multiply by 112 for pixel coordinates).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            # The head's pooling windows (14, 7) and the 7x7 valid conv assume
            # exactly 112x112 input; anything else silently changes the head.
            raise ValueError(f"PFLDInference expects NHWC input (N, 112, 112, 3), got {x.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(batch_norm(train, name="bn1", **kw)(conv(64, 3, 2, 1, name="conv1", **kw)(x)))
        x = nn.relu(batch_norm(train, name="bn2", **kw)(conv(64, 3, 1, 1, name="conv2", **kw)(x)))
        features = None
        for name, feats, stride, res, expand in _BLOCKS:
            x = InvertedResidual(feats, stride, res, expand, name=name, **kw)(x, train)
            if name == "block3_5":
                features = x
        # x: (N, 14, 14, 16)
        s1 = jnp.mean(x, axis=(1, 2))
        x = conv(32, 3, 2, 1, name="conv7_0", **kw)(x)
        x = nn.relu(batch_norm(train, name="conv7_1", **kw)(x))
        s2 = jnp.mean(x, axis=(1, 2))
        x = nn.relu(conv(128, 7, 1, 0, use_bias=True, name="conv8", **kw)(x))
        s3 = x.reshape(x.shape[0], -1)
        multi_scale = jnp.concatenate([s1, s2, s3], axis=-1)  # (N, 16 + 32 + 128)
        landmarks = dense(2 * NUM_LANDMARKS, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="fc")(multi_scale)
        return features, landmarks


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], *,
                            strip_prefix: str | None = None) -> dict:
    """PFLDInference PyTorch state_dict -> Flax variables shaped like ``variables``.

    ``bn8`` (defined but unused by the reference forward) is ignored.
    ``variables`` may be real arrays or ``jax.eval_shape`` structs.
    """
    return torch_to_flax(state_dict, variables, ignore=(r"^bn8\.",), strip_prefix=strip_prefix)


def init_variables(model: PFLDInference, rng: jax.Array | None = None, batch: int = 1):
    """Shapes-only init helper: ``jax.eval_shape`` of ``model.init`` on a (batch,112,112,3) input."""
    rng = jax.random.key(0) if rng is None else rng
    return jax.eval_shape(model.init, rng, jnp.zeros((batch, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
