"""MinusFace (CVPR 2024, arXiv 2403.12457): protect a face by subtracting its regeneration.

The model (TFace ``tasks/minusface/minusface.py: MinusBackbone``), NHWC:

* **stage 1** - ``x = dct(X)`` (192 channels, ``ppfr_jax.frequency``); a U-Net
  generator regenerates it, ``(x', latent) = g(x)``; the residue
  ``r = x - x'`` feeds a recogniser ``f`` (an IR net whose input conv takes 192
  channels). Loss ``gen * L1(X, 2 idct(x') - 1) + fr * ArcFace-CE + spar *
  KL-sparsity(latent)``, weights (5, 1, 0) by default (``losses.minus_loss``).
  Trained jointly; the generator at a fraction of the recogniser's learning
  rate (``config.optim.lr_multipliers['generator']``: 0.1 as the reference
  README says, the paper says 0.5; the reference trainer actually uses 1.0
  because its ``METHOD == 'Minusface'`` test never matches its config).
* **stage 2** - ``g`` frozen (loaded from a stage-1 run). Every sample gets a
  fresh random permutation of the residue's 192 channels, decoded back to a
  3-channel image ``X_p = idct(shuffle(r))`` in [0, 1] (the reference feeds it
  without ``*2-1``; so do we). ``n_duplicate`` independent shuffles are
  concatenated on channels (recogniser input ``3 * n_duplicate``). A new
  recogniser ``f_p`` learns on ``X_p`` with ArcFace only.
* **toy** - the same U-Net on RGB: ``x' = g(X)``, ``r = X - x'``, recogniser on
  ``r``; loss ``gen * L1(X, x') + fr * CE``.

Deployment split (stage 2): the client holds only ``g`` and the transform and
sends ``X_p = protect(...)`` with a fresh key per call; the server holds only
``f_p`` and computes ``recognize(X_p)``. ``MinusBackbone.protect`` /
``MinusBackbone.recognize`` touch only the generator's / the recogniser's
variables, so each side can be applied with just its own half; the
``minusface_stage2`` task exposes them on the engine's variables.

Training tasks for ``ppfr_jax.train`` (registered here; ``methods.make_task``
imports this module): ``minusface_stage1``, ``minusface_stage2``,
``minusface_toy``. Their variables are ``params = {generator, recognizer,
head}``, ``batch_stats = {recognizer}``; the generator's optimiser group is
``'generator'`` (stages 1 / toy) or ``'frozen'`` (stage 2). Stage 2 reads the
generator from the stage-1 run's Orbax checkpoint
(``config.minusface.stage1_workdir``) and refuses to start without one.

Torch names: ``generator`` <-> ``generator.backbone`` (the reference wraps its
U-Net in ``MinusGenerativeModel.backbone``), ``recognizer`` <-> ``recognizer``;
``import_torch_state_dict`` maps a reference ``MinusBackbone`` state_dict.

Where we knowingly differ from the reference trainer:

* weight decay on conv/linear kernels only (the engine's rule); the reference's
  "no decay on BN" test looks for ``bn`` in parameter names, which IR nets never
  have, so it decays everything;
* stage-2 verification shuffles every image with a permutation keyed by
  ``config.minusface.eval_seed`` and the image itself, so that evaluation is
  repeatable (``MinusFaceTask.eval_permutations``); training draws fresh
  permutations from the engine's per-step rng;
* parameters are initialised from an RBG key derived from the engine's key
  (see ``MinusFaceTask.init``: compile time), so initial values differ from a
  threefry init, not their distribution;
* the dataset multiplier ``NUM_AUG`` is a stretched schedule, see
  ``configs/minusface.py``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import frequency, losses, tasks
from ppfr_jax.models import iresnet, unet
from ppfr_jax.checkpoints import load_run_config, restore_variables
from ppfr_jax.errors import PpfrError

MODES = ("stage1", "stage2", "toy")


# ----------------------------------------------------------------------------- shuffle


def draw_permutations(key: jax.Array, batch: int, n_duplicate: int = 1,
                      channels: int = frequency.NUM_CHANNELS) -> jax.Array:
    """Independent channel permutations: (n_duplicate, batch, channels) int32.

    Drawn exactly as ``frequency.shuffle_decode`` draws them (one sub-key per
    duplicate, then one per sample), so both give the same ``X_p`` for a key.
    """
    if n_duplicate < 1:
        raise ValueError(f"n_duplicate must be >= 1, got {n_duplicate}")
    return jnp.stack([frequency.random_permutations(k, batch, channels)
                      for k in jax.random.split(key, n_duplicate)])


def shuffle_decode(residue: jax.Array, key: jax.Array | None = None, *, perms: jax.Array | None = None,
                   n_duplicate: int = 1) -> jax.Array:
    """Stage-2 protected image: per-sample channel shuffle of the residue, then inverse DCT.

    Args:
      residue: (N, 112, 112, 192) DCT-domain residue ``x - g(x)``.
      key: ``jax.random`` key the permutations are drawn from (ignored if ``perms``).
      perms: (n_duplicate, N, 192) or (N, 192) permutations to use instead
        (e.g. recorded ones, for parity tests).
      n_duplicate: independent shuffles concatenated on channels.
    Returns:
      (N, 112, 112, 3 * n_duplicate) in [0, 1].
    """
    n = residue.shape[0]
    if perms is None:
        if key is None:
            raise ValueError("shuffle_decode needs a jax.random key (or explicit perms)")
        perms = draw_permutations(key, n, n_duplicate, residue.shape[-1])
    perms = jnp.asarray(perms)
    if perms.ndim == 2:
        perms = perms[None]
    if perms.ndim != 3 or perms.shape[1:] != (n, residue.shape[-1]):
        raise ValueError(f"perms must be (n_duplicate, {n}, {residue.shape[-1]}), got shape {perms.shape}")
    return jnp.concatenate([frequency.idct_transform(frequency.permute_channels(residue, p)) for p in perms],
                           axis=-1)


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
        return shuffle_decode(jax.lax.stop_gradient(r), key, perms=perms, n_duplicate=self.n_duplicate)

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
            x_p = shuffle_decode(out["x_residue_up"], key, perms=perms, n_duplicate=self.n_duplicate)
            out["x_protected"] = x_p
            out["x_feature"] = self.recognizer(x_p, train=train)
        return out


def recognizer_channels(mode: str, n_duplicate: int = 1) -> int:
    """Input channels of the recogniser in each mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return {"stage1": frequency.NUM_CHANNELS, "stage2": 3 * n_duplicate, "toy": 3}[mode]


