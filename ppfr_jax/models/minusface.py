"""MinusFace's model (CVPR 2024, arXiv 2403.12457; TFace ``tasks/minusface/minusface.py: MinusBackbone``), NHWC.

``MinusBackbone`` = a U-Net generator ``g`` + an IR recogniser ``f``; ``mode``:

* ``stage1``: ``x = dct(X)`` (192 channels), ``r = x - g(x)``, ``f(r)``;
* ``stage2``: ``g`` frozen; ``X_p = idct(shuffle(r))`` in [0, 1] with a fresh
  per-sample channel permutation (``frequency.shuffle_decode``), ``n_duplicate``
  shuffles concatenated on channels, ``f(X_p)``;
* ``toy``: the U-Net on RGB, ``r = X - g(X)``, ``f(r)``.

Faces are (N, 112, 112, 3) in [-1, 1]. ``protect`` uses only the generator's
variables, ``recognize`` only the recogniser's. Torch names: ``generator`` <->
``generator.backbone``, ``recognizer`` <-> ``recognizer``
(``import_torch_state_dict``). Training tasks, frozen-generator loading and the
client/server contract: ``ppfr_jax.methods.minusface``.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import frequency
from ppfr_jax.models import iresnet, unet

MODES = ("stage1", "stage2", "toy")


# ----------------------------------------------------------------------------- model


class MinusBackbone(nn.Module):
    """Generator + recogniser (the reference's ``MinusBackbone``), NHWC.

    Attributes:
      generator: ``unet.UNet`` (192 -> 192 channels; 3 -> 3 in toy mode).
      recognizer: an ``iresnet.IResNet`` whose ``in_channels`` fits the mode
        (192 stage 1, ``3 * n_duplicate`` stage 2, 3 toy).
      mode: 'stage1' | 'stage2' | 'toy'.
      n_duplicate: stage-2 shuffles per sample.
      generator_scale: the DCT modes' generator is ``g(x) = scale * U(x / scale)``;
        1.0 is the reference's ``g = U``. Same function class for any scale (it
        folds into the first and last layers' weights), but plain SGD trains it
        very differently: DCT coefficients reach ~1000 while the stage-1 L1 is
        taken on the decoded image in [-1, 1], so the gradient reaching the
        generator's output is ~1e-3 per unit and the reference's U-Net barely
        moves in a few hundred steps (demo: 5 L1 ~ 1.9, regeneration PSNR
        ~12 dB). ``scale`` ~ 256 puts U's inputs and outputs at unit scale. A
        stage-2 run must use its stage-1 run's scale (checked when it loads).

    Methods (``model.apply(variables, ..., method=...)``):
      ``residue(x)``: dict of the intermediate tensors (generator only).
      ``protect(x, key=None, perms=None)``: the recogniser's input computed from
        faces x (N, 112, 112, 3) in [-1, 1]: stage 1 the 192-channel residue,
        stage 2 ``X_p`` (N, 112, 112, 3 * n_duplicate) in [0, 1], toy ``X - g(X)``.
        Uses only the generator's variables.
      ``recognize(x_p, train=False)``: (N, embedding) (recogniser only).
      ``__call__(x, train=False, key=None, perms=None)``: everything, as the
        reference's forward: dict with ``x_encode`` (N, 112, 112, 3) (decoded
        regeneration in [-1, 1]; toy: g(X)), ``x_residue`` (decoded residue in
        [-1, 1]; toy: X - g(X)), ``x_latent``, ``x_feature`` (N, embedding), and
        for the DCT modes ``x_up``, ``x_encode_up``, ``x_residue_up``
        (N, 112, 112, 192); stage 2 adds ``x_protected``.
    """

    generator: nn.Module
    recognizer: nn.Module
    mode: str = "stage1"
    n_duplicate: int = 1
    generator_scale: float = 1.0

    def _check(self, x):
        if self.mode not in MODES:
            raise ValueError(f"MinusBackbone.mode must be one of {MODES}, got {self.mode!r}")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"MinusBackbone expects NHWC RGB faces (N, 112, 112, 3) in [-1, 1], got {x.shape}")

    def residue(self, x):
        """Faces (N, 112, 112, 3) in [-1, 1] -> dict of generator-side tensors (see class doc)."""
        self._check(x)
        x = x.astype(jnp.float32)
        if self.mode == "toy":
            x_encode, latent = self.generator(x)
            x_encode = x_encode.astype(jnp.float32)
            return {"x_encode": x_encode, "x_residue": x - x_encode, "x_latent": latent}
        # the DCT and the subtraction stay in float32 (coefficients reach ~1000)
        x_up = frequency.dct_transform(x)
        # generator_scale (1 = the reference): the U-Net reads x / scale and writes scale * U(.) -
        # the same functions, better conditioned for SGD (see the class doc)
        s = float(self.generator_scale)
        x_encode_up, latent = self.generator(x_up / s if s != 1.0 else x_up)
        x_encode_up = x_encode_up.astype(jnp.float32) * s
        return {"x_up": x_up, "x_encode_up": x_encode_up, "x_residue_up": x_up - x_encode_up, "x_latent": latent}

    def protect(self, x, key=None, *, perms=None):
        if self.mode == "toy":
            return self.residue(x)["x_residue"]
        r = self.residue(x)["x_residue_up"]
        if self.mode == "stage1":
            return r
        # g is frozen in stage 2: no gradient flows into it (the reference's no_grad)
        return frequency.shuffle_decode(jax.lax.stop_gradient(r), key, perms=perms, n_duplicate=self.n_duplicate)

    def recognize(self, x_p, train: bool = False):
        return self.recognizer(x_p, train=train)

    def __call__(self, x, train: bool = False, key=None, *, perms=None):
        out = self.residue(x)
        if self.mode == "toy":
            out["x_feature"] = self.recognizer(out["x_residue"], train=train)
            return out
        # decoded images, as the reference returns them (idct clamps to [0, 1], then *2-1);
        # unused ones cost nothing under jit (dead code)
        out["x_encode"] = frequency.idct_transform(out["x_encode_up"]) * 2 - 1
        out["x_residue"] = frequency.idct_transform(out["x_residue_up"]) * 2 - 1
        if self.mode == "stage1":
            out["x_feature"] = self.recognizer(out["x_residue_up"], train=train)
        else:
            out = jax.tree.map(jax.lax.stop_gradient, out)
            x_p = frequency.shuffle_decode(out["x_residue_up"], key, perms=perms, n_duplicate=self.n_duplicate)
            out["x_protected"] = x_p
            out["x_feature"] = self.recognizer(x_p, train=train)
        return out


def recognizer_channels(mode: str, n_duplicate: int = 1) -> int:
    """Input channels of the recogniser in each mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {"stage1": frequency.NUM_CHANNELS, "stage2": 3 * n_duplicate, "toy": 3}[mode]


