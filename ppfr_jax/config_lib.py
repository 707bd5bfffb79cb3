"""Config helpers: variant parsing (big_vision style), shared defaults, validation.

Every experiment is ``configs/<name>.py`` with ``get_config(arg=None)``; the
argument selects variants, e.g. ``--config configs/arcface.py:ir50`` or
``configs/arcface.py:demo``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib

import ml_collections
import numpy as np

from ppfr_jax import models
from ppfr_jax.errors import PpfrError

INPUTS = ("rgb", "dct")
HEADS = ("arcface", "cosface", "curricularface")
DATA_SOURCES = ("demo", "tfrecord", "image_folder", "recordio", "tfds", "synthetic")
# data.loader: how listed sources are read (ppfr_jax.data.train_source); "auto" = tf.data when TensorFlow imports
DATA_LOADERS = ("auto", "tf", "numpy")


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
    try:
        return mod.get_config(arg or None)
    except ValueError as e:  # a bad variant argument: the config file's own message, naming the spec
        raise error(f"--config {spec!r}: {e}") from None


PIPELINE_STAGES = {"duetface": ("client", "server"), "minusface": ("stage1", "stage2")}
# the shared CASIA recogniser (../shared/data/models/PROVENANCE.md), next to the repository checkout
CASIA_CHECKPOINT = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "models"
                       / "mobilefacenet_casia_xiaoccer" / "068.ckpt")


def pipeline_attack_and_baseline(configs_dir, method: str, size: str, attack_steps: int = 0):
    """The demo/tiny pipeline's privacy config (one row, ``method``'s view, the CASIA recogniser) and its
    equal-budget RGB baseline (``arcface.py:demo,match=<method>``, or ``:tiny``), read from ``configs_dir``.

    -> ``(privacy_config, baseline_config)``; ``attack_steps`` 0: 200 attacker steps for demo, 2 for tiny.
    """
    configs_dir = pathlib.Path(configs_dir)
    privacy = load_config_spec(f"{configs_dir / 'privacy.py'}:{size},rows={method}")
    privacy.allow_untrained = False  # the pipeline trains the run the attack reads
    privacy.recognizer.checkpoint = CASIA_CHECKPOINT  # skipped with the reason when absent
    privacy.attacker.steps = attack_steps or (200 if size == "demo" else 2)
    baseline = load_config_spec(f"{configs_dir / 'arcface.py'}:tiny" if size == "tiny" else
                                f"{configs_dir / 'arcface.py'}:demo,match={method}")
    return privacy, baseline


def pipeline_config(method: str, stages: dict, *, baseline_config, privacy_config, baseline: bool = True,
                    baseline_workdir: str = "", estimates_s: dict | None = None,
                    grid_rows: int = 6) -> ml_collections.ConfigDict:
    """A whole method in one config (``ppfr_jax.pipeline``): its stages' training configs in order, the
    equal-budget RGB baseline, the privacy attack settings.

    Args:
      method: a key of :data:`PIPELINE_STAGES` (``'duetface'``, ``'minusface'``).
      stages: stage name -> its training config (e.g. ``configs/duetface.py:client,demo``), every stage of
        ``PIPELINE_STAGES[method]``; the pipeline wires each to the previous stage's workdir at run time.
      baseline_config: the RGB ArcFace config with the recogniser's budget (``configs/arcface.py:demo,match=...``).
      privacy_config: a ``configs/privacy.py`` config (the attack's budget); its rows and method workdirs
        are set by the pipeline.
      baseline: train the baseline in ``<workdir>/baseline``; ``baseline_workdir``: read it from there instead.
      estimates_s: phase name (stage names, ``'baseline'``, ``'privacy'``) -> seconds on an idle 2-core CPU,
        for the whole pipeline's ETA (scaled by the measured speed of the running stage); {} = unknown.
      grid_rows: faces shown in the report's pictures.
    Returns:
      ``ConfigDict(pipeline=..., stages=..., baseline=..., privacy=...)``; ``"pipeline" in config`` tells
      the CLI to run :func:`ppfr_jax.pipeline.run_pipeline`.
    """
    c = ml_collections.ConfigDict()
    c.pipeline = ml_collections.ConfigDict(dict(
        method=method, stages=tuple(PIPELINE_STAGES.get(method, ())), baseline=bool(baseline),
        baseline_workdir=baseline_workdir, grid_rows=int(grid_rows),
        estimates_s=ml_collections.ConfigDict({k: float(v) for k, v in (estimates_s or {}).items()})))
    c.stages = ml_collections.ConfigDict({k: v for k, v in stages.items()})
    c.baseline = baseline_config
    c.privacy = privacy_config
    return c


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every training config (the paper settings)."""
    c = ml_collections.ConfigDict()
    c.task = "arcface"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        backbone="ir18", input="rgb", embedding_size=512, dropout=0.4))
    c.head = ml_collections.ConfigDict(dict(kind="arcface", scale=64.0, margin=0.5, sample_rate=1.0, class_chunk=0))
    c.data = ml_collections.ConfigDict(dict(
        source="demo", path="", index="", tfds_name="", num_classes=0, flip=True, shuffle_buffer=2048,
        skip_bad=False, landmarks=False, loader="auto"))
    # eval.sets: named verification sets (eval_set_specs); () = the one set eval.pairs, named "devtest"
    c.eval = ml_collections.ConfigDict(dict(pairs="demo", sets=(), root="", every_steps=0, batch_size=128,
                                            flip=True))
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


