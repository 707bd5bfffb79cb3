"""Privacy evaluation: what each method shows, and what a white-box recovery attack gets back.

For every row (a protection method) we measure

* **visual**: SSIM / PSNR between the protected representation, decoded to a
  112x112 RGB image where it is not one already, and the face;
* **recovery attack**: an inversion model - a U-Net (``models/unet.py``, the
  full-scale 64-128-256-512-1024 one by default) trained with L1 loss to map
  the protected representation back to the face, on the training identities
  (the white-box attacker of the MinusFace and PartialFace papers: it knows the
  method and holds the client's weights, so it can make its own training
  pairs). It is then run on held-out identities (the DevTest verification
  images of the embedded demo set by default): SSIM / PSNR of the recovered
  faces, and the verification accuracy (10-fold protocol,
  ``evaluate.verify``) that an unprotected, independently trained recogniser
  (``config.recognizer``: any ``evaluate.MODELS`` entry and its checkpoint)
  reaches on the recovered faces. Lower is more private; the recogniser's
  accuracy on the original faces is reported beside it as the ceiling.

Rows (``config.rows``):

* ``raw``: no protection (the attacker sees the face: a sanity row, the
  inversion should be near perfect);
* ``duetface``: what the DuetFace server receives - the 162 server DCT
  channels and the client's 4 attention masks. The *protected image* is the
  server channels decoded with the 30 client channels zeroed (nearly uniform
  grey: the low frequencies carry almost all the energy). The attacker's input
  (``config.duetface.attacker_input``) is ``'channels'`` (default: the 162
  channels themselves, which hold far more than their lossy 112x112 decode)
  or ``'decoded'`` (that image), plus the masks resized to 112x112 as extra
  channels. The ROI behind the masks is the template hull (``roi.template_mask``),
  as DuetFace's verification uses;
* ``minusface``: MinusFace's ``X_p = idct(shuffle(x - g(x)))`` with a fresh
  permutation per image and batch (stage 2's deployment: a fresh key per call);
* ``minusface_fixed_theta``: the attacker trains on ``X_p`` made with ONE
  fixed permutation θ (the same for every image), then is evaluated twice:
  ``minusface_fixed_theta/same_theta`` (the θ it trained on) and
  ``minusface_fixed_theta/fresh_theta`` (fresh random θ per image) - the
  randomness is what protects, so the second must fail.

Range convention: images enter as uint8 or float in [-1, 1] (``tasks.normalise_images``);
all metrics compare images mapped to [0, 1] (``dm_pix.ssim`` / ``dm_pix.psnr``
with ``max_val=1``; SSIM uses an 11x11 Gaussian window, sigma 1.5, averaged
over pixels and the three colour channels). PSNR is **capped** at
``PSNR_CAP`` = 100 dB (MSE 1e-10), so identical images give 100, not inf, and
means and JSON stay finite.

Attacker details: its input channels are standardised with a per-channel mean
and std measured on the training data (the DCT channels span five
orders of magnitude); (the first batch); its output is compared with the face in [-1, 1]
(L1), and the recovered image is ``clip((out + 1) / 2, 0, 1)``. Its output
conv starts at zero (first prediction: grey; a fan-in init on the heavy-tailed
DCT inputs starts at L1 ~5 and stalls near the mean face). Adam with a
cosine-decayed learning rate; one jitted step that also computes the
representation from the raw batch (so MinusFace's training pairs get fresh
keys at every step).

Checkpoints: ``config.duetface.workdir`` (a DuetFace **server** run:
``configs/duetface.py:server,...``; its checkpoint holds the frozen client and
the trained attention projections - everything the client side runs) and
``config.minusface.workdir`` (a MinusFace stage-1 or stage-2 run: its
generator). Architecture fields are read from the run's saved config when
it is there, else from ``config.duetface`` / ``config.minusface``. A row whose
checkpoint is missing is skipped with a message (recorded in
``privacy.json``'s ``skipped``) unless ``config.allow_untrained`` (tests):
then freshly initialised weights stand in.

Outputs in the workdir: ``privacy.json`` (``rows``: one record per row with
``method``, ``ssim``, ``psnr``, ``attacker_accuracy``, ``n_images`` and more;
plus the recogniser's accuracy on the original faces and the skipped rows),
``privacy.md`` (a Markdown table), ``privacy_<method>.png`` grids (columns
original | protected | recovered; the protected DuetFace view is contrast
stretched per image (1st..99th percentile) in the grid only: it is near-uniform grey), and
TensorBoard scalars and images (clu writers, process 0).

CLI (``ppfr-privacy``)::

    python -m ppfr_jax.privacy --config configs/privacy.py:demo --workdir runs/privacy
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import checkpoints, data, frequency, roi, tasks
from ppfr_jax.methods import duetface, minusface
from ppfr_jax.methods.contract import MissingVariables
from ppfr_jax.models.duetface import DuetFaceModel, resize_bilinear

PSNR_CAP = 100.0
ROWS = ("raw", "duetface", "minusface", "minusface_fixed_theta")
FIXED_SAME = "minusface_fixed_theta/same_theta"
FIXED_FRESH = "minusface_fixed_theta/fresh_theta"


class RowUnavailable(RuntimeError):
    """A row cannot run (no checkpoint and untrained weights not allowed); the message says what to do."""


# ----------------------------------------------------------------------------- visual metrics


def to_unit(images) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] (N, H, W, C) -> float32 [0, 1]."""
    return tasks.normalise_images(jnp.asarray(images)) * 0.5 + 0.5


