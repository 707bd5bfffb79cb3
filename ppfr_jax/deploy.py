"""The deployed client/server split of a trained run: ``ppfr-protect`` (client) and ``ppfr-verify`` (server).

A deployable run is a DuetFace server run (task ``duetface``: it holds the
frozen client too) or a MinusFace stage-2 run (``minusface_stage2``: frozen
generator + recogniser on X_p). :func:`load_deployment` splits its variables
into the two halves, without rebuilding the training task (which would
re-read the stage-1 / warm-up workdir the run was started from):

- **client** (``Deployment.client_fn``), what a phone or camera runs:
  DuetFace: aligned face + facial ROI -> the 162 server DCT channels and the 4
  attention masks (``server_channels``, ``attention_mask_0..3``); MinusFace:
  aligned face + channel permutations -> ``x_p`` (the protected image,
  (112, 112, 3 * n_duplicate) in [0, 1]).
- **server** (``Deployment.server_fn``): those tensors -> embedding.

Client inputs not derived from the image by the model:

- DuetFace ROI: the run's verification ROI (``config.duetface.eval_roi_source``):
  the constant template hull for aligned faces, or the hull of the frozen
  PFLD's landmarks (:meth:`Deployment.client_extra`).
- MinusFace permutations: drawn on the host by :func:`fresh_permutations` from
  the operating system's entropy (``random.SystemRandom``) on every call. The
  permutation is the client's secret: it is never written to a protected file
  and never reused, so two protections of the same face differ.

Protected files (``.npz``, one per image, written by ``ppfr-protect``) hold
only the transmitted tensors (no batch axis) and ``meta``, a JSON string:
``format``, ``version``, ``method``, ``task``, ``step``, ``client_fingerprint``
(hash of the client's weights, so the server can refuse tensors made by a
different client), ``tensors`` (name -> shape), ``backend``. Never the image,
its name, the ROI or the permutation. Their *file names* carry nothing of the
input either: ``ppfr-protect`` names them at random and records which image
each came from in a manifest beside (never inside) the output folder, to stay
on the client; ``--keep-names`` opts in to ``<image stem>.npz``. It never
overwrites a file.

Decision threshold of ``ppfr-verify`` (cosine similarity, "same" when
``score >= threshold``): ``--threshold``; else ``<RUNDIR>/results.json``
``verify_threshold`` (cosine) or ``devtest_threshold`` (the verification
protocol's squared L2 distance between unit embeddings, ``cos = 1 - d / 2``);
else :data:`DEFAULT_THRESHOLD`, which is not calibrated for any run: measure
one with ``ppfr-eval`` (its ``best_thresholds`` are squared distances).

Examples::

    ppfr-protect --workdir runs/minusface_stage2_demo --images faces/ --out protected/
    ppfr-verify --workdir runs/minusface_stage2_demo protected/a.npz protected/b.npz
    ppfr-protect --config configs/minusface.py:stage2,tiny --untrained --images a.png --out /tmp/p  # smoke test
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import random
import secrets
import sys
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppfr_jax import checkpoints, config_lib, frequency, image_io, safe_npz
from ppfr_jax.errors import PpfrError

METHODS = ("duetface", "minusface")
TASK_METHOD = {"duetface": "duetface", "minusface_stage2": "minusface"}
IMAGE_SIZE = 112
IMAGE_EXTS = image_io.EXTENSIONS
FILE_FORMAT = "ppfr-protected"
FILE_VERSION = 1
# Cosine similarity of unit embeddings. ArcFace-trained recognisers put LFW's best
# threshold near cos 0.2-0.35 (squared distance 1.3-1.6); a placeholder, not a calibration.
DEFAULT_THRESHOLD = 0.3
# The largest protected file a client writes: DuetFace's 162 channels, 112x112 float32 (8.1 MB) + masks.
MAX_PROTECTED_BYTES = 64 << 20


class DeployError(PpfrError, ValueError):
    """A deployment input (run, config, image, protected file) is unusable; the message names it."""


# ----------------------------------------------------------------------------- randomness


def fresh_permutations(batch: int, n_duplicate: int = 1, channels: int = frequency.NUM_CHANNELS,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Independent channel permutations for MinusFace's shuffle: (batch, n_duplicate, channels) int32.

    ``rng=None`` (deployment): every permutation comes from ``random.SystemRandom``
    (the OS's cryptographic entropy, fresh on every call, nothing to seed or
    store), because the permutation is what keeps the residue from the server.
    Pass a ``numpy.random.Generator`` only for reproducible tests.
    """
    if batch < 0 or n_duplicate < 1:
        raise ValueError(f"fresh_permutations: batch must be >= 0 and n_duplicate >= 1, got {batch}, {n_duplicate}")
    if rng is not None:
        base = np.broadcast_to(np.arange(channels, dtype=np.int32), (batch, n_duplicate, channels))
        return rng.permuted(base, axis=-1).astype(np.int32)
    sr = random.SystemRandom()
    out = np.empty((batch, n_duplicate, channels), np.int32)
    for idx in np.ndindex(batch, n_duplicate):
        p = list(range(channels))
        sr.shuffle(p)
        out[idx] = p
    return out


