"""What each privacy row shows an attacker (``Representation``), and loading the method runs behind them.

Rows (``ROWS``): ``raw`` (the face), ``duetface`` (the 162 server DCT channels + the 4 attention
masks, or their decode), ``minusface`` (``X_p`` with a fresh permutation per image), and
``minusface_fixed_theta`` (one fixed permutation; evaluated on the same and on fresh ones).
The client halves come from ``ppfr_jax.methods`` (``split_variables`` / ``client_fn``); a row whose
run is missing raises ``RowUnavailable`` naming the config field and the command that makes it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import checkpoints, frequency, roi
from ppfr_jax.methods import duetface, minusface
from ppfr_jax.methods.contract import MissingVariables
from ppfr_jax.models.duetface import DuetFaceModel, resize_bilinear
from ppfr_jax.models.layers import rbg_init_key

ROWS = ("raw", "duetface", "minusface", "minusface_fixed_theta")
FIXED_SAME = "minusface_fixed_theta/same_theta"
FIXED_FRESH = "minusface_fixed_theta/fresh_theta"


class RowUnavailable(RuntimeError):
    """A row cannot run (no checkpoint and untrained weights not allowed); the message says what to do."""



@dataclasses.dataclass(frozen=True)
class Representation:
    """What one method lets the server (and the attacker) see.

    Attributes:
      name: the row's method name.
      apply: ``(variables, x, key) -> (attacker_input (N, 112, 112, C), protected (N, 112, 112, 3))``;
        x (N, 112, 112, 3) float in [-1, 1], key a ``jax.random`` key (used by
        MinusFace's shuffle), protected the decoded image in [0, 1]. Jittable.
      variables: the client-side weights ``apply`` needs (a pytree; ``{}`` for none).
      description: one line for the table.
      source: where the weights came from ('-', a checkpoint path, or 'untrained').
    """

    name: str
    apply: Callable
    variables: Any
    description: str
    source: str = "-"

    def channels(self) -> int:
        x = jax.ShapeDtypeStruct((1, frequency.IMAGE_SIZE, frequency.IMAGE_SIZE, 3), jnp.float32)
        out = jax.eval_shape(self.apply, self.variables, x, jax.random.key(0))
        return int(out[0].shape[-1])


def raw_view() -> Representation:
    """No protection: the attacker sees the face itself (3 channels in [-1, 1])."""
    return Representation("raw", lambda v, x, key: (x, x * 0.5 + 0.5), {}, "the face (no protection)")


def duetface_server_image(x, sub_channels=frequency.SUB_CHS) -> tuple[jax.Array, jax.Array]:
    """DuetFace server channels of faces x (N, 112, 112, 3) in [-1, 1], and their decode.

    Returns:
      (server channels (N, 112, 112, 162), decoded (N, 112, 112, 3) in [0, 1]:
      ``idct`` of the 192 channels with the client's 30 set to zero).
    """
    server, _ = duetface.split_input(x, sub_channels)
    return server, frequency.idct_transform(frequency.merge_channels(server, None, sub_channels))


def duetface_server_view(split, variables, *, attacker_input: str = "channels",
                         source: str = "-") -> Representation:
    """What the DuetFace server receives: 162 DCT channels + the client's 4 attention masks.

    Args:
      split: a ``methods.duetface.DuetFaceSplit``; variables: its client half,
        ``{'params': {'client_model', 'attention_0..3'}, 'batch_stats': {'client_model'}}``.
      attacker_input: ``'channels'`` (the 162 channels) or ``'decoded'`` (their
        3-channel decode in [-1, 1]); the 4 masks (resized to 112x112, in [0, 1])
        are appended either way: 166 or 7 channels.
    """
    if attacker_input not in ("channels", "decoded"):
        raise ValueError(f"config.duetface.attacker_input must be 'channels' or 'decoded', got {attacker_input!r}")
    template = roi.template_mask()

    def apply(v, x, key):
        del key
        r = jnp.broadcast_to(jnp.asarray(template), (x.shape[0],) + template.shape)
        sent = split.client_fn(v, x, r)
        server = sent["server_channels"]
        # the decode of what was sent (= duetface_server_image's, without a second DCT)
        decoded = frequency.idct_transform(frequency.merge_channels(server, None, split.sub_channels))
        size = frequency.IMAGE_SIZE
        masks = [resize_bilinear(sent[k].astype(jnp.float32), size, align_corners=False)
                 for k in split.output_names if k.startswith("attention_mask_")]
        base = server if attacker_input == "channels" else decoded * 2.0 - 1.0
        return jnp.concatenate([base.astype(jnp.float32)] + masks, axis=-1), decoded

    what = "162 DCT channels" if attacker_input == "channels" else "decoded server channels"
    return Representation("duetface", apply, variables, f"{what} + 4 attention masks (server's view)", source)


def minusface_view(split, variables, *, fixed_theta=None, name: str = "minusface",
                   source: str = "-") -> Representation:
    """MinusFace's protected image ``X_p`` (n_duplicate = 1: 3 channels in [0, 1]).

    Args:
      split: a ``methods.minusface.MinusFaceSplit`` (n_duplicate 1); variables: its client half,
        ``{'params': {'generator': ...}}``.
      fixed_theta: None (a fresh permutation per image, drawn from the call's
        key), or a (192,) permutation used for every image.
    """
    theta = None if fixed_theta is None else jnp.asarray(fixed_theta, jnp.int32)
    if theta is not None and theta.shape != (frequency.NUM_CHANNELS,):
        raise ValueError(f"fixed_theta must be a ({frequency.NUM_CHANNELS},) permutation, got shape {theta.shape}")

    def apply(v, x, key):
        if theta is None:  # (N, 1, 192): the draw frequency.shuffle_decode makes from this key
            perms = jnp.swapaxes(frequency.draw_permutations(key, x.shape[0], 1), 0, 1)
        else:
            perms = jnp.broadcast_to(theta, (x.shape[0], 1, theta.shape[0]))
        xp = split.client_fn(v, x, perms)["x_p"]
        return xp * 2.0 - 1.0, xp

    what = "X_p, fresh θ per image" if theta is None else "X_p, one fixed θ"
    return Representation(name, apply, variables, what, source)


def fixed_theta(seed: int) -> np.ndarray:
    """The fixed shuffle θ of the fixed-key row: a (192,) permutation from ``seed``."""
    return np.asarray(jax.random.permutation(jax.random.key(seed), frequency.NUM_CHANNELS))



def _run_config(workdir: str) -> dict:
    """The training config a run saved (``checkpoints.load_run_config``) as a dict; {} if it has none."""
    try:
        return checkpoints.load_run_config(workdir).to_dict()
    except (FileNotFoundError, ValueError):
        return {}


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _missing(row: str, arg: str, why: str, how: str) -> RowUnavailable:
    return RowUnavailable(
        f"row {row!r} skipped: {why}. Train it first:\n    {how}\nthen pass {arg}=<that workdir> in the "
        f"configs/privacy.py argument (or allow_untrained=True to evaluate untrained weights)")


def _restore_run(config, row: str, arg: str, restore, how: str):
    """``restore(config.<row>.workdir, step)`` -> (variables, step); None for an untrained
    stand-in when ``config.allow_untrained`` (tests), else a clear error saying how to make the run."""
    section = config[row]
    wd = section.get("workdir", "") or ""
    try:
        if not wd:
            raise FileNotFoundError(f"config.{row}.workdir is empty")
        return restore(wd, int(section.get("step", 0) or 0) or None)
    except FileNotFoundError as e:
        if not config.get("allow_untrained", False):
            raise _missing(row, arg, str(e), how) from None
        return None


def load_duetface(config, rng) -> Representation:
    """The DuetFace row from ``config.duetface`` (see the module doc)."""
    d = config.duetface
    wd = d.get("workdir", "") or ""
    run = _run_config(wd) if wd else {}
    rd = run.get("duetface", {})
    arch = dict(backbone=run.get("model", {}).get("backbone", d.backbone),
                client_backbone=rd.get("client_backbone", d.client_backbone),
                client_embedding_size=int(rd.get("client_embedding_size", d.client_embedding_size)),
                sub_channels=tuple(int(s) for s in rd.get("sub_channels", d.sub_channels)))
    model = duetface.build_model(arch["backbone"], arch["client_backbone"],
                                 client_embedding_size=arch["client_embedding_size"], dropout=0.0,
                                 sub_channels=arch["sub_channels"])
    split = duetface.DuetFaceSplit(model, arch["sub_channels"])
    n_client = 3 * len(arch["sub_channels"])
    x_client = jax.ShapeDtypeStruct((1, 112, 112, n_client), jnp.float32)
    r = jax.ShapeDtypeStruct((1, 112, 112), jnp.float32)
    init = functools.partial(model.init, method=DuetFaceModel.client_side)  # the client half only
    want = jax.eval_shape(init, jax.random.key(0), x_client, r)
    how = d.get("command", "") or "python -m ppfr_jax.main --config configs/duetface.py:server,demo " \
                                   "--workdir runs/duetface_server_demo"
    restored = _restore_run(config, "duetface", "duetface_workdir", checkpoints.restore_variables, how)
    if restored is None:
        variables = jax.jit(lambda k, *a: init(rbg_init_key(k), *a))(rng, jnp.zeros(x_client.shape), jnp.zeros(r.shape))
        source = "untrained"
    else:
        ckpt, step = restored
        try:
            variables = split.client_variables(ckpt)
        except MissingVariables as e:
            raise ValueError(f"config.duetface.workdir={wd!r}: the checkpoint of step {step} has no {e.path} "
                             f"(params: {sorted(ckpt['params'])}); the privacy row needs a DuetFace *server* run "
                             f"(configs/duetface.py:server,...)") from None
        if _shapes(variables) != _shapes(dict(want)):
            raise ValueError(f"config.duetface: backbone={arch['backbone']!r}, client_backbone="
                             f"{arch['client_backbone']!r}, client_embedding_size={arch['client_embedding_size']} "
                             f"do not match the client side saved in {wd!r} (step {step}); set them to the run's")
        variables = jax.tree.map(jnp.asarray, variables)
        source = f"{os.path.abspath(wd)} (step {step})"
    return duetface_server_view(split, variables, attacker_input=d.get("attacker_input", "channels"), source=source)


def load_minusface_generator(config, rng):
    """-> (a stage-2 ``MinusFaceSplit``, its client half ``{'params': {'generator'}}``, source) from
    ``config.minusface``."""
    mf = config.minusface
    wd = mf.get("workdir", "") or ""
    run = _run_config(wd) if wd else {}
    widths = tuple(int(w) for w in run.get("minusface", {}).get("generator_widths", mf.generator_widths))
    # the generator's function depends on its run's scale (g = s U(x / s)), as on its widths
    scale = float(run.get("minusface", {}).get("generator_scale", mf.get("generator_scale", 1.0)))
    split = minusface.MinusFaceSplit(minusface.build_model("stage2", backbone="ir_tiny", generator_widths=widths,
                                                           n_duplicate=1, generator_scale=scale))
    gen = split.model.generator
    x = jax.ShapeDtypeStruct((1, 112, 112, frequency.NUM_CHANNELS), jnp.float32)
    want = jax.eval_shape(gen.init, jax.random.key(0), x)["params"]
    how = mf.get("command", "") or "python -m ppfr_jax.main --config configs/minusface.py:stage1,demo " \
                                    "--workdir runs/minusface_stage1_demo"
    restored = _restore_run(config, "minusface", "minusface_workdir", checkpoints.restore_variables, how)
    if restored is None:
        params = jax.jit(lambda k, x: gen.init(rbg_init_key(k), x))(rng, jnp.zeros(x.shape))["params"]
        source = "untrained"
    else:
        ckpt, step = restored
        try:
            params = split.client_variables(ckpt)["params"]["generator"]
        except MissingVariables:
            raise ValueError(f"config.minusface.workdir={wd!r}: the checkpoint of step {step} has no generator "
                             f"(params: {sorted(ckpt['params'])}); is it a MinusFace stage-1/2 run?") from None
        if _shapes(params) != _shapes(want):
            raise ValueError(f"config.minusface.generator_widths={widths} does not match the generator saved in "
                             f"{wd!r} (step {step}); set it to the run's widths")
        params = jax.tree.map(jnp.asarray, params)
        source = f"{os.path.abspath(wd)} (step {step})"
    return split, {"params": {"generator": params}}, source