def build_model(mode: str = "stage1", *, backbone: str = "ir18", embedding_size: int = 512, dropout: float = 0.4,
                generator_widths=unet.DEFAULT_WIDTHS, n_duplicate: int = 1, remat: bool = False,
                dtype=jnp.float32, generator_scale: float = 1.0) -> MinusBackbone:
    """A ``MinusBackbone`` for ``mode`` with an IR recogniser named as in ``tasks.build_backbone``."""
    if not backbone.startswith("ir"):
        raise ValueError(f"config.model.backbone: MinusFace's recogniser is an IR net (ir18, ir50, ...), "
                         f"got {backbone!r}")
    if n_duplicate < 1:
        raise ValueError(f"config.minusface.n_duplicate must be >= 1, got {n_duplicate}")
    widths = tuple(int(w) for w in generator_widths)
    if len(widths) < 2:
        raise ValueError(f"config.minusface.generator_widths needs at least 2 entries, got {widths}")
    ch = 3 if mode == "toy" else frequency.NUM_CHANNELS
    generator = unet.UNet(in_channels=ch, out_channels=ch, widths=widths, remat=remat, dtype=dtype)
    recognizer = tasks.build_backbone(backbone, embedding_size, dropout, dtype).clone(
        in_channels=recognizer_channels(mode, n_duplicate))
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


# ----------------------------------------------------------------------------- checkpoints


