"""Recognizers ``ppfr-eval`` and the privacy suite evaluate: the :data:`MODELS` registry.

A :class:`Recognizer` is what evaluation needs from a model: ``apply_fn``
(B, H, W, 3) preprocessed input -> (B, D) embeddings (or a
``WithVariables``), ``preprocess`` uint8 -> model input, its input size and
alignment template, and its flip fusion. ``MODELS[name](checkpoint)`` loads
one: ``casia_mobilefacenet`` (the pretrained CASIA MobileFaceNet, 112x96,
SphereFace template, concat flip) and ``ppfr`` (a ppfr_jax training workdir
via ``methods.load_for_inference``: the task's own verification embedding,
the same function, loop and flip the training run's DevTest evaluation uses).
New kinds plug in with :func:`register_model`. :func:`evaluate_set` embeds a
set's distinct images once and runs the k-fold protocol on its pairs.
Errors: ``BadInputError`` (images the model cannot take), ``FileNotFoundError``
(no workdir or checkpoint).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
from absl import logging

from ppfr_jax import methods
from ppfr_jax.evaluate.embedding import WithVariables, embed
from ppfr_jax.evaluate.protocol import verify
from ppfr_jax.evaluate.sets import BadInputError, LazyImages, VerificationSet
from ppfr_jax.models import mobilefacenet_casia as mc


def _identity(x):
    return x


@dataclasses.dataclass
class Recognizer:
    """What ``ppfr-eval`` needs from a model.

    Attributes:
      apply_fn: jittable (B, H, W, 3) preprocessed input -> (B, D) embeddings (a
        ``WithVariables`` keeps its weights as jit arguments).
      preprocess: jittable uint8 (B, H, W, 3) -> model input.
      input_hw: (H, W) the model takes.
      template: alignment template its training data used (``ppfr_jax.align.TEMPLATES``).
      flip: default flip fusion ("sum", "concat" or None).
    """

    apply_fn: Callable
    preprocess: Callable
    input_hw: tuple[int, int]
    template: str = "arcface"
    flip: str | None = "sum"


MODELS: dict[str, Callable[[str], Recognizer]] = {}


def register_model(name: str):
    """Decorator: ``@register_model("x") def load(checkpoint: str) -> Recognizer``; ``--model x`` uses it."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


@register_model("casia_mobilefacenet")
def _load_casia_mobilefacenet(checkpoint: str) -> Recognizer:
    model, variables = mc.load_casia_mobilefacenet(checkpoint)
    return Recognizer(apply_fn=lambda x: model.apply(variables, x, train=False), preprocess=mc.preprocess,
                      input_hw=tuple(mc.INPUT_HW), template="sphereface", flip="concat")


@register_model("ppfr")
def _load_ppfr_workdir(checkpoint: str) -> Recognizer:
    """A ppfr_jax training workdir (``--checkpoint runs/x``): the task's own verification embedding.

    DuetFace embeds through client + server, MinusFace stage 2 through protect +
    recognize (``task.embed``), as the training run's DevTest evaluation does.
    """
    if not os.path.isdir(checkpoint) and "://" not in checkpoint:
        raise FileNotFoundError(f"--checkpoint {checkpoint!r}: not a directory (a ppfr_jax training workdir)")
    task, variables, step = methods.load_for_inference(checkpoint)
    logging.info("%s: task %s, checkpoint of step %d", checkpoint, task.config.task, step)
    flip = "sum" if task.config.eval.get("flip", True) else None
    return Recognizer(apply_fn=WithVariables(task.embed, variables), preprocess=_identity, input_hw=(112, 112),
                      template="arcface", flip=flip)


def fit_to_input(images: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Adapt aligned crops to a model's input size without resampling.

    ArcFace 112x112 crops -> SphereFace 112x96 by dropping 8 columns each side
    (the two templates differ by exactly that shift). ``images``: (N, H, W, 3), or
    :class:`~ppfr_jax.evaluate.sets.LazyImages` (cropped as each batch is decoded).
    """
    hw = tuple(images.shape[1:3])
    if hw == tuple(input_hw):
        return images
    if hw == (112, 112) and tuple(input_hw) == (112, 96):
        if isinstance(images, LazyImages):
            return images.transformed(lambda x: x[:, :, 8:104], (112, 96) + tuple(images.shape[3:]))
        return images[:, :, 8:104]
    raise BadInputError(f"images are {hw[0]}x{hw[1]} (HxW) but the model takes "
                        f"{input_hw[0]}x{input_hw[1]}; align them with the model's template")


def evaluate_set(rec: Recognizer, vs: VerificationSet, *, batch_size: int = 128, flip: str | None = None,
                 nrof_folds: int = 10) -> dict[str, Any]:
    """Embed the distinct images of a set once and run :func:`verify` on its pairs."""
    images = fit_to_input(vs.images, rec.input_hw)
    emb = embed(rec.apply_fn, images, batch_size=batch_size, flip=flip, preprocess=rec.preprocess)
    res = verify(emb[vs.pairs.reshape(-1)], vs.issame, nrof_folds=nrof_folds)
    res["num_pairs"] = int(vs.issame.size)
    res["skipped"] = list(vs.skipped)
    return res
