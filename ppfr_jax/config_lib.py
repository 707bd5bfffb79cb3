"""Config helpers: variant parsing (big_vision style), shared defaults, validation.

Every experiment is ``configs/<name>.py`` with ``get_config(arg=None)``; the
argument selects variants, e.g. ``--config configs/arcface.py:ir50`` or
``configs/arcface.py:demo``.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

BACKBONES = ("ir18", "ir34", "ir50", "ir100", "irse50", "ir_tiny", "mobilefacenet", "mobilefacenet_tiny")
INPUTS = ("rgb", "dct")
HEADS = ("arcface", "cosface", "curricularface")
DATA_SOURCES = ("demo", "tfrecord", "image_folder", "tfds", "synthetic")


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """``'ir50,demo,steps=10'`` -> ConfigDict(ir50=True, demo=True, steps=10) over ``spec`` defaults.

    Bare names must be declared in ``spec`` (as booleans); unknown names are
    rejected so a typo in a variant does not silently run the default.
    """
    out = ml_collections.ConfigDict(dict(spec))
    if not arg:
        return out
    for part in arg.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            if k not in spec:
                raise ValueError(f"unknown config argument {k!r}; known: {sorted(spec)}")
            d = spec[k]
            out[k] = type(d)(v) if d is not None and not isinstance(d, bool) else (
                v.lower() in ("1", "true", "yes") if isinstance(d, bool) else v)
        else:
            if part not in spec:
                raise ValueError(f"unknown config variant {part!r}; known: {sorted(spec)}")
            out[part] = True
    return out


def load_config_spec(spec: str, error: type[Exception] = ValueError) -> ml_collections.ConfigDict:
    """``'configs/minusface.py:stage2,tiny'`` -> that file's ``get_config('stage2,tiny')``.

    A missing file or one without ``get_config`` raises ``error`` naming the spec.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise error(f"--config {spec!r}: {path} is not a file (expected configs/<name>.py[:variant])")
    mod_spec = importlib.util.spec_from_file_location(f"_ppfr_config_{pathlib.Path(path).stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise error(f"--config {spec!r}: {path} has no get_config()")
    return mod.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every training config (the paper settings)."""
    c = ml_collections.ConfigDict()
    c.task = "arcface"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        backbone="ir18", input="rgb", embedding_size=512, dropout=0.4))
    c.head = ml_collections.ConfigDict(dict(kind="arcface", scale=64.0, margin=0.5, sample_rate=1.0))
    c.data = ml_collections.ConfigDict(dict(
        source="demo", path="", index="", tfds_name="", num_classes=0, flip=True, shuffle_buffer=2048,
        skip_bad=False, landmarks=False))
    c.eval = ml_collections.ConfigDict(dict(pairs="demo", every_steps=0, batch_size=128, flip=True))
    c.batch_size_per_device = 64
    c.batch_size = 0  # global; 0 = per_device * device count
    c.num_epochs = 24.0
    c.num_train_steps = 0  # >0 overrides epochs
    c.steps_per_epoch = 0  # 0 = from the dataset size
    c.optim = ml_collections.ConfigDict(dict(
        lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, boundaries_epochs=(10, 18, 22),
        decay_factor=0.1, warmup_epochs=0.0, grad_clip_norm=0.0, lr_multipliers={}))
    c.half_precision = False
    c.mesh = ml_collections.ConfigDict(dict(model=1))
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.keep_best = 1
    return c


def _exists(path: str) -> bool:
    """Local paths are checked here; URLs (gs://...) are left to the reader that opens them."""
    return "://" in str(path) or os.path.exists(path)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Reject bad values before anything is built, naming the field."""
    def bad(field, msg):
        raise ValueError(f"config.{field}: {msg}")

    m = config.model
    if m.backbone not in BACKBONES:
        bad("model.backbone", f"unknown backbone {m.backbone!r}; choose one of {BACKBONES}")
    if m.input not in INPUTS:
        bad("model.input", f"unknown input {m.input!r}; choose one of {INPUTS}")
    if config.head.kind not in HEADS:
        bad("head.kind", f"unknown head {config.head.kind!r}; choose one of {HEADS}")
    if not 0 < config.head.sample_rate <= 1:
        bad("head.sample_rate", f"must be in (0, 1], got {config.head.sample_rate}")
    o = config.optim
    if not o.lr > 0:
        bad("optim.lr", f"learning rate must be > 0, got {o.lr}")
    if o.weight_decay < 0:
        bad("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not 0 <= o.momentum < 1:
        bad("optim.momentum", f"must be in [0, 1), got {o.momentum}")
    if list(o.boundaries_epochs) != sorted(o.boundaries_epochs):
        bad("optim.boundaries_epochs", f"must be increasing, got {list(o.boundaries_epochs)}")
    for k, v in dict(o.lr_multipliers).items():
        if not v >= 0:
            bad(f"optim.lr_multipliers.{k}", f"must be >= 0, got {v}")
    if config.batch_size_per_device <= 0 and config.batch_size <= 0:
        bad("batch_size_per_device", f"must be > 0, got {config.batch_size_per_device}")
    if num_devices is not None and config.batch_size > 0 and config.batch_size % num_devices:
        bad("batch_size", f"global batch {config.batch_size} is not divisible by the {num_devices} devices")
    if num_devices is not None and num_devices % max(config.mesh.model, 1):
        bad("mesh.model", f"{config.mesh.model} does not divide the {num_devices} devices")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        bad("num_epochs", "set num_epochs > 0 or num_train_steps > 0")
    d = config.data
    if d.source not in DATA_SOURCES:
        bad("data.source", f"unknown source {d.source!r}; choose one of {DATA_SOURCES}")
    if d.source in ("tfrecord", "image_folder"):
        if not d.path:
            bad("data.path", f"data.source={d.source!r} needs data.path")
        if not _exists(d.path):
            bad("data.path", f"{d.path!r} does not exist")
        if d.source == "tfrecord" and d.index and not _exists(d.index):
            bad("data.index", f"{d.index!r} does not exist")
    if d.source == "tfds" and not d.tfds_name:
        bad("data.tfds_name", "data.source='tfds' needs data.tfds_name")
    if d.source == "synthetic" and d.num_classes <= 0:
        bad("data.num_classes", "data.source='synthetic' needs num_classes > 0")
    ev = config.eval
    if ev.pairs not in ("demo", "") and not _exists(ev.pairs):
        bad("eval.pairs", f"{ev.pairs!r} does not exist (use 'demo' or '' to disable)")
