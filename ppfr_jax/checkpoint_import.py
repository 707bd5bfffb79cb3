"""PyTorch / TFace weights -> Flax variables.

Reading a ``.pth`` never imports torch and never runs pickled code: see
``ppfr_jax.torch_pickle``. This module maps a state_dict (``{key: ndarray}``,
PyTorch names and layouts) onto the variables of one of our Linen models.

The mapping is a table, not per-model code, because every model names its
submodules after the PyTorch attribute path (``models/layers.py``). For each
leaf of the Flax variables we derive the PyTorch key:

==============================  ==================  =========================
Flax leaf                        PyTorch suffix      layout change
==============================  ==================  =========================
``params/.../kernel`` (4-D)      ``weight``          OIHW -> HWIO
``params/.../kernel`` (2-D)      ``weight``          (out, in) -> (in, out)
``params/.../bias``              ``bias``            -
``params/.../scale``             ``weight``          - (BatchNorm)
``params/.../alpha``             ``weight``          - (PReLU)
``batch_stats/.../mean``         ``running_mean``    -
``batch_stats/.../var``          ``running_var``     -
anything else                    same name           -
==============================  ==================  =========================

and the module path: Flax ``body_0/res_layer_1`` matches PyTorch
``body.0.res_layer.1`` (Sequential indices ``.N`` are compared as ``_N``).
Models whose names cannot follow the convention pass ``rename`` (a callable or
a dict of Flax-path prefixes to PyTorch prefixes) and, for the odd tensor,
``transforms``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

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
# ``ppfr-import`` CLI: PyTorch checkpoint -> Orbax checkpoint of Flax variables.
# ----------------------------------------------------------------------------

class ImportSpec:
    """How ``ppfr-import`` builds one model: where it lives and its input.

    Attributes:
      module: ``ppfr_jax.models.<module>``, imported only when this model is asked for.
      factories: candidate names of the Linen class / partial in that module (first found wins).
      input_hw: (H, W) of the dummy input used to derive variable shapes.
      channels: default input channels (``--input-channels`` overrides).
      channel_fields: constructor fields set to the input channel count when
        the model has them (``in_channels``; the U-Net maps C -> C).
      kwargs: constructor keyword arguments (``--model-arg`` adds/overrides).
      ignore: extra regexes of PyTorch keys that may be left unused (used only
        when the module has no ``import_torch_state_dict``).
    """

    def __init__(self, module: str, factories: tuple[str, ...], input_hw=(112, 112), channels: int = 3,
                 channel_fields: tuple[str, ...] = ("in_channels",), kwargs: Mapping[str, Any] | None = None,
                 ignore: tuple = ()):
        self.module, self.factories, self.input_hw = module, tuple(factories), tuple(input_hw)
        self.channels, self.channel_fields = channels, tuple(channel_fields)
        self.kwargs, self.ignore = dict(kwargs or {}), tuple(ignore)

    def __repr__(self):
        return f"ImportSpec(ppfr_jax.models.{self.module}:{'|'.join(self.factories)})"


# Entries are resolved lazily: a model whose module or class is not available
# fails with a clear message when asked for, not at start-up. A module that
# defines ``import_torch_state_dict(state_dict, variables)`` maps the weights;
# otherwise plain ``torch_to_flax`` does.
MODEL_REGISTRY: dict[str, ImportSpec] = {
    "ir18": ImportSpec("iresnet", ("IR18",)),
    "ir34": ImportSpec("iresnet", ("IR34",)),
    "ir50": ImportSpec("iresnet", ("IR50",)),
    "ir100": ImportSpec("iresnet", ("IR100",)),
    "ir152": ImportSpec("iresnet", ("IR152",)),
    "ir_se50": ImportSpec("iresnet", ("IRSE50",)),
    "ir_se100": ImportSpec("iresnet", ("IRSE100",)),
    "mobilefacenet": ImportSpec("mobilefacenet", ("MobileFaceNet",)),
    "duetface_client": ImportSpec("mobilefacenet", ("DuetFaceClient",), channels=30),
    "pfld": ImportSpec("pfld", ("PFLDInference",)),
    # MinusFace generator: DCT mode 192 -> 192 (``--input-channels 3`` for toy mode).
    "unet": ImportSpec("unet", ("UNet",), channels=192, channel_fields=("in_channels", "out_channels")),
    "casia_mobilefacenet": ImportSpec("mobilefacenet_casia", ("CasiaMobileFaceNet",), input_hw=(112, 96)),
}


class UnknownModelError(PpfrError, LookupError):
    """``--model`` names no registry entry, or its module/class is not available."""


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

    if name not in MODEL_REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_REGISTRY))}")
    spec = MODEL_REGISTRY[name]
    modname = f"ppfr_jax.models.{spec.module}"
    try:
        module = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise UnknownModelError(f"model {name!r} needs {modname}, which is not available") from e
        raise
    factory = next((getattr(module, f) for f in spec.factories if hasattr(module, f)), None)
    if factory is None:
        raise UnknownModelError(f"model {name!r}: {modname} defines none of {list(spec.factories)}")
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


def _parse_model_args(items) -> dict:
    import ast

    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _shorten_sections(msg: str, keep: int = 20) -> str:
    """Keep the first ``keep`` indented lines under each heading (a wrong --model lists every key)."""
    out, shown, hidden = [], 0, 0
    for line in msg.splitlines() + ["<end>"]:
        if not line.startswith(" "):
            if hidden:
                out.append(f"  ... and {hidden} more")
            shown = hidden = 0
            if line != "<end>":
                out.append(line)
        elif shown < keep:
            out.append(line)
            shown += 1
        else:
            hidden += 1
    return "\n".join(out)


def main(argv=None) -> int:
    """``ppfr-import --pth FILE --model NAME --out DIR``: convert PyTorch weights to Orbax.

    Reads the checkpoint with ``ppfr_jax.torch_pickle`` (no torch, no pickled
    code), maps it with the model's ``import_torch_state_dict`` (or
    ``torch_to_flax``), and writes ``{'params', 'batch_stats'}`` with
    ``orbax.checkpoint.StandardCheckpointer`` to DIR (restore with
    ``StandardCheckpointer().restore(DIR)``). Returns the exit status.
    """
    import argparse
    import os
    import sys

    from ppfr_jax.torch_pickle import CheckpointReadError, load_state_dict

    p = argparse.ArgumentParser(
        prog="ppfr-import",
        description="Convert a PyTorch checkpoint (read without torch) into an Orbax checkpoint of "
                    "Flax variables {'params', 'batch_stats'}.")
    p.add_argument("--pth", required=True, help="PyTorch checkpoint (.pth/.ckpt, zip or legacy format)")
    p.add_argument("--model", required=True, help=f"one of: {', '.join(sorted(MODEL_REGISTRY))}")
    p.add_argument("--out", required=True, help="output directory of the Orbax checkpoint")
    p.add_argument("--input-channels", type=int, default=None,
                   help="input channels of the model (default: the registry's, e.g. 30 for duetface_client)")
    p.add_argument("--key", default=None,
                   help="where the state_dict sits in the checkpoint, '/'-separated (default: found)")
    p.add_argument("--prefix", default=None,
                   help="use only the keys under this prefix, with it removed (a sub-model of a larger "
                        "checkpoint, e.g. 'generator.backbone.' or 'recognizer.'); 'module.' is always "
                        "dropped when every key has it")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument of the Linen model (repeatable; VALUE a Python literal)")
    p.add_argument("--force", action="store_true", help="overwrite DIR if it exists")
    args = p.parse_args(argv)

    if args.model not in MODEL_REGISTRY:
        print(f"ppfr-import: error: unknown model {args.model!r}; known: {', '.join(sorted(MODEL_REGISTRY))}",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        print(f"ppfr-import: error: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        # the checkpoint first: a bad file fails before any model is traced
        sd = load_state_dict(args.pth, key=args.key)
        if args.prefix:
            total = len(sd)
            sd = {k[len(args.prefix):]: v for k, v in sd.items() if k.startswith(args.prefix)}
            if not sd:
                raise KeyError(f"none of the {total} state_dict keys starts with --prefix {args.prefix!r}")
        model, module, target, shape = build_import_target(
            args.model, args.input_channels, _parse_model_args(args.model_arg))
        importer = getattr(module, "import_torch_state_dict", None)
        if importer is not None:
            variables = importer(sd, target)
        else:
            variables = torch_to_flax(sd, target, ignore=MODEL_REGISTRY[args.model].ignore)
    except (UnknownModelError, CheckpointReadError, CheckpointMismatchError, FileNotFoundError, KeyError,
            ValueError) as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # KeyError's str() adds quotes
        print("ppfr-import: error: " + _shorten_sections(msg), file=sys.stderr)
        return 2

    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, variables, force=args.force)
        ckptr.wait_until_finished()

    counts = {col: sum(int(np.prod(v.shape)) for _, v in _flatten(tree)) for col, tree in variables.items()}
    leaves = {col: sum(1 for _ in _flatten(tree)) for col, tree in variables.items()}
    print(f"ppfr-import: {args.pth}")
    print(f"  model       {args.model} ({type(model).__name__}, input NHWC {shape})")
    print(f"  state_dict  {len(sd)} tensors, {sum(int(np.asarray(v).size) for v in sd.values()):,} values")
    for col in variables:
        print(f"  {col:<11} {leaves[col]} arrays, {counts[col]:,} values")
    print(f"  wrote       {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