def visual_metrics(protected, face, *, psnr_cap: float = PSNR_CAP) -> dict[str, jax.Array]:
    """Per-image SSIM and PSNR of ``protected`` against ``face`` (dm-pix).

    Args:
      protected, face: (N, H, W, C) float images in [0, 1] (map uint8 / [-1, 1]
        inputs with ``to_unit`` first); same shape.
      psnr_cap: PSNR ceiling in dB (identical images give this instead of inf).
    Returns:
      ``{'ssim': (N,), 'psnr': (N,)}`` float32; SSIM with ``max_val=1``, an
      11x11 Gaussian window (sigma 1.5), averaged over pixels and channels.
    """
    import dm_pix

    a = jnp.asarray(protected, jnp.float32)
    b = jnp.asarray(face, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"visual_metrics: need two (N, H, W, C) images of one shape, got {a.shape} and {b.shape}")
    return {"ssim": dm_pix.ssim(a, b, max_val=1.0),
            "psnr": jnp.minimum(dm_pix.psnr(a, b), psnr_cap)}


# ----------------------------------------------------------------------------- representations


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
        _, decoded = duetface_server_image(x, split.sub_channels)
        r = jnp.broadcast_to(jnp.asarray(template), (x.shape[0],) + template.shape)
        sent = split.client_fn(v, x, r)
        server = sent["server_channels"]
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


# ----------------------------------------------------------------------------- loading the methods


def _run_config(workdir: str) -> dict:
    """The training config a run saved (``checkpoints.load_run_config``) as a dict; {} if it has none."""
    try:
        return checkpoints.load_run_config(workdir).to_dict()
    except (FileNotFoundError, ValueError):
        return {}


def _init_key(rng):
    """An RBG key from ``rng``, for parameter init.

    XLA:CPU compiles each shape of threefry draw slowly (a U-Net's init takes
    over a minute to compile); RngBitGenerator compiles in seconds. Same
    distributions, deterministic in ``rng`` (as ``MinusFaceTask.init``).
    """
    return jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl="rbg")


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
        variables = jax.jit(lambda k, *a: init(_init_key(k), *a))(rng, jnp.zeros(x_client.shape), jnp.zeros(r.shape))
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
        params = jax.jit(lambda k, x: gen.init(_init_key(k), x))(rng, jnp.zeros(x.shape))["params"]
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


# ----------------------------------------------------------------------------- the attacker


