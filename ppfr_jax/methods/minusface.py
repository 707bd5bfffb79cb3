"""MinusFace as a method: its training tasks, the frozen generator, eval shuffles and the client/server split.

Tasks (``tasks.register``), on ``models.minusface.MinusBackbone``:
``minusface_stage1`` (generator + recogniser on the residue ``x - g(x)``; loss
``gen * L1 + fr * ArcFace-CE + spar * KL``, ``losses.minus_loss``),
``minusface_stage2`` (``g`` frozen, read from ``config.minusface.stage1_workdir``
by ``checkpoints.load_frozen``; a new recogniser on ``X_p = idct(shuffle(r))``
in [0, 1]; without a stage-1 run, ``Stage1CheckpointNotFound`` names the field
and the command that makes it) and ``minusface_toy`` (the U-Net on RGB).
Variables: ``params = {generator, recognizer, head}`` (the generator's
optimiser group ``'generator'``), ``batch_stats = {recognizer}``; in stage 2
the generator is not a parameter: ``frozen = {generator: {params}}``, outside
the optimiser, as DuetFace's client. Verification shuffles (stage 2) are keyed by
``config.minusface.eval_seed`` and each image (``eval_permutations``). Unlike
the reference trainer: weight decay on kernels only, repeatable verification
shuffles, RBG-keyed init (same distributions), the generator's learning-rate
multiplier actually applied (``config.optim.lr_multipliers['generator']``).

Client/server split (``MinusFaceSplit``, the contract of ``ppfr_jax.methods``):
the client holds only ``g``, takes fresh permutations (B, n_duplicate, 192)
int32 and sends ``x_p`` (B, 112, 112, 3 * n_duplicate) in [0, 1]; the server
holds only the recogniser.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ppfr_jax import checkpoints, frequency, losses, tasks
from ppfr_jax.config_lib import ConfigError
from ppfr_jax.errors import PpfrError
from ppfr_jax.methods.contract import take
from ppfr_jax.models import unet
from ppfr_jax.models.layers import rbg_init_key
from ppfr_jax.models import minusface as minusface_model
from ppfr_jax.models.minusface import MinusBackbone

IMAGE_SIZE = frequency.IMAGE_SIZE


def build_model(mode: str = "stage1", *, backbone: str = "ir18", embedding_size: int = 512, dropout: float = 0.4,
                generator_widths=unet.DEFAULT_WIDTHS, n_duplicate: int = 1, remat: bool = False,
                dtype=jnp.float32, generator_scale: float = 1.0) -> MinusBackbone:
    """A ``MinusBackbone`` for ``mode`` with the IR recogniser ``backbone`` (a ``tasks.build_backbone`` name).

    Raises:
      ValueError naming the config field (not an IR backbone, n_duplicate < 1, widths, generator_scale).
    """
    if not backbone.startswith("ir"):
        raise ValueError(f"config.model.backbone: MinusFace's recogniser is an IR net (ir18, ir50, ...), "
                         f"got {backbone!r}")
    if n_duplicate < 1:
        raise ValueError(f"config.minusface.n_duplicate must be >= 1, got {n_duplicate}")
    recognizer = tasks.build_backbone(backbone, embedding_size, dropout, dtype)
    return minusface_model.build_model(mode, recognizer=recognizer, generator_widths=generator_widths,
                                       n_duplicate=n_duplicate, remat=remat, dtype=dtype,
                                       generator_scale=generator_scale)


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
        self.split = MinusFaceSplit(self.model)
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
        v = {"params": {"generator": generator_params({"params": params, **model_state}),
                        "recognizer": params["recognizer"]}}
        if "batch_stats" in model_state:
            v["batch_stats"] = {"recognizer": model_state["batch_stats"]["recognizer"]}
        return v

    def init(self, rng, images, labels):
        rng = rbg_init_key(rng)  # compiles in seconds on CPU where threefry takes minutes
        r_m, r_h, r_k = jax.random.split(rng, 3)
        x = tasks.normalize_images(images)
        out, mv = self.model.init_with_output({"params": r_m, "dropout": r_m}, x, train=False, key=r_k)
        hd = self.head.init({"params": r_h, "sample": r_h}, out["x_feature"].astype(jnp.float32), labels)
        params = {"generator": mv["params"]["generator"], "recognizer": mv["params"]["recognizer"],
                  "head": hd["params"]}
        variables = {"params": params, "batch_stats": {"recognizer": mv.get("batch_stats", {}).get("recognizer", {})}}
        if "head_state" in hd:
            variables["head_state"] = {"head": hd["head_state"]}
        return variables

    # -- loss -----------------------------------------------------------------------------------
    def objective(self, image, x_encode, latent, logits, labels, ce=None) -> dict:
        """The reference's ``MinusLoss(mode)`` with the configured weights: dict of loss terms.

        image / x_encode (B, 112, 112, 3) in [-1, 1] (stage 1: the decoded
        regeneration ``2 idct(g(x)) - 1``; toy: ``g(X)``), latent any layout,
        logits (B, classes), labels (B,).
        """
        return losses.minus_loss(image, x_encode, latent, logits, labels, self.loss_weights, self.sparsity_target,
                                 ce=ce)

    def loss(self, params, model_state, batch, rng, train=True):
        r_d, r_h, r_s = jax.random.split(rng, 3)
        x = tasks.normalize_images(batch["image"])
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
        head_out, hs = self.head.apply(head_vars, out["x_feature"].astype(jnp.float32), batch["label"],
                                       train=train, return_loss=True, rngs={"sample": r_h}, mutable=["head_state"])
        if "head_state" in model_state:
            new_state["head_state"] = {"head": hs["head_state"]}
        terms = self.objective(x, out["x_encode"], out["x_latent"], None, None, ce=head_out.pop("loss"))
        # plain cosines, as tasks.py (``accuracy_sampled`` under PartialFC: over the sampled classes only)
        metrics = dict(terms, **head_out)
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
        x = tasks.normalize_images(images)
        ids = jnp.sum(jnp.round((x + 1.0) * 127.5), axis=(1, 2, 3)).astype(jnp.uint32)
        base = jax.random.key(self.eval_key_seed)
        n_dup = self.model.n_duplicate
        perms = jax.vmap(lambda i: frequency.draw_permutations(jax.random.fold_in(base, i), 1, n_dup)[:, 0])(ids)
        return jnp.swapaxes(perms, 0, 1)

    def embed(self, variables, images):
        """Verification embeddings: the recogniser on what the client would send.

        Stage 2 shuffles each image with ``eval_permutations`` (repeatable).
        """
        perms = self.eval_permutations(images) if self.mode == "stage2" else None
        gv = {"params": {"generator": generator_params(variables)}}
        x_p = self.model.apply(gv, tasks.normalize_images(images), perms=perms, method=MinusBackbone.protect)
        rv = {"params": {"recognizer": variables["params"]["recognizer"]}}
        if "batch_stats" in variables:
            rv["batch_stats"] = {"recognizer": variables["batch_stats"]["recognizer"]}
        return self.model.apply(rv, x_p, train=False, method=MinusBackbone.recognize)

    def param_group(self, path):
        return "generator" if path and path[0] == "generator" else "default"  # stage 2 has no generator param


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
        """-> (the stage-1 run's generator params (numpy), its step); checks widths and ``generator_scale``."""
        mf = config.minusface
        want = jax.eval_shape(self.model.generator.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, frequency.NUM_CHANNELS),
                                                   jnp.float32))["params"]
        wd = mf.get("stage1_workdir", "") or ""
        gen, step = checkpoints.load_frozen(
            wd, ("params", "generator"), field="config.minusface.stage1_workdir",
            what="MinusFace stage 2 freezes the generator of a finished stage-1 run (with this run's data flags)",
            how_to_make=(mf.get("stage1_command", "")
                         or "python -m ppfr_jax.main --config configs/minusface.py:stage1 --workdir <dir>"),
            want=want, mismatch_hint=(f"config.minusface.generator_widths={tuple(mf.generator_widths)} must be "
                                      f"the stage-1 run's widths"),
            step=int(mf.get("stage1_step", 0) or 0) or None, not_found=Stage1CheckpointNotFound)
        try:
            s1_scale = float(checkpoints.load_run_config(wd).get("minusface", {}).get("generator_scale", 1.0))
        except (FileNotFoundError, ValueError):
            s1_scale = None  # a checkpoint without its run's config (e.g. imported): nothing to check against
        if s1_scale is not None and s1_scale != float(mf.get("generator_scale", 1.0)):
            raise ConfigError(
                f"config.minusface.generator_scale={mf.get('generator_scale', 1.0)} does not match the stage-1 run "
                f"in {wd!r} (generator_scale={s1_scale}); the frozen generator computes scale * U(x / scale), so "
                f"use --config.minusface.generator_scale={s1_scale}")
        if jax.process_index() == 0:
            print(f"MinusFace stage 2: frozen generator from {os.path.abspath(wd)} (step {step})", flush=True)
        return gen, step

    def init(self, rng, images, labels):
        """Variables as stage 1's, except that the generator is not a parameter: the stage-1 generator sits in
        ``frozen = {'generator': {'params': ...}}`` (as DuetFace's client does), outside the optimiser."""
        variables = super().init(rng, images, labels)
        want = variables["params"].pop("generator")
        # the stage-1 generator, as constants of the (one-off) init program
        variables["frozen"] = {"generator": {"params": jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype),
                                                                    self.stage1_generator, want)}}
        return variables