# The verification benchmarks of the papers' tables, as insightface ships them (faces_emore / MS1MV2 packs
# hold lfw.bin, cfp_fp.bin and agedb_30.bin beside train.rec; calfw.bin and cplfw.bin come with the newer ones)
PAPER_EVAL_SETS = ("lfw.bin", "cfp_fp.bin", "agedb_30.bin", "calfw.bin", "cplfw.bin")
_SET_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def use_paper_benchmarks(c: ml_collections.ConfigDict) -> None:
    """A paper config verifies on the five benchmarks (``PAPER_EVAL_SETS``) under ``eval.root``, not the demo set."""
    c.eval.sets = PAPER_EVAL_SETS
    c.eval.pairs = ""


def eval_set_specs(config) -> dict[str, str]:
    """The verification sets the engine evaluates: ``{name: spec}`` in order (spec: ``demo``, a ``.bin``, a pairs file).

    ``config.eval.sets``: a tuple of ``"spec"`` or ``"name=spec"`` entries (on a command line:
    ``--config.eval.sets='("lfw.bin", "agedb=agedb_30.bin")'``). A set is named by its ``name=`` or by its file's stem (``lfw.bin`` -> ``lfw``,
    ``demo`` -> ``demo``); names are what the logs (``eval/<name>/accuracy``) and ``results.json``
    use. A relative path is taken under ``eval.root``, or when that is ``""`` under ``data.path``
    for ``data.source='recordio'`` (insightface ships its .bin files beside ``train.rec``), else
    as given. An empty entry or one whose spec is empty (``"cplfw="``) is left out.
    No ``eval.sets``: the one set ``eval.pairs`` named ``devtest`` (none when it is ``""``); with
    ``eval.sets``, ``eval.pairs`` must be ``""`` (``validate`` says so). ``--config.eval.sets='()'``
    and ``--config.eval.pairs=''`` turn verification off.

    Raises:
      ConfigError naming ``eval.sets`` for an entry that is not a string, a name with other than
      letters, digits, ``_-.``, or a name given twice.
    """
    ev = config.eval
    sets = ev.get("sets", ()) or ()
    if not sets:
        return {"devtest": ev.pairs} if ev.get("pairs") else {}
    d = config.get("data", {})
    root = ev.get("root", "") or (d.get("path", "") if d.get("source") == "recordio" else "")
    out: dict[str, str] = {}
    for entry in sets:
        if not isinstance(entry, str):
            raise ConfigError(f"config.eval.sets: entries are strings ('lfw.bin', 'name=path' or 'demo'), got "
                              f"{entry!r}")
        name, _, spec = entry.partition("=") if "=" in entry else ("", "", entry)
        name, spec = name.strip(), spec.strip()
        if not spec:
            continue
        if not name:
            name = "demo" if spec == "demo" else pathlib.Path(spec).stem
        if not name or not set(name) <= _SET_NAME_CHARS:
            raise ConfigError(f"config.eval.sets: set name {name!r} (from {entry!r}) may hold only letters, digits "
                              f"and _-.; name it with 'name=path'")
        if name in out:
            raise ConfigError(f"config.eval.sets: two sets are named {name!r} ({out[name]!r} and {spec!r}); name "
                              f"one with 'name=path'")
        if spec != "demo" and root and not os.path.isabs(spec):
            spec = os.path.join(root, spec)
        out[name] = spec
    return out


