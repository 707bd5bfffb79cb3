"""IResNet ("IR" / "IR-SE") face-recognition backbones.

Mirrors TFace ``torchkit/backbone/model_irse.py: Backbone`` (ArcFace paper
arXiv 1801.07698). ``IResNet``: NHWC (N, input_size, input_size, C) ->
(N, embedding_size); another size raises ``ValueError`` (default 112; the
output Linear's width follows from it). Names follow the PyTorch attribute
paths, so a TFace state_dict maps with ``checkpoint_import.torch_to_flax``
(``TORCH_RENAME`` for the SE block). Architecture and naming: README,
Differences from the reference, Backbones.

Reuse by DuetFace's server: ``stage_hook`` runs inside the last unit of each
stage (after the residual sum), so the modules it creates are that unit's
submodules (``body_{i}/embedding_layer`` <-> torch ``body.{i}.embedding_layer``)::

    def hook(stage, unit_index, x):   # x: (N, H, W, C), the stage's output
        return InteractiveBlock(name="embedding_layer")(x, client[stage], roi)
    emb = IResNet(...)(x, train, stage_hook=hook)

``return_stages=True`` also returns the four stage outputs (after the hook).
``unit_plan`` and the unit classes are public for code that builds its own loop.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.models.layers import PReLU, batch_norm, conv, dense, flatten_nchw

Dtype = Any

BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)

# Units per stage, as in the reference ``get_blocks``.
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}


class SEModule(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(relu(fc1(avgpool(x))))), 1x1 convs without bias."""

    reduction: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(conv(c // self.reduction, 1, name="fc1", **kw)(s))
        s = nn.sigmoid(conv(c, 1, name="fc2", **kw)(s))
        return x * s


def _shortcut(x, features: int, stride: int, train: bool, kw: dict):
    if x.shape[-1] == features:
        # torch MaxPool2d(1, stride): a 1x1 window, i.e. plain subsampling.
        return x[:, ::stride, ::stride, :]
    y = conv(features, 1, stride, name="shortcut_layer_0", **kw)(x)
    return batch_norm(train, name="shortcut_layer_1", **kw)(y)


class BasicBlockIR(nn.Module):
    """IR unit: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN [-> SE], plus shortcut.

    (N, H, W, C_in) -> (N, H/stride, W/stride, features).
    """

    features: int
    stride: int
    use_se: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, post: Callable[[jax.Array], jax.Array] | None = None):
        """``post``: optional fn applied to the unit's output inside this module's scope."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = _shortcut(x, self.features, self.stride, train, kw)
        y = batch_norm(train, name="res_layer_0", **kw)(x)
        y = conv(self.features, 3, 1, 1, name="res_layer_1", **kw)(y)
        y = batch_norm(train, name="res_layer_2", **kw)(y)
        y = PReLU(param_dtype=self.param_dtype, name="res_layer_3")(y)
        y = conv(self.features, 3, self.stride, 1, name="res_layer_4", **kw)(y)
        y = batch_norm(train, name="res_layer_5", **kw)(y)
        if self.use_se:
            y = SEModule(name="res_layer_se_block", **kw)(y)
        y = y + shortcut
        return y if post is None else post(y)


class BottleneckIR(nn.Module):
    """IR bottleneck: BN -> 1x1 -> BN -> PReLU -> 3x3 -> BN -> PReLU -> 1x1 (stride) -> BN [-> SE].

    The reduction width is ``features // 4``; the stride sits on the last 1x1
    conv as in the reference. (N, H, W, C_in) -> (N, H/stride, W/stride, features).
    """

    features: int
    stride: int
    use_se: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, post: Callable[[jax.Array], jax.Array] | None = None):
        """``post``: optional fn applied to the unit's output inside this module's scope."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mid = self.features // 4
        shortcut = _shortcut(x, self.features, self.stride, train, kw)
        y = batch_norm(train, name="res_layer_0", **kw)(x)
        y = conv(mid, 1, name="res_layer_1", **kw)(y)
        y = batch_norm(train, name="res_layer_2", **kw)(y)
        y = PReLU(param_dtype=self.param_dtype, name="res_layer_3")(y)
        y = conv(mid, 3, 1, 1, name="res_layer_4", **kw)(y)
        y = batch_norm(train, name="res_layer_5", **kw)(y)
        y = PReLU(param_dtype=self.param_dtype, name="res_layer_6")(y)
        y = conv(self.features, 1, self.stride, name="res_layer_7", **kw)(y)
        y = batch_norm(train, name="res_layer_8", **kw)(y)
        if self.use_se:
            y = SEModule(name="res_layer_se_block", **kw)(y)
        y = y + shortcut
        return y if post is None else post(y)


class Unit(NamedTuple):
    """One body unit: its index in ``body``, stage, width, stride, and whether it ends the stage."""

    index: int
    stage: int
    features: int
    stride: int
    last_in_stage: bool


def unit_plan(stage_sizes: Sequence[int], widths: Sequence[int]) -> list[Unit]:
    """The flat ``body`` list of the reference: stride 2 on the first unit of each stage."""
    if len(stage_sizes) != len(widths):
        raise ValueError(f"stage_sizes {tuple(stage_sizes)} and widths {tuple(widths)} differ in length")
    units, i = [], 0
    for s, (n, w) in enumerate(zip(stage_sizes, widths)):
        if n < 1:
            raise ValueError(f"stage {s} has {n} units; every stage needs at least one")
        for j in range(n):
            units.append(Unit(i, s, w, 2 if j == 0 else 1, j == n - 1))
            i += 1
    return units


StageHook = Callable[[int, int, jax.Array], jax.Array]


class IResNet(nn.Module):
    """IR / IR-SE backbone (TFace ``Backbone``); NHWC in, (N, embedding_size) out.

    Call: ``(x, train=False, *, stage_hook=None, return_stages=False)``

    Args:
      x: (N, input_size, input_size, C) NHWC; C must equal ``in_channels`` if set.
      train: batch statistics for BatchNorm (update ``batch_stats``: pass
        ``mutable=['batch_stats']``) and Dropout on (needs a ``'dropout'`` rng).
      stage_hook: optional ``fn(stage, unit_index, x) -> x`` applied to the
        output of the last unit of each stage, inside that unit's scope (see
        the module docstring).
      return_stages: also return the four stage outputs.

    Returns:
      embedding (N, embedding_size) in ``dtype``, or ``(embedding, stages)``
      with ``stages`` a tuple of NHWC maps (56, 28, 14, 7 for 112 input).
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int] = BASIC_WIDTHS
    bottleneck: bool = False
    use_se: bool = False
    stem_width: int = 64
    input_stride: int = 1
    input_size: int = 112
    in_channels: int | None = None
    embedding_size: int = 512
    dropout: float = 0.4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_input(self, x):
        n_down = self.input_stride * 2 ** len(self.stage_sizes)
        if self.input_size % n_down:
            raise ValueError(f"input_size {self.input_size} is not divisible by the total stride {n_down}")
        if x.ndim != 4 or x.shape[1:3] != (self.input_size, self.input_size):
            # The output Linear's width is fixed by the final map size; any
            # other input size would need a different Linear (or silently fail).
            raise ValueError(
                f"IResNet expects NHWC input (N, {self.input_size}, {self.input_size}, C) "
                f"(input_size={self.input_size}, input_stride={self.input_stride}), got shape {x.shape}")
        c = x.shape[-1]
        if self.in_channels is not None and c != self.in_channels:
            raise ValueError(f"IResNet built for {self.in_channels} input channels, got {c} (input shape {x.shape})")
        if self.has_variable("params", "input_layer_0"):
            want = self.variables["params"]["input_layer_0"]["kernel"].shape[2]
            if c != want:
                raise ValueError(f"IResNet parameters expect {want} input channels, got {c} (input shape {x.shape})")

    @nn.compact
    def __call__(self, x, train: bool = False, *, stage_hook: StageHook | None = None,
                 return_stages: bool = False):
        self._check_input(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv(self.stem_width, 3, self.input_stride, 1, name="input_layer_0", **kw)(x)
        x = batch_norm(train, name="input_layer_1", **kw)(x)
        x = PReLU(param_dtype=self.param_dtype, name="input_layer_2")(x)

        block = BottleneckIR if self.bottleneck else BasicBlockIR
        stages = []
        for u in unit_plan(self.stage_sizes, self.widths):
            post = None
            if u.last_in_stage and stage_hook is not None:
                post = functools.partial(stage_hook, u.stage, u.index)
            x = block(u.features, u.stride, self.use_se, name=f"body_{u.index}", **kw)(x, train, post)
            if u.last_in_stage:
                stages.append(x)

        x = batch_norm(train, name="output_layer_0", **kw)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = flatten_nchw(x)
        x = dense(self.embedding_size, name="output_layer_3", **kw)(x)
        x = batch_norm(train, name="output_layer_4", affine=False, **kw)(x)
        return (x, tuple(stages)) if return_stages else x


def _variant(num_layers: int, mode: str = "ir", **kw):
    bottleneck = num_layers > 100  # the reference's rule, not ResNet's usual 50
    return functools.partial(
        IResNet,
        stage_sizes=STAGE_SIZES[num_layers],
        widths=BOTTLENECK_WIDTHS if bottleneck else BASIC_WIDTHS,
        bottleneck=bottleneck,
        use_se=mode == "ir_se",
        **kw,
    )


IR18 = _variant(18)
IR34 = _variant(34)
IR50 = _variant(50)
IR100 = _variant(100)
IR152 = _variant(152)
IR200 = _variant(200)
IRSE50 = _variant(50, "ir_se")
IRSE100 = _variant(100, "ir_se")
IRSE152 = _variant(152, "ir_se")
IRSE200 = _variant(200, "ir_se")
# Same structure as IR-18 minus one unit per stage, at toy widths: for tests.
IR_TINY = functools.partial(IResNet, stage_sizes=(1, 1, 1, 1), widths=(8, 16, 16, 32), stem_width=8,
                            embedding_size=32)

def TORCH_RENAME(flax_module_path: str) -> str:  # noqa: N802 - a table-like constant for torch_to_flax
    """Flax module path -> PyTorch module path (only the SE block differs from the convention)."""
    return flax_module_path.replace("/", ".").replace("res_layer_se_block", "res_layer.se_block")


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], *,
                            strip_prefix: str | None = None, ignore: tuple = ()) -> dict:
    """TFace ``Backbone`` (IR / IR-SE) state_dict -> Flax variables shaped like ``variables``.

    Args:
      state_dict: ``{torch_key: array}`` (PyTorch layouts).
      variables: our ``IResNet`` variables (arrays or ``jax.eval_shape`` structs).
      strip_prefix: e.g. ``'module.'`` for a DataParallel checkpoint, or
        ``'server_model.'`` for the server of a DuetFace checkpoint.
      ignore: regexes of keys that may be left unused (e.g. ``r'^client_model\.'``).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.
    """
    return torch_to_flax(state_dict, variables, rename=TORCH_RENAME, strip_prefix=strip_prefix, ignore=ignore)


def init_variables(model: IResNet, in_channels: int = 3, batch: int = 1, rng: jax.Array | None = None):
    """Shapes-only init: ``jax.eval_shape`` of ``model.init`` on a (batch, size, size, in_channels) input."""
    rng = jax.random.key(0) if rng is None else rng
    if model.in_channels is not None:
        in_channels = model.in_channels
    x = jax.ShapeDtypeStruct((batch, model.input_size, model.input_size, in_channels), jnp.float32)
    return jax.eval_shape(model.init, rng, x)
