"""A trained run's client and server halves, ready to run: :func:`load_deployment` -> :class:`Deployment`.

A deployable run is one whose ``config.task`` a method's split lists
(``methods.TASK_METHOD``: DuetFace ``duetface``, MinusFace ``minusface_stage2``).
Its variables are split with the method's contract (``methods.METHODS``)
without rebuilding the training task, so the warm-up / stage-1 run it was
started from is not needed. ``Deployment.protect(images)`` runs the client
(images (B, 112, 112, 3) uint8 or float in [-1, 1] -> {name: (B, ...)} numpy),
``Deployment.embed(transmitted)`` the server (-> (B, E) float32).

The client's non-image input is drawn on the host (:class:`ClientInput`):
DuetFace's ROI (the run's ``eval_roi_source``: the template hull, or the hull
of the frozen PFLD's landmarks), MinusFace's permutations, fresh from the OS's
entropy on every call (:func:`fresh_permutations`) and never stored.

Errors: :class:`DeployError` (a ``ValueError``) naming the run, config, image or
input that is unusable.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppfr_jax import checkpoints, config_lib, frequency, methods, roi
from ppfr_jax.errors import PpfrError
from ppfr_jax.methods import duetface
from ppfr_jax.methods.contract import MissingVariables
from ppfr_jax.models import pfld
from ppfr_jax.models.layers import rbg_init_key

METHOD_NAMES = tuple(methods.METHODS)
IMAGE_SIZE = 112


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


# ----------------------------------------------------------------------------- images, variables


def check_images(images) -> np.ndarray:
    """Aligned faces (B, 112, 112, 3), as numpy; raises DeployError otherwise."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DeployError(f"images must be aligned faces (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}")
    return images