def _exists(path: str) -> bool:
    """Local paths are checked here; URLs (gs://...) are left to the reader that opens them."""
    return "://" in str(path) or os.path.exists(path)


class ConfigError(PpfrError, ValueError):
    """A config value is unusable; the message starts with ``config.<field>:``."""


@dataclasses.dataclass(frozen=True)
class Range:
    """What a numeric config field may hold: integer or real, and an interval.

    Reals must be finite (NaN and +-inf are never valid); ``bool`` is not a
    number here (``True`` for a step count is a mistake, not a 1).
    """

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False  # None allowed (e.g. head.margin: the head's default)

    def describe(self) -> str:
        what = "an integer" if self.integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return what

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        if isinstance(v, (bool, np.bool_)):
            return False
        if self.integer:
            if not isinstance(v, (int, np.integer)):
                return False
        elif not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(float(v)):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True


def _fmt(x: float) -> str:
    if x == math.pi:
        return "pi"
    if isinstance(x, int) and x >= 2 ** 16:
        return f"2**{x.bit_length()}-1" if (x + 1) & x == 0 else str(x)
    return repr(x)


SEED_MAX = 2 ** 32 - 1  # jax.random.key keeps 32 bits without x64: larger seeds would silently alias

_COUNT = Range(True, 0)             # sizes and steps where 0 means "off" / "derive it"
_POSITIVE = Range(True, 1)          # sizes and intervals that must be at least 1
_SEED = Range(True, 0, SEED_MAX)
_NONNEG = Range(False, 0)           # weights, epochs, norms
_RATE = Range(False, 0, lo_open=True)  # learning rates and scales

# Every numeric field of every config in configs/ (training and privacy), by dotted path.
# ``path.*`` is each value of a dict field; ``path[]`` each element of a sequence field.
# tests/test_config.py checks that no numeric field of any shipped config is missing here.
NUMERIC_FIELDS: dict[str, Range] = {
    "seed": _SEED,
    "model.embedding_size": _POSITIVE,
    "model.dropout": Range(False, 0, 1, hi_open=True),
    "head.scale": _RATE,
    "head.margin": Range(False, 0, math.pi, hi_open=True, optional=True),
    "head.sample_rate": Range(False, 0, 1, lo_open=True),
    "head.class_chunk": _COUNT,
    "data.num_classes": _COUNT,
    "data.shuffle_buffer": _POSITIVE,
    "eval.every_steps": _COUNT,
    "eval.batch_size": _POSITIVE,
    "eval.max_pairs": _COUNT,
    "batch_size_per_device": _COUNT,
    "batch_size": _COUNT,
    "num_epochs": _NONNEG,
    "num_train_steps": _COUNT,
    "steps_per_epoch": _COUNT,
    "optim.lr": _RATE,
    "optim.momentum": Range(False, 0, 1, hi_open=True),
    "optim.weight_decay": _NONNEG,
    "optim.boundaries_epochs[]": _NONNEG,
    "optim.decay_factor": _RATE,
    "optim.warmup_epochs": _NONNEG,
    "optim.grad_clip_norm": _NONNEG,
    "optim.lr_multipliers.*": _NONNEG,
    "mesh.model": _POSITIVE,
    "log_every_steps": _POSITIVE,
    "checkpoint_every_steps": _POSITIVE,
    "keep_checkpoints": _POSITIVE,  # 0 would let the preservation policy delete the only checkpoint
    "keep_best": _COUNT,
    # DuetFace
    "duetface.sub_channels[]": Range(True, 0, 63),
    "duetface.client_embedding_size": _POSITIVE,
    "duetface.client_step": _COUNT,
    "duetface.step": _COUNT,
    # MinusFace
    "minusface.generator_widths[]": _POSITIVE,
    "minusface.n_duplicate": _POSITIVE,
    "minusface.num_aug": _POSITIVE,
    "minusface.loss_weights.*": _NONNEG,
    "minusface.sparsity_target": Range(False, 0, 1, lo_open=True, hi_open=True),
    "minusface.stage1_step": _COUNT,
    "minusface.eval_seed": _SEED,
    "minusface.step": _COUNT,
    "minusface.fixed_theta_seed": _SEED,
    "minusface.generator_scale": _RATE,  # g(x) = s * U(x / s) (being added on main)
    # privacy evaluation (configs/privacy.py)
    "attacker.widths[]": _POSITIVE,
    "attacker.steps": _POSITIVE,
    "attacker.batch_size": _POSITIVE,
    "attacker.lr": _RATE,
    "attacker.warmup_steps": _COUNT,
    "attacker.log_every_steps": _POSITIVE,
    "grid_rows": _POSITIVE,
}


