"""Flax Linen models, and THE table of their names: ``BACKBONES`` / ``get_model``.

Every model a config, ``ppfr-import`` or a tool can name is one entry here,
under one name (TFace's spelling: ``ir_se50``, not ``irse50``); config
validation, the training tasks and the weight importer all read this table.
Entries are resolved lazily (``importlib``), so importing this package does not
import Flax. NHWC inside; ``ppfr_jax.frequency`` has the NCHW helpers.

``role``: ``recognizer`` (a face recogniser: image in, embedding out; what
``config.model.backbone`` may name; ``CLIENT_BACKBONES`` of them can be
DuetFace's client), ``client`` (the paper's DuetFace client, for
``ppfr-import``), or ``part`` (detector, generator, evaluation recogniser:
importable, not trainable as a backbone).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from ppfr_jax.errors import PpfrError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a named model lives and how it is built.

    Attributes:
      module: submodule of ``ppfr_jax.models``.
      factory: class or ``functools.partial`` in it.
      role: ``'recognizer'``, ``'client'`` or ``'part'`` (see the module doc).
      kwargs: fixed constructor arguments of this name.
      input_hw: (H, W) of the input image.
      channels: input channels ``ppfr-import`` builds the model for by default.
      channel_fields: constructor fields set to the input channel count.
      dropout: the constructor takes ``dropout`` (IR nets).
      ignore: regexes of PyTorch keys ``ppfr-import`` may leave unused.
    """

    module: str
    factory: str
    role: str = "recognizer"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_hw: tuple[int, int] = (112, 112)
    channels: int = 3
    channel_fields: tuple[str, ...] = ("in_channels",)
    dropout: bool = False
    ignore: tuple[str, ...] = ()


def _ir(factory: str) -> ModelSpec:
    return ModelSpec("iresnet", factory, dropout=True)


BACKBONES: dict[str, ModelSpec] = {
    "ir18": _ir("IR18"), "ir34": _ir("IR34"), "ir50": _ir("IR50"), "ir100": _ir("IR100"),
    "ir152": _ir("IR152"), "ir200": _ir("IR200"),
    "ir_se50": _ir("IRSE50"), "ir_se100": _ir("IRSE100"), "ir_se152": _ir("IRSE152"), "ir_se200": _ir("IRSE200"),
    "ir_tiny": _ir("IR_TINY"),  # IR-18's structure minus one unit per stage, toy widths: tests and demos
    "mobilefacenet": ModelSpec("mobilefacenet", "MobileFaceNet"),
    "mobilefacenet_tiny": ModelSpec("mobilefacenet", "MobileFaceNetTiny", kwargs={"head": "gdc"}),
    # the paper's DuetFace client as ``ppfr-import`` reads it: MobileFaceNet, 30 DCT channels, client output layer
    "duetface_client": ModelSpec("mobilefacenet", "MobileFaceNet", role="client",
                                 kwargs={"head": "client"}, channels=30),
    "pfld": ModelSpec("pfld", "PFLDInference", role="part"),
    # MinusFace generator: DCT mode 192 -> 192 (``--input-channels 3`` for toy mode).
    "unet": ModelSpec("unet", "UNet", role="part", channels=192, channel_fields=("in_channels", "out_channels")),
    "casia_mobilefacenet": ModelSpec("mobilefacenet_casia", "CasiaMobileFaceNet", role="part", input_hw=(112, 96)),
}

RECOGNIZERS: tuple[str, ...] = tuple(n for n, s in BACKBONES.items() if s.role == "recognizer")
# what ``config.duetface.client_backbone`` may name: recognizers that return DuetFace's four feature maps
# (``return_features=True``); built with ``in_channels=3 * len(sub_channels)``, ``head='client'``
CLIENT_BACKBONES: tuple[str, ...] = ("mobilefacenet", "mobilefacenet_tiny")


class UnknownBackboneError(PpfrError, LookupError):
    """A model name that is not in ``BACKBONES`` (or not of the role asked for)."""


def spec(name: str, role: str | None = None) -> ModelSpec:
    """The entry of ``name``. Raises UnknownBackboneError naming the known ones (of ``role``, if given)."""
    known = [n for n, s in BACKBONES.items() if role is None or s.role == role]
    if name not in known:
        hint = " (renamed ir_se50, TFace's name: edit the run's config.json)" if name == "irse50" else ""
        raise UnknownBackboneError(f"unknown {role or 'model'} {name!r}{hint}; choose one of {known}")
    return BACKBONES[name]


def factory(name: str, role: str | None = None):
    """The class / partial of ``name`` (imports its module). Raises UnknownBackboneError."""
    s = spec(name, role)
    module = importlib.import_module(f"ppfr_jax.models.{s.module}")
    try:
        return getattr(module, s.factory)
    except AttributeError:
        raise UnknownBackboneError(f"model {name!r}: ppfr_jax.models.{s.module} has no {s.factory}") from None


def get_model(name: str, role: str | None = None, *, dropout: float | None = None, **kwargs):
    """Build the model ``name``: ``factory(**spec.kwargs, **kwargs)``.

    Args:
      name: a key of ``BACKBONES``.
      role: if given, ``name`` must have this role (``'recognizer'`` for
        ``config.model.backbone``, ``'client'`` for DuetFace's client).
      dropout: passed only to models that take it (IR nets); ignored by the others.
      **kwargs: constructor fields (``embedding_size``, ``in_channels``, ``dtype``...).

    Raises:
      UnknownBackboneError: unknown name, or one of another role.
    """
    s = spec(name, role)
    kw = {**s.kwargs, **kwargs}
    if dropout is not None and s.dropout:
        kw["dropout"] = dropout
    return factory(name)(**kw)