def normalize_images(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (``tasks.normalize_images`` on the host); float is taken as normalised."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


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


# ----------------------------------------------------------------------------- the client's non-image input


class ClientInput:
    """The client's second input, drawn on the host: ``draw(images, rng)``, ``check(extra, batch)``,
    ``describe()`` (ONNX metadata) and ``preview`` (the output worth a PNG, or None)."""

    preview: str | None = None

    def draw(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError

    def check(self, extra, batch: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        return {}


class RoiInput(ClientInput):
    """DuetFace: the facial ROI (B, 112, 112) float32 in {0, 1}, from the template hull or PFLD landmarks."""

    def __init__(self, roi_source: str, pfld_variables: dict | None = None):
        self.roi_source = roi_source
        self.pfld_variables = pfld_variables

    def draw(self, images, rng=None):
        b = len(images)
        if self.roi_source == "template":
            return np.broadcast_to(roi.template_mask(), (b, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        return np.asarray(self._pfld_roi(self.pfld_variables, normalize_images(images)))

    @functools.cached_property
    def _pfld_roi(self):
        @jax.jit
        def f(v, x):
            _, lm = pfld.PFLDInference().apply(v, x * 0.5 + 0.5, train=False)  # PFLD takes [0, 1]
            return roi.landmark_mask(lm.reshape(x.shape[0], -1, 2))
        return f

    def check(self, extra, batch):
        if np.shape(extra) != (batch, IMAGE_SIZE, IMAGE_SIZE):
            raise DeployError(f"roi_mask must have shape {(batch, IMAGE_SIZE, IMAGE_SIZE)}, got {np.shape(extra)}")
        return extra

    def describe(self):
        return {"ppfr.roi_source": self.roi_source}


class PermutationInput(ClientInput):
    """MinusFace: fresh permutations (B, n_duplicate, 192) int32 from the OS's entropy on every call."""

    preview = "x_p"

    def __init__(self, n_duplicate: int):
        self.n_duplicate = n_duplicate

    def draw(self, images, rng=None):
        return fresh_permutations(len(images), self.n_duplicate, rng=rng)

    def check(self, extra, batch):
        return check_permutations(extra, batch, self.n_duplicate)

    def describe(self):
        return {"ppfr.permutations": "fresh per image from OS entropy (ppfr_jax.deploy.fresh_permutations)"}


def _duetface_input(config, variables, source) -> ClientInput:
    d = config.duetface
    roi_source = d.get("eval_roi_source", "") or ("template" if d.roi_source == "dataset" else d.roi_source)
    if roi_source not in ("template", "pfld"):
        raise DeployError(f"{source}: config.duetface.eval_roi_source={roi_source!r}; a deployment needs "
                          f"'template' (aligned faces) or 'pfld'")
    pfld_vars = None
    if roi_source == "pfld":
        pfld_vars = (variables or {}).get("frozen", {}).get("pfld")
        if pfld_vars is None:
            try:
                pfld_vars = duetface.load_pfld_variables(d.get("pfld_checkpoint", ""))
            except FileNotFoundError as e:
                raise DeployError(f"{source}: the ROI comes from PFLD landmarks (eval_roi_source 'pfld'): {e}; "
                                  f"or use the template ROI for aligned faces (configs/duetface.py:...,roi=template)"
                                  ) from None
    return RoiInput(roi_source, pfld_vars)


def _minusface_input(config, variables, source) -> ClientInput:
    return PermutationInput(int(config.minusface.get("n_duplicate", 1)))


CLIENT_INPUTS = {"duetface": _duetface_input, "minusface": _minusface_input}


# ----------------------------------------------------------------------------- the deployment


@dataclasses.dataclass(eq=False)
class Deployment:
    """The two halves of a deployable run. Build with :func:`load_deployment`.

    Attributes:
      method: a key of ``methods.METHODS`` ('duetface' | 'minusface').
      task: the run's ``config.task``.
      config: the run's config.
      split: the method's client/server contract (``methods.METHODS[method]`` instance).
      client_variables / server_variables: each half's variables only (numpy).
      source: where the weights came from (for messages).
      step: checkpoint step (None when untrained).
      client_input: the client's non-image input (ROI / permutations), drawn on the host.
    """

    method: str
    task: str
    config: ml_collections.ConfigDict
    split: Any
    client_variables: dict
    server_variables: dict
    source: str
    step: int | None = None
    client_input: ClientInput | None = None

    # -- description ---------------------------------------------------------------------------
    @property
    def model(self):
        return self.split.model

    @functools.cached_property
    def client_fingerprint(self) -> str:
        return fingerprint(self.client_variables)

    @property
    def input_names(self) -> tuple[str, str]:
        return tuple(self.split.input_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.split.output_names)

    def input_specs(self, batch: int | str = "B") -> list[jax.ShapeDtypeStruct]:
        """Client inputs: images (B, 112, 112, 3) float32 in [-1, 1], then the method's extra input."""
        return self.split.input_specs(batch)

    @functools.cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every transmitted tensor (no batch axis), in ``output_names`` order."""
        out = jax.eval_shape(self.client_fn, *self.input_specs(1))
        return {k: tuple(out[k].shape[1:]) for k in self.output_names}

    def describe(self) -> dict[str, str]:
        """Method-specific facts about the client (ONNX metadata)."""
        return {**self.client_input.describe(), **self.split.describe()}

    # -- pure functions (jit- and export-able) ----------------------------------------------------
    def client_fn(self, images, extra) -> dict:
        """Client half: images (B, 112, 112, 3) float in [-1, 1] + ROI / permutations -> {name: (B, ...)}."""
        return self.split.client_fn(self.client_variables, jnp.asarray(images, jnp.float32), extra)

    def server_fn(self, transmitted: Mapping[str, Any]) -> jax.Array:
        """Server half: the client's tensors {name: (B, ...)} -> embeddings (B, E) (not normalised)."""
        return self.split.server_fn(self.server_variables, transmitted)

    # -- host side -----------------------------------------------------------------------------
    def client_extra(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The client's non-image input for a batch: DuetFace ROI masks, MinusFace fresh permutations.

        images: (B, 112, 112, 3) uint8 or float in [-1, 1]. ``rng`` only for
        reproducible permutations (tests); None draws from the OS.
        """
        return self.client_input.draw(images, rng)

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
        images = normalize_images(check_images(images))
        if extra is None:
            extra = self.client_extra(images, rng)
        else:
            extra = self.client_input.check(extra, len(images))
        return {k: np.asarray(v) for k, v in self._client_jit(images, extra).items()}

    def embed(self, transmitted: Mapping[str, np.ndarray]) -> np.ndarray:
        """Server side in JAX: {name: (B, ...)} -> (B, E) float32 embeddings."""
        return np.asarray(self._server_jit({k: jnp.asarray(v, jnp.float32) for k, v in transmitted.items()}))


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
        source, step = f"untrained {config.get('task', '')} (seed {seed})", None
    else:
        raise DeployError("give a run (--workdir RUNDIR), or --config configs/...py:variant --untrained")
    if "pipeline" in config and "task" not in config:
        raise DeployError("the config is a whole pipeline (every stage of a method); deployment needs the stage "
                          "that serves: e.g. --config configs/duetface.py:server,demo, or --workdir "
                          "<pipeline workdir>/server (DuetFace) / <pipeline workdir>/stage2 (MinusFace)")
    task = config.get("task", "")
    if task not in methods.TASK_METHOD:
        raise DeployError(f"{source}: config.task={task!r} is not deployable; the client/server split exists for "
                          f"DuetFace server runs (task 'duetface') and MinusFace stage-2 runs ('minusface_stage2')")
    name = methods.TASK_METHOD[task]
    if method is not None and name != method:
        raise DeployError(f"--method {method}, but {source} is a {name} run (task {task!r})")
    client_input = CLIENT_INPUTS[name](config, variables, source)  # first: a missing PFLD should not wait for init
    split = methods.METHODS[name].from_config(config)
    trained = variables is not None
    if not trained:
        variables = jax.tree.map(np.asarray, jax.jit(split.init_variables)(rbg_init_key(seed)))
    try:
        client, server = split.split_variables(variables)
    except MissingVariables as e:
        raise DeployError(f"{source}: the checkpoint has no {e.path!r}; is it a finished run of this task?") from None
    if trained:
        _check_shapes((client, server), split.split_variables(jax.eval_shape(split.init_variables, rbg_init_key(0))),
                      source)
    return Deployment(name, task, config, split, client, server, source, step, client_input)


@functools.lru_cache(maxsize=4)
def cached_deployment(workdir, config_spec, untrained, seed, step, method) -> Deployment:
    """:func:`load_deployment` for the CLIs: repeated in-process calls (tests, notebooks) restore/initialise once."""
    return load_deployment(workdir, config=config_spec, untrained=untrained, seed=seed, step=step, method=method)