class Stage1CheckpointNotFound(PpfrError, FileNotFoundError):
    """Stage 2 was asked to start without a finished stage-1 run."""


# ----------------------------------------------------------------------------- training tasks


class MinusFaceTask(tasks.RecognitionTask):
    """Shared by the three MinusFace tasks; ``mode`` picks the stage.

    Config (``configs/minusface.py``): ``model.backbone`` (IR family),
    ``model.embedding_size``, ``model.dropout``, ``head.*``, and
    ``minusface.{generator_widths, remat, n_duplicate, loss_weights,
    sparsity_target, stage1_workdir, stage1_step, stage1_command, eval_seed}``.
    """

    mode = "stage1"

    def __init__(self, config, num_classes: int, padded_classes: int | None = None):
        super().__init__(config, num_classes, padded_classes)  # the margin head
        mf = config.minusface
        m = config.model
        self.model = build_model(self.mode, backbone=m.backbone, embedding_size=m.embedding_size,
                                 dropout=m.get("dropout", 0.4), generator_widths=mf.generator_widths,
                                 n_duplicate=int(mf.get("n_duplicate", 1)), remat=bool(mf.get("remat", False)),
                                 dtype=self.dtype, generator_scale=float(mf.get("generator_scale", 1.0)))
        self.backbone = self.model.recognizer
        self.loss_weights = self.objective_weights(config)
        self.sparsity_target = float(mf.get("sparsity_target", 0.01))
        self.eval_key_seed = int(mf.get("eval_seed", 0))

    @classmethod
    def objective_weights(cls, config) -> dict:
        w = dict(losses.MINUS_DEFAULT_WEIGHTS, **dict(config.minusface.get("loss_weights", {}) or {}))
        if cls.mode == "stage2":
            # only the recogniser learns (the reference's MinusLoss('stage2') zeroes these)
            w["gen"] = w["spar"] = 0.0
        if cls.mode == "toy":
            w["spar"] = 0.0  # the reference's toy loss has no sparsity term
        return w

    # -- variables ------------------------------------------------------------------------------
    @staticmethod
    def _model_vars(params, model_state) -> dict:
        v = {"params": {"generator": params["generator"], "recognizer": params["recognizer"]}}
        if "batch_stats" in model_state:
            v["batch_stats"] = {"recognizer": model_state["batch_stats"]["recognizer"]}
        return v

    def init(self, rng, images, labels):
        # XLA:CPU compiles each partitionable-threefry draw slowly (~3 s per kernel
        # shape here, ~2 min for the ~70 leaves of U-Net + IR); the RBG generator
        # (one RngBitGenerator op per draw) compiles in seconds. Same distributions,
        # deterministic in ``rng``; only the initial values differ from a threefry init.
        rng = jax.random.key(jax.random.bits(rng, (), jnp.uint32), impl="rbg")
        r_m, r_h, r_k = jax.random.split(rng, 3)
        x = tasks.normalise_images(images)
        out, mv = self.model.init_with_output({"params": r_m, "dropout": r_m}, x, train=False, key=r_k)
        hd = self.head.init({"params": r_h, "sample": r_h}, out["x_feature"].astype(jnp.float32), labels)
        params = {"generator": mv["params"]["generator"], "recognizer": mv["params"]["recognizer"],
                  "head": hd["params"]}
        variables = {"params": params, "batch_stats": {"recognizer": mv.get("batch_stats", {}).get("recognizer", {})}}
        if "head_state" in hd:
            variables["head_state"] = {"head": hd["head_state"]}
        return variables

    # -- loss -----------------------------------------------------------------------------------
    def objective(self, image, x_encode, latent, logits, labels) -> dict:
        """The reference's ``MinusLoss(mode)`` with the configured weights: dict of loss terms.

        image / x_encode (B, 112, 112, 3) in [-1, 1] (stage 1: the decoded
        regeneration ``2 idct(g(x)) - 1``; toy: ``g(X)``), latent any layout,
        logits (B, classes), labels (B,).
        """
        return losses.minus_loss(image, x_encode, latent, logits, labels, self.loss_weights, self.sparsity_target)

    def loss(self, params, model_state, batch, rng, train=True):
        r_d, r_h, r_s = jax.random.split(rng, 3)
        x = tasks.normalise_images(batch["image"])
        if self.mode == "stage2":
            # belt and braces next to the 'frozen' optimiser group: no gradient is even computed for g
            params = {**params, "generator": jax.lax.stop_gradient(params["generator"])}
        perms = batch.get("perms")  # (B, n_duplicate, 192): recorded shuffles (parity runs), batch-major
        if perms is not None:
            perms = jnp.swapaxes(perms, 0, 1)
        out, upd = self.model.apply(self._model_vars(params, model_state), x, train=train, key=r_s, perms=perms,
                                    rngs={"dropout": r_d}, mutable=["batch_stats"])
        new_state = dict(model_state)
        if "batch_stats" in upd:
            new_state["batch_stats"] = {**model_state["batch_stats"], "recognizer": upd["batch_stats"]["recognizer"]}
        head_vars = {"params": params["head"]}
        if "head_state" in model_state:
            head_vars["head_state"] = model_state["head_state"]["head"]
        (logits, _), hs = self.head.apply(head_vars, out["x_feature"].astype(jnp.float32), batch["label"],
                                          train=train, rngs={"sample": r_h}, mutable=["head_state"])
        if "head_state" in model_state:
            new_state["head_state"] = {"head": hs["head_state"]}
        terms = self.objective(x, out["x_encode"], out["x_latent"], logits, batch["label"])
        metrics = dict(terms, accuracy=losses.top1_accuracy(logits, batch["label"]))
        return terms["loss"], (metrics, new_state)

    # -- inference ------------------------------------------------------------------------------
    def eval_permutations(self, images) -> jax.Array:
        """Stage-2 verification shuffles: (n_duplicate, N, 192), one permutation per image.

        Keyed by ``config.minusface.eval_seed`` and the image's pixel sum: independent
        across images, repeatable, the same for an image and its mirror, and not tied
        to the image's position in the batch. (One key per call would give batch
        position i the same permutation in every chunk; verification pairs sit at
        fixed positions, so pair distances then carry the permutation pattern and
        the 10-fold accuracy of a weak recogniser can land well below chance.)
        """
        x = tasks.normalise_images(images)
        ids = jnp.sum(jnp.round((x + 1.0) * 127.5), axis=(1, 2, 3)).astype(jnp.uint32)
        base = jax.random.key(self.eval_key_seed)
        n_dup = self.model.n_duplicate
        perms = jax.vmap(lambda i: draw_permutations(jax.random.fold_in(base, i), 1, n_dup)[:, 0])(ids)
        return jnp.swapaxes(perms, 0, 1)

    def protect(self, variables, images, key=None, *, perms=None):
        """Client side: faces (N, 112, 112, 3) (uint8, or float in [-1, 1]) -> the recogniser's input.

        Needs only ``variables['params']['generator']``. Stage 2: ``X_p``
        (N, 112, 112, 3 * n_duplicate) in [0, 1]; pass a fresh ``key`` per call
        (or explicit ``perms`` (n_duplicate, N, 192)).
        """
        if self.mode == "stage2" and key is None and perms is None:
            raise ValueError("protect: stage 2 needs a jax.random key (a fresh one per call)")
        gv = {"params": {"generator": variables["params"]["generator"]}}
        return self.model.apply(gv, tasks.normalise_images(images), key, perms=perms, method=MinusBackbone.protect)

    def recognize(self, variables, x_p):
        """Server side: the protected input (as ``protect`` returns it) -> (N, embedding).

        Needs only the recogniser's params and batch_stats.
        """
        rv = {"params": {"recognizer": variables["params"]["recognizer"]}}
        if "batch_stats" in variables:
            rv["batch_stats"] = {"recognizer": variables["batch_stats"]["recognizer"]}
        return self.model.apply(rv, x_p, train=False, method=MinusBackbone.recognize)

    def embed(self, variables, images):
        """Verification embeddings: the recogniser on what the client would send.

        Stage 2 shuffles each image with ``eval_permutations`` (repeatable).
        """
        perms = self.eval_permutations(images) if self.mode == "stage2" else None
        return self.recognize(variables, self.protect(variables, images, perms=perms))

    def param_group(self, path):
        if path and path[0] == "generator":
            return "frozen" if self.mode == "stage2" else "generator"
        return "default"