# ----------------------------------------------------------------------------- client/server contract


def generator_params(variables) -> Any:
    """The generator's params in a run's variables: ``frozen/generator/params`` (stage 2) or
    ``params/generator`` (stage 1, toy, and stage-2 runs written before it moved).

    Raises ``contract.MissingVariables`` naming ``frozen/generator/params`` when neither is there."""
    frozen = variables.get("frozen", {}) if isinstance(variables, Mapping) else {}
    if isinstance(frozen, Mapping) and "generator" in frozen:
        return take(variables, "frozen/generator/params")
    if isinstance(variables.get("params"), Mapping) and "generator" in variables["params"]:
        return variables["params"]["generator"]
    return take(variables, "frozen/generator/params")


class MinusFaceSplit:
    """MinusFace's client/server contract (see ``ppfr_jax.methods``), for a stage-2 ``MinusBackbone``.

    Client input ``extra``: permutations (B, n_duplicate, 192) int32, each row
    a permutation of 0..191 (not checked here: the caller draws or checks them).
    Transmitted: ``x_p`` (B, 112, 112, 3 * n_duplicate) in [0, 1]. Engine
    variables: ``frozen/generator/params``, ``params/recognizer``,
    ``batch_stats/recognizer`` (a stage-1 run, and stage-2 runs written before
    the generator moved out of the parameters: ``params/generator``).
    """

    method = "minusface"
    tasks = ("minusface_stage2",)
    input_names = ("images", "permutations")
    output_names = ("x_p",)

    def __init__(self, model: MinusBackbone):
        self.model = model

    @classmethod
    def from_config(cls, config) -> "MinusFaceSplit":
        """The split of a stage-2 run with this config (float32)."""
        mf, m = config.minusface, config.model
        return cls(build_model("stage2", backbone=m.backbone, embedding_size=m.embedding_size,
                               dropout=m.get("dropout", 0.4), generator_widths=mf.generator_widths,
                               n_duplicate=int(mf.get("n_duplicate", 1)),
                               generator_scale=float(mf.get("generator_scale", 1.0))))

    @property
    def n_duplicate(self) -> int:
        return int(self.model.n_duplicate)

    def describe(self) -> dict[str, str]:
        """What a deployed client records about itself (ONNX metadata)."""
        return {"ppfr.n_duplicate": str(self.n_duplicate)}

    def input_specs(self, batch: int | str = "B") -> list[jax.ShapeDtypeStruct]:
        """images (B, 112, 112, 3) float32 in [-1, 1]; permutations (B, n_duplicate, 192) int32."""
        return [jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
                jax.ShapeDtypeStruct((batch, self.n_duplicate, frequency.NUM_CHANNELS), jnp.int32)]

    def init_variables(self, key) -> dict:
        """Untrained variables in a stage-2 run's layout (no head), from ``key``."""
        x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
        v = dict(self.model.init({"params": key, "dropout": key}, x, key=key))
        params = dict(v["params"])
        v["frozen"] = {"generator": {"params": params.pop("generator")}}
        v["params"] = params
        return v

    def client_variables(self, variables) -> dict:
        """Engine variables -> the client half: the generator's params."""
        return {"params": {"generator": generator_params(variables)}}

    def server_variables(self, variables) -> dict:
        """Engine variables -> the server half: the recogniser's params and batch_stats."""
        return {"params": {"recognizer": take(variables, "params/recognizer")},
                "batch_stats": {"recognizer": take(variables, "batch_stats/recognizer")}}

    def split_variables(self, variables) -> tuple[dict, dict]:
        """Engine variables -> ``(client_variables, server_variables)``.

        Raises ``contract.MissingVariables`` naming the first missing sub-tree.
        """
        return self.client_variables(variables), self.server_variables(variables)

    def client_fn(self, client_vars, images, extra) -> dict:
        """images (B, 112, 112, 3) uint8 / float [-1, 1] + permutations (B, n_duplicate, 192) -> {'x_p'}."""
        perms = jnp.swapaxes(jnp.asarray(extra, jnp.int32), 0, 1)  # -> (n_duplicate, B, 192)
        x_p = self.model.apply(client_vars, tasks.normalize_images(images), perms=perms,
                               method=MinusBackbone.protect)
        return {"x_p": x_p}

    def server_fn(self, server_vars, transmitted: Mapping[str, Any]) -> jax.Array:
        """{'x_p': (B, 112, 112, 3 * n_duplicate)} -> embeddings (B, E) (not normalised); recogniser only."""
        return self.model.apply(server_vars, transmitted["x_p"], train=False, method=MinusBackbone.recognize)