@dataclasses.dataclass
class Attacker:
    """A trained inversion model: U-Net + its input standardisation.

    ``params``: the U-Net's; ``mean``/``std``: (C,) per input channel; ``history``:
    [(step, mean L1 since the last entry)].
    """

    model: Any
    params: Any
    mean: jax.Array
    std: jax.Array
    history: list = dataclasses.field(default_factory=list)

    def recover(self, params, mean, std, inputs):
        """(N, 112, 112, C) representation -> (N, 112, 112, 3) recovered face in [-1, 1] (unclipped)."""
        out, _ = self.model.apply({"params": params}, (inputs - mean) / std)
        return out.astype(jnp.float32)


def build_attacker(channels: int, config):
    """The inversion U-Net: ``channels`` -> 3, widths ``config.attacker.widths``."""
    from ppfr_jax.models import unet

    a = config.attacker
    return unet.UNet(in_channels=channels, out_channels=3, widths=tuple(a.widths), remat=bool(a.get("remat", False)))


def train_attacker(rep: Representation, batches: Iterator[dict], config, rng, *, log=print) -> Attacker:
    """Train an inversion U-Net from ``rep``'s attacker input to the face (L1), on training batches.

    Args:
      rep: the representation (its ``apply`` runs inside the jitted step, on
        the raw batch, with a fresh key per step).
      batches: iterator of dicts with ``image`` (B, 112, 112, 3) uint8 or [-1, 1].
      config: ``config.attacker``: widths, steps, lr, warmup_steps, log_every_steps
        (the batch size is the iterator's). The input standardisation is measured
        on the first batch.
    Returns:
      the trained ``Attacker``.
    """
    import optax

    a = config.attacker
    steps = int(a.steps)
    if steps < 1:
        raise ValueError(f"config.attacker.steps must be >= 1, got {steps}")
    r_init, r_rep, r_step = jax.random.split(rng, 3)
    model = build_attacker(rep.channels(), config)

    @jax.jit
    def prepare(key, rep_vars, images, rep_key):
        # input standardisation from the first batch (DCT channels span ~1e-2 .. 1e3), and the init
        inputs, _ = rep.apply(rep_vars, tasks.normalise_images(images), rep_key)
        mean = jnp.mean(inputs, axis=(0, 1, 2))
        std = jnp.maximum(jnp.std(inputs, axis=(0, 1, 2)), 1e-6)
        params = model.init(_init_key(key), inputs[:1])["params"]
        # the output conv starts at zero (the attacker first predicts grey): with heavy-tailed inputs
        # (DCT channels: kurtosis ~16) a fan-in init starts at L1 ~5 and the first steps kill ReLUs
        last = f"right_conv_{len(model.widths)}"
        params = {**params, last: {**params[last], "kernel": jnp.zeros_like(params[last]["kernel"])}}
        return params, mean, std

    first = next(batches)
    params, mean, std = prepare(r_init, rep.variables, first["image"], r_rep)
    warm = int(a.get("warmup_steps", 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, float(a.lr), max(warm, 1), max(steps, warm + 1),
                                                  end_value=float(a.lr) * 0.01)
    tx = optax.adam(schedule)
    attacker = Attacker(model, params, mean, std)

    def step(params, opt_state, mean, std, rep_vars, images, key):
        x = tasks.normalise_images(images)
        inputs, _ = rep.apply(rep_vars, x, key)
        inputs = jax.lax.stop_gradient(inputs)

        def loss_fn(p):
            return jnp.mean(jnp.abs(attacker.recover(p, mean, std, inputs) - x))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    opt_state = tx.init(params)
    every = max(1, int(a.get("log_every_steps", 50)))
    pending, t0 = [], time.time()
    for i in range(steps):
        batch = first if i == 0 else next(batches)
        params, opt_state, loss = step(params, opt_state, mean, std, rep.variables, batch["image"],
                                       jax.random.fold_in(r_step, i))
        pending.append(loss)
        if (i + 1) % every == 0 or i + 1 == steps:
            l1 = float(np.mean(jax.device_get(pending)))
            if not np.isfinite(l1):
                raise FloatingPointError(f"attacker for row {rep.name!r}: non-finite L1 loss by step {i + 1}; "
                                         f"lower config.attacker.lr (now {a.lr})")
            attacker.history.append((i + 1, l1))
            pending = []
            per_step = (time.time() - t0) / (i + 1)
            log(f"  [{rep.name}] attacker step {i + 1}/{steps}: L1 {l1:.4f} ({per_step:.2f} s/step)")
    attacker.params = params
    return attacker


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSet:
    """Held-out faces: distinct images (M, 112, 112, 3) uint8 and the verification pairs over them."""

    images: np.ndarray
    pairs: np.ndarray  # (P, 2) rows into images
    issame: np.ndarray  # (P,)
    name: str


def load_eval_set(config) -> EvalSet:
    """``config.eval.pairs`` ('demo' = LFW DevTest of the demo set, or a .bin / pairs.txt) and the images
    its pairs use.

    ``config.eval.max_pairs`` > 0 keeps that many pairs, half same and half
    different, alternating (LFW files list all same pairs first, so a prefix
    would be one-sided and its 10-fold accuracy meaningless).
    """
    from ppfr_jax import evaluate

    vs = evaluate.load_set(config.eval.pairs)
    if vs.images.shape[1:] != (112, 112, 3):
        raise ValueError(f"config.eval.pairs={config.eval.pairs!r}: images are {vs.images.shape[1:]}, the "
                         f"methods take 112x112x3 ArcFace-aligned faces")
    pairs, same = vs.pairs, np.asarray(vs.issame, bool)
    k = int(config.eval.get("max_pairs", 0) or 0)
    if 0 < k < len(same):
        pos, neg = np.flatnonzero(same)[:(k + 1) // 2], np.flatnonzero(~same)[:k // 2]
        order = np.full(len(pos) + len(neg), -1, np.int64)
        n = min(len(pos), len(neg))
        order[0:2 * n:2], order[1:2 * n:2] = pos[:n], neg[:n]
        order[2 * n:] = np.concatenate([pos[n:], neg[n:]])
        pairs, same = pairs[order], same[order]
    used, inverse = np.unique(pairs.reshape(-1), return_inverse=True)
    return EvalSet(vs.images[used], inverse.reshape(-1, 2).astype(np.int64), same, vs.name)


def _chunks(n: int, bs: int):
    for i in range(0, n, bs):
        yield i, min(n, i + bs)


def _pad(x: np.ndarray, bs: int) -> np.ndarray:
    if len(x) == bs:
        return x
    return np.concatenate([x, np.zeros((bs - len(x),) + x.shape[1:], x.dtype)])


def _as_uint8(x01):
    return jnp.round(jnp.clip(x01, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def run_attack(rep: Representation, attacker: Attacker, eval_set: EvalSet, key, *, batch_size: int = 64) -> dict:
    """Recover every eval face from ``rep``: images and per-image metrics.

    The key of chunk i is ``fold_in(key, i)`` (MinusFace's fresh shuffles).
    Returns:
      dict of numpy arrays: ``recovered`` / ``protected`` (M, 112, 112, 3) uint8,
      ``ssim`` / ``psnr`` (recovered vs face), ``protected_ssim`` / ``protected_psnr``.
    """

    @jax.jit
    def fn(params, mean, std, rep_vars, images, k):
        x = tasks.normalise_images(images)
        face = x * 0.5 + 0.5
        inputs, protected = rep.apply(rep_vars, x, k)
        recovered = jnp.clip(attacker.recover(params, mean, std, inputs) * 0.5 + 0.5, 0.0, 1.0)
        m_rec = visual_metrics(recovered, face)
        m_pro = visual_metrics(protected, face)
        return {"recovered": _as_uint8(recovered), "protected": _as_uint8(protected),
                "ssim": m_rec["ssim"], "psnr": m_rec["psnr"],
                "protected_ssim": m_pro["ssim"], "protected_psnr": m_pro["psnr"]}

    n = len(eval_set.images)
    bs = min(batch_size, n)
    outs = []
    for c, (i, j) in enumerate(_chunks(n, bs)):
        res = fn(attacker.params, attacker.mean, attacker.std, rep.variables, _pad(eval_set.images[i:j], bs),
                 jax.random.fold_in(key, c))
        outs.append({k: np.asarray(v)[:j - i] for k, v in res.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def recognizer_accuracy(recognizer, images: np.ndarray, eval_set: EvalSet, *, batch_size: int = 64) -> dict:
    """10-fold verification accuracy of ``recognizer`` (an ``evaluate.Recognizer``) on ``images``
    (M, 112, 112, 3) uint8 standing in for ``eval_set.images`` -> {'accuracy', 'std'}."""
    from ppfr_jax import evaluate

    imgs = evaluate.fit_to_input(np.asarray(images), recognizer.input_hw)
    emb = evaluate.embed(recognizer.apply_fn, imgs, batch_size=batch_size, flip=recognizer.flip,
                         preprocess=recognizer.preprocess)
    res = evaluate.verify(emb[eval_set.pairs.reshape(-1)], eval_set.issame)
    return {"accuracy": float(res["accuracy_mean"]), "std": float(res["accuracy_std"])}


def load_recognizer(config):
    """``config.recognizer`` -> (``evaluate.Recognizer`` or None, description)."""
    from ppfr_jax import evaluate

    r = config.recognizer
    if not r.get("checkpoint", ""):
        return None, "none (config.recognizer.checkpoint is empty: attacker_accuracy not measured)"
    if r.model not in evaluate.MODELS:
        raise ValueError(f"config.recognizer.model: unknown model {r.model!r}; known: {sorted(evaluate.MODELS)}")
    if r.checkpoint != "-" and not os.path.exists(r.checkpoint):
        raise FileNotFoundError(f"config.recognizer.checkpoint: {r.checkpoint!r} does not exist")
    return evaluate.MODELS[r.model](r.checkpoint), f"{r.model}: {r.checkpoint}"


# ----------------------------------------------------------------------------- outputs


def _stretch(img: np.ndarray) -> np.ndarray:
    """Per-image contrast stretch of uint8 (H, W, 3), 1st..99th percentile to 0..255 (display only)."""
    lo, hi = np.percentile(img, [1, 99])
    if hi <= lo:
        return img
    return np.clip((img.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def make_grid(original: np.ndarray, protected: np.ndarray, recovered: np.ndarray, *, stretch: bool = False,
              gap: int = 2) -> np.ndarray:
    """Rows of (original | protected | recovered) 112x112 tiles -> one uint8 (H, W, 3) picture."""
    n, h, w, _ = original.shape
    grid = np.full((n * h + (n - 1) * gap, 3 * w + 2 * gap, 3), 255, np.uint8)
    for i in range(n):
        p = _stretch(protected[i]) if stretch else protected[i]
        for j, tile in enumerate((original[i], p, recovered[i])):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return grid


def _file_name(method: str) -> str:
    return "privacy_" + method.replace("/", "__") + ".png"


def markdown_table(records: list[dict], reference: dict | None, skipped: dict) -> str:
    """The rows as a Markdown table (SSIM / PSNR of recovered faces and of the protected image)."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| method | attacker sees | recovered SSIM | recovered PSNR (dB) | attacker accuracy (%) "
             "| protected SSIM | protected PSNR (dB) | images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        acc = None if r["attacker_accuracy"] is None else 100 * r["attacker_accuracy"]
        lines.append(f"| {r['method']} | {r['representation']} | {f(r['ssim'], '.3f')} | {f(r['psnr'], '.2f')} | "
                     f"{f(acc, '.2f')} | {f(r['protected_ssim'], '.3f')} | {f(r['protected_psnr'], '.2f')} | "
                     f"{r['n_images']} |")
    out = "\n".join(lines) + "\n"
    if reference is not None:
        out += (f"\nRecogniser on the original faces (the ceiling): {100 * reference['accuracy']:.2f}% "
                f"± {100 * reference['std']:.2f}.\n")
    for name, why in skipped.items():
        out += f"\nSkipped `{name}`: {why.splitlines()[0]}\n"
    out += (f"\nLower is more private. PSNR capped at {PSNR_CAP:g} dB. Images mapped to [0, 1]; SSIM with an 11x11 "
            f"Gaussian window (dm-pix).\n")
    return out


# ----------------------------------------------------------------------------- the suite


def _representations(config, rng, log) -> tuple[list[tuple[Representation, list]], dict]:
    """-> ([(training representation, [(method, eval representation), ...])], skipped {row: reason})."""
    rows = list(config.rows)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"config.rows: unknown row(s) {unknown}; choose from {ROWS}")
    out, skipped = [], {}
    r_duet, r_minus = jax.random.split(rng)
    mf: Any = None  # the MinusFace generator (or why it is unavailable), shared by both MinusFace rows
    for row in rows:
        try:
            if row == "raw":
                rep = raw_view()
                out.append((rep, [("raw", rep)]))
            elif row == "duetface":
                rep = load_duetface(config, r_duet)
                out.append((rep, [("duetface", rep)]))
            else:
                if mf is None:
                    try:
                        mf = load_minusface_generator(config, r_minus)
                    except RowUnavailable as e:
                        mf = e
                if isinstance(mf, RowUnavailable):
                    raise RowUnavailable(str(mf).replace("row 'minusface'", f"row {row!r}"))
                split, variables, source = mf
                fresh = minusface_view(split, variables, source=source)
                if row == "minusface":
                    out.append((fresh, [("minusface", fresh)]))
                else:
                    theta = fixed_theta(int(config.minusface.fixed_theta_seed))
                    fixed = minusface_view(split, variables, fixed_theta=theta, name="minusface_fixed_theta",
                                           source=source)
                    fresh_t = dataclasses.replace(fresh, name=FIXED_FRESH,
                                                  description="X_p, fresh θ (attacker trained on one fixed θ)")
                    out.append((fixed, [(FIXED_SAME, fixed), (FIXED_FRESH, fresh_t)]))
        except RowUnavailable as e:
            skipped[row] = str(e)
            log(str(e))
    return out, skipped


def _train_batches(config, batch_size: int):
    it, _, _ = data.train_source(config, batch_size, 0)
    return it


def run_privacy(config, workdir: str, *, log=None) -> dict:
    """Run every row of ``config.rows``; write privacy.json / privacy.md / PNG grids / TensorBoard to ``workdir``.

    Returns:
      the ``privacy.json`` content: ``{'rows': [record...], 'recognizer', 'reference_accuracy',
      'skipped', 'eval_set', 'config', 'wall_s'}``; each record has ``method``,
      ``ssim``, ``psnr`` (recovered vs face), ``attacker_accuracy`` (None without a
      recogniser), ``attacker_accuracy_std``, ``n_images``, ``n_pairs``,
      ``protected_ssim``, ``protected_psnr``, ``representation``, ``weights``,
      ``attacker_steps``, ``attacker_final_l1``, ``grid``.
    Raises:
      config_lib.ConfigError naming a bad config field (checked before anything is built).
    """
    from clu import metric_writers

    from ppfr_jax import config_lib
    config_lib.validate_privacy(config)

    is_main = jax.process_index() == 0
    log = log or (lambda msg: print(msg, flush=True) if is_main else None)
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    rng = jax.random.key(int(config.seed))
    r_reps, r_train, r_eval = jax.random.split(rng, 3)

    eval_set = load_eval_set(config)
    recognizer, rec_desc = load_recognizer(config)
    log(f"privacy: {len(eval_set.images)} held-out faces, {len(eval_set.issame)} pairs ({eval_set.name}); "
        f"recogniser {rec_desc}")
    reference = None
    if recognizer is not None:
        reference = recognizer_accuracy(recognizer, eval_set.images, eval_set, batch_size=config.eval.batch_size)
        log(f"recogniser on the original faces: {100 * reference['accuracy']:.2f}% ± {100 * reference['std']:.2f}")

    reps, skipped = _representations(config, r_reps, log)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main, asynchronous=False)
    records = []
    n_grid = min(int(config.get("grid_rows", 6)), len(eval_set.images))
    try:
        for k, (train_rep, evals) in enumerate(reps):
            log(f"row {train_rep.name}: {train_rep.description}; weights {train_rep.source}; "
                f"{train_rep.channels()} input channels")
            attacker = train_attacker(train_rep, _train_batches(config, int(config.attacker.batch_size)), config,
                                      jax.random.fold_in(r_train, k), log=log)
            for m, (method, rep) in enumerate(evals):
                res = run_attack(rep, attacker, eval_set, jax.random.fold_in(jax.random.fold_in(r_eval, k), m),
                                 batch_size=int(config.eval.batch_size))
                acc = (recognizer_accuracy(recognizer, res["recovered"], eval_set,
                                           batch_size=int(config.eval.batch_size))
                       if recognizer is not None else None)
                grid = make_grid(eval_set.images[:n_grid], res["protected"][:n_grid], res["recovered"][:n_grid],
                                 stretch=train_rep.name == "duetface")
                grid_file = _file_name(method)
                if is_main:
                    from PIL import Image
                    Image.fromarray(grid).save(os.path.join(workdir, grid_file))
                rec = {
                    "method": method,
                    "ssim": float(np.mean(res["ssim"])),
                    "psnr": float(np.mean(res["psnr"])),
                    "attacker_accuracy": None if acc is None else acc["accuracy"],
                    "attacker_accuracy_std": None if acc is None else acc["std"],
                    "n_images": int(len(eval_set.images)),
                    "n_pairs": int(len(eval_set.issame)),
                    "protected_ssim": float(np.mean(res["protected_ssim"])),
                    "protected_psnr": float(np.mean(res["protected_psnr"])),
                    "representation": rep.description,
                    "weights": rep.source,
                    "attacker_steps": int(config.attacker.steps),
                    "attacker_final_l1": attacker.history[-1][1] if attacker.history else None,
                    "grid": grid_file,
                }
                records.append(rec)
                scalars = {f"privacy/{method}/{key}": rec[key] for key in
                           ("ssim", "psnr", "protected_ssim", "protected_psnr", "attacker_accuracy")
                           if rec[key] is not None}
                writer.write_scalars(0, scalars)
                writer.write_images(0, {f"privacy/{method}": grid[None]})
                acc_s = "-" if acc is None else f"{100 * acc['accuracy']:.2f}%"
                log(f"{method}: recovered SSIM {rec['ssim']:.3f} PSNR {rec['psnr']:.2f} dB, attacker accuracy "
                    f"{acc_s}; protected SSIM {rec['protected_ssim']:.3f} PSNR {rec['protected_psnr']:.2f} dB")
    finally:
        writer.flush()
        writer.close()

    out = {
        "rows": records,
        "recognizer": rec_desc,
        "reference_accuracy": reference,
        "skipped": skipped,
        "eval_set": {"name": eval_set.name, "n_images": int(len(eval_set.images)),
                     "n_pairs": int(len(eval_set.issame))},
        "psnr_cap_db": PSNR_CAP,
        "config": config.to_dict(),
        "wall_s": time.time() - t_start,
    }
    if is_main:
        with open(os.path.join(workdir, "privacy.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
        table = markdown_table(records, reference, skipped)
        with open(os.path.join(workdir, "privacy.md"), "w") as f:
            f.write("# Privacy evaluation\n\n" + table)
        log("\n" + table)
    return out


def main(argv: list[str] | None = None) -> int:
    """``ppfr-privacy --config configs/privacy.py:demo --workdir runs/privacy`` (overrides: ``--config.x=y``)."""
    from absl import flags, logging
    from ml_collections import config_flags

    # a private flag registry: importing this module next to ppfr_jax.main must not redefine --config
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/privacy.py[:variant,...]", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where privacy.json, privacy.md, the PNG grids and TensorBoard go",
                        flag_values=fv)
    argv = list(sys.argv if argv is None else ["ppfr-privacy"] + list(argv))
    rest = fv(argv)
    if len(rest) > 1:
        raise SystemExit(f"ppfr-privacy: unexpected arguments {rest[1:]}")
    if fv.config is None or not fv.workdir:
        raise SystemExit("ppfr-privacy: --config and --workdir are required "
                         "(e.g. --config configs/privacy.py:demo --workdir runs/privacy)")
    logging.set_verbosity(logging.WARNING)
    from ppfr_jax import config_lib
    try:
        run_privacy(fv.config, fv.workdir)
    except config_lib.ConfigError as e:
        raise SystemExit(f"ppfr-privacy: error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