@tasks.register("minusface_stage1")
class MinusFaceStage1(MinusFaceTask):
    mode = "stage1"


@tasks.register("minusface_toy")
class MinusFaceToy(MinusFaceTask):
    mode = "toy"


@tasks.register("minusface_stage2")
class MinusFaceStage2(MinusFaceTask):
    """Stage 2: the generator comes from the stage-1 run in ``config.minusface.stage1_workdir``."""

    mode = "stage2"

    def __init__(self, config, num_classes: int, padded_classes: int | None = None):
        super().__init__(config, num_classes, padded_classes)
        self.stage1_generator, self.stage1_step = self._load_generator(config)

    def _load_generator(self, config):
        mf = config.minusface
        wd = mf.get("stage1_workdir", "") or ""
        how = (mf.get("stage1_command", "")
               or "python -m ppfr_jax.main --config configs/minusface.py:stage1 --workdir <dir>")
        hint = (f"Train stage 1 first (with this run's data flags):\n    {how}\nthen point stage 2 at it: "
                f"--config.minusface.stage1_workdir=<that workdir>")
        if not wd:
            raise Stage1CheckpointNotFound(
                "config.minusface.stage1_workdir is empty: MinusFace stage 2 freezes the generator of a finished "
                "stage-1 run and needs its workdir. " + hint)
        step = int(mf.get("stage1_step", 0) or 0) or None
        try:
            variables, step = restore_variables(wd, step)
        except FileNotFoundError as e:
            raise Stage1CheckpointNotFound(
                f"config.minusface.stage1_workdir={wd!r}: {e}; MinusFace stage 2 needs the generator of a "
                f"finished stage-1 run. " + hint) from None
        gen = variables["params"].get("generator")
        if gen is None:
            raise Stage1CheckpointNotFound(
                f"config.minusface.stage1_workdir={wd!r}: the checkpoint of step {step} has no generator "
                f"(params: {sorted(variables['params'])}); is it a MinusFace stage-1 run? " + hint)
        want = jax.eval_shape(self.model.generator.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 112, 112, frequency.NUM_CHANNELS), jnp.float32))["params"]
        got_s = jax.tree.map(lambda a: tuple(a.shape), gen)
        want_s = jax.tree.map(lambda a: tuple(a.shape), want)
        if got_s != want_s:
            raise ValueError(
                f"config.minusface.generator_widths={tuple(mf.generator_widths)} does not match the generator "
                f"saved in {wd!r} (step {step}); use the stage-1 run's widths")
        try:
            s1_scale = float(load_run_config(wd).get("minusface", {}).get("generator_scale", 1.0))
        except (FileNotFoundError, ValueError):
            s1_scale = None  # a checkpoint without its run's config (e.g. imported): nothing to check against
        if s1_scale is not None and s1_scale != float(mf.get("generator_scale", 1.0)):
            raise ValueError(
                f"config.minusface.generator_scale={mf.get('generator_scale', 1.0)} does not match the stage-1 run "
                f"in {wd!r} (generator_scale={s1_scale}); the frozen generator computes scale * U(x / scale), so "
                f"use --config.minusface.generator_scale={s1_scale}")
        if jax.process_index() == 0:
            print(f"MinusFace stage 2: frozen generator from {os.path.abspath(wd)} (step {step})", flush=True)
        return gen, step

    def init(self, rng, images, labels):
        variables = super().init(rng, images, labels)
        # the stage-1 generator, as constants of the (one-off) init program
        want = variables["params"]["generator"]
        variables["params"]["generator"] = jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype),
                                                        self.stage1_generator, want)
        return variables