def check_permutations(perms: np.ndarray, batch: int, n_duplicate: int,
                       channels: int = frequency.NUM_CHANNELS) -> np.ndarray:
    """Validate (batch, n_duplicate, channels) permutations (the exported graph cannot check them)."""
    perms = np.asarray(perms)
    if perms.shape != (batch, n_duplicate, channels):
        raise DeployError(f"permutations must have shape {(batch, n_duplicate, channels)}, got {perms.shape}")
    if not np.array_equal(np.sort(perms, axis=-1), np.broadcast_to(np.arange(channels), perms.shape)):
        raise DeployError(f"permutations: every row must be a permutation of 0..{channels - 1}")
    return perms.astype(np.int32)


# ----------------------------------------------------------------------------- configs, variables


def fingerprint(tree) -> str:
    """Short hash of a variable tree (paths, dtypes, shapes, bytes): which client made a protected file."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _check_shapes(got, want, what: str):
    shapes = lambda t: jax.tree.map(lambda a: tuple(np.shape(a)), t)  # noqa: E731
    try:
        same = shapes(got) == shapes(want)
    except Exception:  # noqa: BLE001  (different tree structure)
        same = False
    if not same:
        raise DeployError(f"{what}: the checkpoint's variables do not match the model its config describes "
                          f"(different backbone / widths / embedding size?)")


def _get(tree: Mapping, path: str, where: str):
    node = tree
    for k in path.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise DeployError(f"{where}: the checkpoint has no {path!r}; is it a finished run of this task?")
        node = node[k]
    return node


def _rbg_key(seed: int):
    # one RngBitGenerator per draw: compiles in seconds on CPU where threefry takes minutes
    return jax.random.key(seed, impl="rbg")


# ----------------------------------------------------------------------------- the deployment


@dataclasses.dataclass(eq=False)
class Deployment:
    """The two halves of a deployable run. Build with :func:`load_deployment`.

    Attributes:
      method: 'duetface' | 'minusface'.
      task: the run's ``config.task``.
      config: the run's config.
      model: ``DuetFaceModel`` / ``MinusBackbone``.
      client_variables / server_variables: each half's variables only (numpy).
      source: where the weights came from (for messages).
      step: checkpoint step (None when untrained).
      roi_source: DuetFace only: 'template' or 'pfld'.
      pfld_variables: DuetFace with roi_source 'pfld'.
    """

    method: str
    task: str
    config: ml_collections.ConfigDict
    model: Any
    client_variables: dict
    server_variables: dict
    source: str
    step: int | None = None
    roi_source: str = ""
    pfld_variables: dict | None = None

    # -- description ---------------------------------------------------------------------------
    @property
    def n_duplicate(self) -> int:
        return int(getattr(self.model, "n_duplicate", 1))

    @property
    def sub_channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.config.duetface.get("sub_channels", frequency.SUB_CHS))

    @functools.cached_property
    def client_fingerprint(self) -> str:
        return fingerprint(self.client_variables)

    @property
    def input_names(self) -> tuple[str, str]:
        return ("images", "roi_mask") if self.method == "duetface" else ("images", "permutations")

    @property
    def output_names(self) -> tuple[str, ...]:
        if self.method == "duetface":
            return ("server_channels",) + tuple(f"attention_mask_{s}" for s in range(4))
        return ("x_p",)

    def input_specs(self, batch: int | str = "B") -> list[jax.ShapeDtypeStruct]:
        """Client inputs: images (B, 112, 112, 3) float32 in [-1, 1]; ROI (B, 112, 112) float32 in {0, 1}
        (DuetFace) or permutations (B, n_duplicate, 192) int32 (MinusFace)."""
        img = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
        if self.method == "duetface":
            return [img, jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE), jnp.float32)]
        return [img, jax.ShapeDtypeStruct((batch, self.n_duplicate, frequency.NUM_CHANNELS), jnp.int32)]

    @functools.cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every transmitted tensor (no batch axis), in ``output_names`` order."""
        out = jax.eval_shape(self.client_fn, *self.input_specs(1))
        return {k: tuple(out[k].shape[1:]) for k in self.output_names}

    # -- pure functions (jit- and export-able) ----------------------------------------------------
    def client_fn(self, images, extra) -> dict:
        """Client half: images (B, 112, 112, 3) float in [-1, 1] + ROI / permutations -> {name: (B, ...)}."""
        from ppfr_jax.models import duetface, minusface
        images = jnp.asarray(images, jnp.float32)
        if self.method == "duetface":
            x_server, x_client = duetface.split_input(images, self.sub_channels)
            masks = self.model.apply(self.client_variables, x_client, jnp.asarray(extra, jnp.float32),
                                     method=duetface.DuetFaceModel.client_side)
            return {"server_channels": x_server, **{f"attention_mask_{s}": m for s, m in enumerate(masks)}}
        perms = jnp.swapaxes(jnp.asarray(extra, jnp.int32), 0, 1)  # -> (n_duplicate, B, 192)
        x_p = self.model.apply(self.client_variables, images, perms=perms, method=minusface.MinusBackbone.protect)
        return {"x_p": x_p}

    def server_fn(self, transmitted: Mapping[str, Any]) -> jax.Array:
        """Server half: the client's tensors {name: (B, ...)} -> embeddings (B, E) (not normalised)."""
        from ppfr_jax.models import duetface, minusface
        if self.method == "duetface":
            masks = tuple(transmitted[f"attention_mask_{s}"] for s in range(4))
            return self.model.apply(self.server_variables, transmitted["server_channels"], masks,
                                    method=duetface.DuetFaceModel.server_side)
        return self.model.apply(self.server_variables, transmitted["x_p"], method=minusface.MinusBackbone.recognize)

    # -- host side -----------------------------------------------------------------------------
    def client_extra(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The client's non-image input for a batch: DuetFace ROI masks, MinusFace fresh permutations.

        images: (B, 112, 112, 3) uint8 or float in [-1, 1]. ``rng`` only for
        reproducible permutations (tests); None draws from the OS.
        """
        b = len(images)
        if self.method == "minusface":
            return fresh_permutations(b, self.n_duplicate, rng=rng)
        from ppfr_jax import roi
        if self.roi_source == "template":
            return np.broadcast_to(roi.template_mask(), (b, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        return np.asarray(self._pfld_roi(self.pfld_variables, _normalise(images)))

    @functools.cached_property
    def _pfld_roi(self):
        from ppfr_jax import roi
        from ppfr_jax.models import pfld

        @jax.jit
        def f(v, x):
            _, lm = pfld.PFLDInference().apply(v, x * 0.5 + 0.5, train=False)  # PFLD takes [0, 1]
            return roi.landmark_mask(lm.reshape(x.shape[0], -1, 2))
        return f

    @functools.cached_property
    def _client_jit(self):
        return jax.jit(self.client_fn)

    @functools.cached_property
    def _server_jit(self):
        return jax.jit(self.server_fn)

    def protect(self, images: np.ndarray, extra: np.ndarray | None = None,
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Client side in JAX: images (B, 112, 112, 3) uint8 / [-1, 1] -> {name: (B, ...) float32 numpy}.

        ``extra`` (ROI / permutations) defaults to :meth:`client_extra` (fresh
        permutations for MinusFace).
        """
        images = _normalise(_check_images(images))
        if extra is None:
            extra = self.client_extra(images, rng)
        elif self.method == "minusface":
            extra = check_permutations(extra, len(images), self.n_duplicate)
        elif np.shape(extra) != (len(images), IMAGE_SIZE, IMAGE_SIZE):
            raise DeployError(f"roi_mask must have shape {(len(images), IMAGE_SIZE, IMAGE_SIZE)}, "
                              f"got {np.shape(extra)}")
        return {k: np.asarray(v) for k, v in self._client_jit(images, extra).items()}

    def embed(self, transmitted: Mapping[str, np.ndarray]) -> np.ndarray:
        """Server side in JAX: {name: (B, ...)} -> (B, E) float32 embeddings."""
        return np.asarray(self._server_jit({k: jnp.asarray(v, jnp.float32) for k, v in transmitted.items()}))


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DeployError(f"images must be aligned faces (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}")
    return images


def _normalise(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (as ``tasks.normalise_images``); float is taken as normalised."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def _deployment_duetface(config, variables, source, step, seed) -> Deployment:
    from ppfr_jax.models import duetface
    d, m = config.duetface, config.model
    sub = tuple(int(c) for c in d.get("sub_channels", frequency.SUB_CHS))
    # the ROI first: a missing PFLD should not wait for a model init
    roi_source = d.get("eval_roi_source", "") or ("template" if d.roi_source == "dataset" else d.roi_source)
    if roi_source not in ("template", "pfld"):
        raise DeployError(f"{source}: config.duetface.eval_roi_source={roi_source!r}; a deployment needs "
                          f"'template' (aligned faces) or 'pfld'")
    pfld_vars = None
    if roi_source == "pfld":
        frozen = variables.get("frozen", {}) if variables is not None else {}
        pfld_vars = frozen.get("pfld")
        if pfld_vars is None:
            try:
                pfld_vars = duetface.load_pfld_variables(d.get("pfld_checkpoint", ""))
            except FileNotFoundError as e:
                raise DeployError(f"{source}: the ROI comes from PFLD landmarks (eval_roi_source 'pfld'): {e}; "
                                  f"or use the template ROI for aligned faces (configs/duetface.py:...,roi=template)"
                                  ) from None
    model = duetface.build_model(m.backbone, d.client_backbone, embedding_size=m.embedding_size,
                                 client_embedding_size=d.client_embedding_size, dropout=m.get("dropout", 0.4),
                                 sub_channels=sub)
    n_client = 3 * len(sub)
    shapes = [(1, IMAGE_SIZE, IMAGE_SIZE, frequency.NUM_CHANNELS - n_client), (1, IMAGE_SIZE, IMAGE_SIZE, n_client),
              (1, IMAGE_SIZE, IMAGE_SIZE)]
    init = lambda k: model.init({"params": k, "dropout": k}, *[jnp.zeros(s) for s in shapes])  # noqa: E731
    if variables is None:
        mv = jax.tree.map(np.asarray, jax.jit(init)(_rbg_key(seed)))
    else:
        want = jax.eval_shape(init, _rbg_key(0))
        p, bs = _get(variables, "params/duetface", source), _get(variables, "batch_stats/duetface", source)
        client = _get(variables, "frozen/client_model", source)
        mv = {"params": {**p, "client_model": client["params"]},
              "batch_stats": {**bs, "client_model": client.get("batch_stats", {})}}
        _check_shapes(mv, want, source)
    attention = {k: v for k, v in mv["params"].items() if k.startswith("attention_")}
    client_vars = {"params": {"client_model": mv["params"]["client_model"], **attention},
                   "batch_stats": {"client_model": mv["batch_stats"]["client_model"]}}
    server_vars = {"params": {"server_model": mv["params"]["server_model"]},
                   "batch_stats": {"server_model": mv["batch_stats"]["server_model"]}}
    return Deployment("duetface", config.task, config, model, client_vars, server_vars, source, step,
                      roi_source=roi_source, pfld_variables=pfld_vars)


def _deployment_minusface(config, variables, source, step, seed) -> Deployment:
    from ppfr_jax.models import minusface
    mf, m = config.minusface, config.model
    model = minusface.build_model("stage2", backbone=m.backbone, embedding_size=m.embedding_size,
                                  dropout=m.get("dropout", 0.4), generator_widths=mf.generator_widths,
                                  n_duplicate=int(mf.get("n_duplicate", 1)),
                                  generator_scale=float(mf.get("generator_scale", 1.0)))
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    init = lambda k: model.init({"params": k, "dropout": k}, x, key=k)  # noqa: E731
    if variables is None:
        mv = jax.tree.map(np.asarray, jax.jit(init)(_rbg_key(seed)))
    else:
        want = jax.eval_shape(init, _rbg_key(0))
        mv = {"params": {"generator": _get(variables, "params/generator", source),
                         "recognizer": _get(variables, "params/recognizer", source)},
              "batch_stats": {"recognizer": _get(variables, "batch_stats/recognizer", source)}}
        _check_shapes(mv, want, source)
    client_vars = {"params": {"generator": mv["params"]["generator"]}}
    server_vars = {"params": {"recognizer": mv["params"]["recognizer"]},
                   "batch_stats": {"recognizer": mv["batch_stats"]["recognizer"]}}
    return Deployment("minusface", config.task, config, model, client_vars, server_vars, source, step)


def load_deployment(workdir: str | None = None, *, config: ml_collections.ConfigDict | str | None = None,
                    untrained: bool = False, seed: int = 0, step: int | None = None,
                    method: str | None = None) -> Deployment:
    """The client and server halves of a run.

    Args:
      workdir: a finished (or checkpointed) DuetFace server / MinusFace stage-2 run;
        its config comes from the run (``checkpoints.load_run_config``) unless ``config`` is given.
      config: a ConfigDict or ``'configs/x.py:variant'``; with ``untrained=True``
        the weights are a fresh init from ``seed`` (smoke tests: the numbers mean nothing).
      step: checkpoint step (default: latest).
      method: if given, the run must be of this method.
    Raises:
      DeployError naming what is wrong (no such run, wrong task, mismatched weights).
    """
    if isinstance(config, str):
        config = config_lib.load_config_spec(config, error=DeployError)
    variables = None
    if workdir:
        if config is None:
            try:
                config = checkpoints.load_run_config(workdir)
            except (FileNotFoundError, ValueError) as e:
                raise DeployError(f"--workdir {workdir}: {e}") from None
        try:
            variables, step = checkpoints.restore_variables(workdir, step)
        except FileNotFoundError as e:
            raise DeployError(f"--workdir {workdir}: {e}") from None
        source = f"{os.path.abspath(workdir)} (step {step})"
    elif untrained and config is not None:
        source, step = f"untrained {config.task} (seed {seed})", None
    else:
        raise DeployError("give a run (--workdir RUNDIR), or --config configs/...py:variant --untrained")
    task = config.get("task", "")
    if task not in TASK_METHOD:
        raise DeployError(f"{source}: config.task={task!r} is not deployable; the client/server split exists for "
                          f"DuetFace server runs (task 'duetface') and MinusFace stage-2 runs ('minusface_stage2')")
    if method is not None and TASK_METHOD[task] != method:
        raise DeployError(f"--method {method}, but {source} is a {TASK_METHOD[task]} run (task {task!r})")
    build = _deployment_duetface if TASK_METHOD[task] == "duetface" else _deployment_minusface
    return build(config, variables, source, step, seed)


@functools.lru_cache(maxsize=4)
def _cached_deployment(workdir, config_spec, untrained, seed, step, method) -> Deployment:
    # the CLIs' entry point: repeated in-process calls (tests, notebooks) restore/initialise once
    return load_deployment(workdir, config=config_spec, untrained=untrained, seed=seed, step=step, method=method)


# ----------------------------------------------------------------------------- protected files


def save_protected(path, deployment: Deployment, tensors: Mapping[str, np.ndarray],
                   backend: str = "jax") -> None:
    """Write one protected sample: ``tensors`` {name: per-sample array (no batch axis)} + ``meta``.

    ``path``: a file name (``.npz`` is appended if missing) or a binary file object.
    """
    want = deployment.tensor_shapes
    if set(tensors) != set(want):
        raise DeployError(f"{path}: tensors {sorted(tensors)} are not the client's outputs {sorted(want)}")
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "method": deployment.method, "task": deployment.task,
            "step": deployment.step, "client_fingerprint": deployment.client_fingerprint, "backend": backend,
            "tensors": {k: list(np.shape(v)) for k, v in tensors.items()}}
    arrays = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    np.savez_compressed(path, meta=np.asarray(json.dumps(meta)), **arrays)


def load_protected(path: str | os.PathLike, deployment: Deployment | None = None) -> tuple[dict, dict]:
    """Read a protected file -> (tensors {name: array}, meta); checked against ``deployment`` if given.

    At most :data:`MAX_PROTECTED_BYTES` are decompressed (``safe_npz``: checked
    on the headers first), so a hostile file cannot make the server allocate more.

    Raises:
      DeployError naming the file: missing, not an .npz, not a protected file,
      over the size limit, another method, another client, or tensors of the
      wrong shape / dtype / non-finite values.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise DeployError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):  # np.load would try it as a pickle and say so, confusingly
        raise DeployError(f"{p}: not an .npz file (not a zip archive); expected a file written by ppfr-protect")
    # a client's file is untrusted: headers and sizes checked before anything is decompressed
    data = safe_npz.load_npz(p, max_bytes=MAX_PROTECTED_BYTES, error=DeployError)
    if "meta" not in data:
        raise DeployError(f"{p}: not a protected file (no 'meta' entry; write it with ppfr-protect)")
    m = data.pop("meta")
    if m.ndim != 0 or m.dtype.kind != "U":
        raise DeployError(f"{p}: not a protected file ('meta' is not a JSON string)")
    try:
        meta = json.loads(str(m))
    except json.JSONDecodeError as e:
        raise DeployError(f"{p}: corrupt 'meta' ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise DeployError(f"{p}: not a protected file (meta.format is not {FILE_FORMAT!r})")
    if meta.get("version") != FILE_VERSION:
        raise DeployError(f"{p}: protected-file version {meta.get('version')!r}; this ppfr_jax reads {FILE_VERSION}")
    if deployment is not None:
        if meta.get("method") != deployment.method:
            raise DeployError(f"{p}: made by method {meta.get('method')!r}, but this run is {deployment.method} "
                              f"({deployment.source})")
        if meta.get("client_fingerprint") != deployment.client_fingerprint:
            raise DeployError(f"{p}: made by a different client (fingerprint {meta.get('client_fingerprint')}) "
                              f"than this run's ({deployment.client_fingerprint}, {deployment.source}); the server "
                              f"only understands its own client's output")
        for name, shape in deployment.tensor_shapes.items():
            if name not in data:
                raise DeployError(f"{p}: no tensor {name!r} (has {sorted(data)})")
            if tuple(data[name].shape) != shape:
                raise DeployError(f"{p}: tensor {name!r} has shape {data[name].shape}, expected {shape}")
            if data[name].dtype != np.float32:
                raise DeployError(f"{p}: tensor {name!r} is {data[name].dtype}, expected float32")
            if not np.isfinite(data[name]).all():
                raise DeployError(f"{p}: tensor {name!r} has non-finite values")
    return data, meta


def preview_image(x_p: np.ndarray) -> np.ndarray:
    """MinusFace X_p (112, 112, 3 * n) in [0, 1] -> uint8 (112, 112 * n, 3): the shuffles side by side."""
    groups = np.split(np.clip(np.asarray(x_p), 0.0, 1.0), x_p.shape[-1] // 3, axis=-1)
    return np.round(np.concatenate(groups, axis=1) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- verification


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def resolve_threshold(workdir: str | None, explicit: float | None) -> tuple[float, str]:
    """(cosine threshold, where it came from): ``--threshold``, the run's results.json, or the default."""
    if explicit is not None:
        return float(explicit), "--threshold"
    if workdir:
        f = pathlib.Path(workdir) / "results.json"
        if f.is_file():
            try:
                res = json.loads(f.read_text())
            except json.JSONDecodeError:
                res = {}
            if isinstance(res.get("verify_threshold"), (int, float)):
                return float(res["verify_threshold"]), f"{f} verify_threshold"
            if isinstance(res.get("devtest_threshold"), (int, float)):  # squared L2 of unit vectors
                return 1.0 - float(res["devtest_threshold"]) / 2.0, f"{f} devtest_threshold (squared L2)"
    return DEFAULT_THRESHOLD, "default, uncalibrated"


# ----------------------------------------------------------------------------- CLIs


def _add_run_args(p: argparse.ArgumentParser):
    p.add_argument("--workdir", default=None, help="a DuetFace server / MinusFace stage-2 training run")
    p.add_argument("--config", default=None,
                   help="configs/<x>.py[:variant]: the run's config (default: the one saved in --workdir); "
                        "with --untrained, the model to initialise")
    p.add_argument("--untrained", action="store_true", help="random weights from --seed (smoke tests only)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="init seed for --untrained")
    p.add_argument("--step", type=_nonneg_int, default=None, help="checkpoint step (default: latest)")


def _deployment_from_args(a, method=None) -> Deployment:
    if a.workdir and a.untrained:
        raise DeployError("--untrained initialises random weights; it does not go with --workdir")
    if a.untrained and not a.config:
        raise DeployError("--untrained needs --config configs/<x>.py:variant")
    return _cached_deployment(a.workdir, a.config, bool(a.untrained), int(a.seed), a.step, method)


def collect_images(specs: Sequence[str], keep_names: bool = False) -> list[str]:
    """Files as given, folders expanded to their images (not recursive, sorted). Raises DeployError.

    ``keep_names``: also refuse two inputs that would be written under the same name.
    """
    out = []
    for s in specs:
        p = pathlib.Path(s)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DeployError(f"{s}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise DeployError(f"{s}: no such file or folder")
    if keep_names:
        stems: dict[str, str] = {}
        for f in out:
            stem = pathlib.Path(f).stem
            if stem in stems:
                raise DeployError(f"{stems[stem]} and {f} would both be written as {stem}.npz; rename one")
            stems[stem] = f
    return out


def default_manifest(out: str) -> str:
    """``<out>.manifest.json`` beside the output folder (never inside it: it must not travel with the files)."""
    return os.path.abspath(out).rstrip(os.sep) + ".manifest.json"


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _opaque_name(out: str, taken: set[str]) -> str:
    """A random 64-bit hex name that no file in ``out`` has (nor will get in this run)."""
    while True:
        name = secrets.token_hex(8)
        if name not in taken and not any(os.path.exists(os.path.join(out, name + ext)) for ext in (".npz", ".xp.png")):
            taken.add(name)
            return name


def _write_new(path: str, write) -> None:
    """Create ``path`` (never replacing an existing file) and fill it with ``write(fileobj)``."""
    try:
        f = open(path, "xb")
    except FileExistsError:
        raise DeployError(f"{path}: already exists; ppfr-protect never overwrites a file (remove it, or choose "
                          f"another --out)") from None
    except OSError as e:
        raise DeployError(f"{path}: cannot create it ({e.strerror or e})") from None
    try:
        with f:
            write(f)
    except BaseException as e:
        os.unlink(path)  # no half-written file is left behind
        if isinstance(e, OSError):
            raise DeployError(f"{path}: writing failed ({e.strerror or e})") from None
        raise


def _update_manifest(path: str, entries: dict[str, str], out: str) -> None:
    """Merge ``entries`` (output file -> input image) into the JSON manifest at ``path`` (atomically)."""
    old: dict = {}
    if os.path.exists(path):
        try:
            old = json.loads(pathlib.Path(path).read_text())["files"]
            if not isinstance(old, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise DeployError(f"--manifest {path}: exists and is not a ppfr-protect manifest; ppfr-protect never "
                              f"overwrites a file (move it, or pass another --manifest)") from None
    doc = {"note": "client-side record of which image each protected file came from; it names the people in "
                   "them: keep it on this machine, never send it with the files",
           "out": os.path.abspath(out), "files": {**old, **entries}}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise DeployError(f"--manifest {path}: cannot write it ({e.strerror or e})") from None


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (anything else is one clear line)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _prepare_out(out: str, manifest: str | None) -> None:
    if not out:
        raise DeployError("--out: empty path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DeployError(f"--out {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise DeployError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise DeployError(f"--out {out}: the folder is not writable")
    if manifest is not None:
        if _inside(manifest, out):
            raise DeployError(f"--manifest {manifest}: inside --out {out}; the manifest names the people in the "
                              f"images and must stay on the client, away from the files that are sent")
        if os.path.isdir(manifest):
            raise DeployError(f"--manifest {manifest}: is a folder")


def protect_main(argv: list[str] | None = None) -> int:
    """``ppfr-protect``: aligned 112x112 face images -> one protected ``.npz`` per image (+ X_p preview PNG).

    Output names are random (``<16 hex digits>.npz``): an image's file name (LFW's
    ``Jane_Doe_0001.jpg``) is often the person's identity, and protected files are
    made to be sent. Which image each came from goes to a manifest kept beside,
    never inside, ``--out``. ``--keep-names`` names them ``<image stem>.npz`` instead.
    No existing file is ever overwritten. Every bad input is one line
    ``ppfr-protect: error: ...`` and exit status 2.
    """
    p = argparse.ArgumentParser(prog="ppfr-protect", description=(
        "Run the client half of a DuetFace / MinusFace run on aligned 112x112 faces (ppfr-align makes them) and "
        "write what the client would send: <out>/<random name>.npz (and <name>.xp.png for MinusFace). The "
        "image each file came from is recorded in a manifest beside --out (not inside it): keep that on the "
        "client. Existing files are never overwritten."))
    p.add_argument("--method", choices=METHODS, default=None, help="check that the run is of this method")
    _add_run_args(p)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder (created); holds only what may be sent")
    p.add_argument("--manifest", default=None,
                   help="where to record which image each output came from (JSON, merged into an existing "
                        "manifest; default: <out>.manifest.json beside the output folder; never inside --out)")
    p.add_argument("--keep-names", action="store_true",
                   help="name each output after its input image (<image stem>.npz) instead of a random name. "
                        "WARNING: image names such as Jane_Doe_0001.jpg name the person, and that name then "
                        "travels with the protected file")
    p.add_argument("--onnx", default=None, help="run this exported client (ppfr-export) with onnxruntime "
                                                "instead of JAX; it must come from the same run")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--no-preview", action="store_true", help="MinusFace: do not write the X_p PNG")
    a = p.parse_args(argv)
    manifest = None if a.keep_names else (a.manifest or default_manifest(a.out))
    try:
        from ppfr_jax import evaluate
        files = collect_images(a.images, keep_names=a.keep_names)
        _prepare_out(a.out, manifest)
        try:
            images, _, _ = evaluate.decode_images(files, size_hw=(IMAGE_SIZE, IMAGE_SIZE))
        except evaluate.BadInputError as e:
            raise DeployError(f"{e} (ppfr-protect takes faces already aligned to {IMAGE_SIZE}x{IMAGE_SIZE}; "
                              f"align them with ppfr-align)") from None
        dep = _deployment_from_args(a, a.method)
        preview = dep.method == "minusface" and not a.no_preview
        taken: set[str] = set()
        names = [pathlib.Path(f).stem if a.keep_names else _opaque_name(a.out, taken) for f in files]
        if a.keep_names:  # refuse before computing anything, not half-way through
            for n in names:
                for ext in (".npz",) + ((".xp.png",) if preview else ()):
                    if os.path.exists(os.path.join(a.out, n + ext)):
                        raise DeployError(f"{os.path.join(a.out, n + ext)}: already exists; ppfr-protect never "
                                          f"overwrites a file (remove it, or choose another --out)")
        runner = None
        if a.onnx:
            from ppfr_jax import export
            runner = export.OnnxClient(a.onnx, expect=dep)
        from PIL import Image
        written: dict[str, str] = {}
        try:
            for i in range(0, len(files), a.batch_size):
                batch = images[i:i + a.batch_size]
                extra = dep.client_extra(batch)
                outs = runner.run(batch, extra) if runner else dep.protect(batch, extra)
                for j, f in enumerate(files[i:i + a.batch_size]):
                    name = names[i + j]
                    sample = {k: v[j] for k, v in outs.items()}
                    _write_new(os.path.join(a.out, name + ".npz"),
                               lambda fh: save_protected(fh, dep, sample, backend="onnxruntime" if runner else "jax"))
                    written[name + ".npz"] = os.path.abspath(f)
                    if preview:
                        png = Image.fromarray(preview_image(sample["x_p"]))
                        _write_new(os.path.join(a.out, name + ".xp.png"), lambda fh: png.save(fh, "PNG"))
        finally:
            if manifest is not None and written:  # even after a failure: what was written stays traceable
                _update_manifest(manifest, written, a.out)
    except DeployError as e:
        print(f"ppfr-protect: error: {e}", file=sys.stderr)
        return 2
    where = (f"; which image each came from: {manifest} (keep it on this machine: it names the people)"
             if manifest else "; named after the input images (--keep-names)")
    print(f"ppfr-protect: {len(files)} protected file(s) in {a.out} ({dep.method}, client {dep.client_fingerprint}, "
          f"{'onnxruntime' if runner else 'jax'}; from {dep.source}){where}")
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    """``ppfr-verify``: two protected files -> cosine score and same / different person (exit 0)."""
    p = argparse.ArgumentParser(prog="ppfr-verify", description=(
        "Run the server half of a run on two files written by ppfr-protect and decide whether they show the "
        "same person (cosine similarity of the embeddings >= threshold)."))
    _add_run_args(p)
    p.add_argument("a", help="protected file (.npz)")
    p.add_argument("b", help="protected file (.npz)")
    p.add_argument("--threshold", type=_finite_float, default=None,
                   help=f"cosine threshold (default: the run's results.json, else {DEFAULT_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)
    try:
        for f in (a.a, a.b):  # cheap checks first: a typo should not wait for a model
            load_protected(f)
        dep = _deployment_from_args(a)
        ta, _ = load_protected(a.a, dep)
        tb, _ = load_protected(a.b, dep)
    except DeployError as e:
        print(f"ppfr-verify: error: {e}", file=sys.stderr)
        return 2
    batch = {k: np.stack([ta[k], tb[k]]) for k in dep.tensor_shapes}
    emb = dep.embed(batch)
    score = cosine(emb[0], emb[1])
    thr, where = resolve_threshold(a.workdir, a.threshold)
    same = score >= thr
    if a.json:
        print(json.dumps({"a": a.a, "b": a.b, "score": score, "threshold": thr, "threshold_source": where,
                          "same": bool(same), "method": dep.method}))
    else:
        print(f"{a.a} vs {a.b}: cosine {score:.4f}, threshold {thr:.3f} ({where}) -> "
              f"{'same person' if same else 'different people'}")
    return 0


if __name__ == "__main__":
    sys.exit(protect_main())