def build_model(mode: str = "stage1", *, recognizer: nn.Module, generator_widths=unet.DEFAULT_WIDTHS,
                n_duplicate: int = 1, remat: bool = False, dtype=jnp.float32,
                generator_scale: float = 1.0) -> MinusBackbone:
    """A ``MinusBackbone`` for ``mode`` around a built IR ``recognizer`` (its input channels are set to fit).

    Raises:
      ValueError naming the config field: ``n_duplicate`` < 1, fewer than 2 generator widths, or a
      ``generator_scale`` that is not a finite number > 0.
    """
    if n_duplicate < 1:
        raise ValueError(f"config.minusface.n_duplicate must be >= 1, got {n_duplicate}")
    widths = tuple(int(w) for w in generator_widths)
    if len(widths) < 2:
        raise ValueError(f"config.minusface.generator_widths needs at least 2 entries, got {widths}")
    ch = 3 if mode == "toy" else frequency.NUM_CHANNELS
    generator = unet.UNet(in_channels=ch, out_channels=ch, widths=widths, remat=remat, dtype=dtype)
    recognizer = recognizer.clone(in_channels=recognizer_channels(mode, n_duplicate))
    if not (np.isfinite(generator_scale) and generator_scale > 0):
        raise ValueError(f"config.minusface.generator_scale must be a finite number > 0, got {generator_scale}")
    return MinusBackbone(generator=generator, recognizer=recognizer, mode=mode, n_duplicate=n_duplicate,
                         generator_scale=float(generator_scale))


def init_variables(model: MinusBackbone, batch: int = 1, rng: jax.Array | None = None):
    """Shapes-only init (``jax.eval_shape``) on a (batch, 112, 112, 3) input."""
    rng = jax.random.key(0) if rng is None else rng
    x = jax.ShapeDtypeStruct((batch, frequency.IMAGE_SIZE, frequency.IMAGE_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: model.init({"params": r, "dropout": r}, x, key=r), rng, x)


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any]) -> dict:
    """Reference ``MinusBackbone`` state_dict -> our ``MinusBackbone`` variables (numpy).

    ``generator.backbone.*`` maps onto ``generator`` (``unet.import_torch_state_dict``),
    ``recognizer.*`` onto ``recognizer`` (``iresnet.import_torch_state_dict``); any
    other key is reported as unexpected.
    """
    gen = unet.import_torch_state_dict(state_dict, {"params": variables["params"]["generator"]},
                                       prefix="generator.backbone.")
    rec_target = {"params": variables["params"]["recognizer"],
                  "batch_stats": variables.get("batch_stats", {}).get("recognizer", {})}
    rec = iresnet.import_torch_state_dict(state_dict, rec_target, strip_prefix="recognizer.",
                                          ignore=(r"^generator\.backbone\.",))
    return {"params": {"generator": gen["params"], "recognizer": rec["params"]},
            "batch_stats": {"recognizer": rec.get("batch_stats", {})}}
