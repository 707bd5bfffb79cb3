"""The white-box recovery attacker (a U-Net inversion model) and the evaluation of what it recovers.

``train_attacker(rep, batches, config, rng)`` -> ``Attacker``: inputs standardised per channel
(statistics of the first batch), L1 to the face in [-1, 1], output conv initialised at zero, Adam with
a cosine-decayed LR; one jitted step also computes the representation from the raw batch (fresh
MinusFace keys every step). ``run_attack`` -> SSIM / PSNR of the recovered faces and the images;
``recognizer_accuracy`` -> 10-fold verification accuracy of an independent recogniser on them.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import tasks
from ppfr_jax.privacy.metrics import visual_metrics
from ppfr_jax.models.layers import rbg_init_key
from ppfr_jax.privacy.views import Representation


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
        inputs, _ = rep.apply(rep_vars, tasks.normalize_images(images), rep_key)
        mean = jnp.mean(inputs, axis=(0, 1, 2))
        std = jnp.maximum(jnp.std(inputs, axis=(0, 1, 2)), 1e-6)
        params = model.init(rbg_init_key(key), inputs[:1])["params"]
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
        x = tasks.normalize_images(images)
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
        x = tasks.normalize_images(images)
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
