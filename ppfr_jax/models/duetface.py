"""DuetFace's Linen modules (ACM MM 2022, arXiv 2207.07340): client backbone + server IR net + interactive blocks.

The face is split in the block-DCT domain (``ppfr_jax.frequency``): the
client network (``MobileFaceNet`` / ``MobileFaceNetTiny`` with the client head) reads the 30 low-frequency
channels, the server IR net the other 162, and after each of the server's 4
stages an interactive block (TFace ``duetface_model.py: InteractiveBlock``)
multiplies the server map by a mask computed from the client's map:

- ``AttentionMask`` (client side): client map -> bilinear resize
  (align_corners=False) -> 1x1 "interface" conv -> channel mean -> per-sample
  min-max -> x facial ROI (resized, align_corners=True) -> min-max: M (N, h, w, 1)
  in [0, 1]; a constant map (empty ROI) gives 0, not the reference's 0/0 NaN;
- ``MaskOverlay`` (server side): ``sigmoid(F) + w * sigmoid(F) * M``, w init 0.

Unlike the reference (which redraws its interface conv in every forward), the
interface conv is an ordinary trained parameter ``attention_<s>``. Parameter
names follow the reference's ``DuetFaceModel`` state_dict via ``torch_rename``.
Training, frozen-client loading, ROI and the client/server contract:
``ppfr_jax.methods.duetface``.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import frequency, models
from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models import iresnet, layers, mobilefacenet

Dtype = Any

NUM_STAGES = 4
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """1-D bilinear resampling matrix (n_out, n_in) with torch's conventions (float64).

    ``align_corners=False`` is ``nn.Upsample(size=n_out, mode='bilinear')``
    (half-pixel centres, source index clamped at 0); ``align_corners=True``
    maps the corner pixels onto each other (``interpolate(...,
    align_corners=True)``; torch ignores ``scale_factor`` for the weights then).
    """
    if n_in == n_out:
        return np.eye(n_out)
    return frequency.bilinear_matrix(n_in, n_out, align_corners)


def resize_bilinear(x: jax.Array, size: int, align_corners: bool) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C), bilinear with torch's corner convention."""
    mh = jnp.asarray(resize_matrix(x.shape[1], size, align_corners), x.dtype)
    mw = jnp.asarray(resize_matrix(x.shape[2], size, align_corners), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", mh, x, mw, precision=_HIGHEST)


def minmax_normalize(m: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-sample (m - min) / (max - min) over all but the batch axis; a constant map gives 0."""
    axes = tuple(range(1, m.ndim))
    lo = jnp.min(m, axis=axes, keepdims=True)
    hi = jnp.max(m, axis=axes, keepdims=True)
    return (m - lo) / jnp.maximum(hi - lo, eps)


# ----------------------------------------------------------------------------- interactive block


class AttentionMask(nn.Module):
    """Client half of an interactive block: client feature map (+ ROI) -> mask M.

    Params: ``kernel`` (1, 1, C_client, features) and ``bias`` (features,), the
    reference's interface ``Conv2d(C_client, features, 1)``.

    Call: ``(feature, roi=None)``; feature (N, h', w', C_client) NHWC, roi
    (N, 112, 112) in {0, 1} or None (the reference's "deprecated" 2-input path).
    Returns M (N, size, size, 1) float32 in [0, 1].
    """

    features: int  # server channels at this stage (the interface conv's outputs)
    size: int  # server map size at this stage

    @nn.compact
    def __call__(self, feature, roi_mask=None):
        c = feature.shape[-1]
        init, _ = layers.torch_default_init(c)  # torch Conv2d's default: U(-1/sqrt(c), 1/sqrt(c))
        kernel = self.param("kernel", lambda k, s: init(k, s), (1, 1, c, self.features))
        bias = self.param("bias", lambda k, s: init(k, s), (self.features,))
        x = jnp.asarray(feature, jnp.float32)
        # mean_c(conv(x)) == conv with the mean kernel; resize commutes with it (rows sum to 1)
        m = jnp.einsum("nhwc,c->nhw", x, jnp.mean(kernel[0, 0], axis=-1), precision=_HIGHEST) + jnp.mean(bias)
        m = resize_bilinear(m[..., None], self.size, align_corners=False)
        m = minmax_normalize(m)
        if roi_mask is not None:
            if roi_mask.ndim == 4:
                roi_mask = roi_mask[..., 0]
            r = resize_bilinear(jnp.asarray(roi_mask, jnp.float32)[..., None], self.size, align_corners=True)
            m = minmax_normalize(m * r)
        return m


class MaskOverlay(nn.Module):
    """Server half of an interactive block: ``sigmoid(F) + w * sigmoid(F) * M``; param ``weight`` (w, init 0)."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        w = self.param("weight", nn.initializers.zeros, (), self.param_dtype)
        s = nn.sigmoid(x)
        return s + jnp.asarray(w, x.dtype) * s * jnp.asarray(mask, x.dtype)


class InteractiveBlock(nn.Module):
    """The whole block (both halves), as the reference's ``InteractiveBlock``: (F, client map[, ROI]) -> F'.

    F (N, h, w, C) NHWC; the mask is computed at F's size and width.
    """

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, feature, roi_mask=None):
        m = AttentionMask(x.shape[-1], x.shape[1], name="interface")(feature, roi_mask)
        return MaskOverlay(self.param_dtype, name="overlay")(x, m)


# ----------------------------------------------------------------------------- models


CLIENTS = models.CLIENT_BACKBONES


def build_client(name: str, in_channels: int = 30, embedding_size: int = 512, dtype=jnp.float32) -> nn.Module:
    """The client backbone ``name`` (``models.CLIENT_BACKBONES``: ``'mobilefacenet'``, the paper's, or
    ``'mobilefacenet_tiny'``) with DuetFace's client output layer. Raises ValueError for another name."""
    if name not in models.CLIENT_BACKBONES:
        raise ValueError(f"config.duetface.client_backbone: unknown client {name!r}; choose one of "
                         f"{models.CLIENT_BACKBONES}")
    return models.get_model(name, in_channels=in_channels, embedding_size=embedding_size, head="client", dtype=dtype)


class DuetFaceModel(nn.Module):
    """Client backbone + server IResNet with an interactive block after each stage.

    Fields: ``server_model`` (an ``IResNet`` with ``in_channels`` = server
    channels) and ``client_model`` (``MobileFaceNet`` / ``MobileFaceNetTiny`` with the client head).
    Variables: ``client_model/...``, ``server_model/...`` (incl.
    ``body_<i>/embedding_layer/weight``) and ``attention_<s>/{kernel,bias}``.

    Methods (``model.apply(variables, ..., method=...)``):

    - ``__call__(x_server, x_client, roi=None, train=False)`` -> (N, E) embedding;
    - ``client_side(x_client, roi=None)`` -> tuple of 4 masks (N, h_s, w_s, 1)
      (needs ``client_model`` and ``attention_*`` variables only);
    - ``server_side(x_server, masks, train=False, return_stages=False)`` ->
      embedding (needs ``server_model`` only).

    Inputs NHWC: x_server (N, 112, 112, 162), x_client (N, 112, 112, 30), roi
    (N, 112, 112). The client always runs in inference mode (frozen).
    """

    server_model: nn.Module
    client_model: nn.Module

    def setup(self):
        s = self.server_model
        n_down = s.input_stride
        sizes = [s.input_size // (n_down * 2 ** (k + 1)) for k in range(NUM_STAGES)]
        if len(s.widths) != NUM_STAGES:
            raise ValueError(f"DuetFace's server needs {NUM_STAGES} stages, got widths {tuple(s.widths)}")
        self.attention = [AttentionMask(w, sz) for w, sz in zip(s.widths, sizes)]

    def client_side(self, x_client, roi_mask=None):
        _, feats = self.client_model(x_client, train=False, return_features=True)
        feats = jax.lax.stop_gradient(feats)
        return tuple(att(f, roi_mask) for att, f in zip(self.attention, feats))

    def server_side(self, x_server, masks, train: bool = False, return_stages: bool = False):
        pd = self.server_model.param_dtype

        def hook(stage, unit_index, x):
            # runs inside the stage's last unit: server_model/body_<i>/embedding_layer, as torch's
            return MaskOverlay(pd, name="embedding_layer")(x, masks[stage])

        return self.server_model(x_server, train, stage_hook=hook, return_stages=return_stages)

    def __call__(self, x_server, x_client, roi_mask=None, train: bool = False):
        return self.server_side(x_server, self.client_side(x_client, roi_mask), train)


def build_model(server: nn.Module, client_backbone: str = "mobilefacenet", *, client_embedding_size: int = 512,
                sub_channels=frequency.SUB_CHS, dtype=jnp.float32) -> DuetFaceModel:
    """DuetFace around a built IR ``server`` (its ``in_channels`` is set to the server channels' count).

    Raises:
      ValueError: ``server`` is not an ``iresnet.IResNet``, or an unknown ``client_backbone``.
    """
    n_client = 3 * len(sub_channels)
    if not isinstance(server, iresnet.IResNet):
        raise ValueError(f"config.model.backbone: DuetFace's server must be an IR network, got "
                         f"{type(server).__name__}")
    server = server.clone(in_channels=frequency.NUM_CHANNELS - n_client)
    client = build_client(client_backbone, n_client, client_embedding_size, dtype)
    return DuetFaceModel(server_model=server, client_model=client)


def torch_rename(model: DuetFaceModel) -> dict[str, str]:
    """Flax module path prefix -> PyTorch module path of the reference ``DuetFaceModel`` (for ``torch_to_flax``)."""
    table = {f"client_model/{k}": f"client_model.{v}" for k, v in mobilefacenet.CLIENT_TORCH_RENAME.items()}
    s = model.server_model
    last = [u.index for u in iresnet.unit_plan(s.stage_sizes, s.widths) if u.last_in_stage]
    for stage, i in enumerate(last):
        table[f"attention_{stage}"] = f"server_model.body.{i}.embedding_layer.interface.1"
    return table


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], model: DuetFaceModel,
                            *, strip_prefix: str | None = None) -> dict:
    """Reference ``DuetFaceModel`` state_dict -> our variables.

    The state_dict must contain the interface convs
    (``server_model.body.<i>.embedding_layer.interface.1.{weight,bias}``),
    which the reference only adds during its first forward pass.
    """
    return torch_to_flax(state_dict, variables, rename=torch_rename(model), strip_prefix=strip_prefix)