def _numeric_leaves(d: dict, prefix: str = ""):
    """(rule path, display path, value) of every number in a nested dict (bools excluded)."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            if f"{path}.*" in NUMERIC_FIELDS:
                for kk, vv in v.items():
                    yield f"{path}.*", f"{path}.{kk}", vv
            else:
                yield from _numeric_leaves(v, path + ".")
        elif isinstance(v, (list, tuple)):
            for i, vv in enumerate(v):
                if f"{path}[]" in NUMERIC_FIELDS or _is_number(vv):
                    yield f"{path}[]", f"{path}[{i}]", vv
        elif path in NUMERIC_FIELDS or _is_number(v):
            yield path, path, v


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def unchecked_numeric_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Numeric fields of ``config`` that :data:`NUMERIC_FIELDS` has no rule for (should be none)."""
    return [shown for rule, shown, _ in _numeric_leaves(config.to_dict()) if rule not in NUMERIC_FIELDS]


def check_numeric_fields(config: ml_collections.ConfigDict) -> None:
    """Type and range of every field listed in :data:`NUMERIC_FIELDS` that ``config`` has.

    Raises:
      ConfigError ``config.<field>: must be <type> in <range>, got <value>`` for the first bad one.
    """
    for rule, shown, v in _numeric_leaves(config.to_dict()):
        r = NUMERIC_FIELDS.get(rule)
        if r is not None and not r.ok(v):
            raise ConfigError(f"config.{shown}: must be {r.describe()}{' or None' if r.optional else ''}, "
                              f"got {v!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Reject bad values of a training config before anything is built, naming the field.

    Every numeric field is checked for type and range first (:data:`NUMERIC_FIELDS`:
    e.g. ``log_every_steps`` an integer >= 1, ``optim.lr`` a finite number > 0,
    ``head.sample_rate`` in (0, 1]), then names (backbone, head, data source),
    paths and the fields that depend on each other (batch sizes, epochs or steps).

    Raises:
      ConfigError (a ValueError) whose message starts with ``config.<field>:`` and
      says what the field may hold.
    """
    def bad(field, msg):
        raise ConfigError(f"config.{field}: {msg}")

    check_numeric_fields(config)
    m = config.model
    if m.backbone not in models.RECOGNIZERS:
        hint = " (renamed ir_se50, TFace's name)" if m.backbone == "irse50" else ""
        bad("model.backbone", f"unknown backbone {m.backbone!r}{hint}; choose one of {models.RECOGNIZERS}")
    if m.input not in INPUTS:
        bad("model.input", f"unknown input {m.input!r}; choose one of {INPUTS}")
    if config.head.kind not in HEADS:
        bad("head.kind", f"unknown head {config.head.kind!r}; choose one of {HEADS}")
    if config.head.get("class_chunk", 0) and config.head.kind not in ("arcface", "cosface"):
        bad("head.class_chunk", f"the class-chunked softmax supports the arcface and cosface heads, not "
                                f"{config.head.kind!r} (CurricularFace modulates every logit by the target "
                                f"cosine); set head.class_chunk=0")
    o = config.optim
    if list(o.boundaries_epochs) != sorted(o.boundaries_epochs):
        bad("optim.boundaries_epochs", f"must be increasing, got {list(o.boundaries_epochs)}")
    if config.batch_size_per_device <= 0 and config.batch_size <= 0:
        bad("batch_size", f"set batch_size (global) or batch_size_per_device to an integer >= 1, got "
                          f"{config.batch_size} and {config.batch_size_per_device}")
    if num_devices is not None and config.batch_size > 0 and config.batch_size % num_devices:
        bad("batch_size", f"global batch {config.batch_size} is not divisible by the {num_devices} devices")
    if num_devices is not None and num_devices % max(config.mesh.model, 1):
        bad("mesh.model", f"{config.mesh.model} does not divide the {num_devices} devices")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        bad("num_epochs", f"set num_epochs > 0 or num_train_steps > 0 (got {config.num_epochs} and "
                          f"{config.num_train_steps})")
    if "duetface" in config:
        subs = list(config.duetface.get("sub_channels", ()))
        if not subs or len(set(subs)) != len(subs):
            bad("duetface.sub_channels", f"must be distinct DCT frequencies in [0, 63], got {subs}")
        client = config.duetface.get("client_backbone", "mobilefacenet")
        if client not in models.CLIENT_BACKBONES:
            bad("duetface.client_backbone", f"unknown client {client!r}; choose one of {models.CLIENT_BACKBONES}")
    d = config.data
    if d.source not in DATA_SOURCES:
        bad("data.source", f"unknown source {d.source!r}; choose one of {DATA_SOURCES}")
    if d.source == "image_folder" or (d.source == "tfrecord" and not d.index):
        if not d.path:
            bad("data.path", "data.source='image_folder' needs data.path" if d.source == "image_folder" else
                "data.source='tfrecord' needs data.index (the TFace .txt index) or data.path pointing at it")
        elif not _exists(d.path):
            bad("data.path", f"{d.path!r} does not exist")
    if d.source == "tfrecord" and d.index:
        if d.path and not _exists(d.path):
            bad("data.path", f"{d.path!r} does not exist")
        if not _exists(d.index):
            bad("data.index", f"{d.index!r} does not exist")
    if d.source == "recordio":
        missing = [f for f in ("train.rec", "train.idx") if not _exists(os.path.join(d.path, f))] if d.path else []
        if not d.path or missing:
            bad("data.path", f"data.source='recordio' needs data.path: a folder holding train.rec and train.idx "
                             f"(an insightface pack){f'; {d.path!r} lacks {missing}' if d.path else ''}")
    if d.get("loader", "auto") not in DATA_LOADERS:
        bad("data.loader", f"must be one of {DATA_LOADERS} ('numpy' reads the records without TensorFlow), "
                           f"got {d.get('loader')!r}")
    if d.get("loader", "auto") == "numpy" and d.source == "tfds":
        bad("data.loader", "'numpy' reads the listed sources (demo, tfrecord, image_folder, recordio); "
                           "data.source='tfds' streams through tf.data: use data.loader='auto' or 'tf'")
    if d.source == "tfds" and not d.tfds_name:
        bad("data.tfds_name", "data.source='tfds' needs data.tfds_name")
    if d.source == "synthetic" and d.num_classes <= 0:
        bad("data.num_classes", "data.source='synthetic' needs num_classes > 0")
    ev = config.eval
    if ev.get("sets") and ev.get("pairs"):
        bad("eval.pairs", f"{ev.pairs!r} would be ignored: eval.sets {tuple(ev.sets)} names the sets evaluated; add "
                          f"'devtest={ev.pairs}' to eval.sets to keep it, or set eval.pairs=''")
    if ev.get("sets"):
        for name, spec in eval_set_specs(config).items():
            if spec != "demo" and not _exists(spec):
                where = ev.get("root") or (f"data.path {d.path!r}" if d.source == "recordio" and d.path else "")
                bad("eval.sets", f"set {name!r}: {spec!r} does not exist ("
                                 + (f"relative names are looked up under {where}; " if where else "")
                                 + "point eval.root at the folder holding insightface's .bin files, or list only "
                                   "the sets you have, e.g. --config.eval.sets='(\"lfw.bin\", \"cfp_fp.bin\")')")
    elif ev.pairs not in ("demo", "") and not _exists(ev.pairs):
        bad("eval.pairs", f"{ev.pairs!r} does not exist (use 'demo' or '' to disable)")


def validate_privacy(config: ml_collections.ConfigDict) -> None:
    """``configs/privacy.py`` configs: every numeric field (as :func:`validate`), the rows and the data.

    Raises:
      ConfigError naming the field.
    """
    check_numeric_fields(config)
    d = config.data
    if d.source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source: unknown source {d.source!r}; choose one of {DATA_SOURCES}")
    if d.source == "synthetic" and d.num_classes <= 0:
        raise ConfigError("config.data.num_classes: data.source='synthetic' needs num_classes > 0")
