"""PyTorch / TFace weights -> Flax variables.

``torch_to_flax(state_dict, variables, ...)`` maps a state_dict (``{key:
ndarray}``, PyTorch names and layouts, as read by ``ppfr_jax.torch_pickle``
without torch and without running pickled code) onto variables shaped like
``variables`` (arrays or ``jax.eval_shape`` structs) of one of our Linen
models: kernels OIHW -> HWIO and (out, in) -> (in, out), BatchNorm / PReLU
names renamed, module path ``body_0/res_layer_1`` <-> ``body.0.res_layer.1``.
Models whose names cannot follow the convention pass ``rename`` and
``transforms``. ``build_import_target(name)`` builds the model ``ppfr-import``
fills, from the backbone registry.

Errors: :class:`CheckpointMismatchError` (every missing, unused or
mis-shaped key, or two keys mapping to one name) and
:class:`UnknownModelError`. The full mapping table: README, Differences from the reference, Weight import.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from ppfr_jax import models
from ppfr_jax.errors import PpfrError

_SEQ_INDEX = re.compile(r"\.(\d+)(?=\.|$)")

_SUFFIX = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "alpha"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

# Buffers PyTorch keeps that have no Flax counterpart.
DEFAULT_IGNORE = (re.compile(r"(^|\.)num_batches_tracked$"),)


class CheckpointMismatchError(PpfrError, ValueError):
    """A state_dict does not fit the model: the message names every offending key."""


def canonical_module_path(torch_module_path: str) -> str:
    """``body.0.res_layer.1`` -> ``body_0.res_layer_1``."""
    return _SEQ_INDEX.sub(r"_\1", torch_module_path)


def _flatten(tree: Mapping, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _default_layout(collection: str, leaf: str, value: np.ndarray, want_shape) -> np.ndarray:
    if collection == "params" and leaf == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return value.T
    if value.shape != tuple(want_shape) and value.size == int(np.prod(want_shape)) and value.size == 1:
        return value.reshape(want_shape)
    return value


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping[str, Any],
    *,
    rename: Callable[[str], str] | Mapping[str, str] | None = None,
    transforms: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    ignore: tuple = (),
    strip_prefix: str | None = None,
    dtype=np.float32,
) -> dict:
    """Map a PyTorch state_dict onto Flax variables shaped like ``target``.

    Args:
      state_dict: ``{torch_key: array}`` in PyTorch layout.
      target: Flax variables (``{'params': ..., 'batch_stats': ...}``); arrays
        or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``): only shapes are used.
      rename: Flax module path (``/``-joined, e.g. ``'body_0/res_layer_1'``) ->
        PyTorch module path. A dict renames by longest matching prefix.
      transforms: ``{'params/a/b/kernel': fn}`` replaces the default layout
        change for that leaf (fn gets the PyTorch array).
      ignore: regexes (strings or compiled) of PyTorch keys that may be left over.
      strip_prefix: drop this prefix from every key first (e.g. ``'module.'``).

    Returns:
      Nested dict of numpy arrays with exactly ``target``'s structure.

    Raises:
      CheckpointMismatchError naming every missing, unused or mis-shaped key.
    """
    transforms = dict(transforms or {})
    ignore_res = list(DEFAULT_IGNORE) + [re.compile(p) if isinstance(p, str) else p for p in ignore]
    sd = {}
    for k, v in state_dict.items():
        if strip_prefix and k.startswith(strip_prefix):
            k = k[len(strip_prefix):]
        sd[k] = np.asarray(v)

    # canonical torch key -> real torch key
    canon: dict[str, str] = {}
    for k in sd:
        mod, _, leaf = k.rpartition(".")
        ck = canonical_module_path(mod) + "." + leaf if mod else leaf
        if ck in canon:
            raise CheckpointMismatchError(f"state_dict keys {canon[ck]!r} and {k!r} map to the same name")
        canon[ck] = k

    def torch_module(flax_mod: str) -> str:
        if rename is None:
            return flax_mod.replace("/", ".")
        if callable(rename):
            return rename(flax_mod)
        best = max((p for p in rename if flax_mod == p or flax_mod.startswith(p + "/")), key=len, default=None)
        if best is None:
            return flax_mod.replace("/", ".")
        rest = flax_mod[len(best):].lstrip("/")
        out = rename[best]
        return ".".join(x for x in (out, rest.replace("/", ".")) if x)

    out: dict = {}
    used: set[str] = set()
    missing, shape_errors = [], []
    for path, leaf_val in _flatten(target):
        collection, *mods, leaf = path
        flax_key = "/".join(path)
        suffix = _SUFFIX.get((collection, leaf), leaf)
        tmod = torch_module("/".join(mods))
        tkey_canon = canonical_module_path(tmod) + "." + suffix if tmod else suffix
        tkey = canon.get(tkey_canon)
        if tkey is None:
            missing.append(f"{flax_key} <- {tmod + '.' if tmod else ''}{suffix}")
            continue
        used.add(tkey)
        want = tuple(leaf_val.shape)
        arr = sd[tkey]
        if flax_key in transforms:
            arr = np.asarray(transforms[flax_key](arr))
        else:
            arr = _default_layout(collection, leaf, arr, want)
        if tuple(arr.shape) != want:
            shape_errors.append(
                f"{tkey}: checkpoint shape {tuple(sd[tkey].shape)} does not fit {flax_key} {want}")
            continue
        _set(out, path, arr.astype(dtype) if np.issubdtype(arr.dtype, np.floating) else arr)

    unused = [k for k in sd if k not in used and not any(r.search(k) for r in ignore_res)]
    problems = []
    if missing:
        problems.append("missing from the checkpoint (flax leaf <- expected torch key):\n  " + "\n  ".join(missing))
    if unused:
        problems.append("unexpected keys in the checkpoint:\n  " + "\n  ".join(unused))
    if shape_errors:
        problems.append("shape mismatch:\n  " + "\n  ".join(shape_errors))
    if problems:
        raise CheckpointMismatchError("state_dict does not match the model; " + "\n".join(problems))
    return out


# ----------------------------------------------------------------------------
# a named model of ``ppfr_jax.models.BACKBONES`` as an import target (``ppfr-import``)
# ----------------------------------------------------------------------------

class UnknownModelError(PpfrError, LookupError):
    """``--model`` names no entry of ``ppfr_jax.models.BACKBONES``, or its module/class is not available."""


def build_import_target(name: str, input_channels: int | None = None, model_kwargs: Mapping | None = None):
    """Resolve a registry entry: ``(model, module, abstract_variables, input_shape)``.

    ``abstract_variables`` are ``jax.ShapeDtypeStruct`` leaves from
    ``jax.eval_shape`` of ``model.init`` on an NHWC (1, H, W, C) input.
    """
    import dataclasses
    import importlib
    import inspect

    import jax
    import jax.numpy as jnp

    if name not in models.BACKBONES:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(models.BACKBONES))}")
    spec = models.BACKBONES[name]
    module = importlib.import_module(f"ppfr_jax.models.{spec.module}")
    factory = getattr(module, spec.factory)
    user_kwargs = dict(model_kwargs or {})
    c = spec.channels if input_channels is None else int(input_channels)
    model = factory(**{**spec.kwargs, **user_kwargs})
    fields = {f.name for f in dataclasses.fields(model)}
    updates = {f: c for f in spec.channel_fields if f in fields and f not in user_kwargs}
    if updates:
        model = model.clone(**updates)
    shape = (1, *spec.input_hw, c)
    call_params = inspect.signature(type(model).__call__).parameters
    extra = {"train": False} if "train" in call_params else {}
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), **extra))
    target = {k: v for k, v in dict(target).items() if k in ("params", "batch_stats")}
    return model, module, target, shape
